"""How the other ranks of a tensor-parallel replica are started and reached (rank 0 is the caller).

:class:`RankRuntime` is the seam: the engine only needs a runtime that starts ranks
``1..world_size-1`` as :class:`~replica.tp.worker.RankWorker`\\ s, hands each a message, and
brings back their statuses. :class:`LocalProcessRuntime` spawns one process per rank on this
machine and talks to each over an authenticated local connection; a Ray runtime would create one
actor per rank and call ``RankWorker.execute`` remotely.

The control plane (messages, statuses) never goes through torch.distributed: a rank waiting for
its next message waits on its pipe, with no collective pending, however long the engine idles.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import torch

from replica.engine_config import EngineConfig
from replica.tp.plan import RankStatus, Shutdown, StatusCode, StepMessage
from replica.tp.worker import RankWorker, default_timeout

log = logging.getLogger(__name__)


class RankRuntime(ABC):
    """Starts and reaches ranks ``1..world_size-1`` of one replica.

    Protocol: ``start`` once; then ``collect`` their ready statuses (step -1); then, for every
    message, ``broadcast`` it and ``collect`` exactly one status per rank; at the end ``stop``
    (the ranks start leaving) and ``shutdown`` (wait for them; also after a failure; idempotent).
    Between the two rank 0 leaves the process group: with NCCL, leaving can wait for the peers.
    """

    @abstractmethod
    def start(self, world_size: int, engine_config: EngineConfig) -> tuple[str, int]:
        """Launches the other ranks without waiting for them; returns ``(address, port)`` where
        rank 0 hosts torch.distributed's rendezvous. Rank r runs
        ``RankWorker(r, world_size, address, port, engine_config)`` and answers its ``ready()``
        status, or a BROKEN status with the error if it could not start."""

    @abstractmethod
    def broadcast(self, message: StepMessage) -> None:
        """Hands ``message`` to every other rank; does not wait. Raises if a rank is gone."""

    @abstractmethod
    def collect(self, timeout_s: float) -> list[RankStatus]:
        """One status per other rank, in rank order. A rank that does not answer within
        ``timeout_s`` seconds (all ranks together), or has gone, gets a BROKEN status saying so."""

    @abstractmethod
    def stop(self) -> None:
        """Tells every other rank to leave the group and end (Shutdown); does not wait."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stops the other ranks (``stop`` if not done yet), waits a little, then ends them by
        force. Idempotent."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


#: The connection's secret, handed to each rank's process in its environment (not its argv).
AUTHKEY_ENV = "VATTN_TP_AUTHKEY"


def rank_main() -> None:
    """A local rank's process (``python -c "from replica.tp.runtime import rank_main; rank_main()"
    RANK WORLD MASTER_ADDR MASTER_PORT HOST PORT``): connect to rank 0, build the worker, report
    ready (or why not), serve messages until Shutdown or until rank 0 goes away."""
    rank, world_size, master_port, port = (int(sys.argv[i]) for i in (1, 2, 4, 6))
    master_addr, host = sys.argv[3], sys.argv[5]
    conn = Client((host, port), authkey=bytes.fromhex(os.environ.pop(AUTHKEY_ENV)))
    conn.send(rank)
    config, timeout_s, threads = conn.recv()
    if threads:
        torch.set_num_threads(threads)
    try:
        worker = RankWorker(rank, world_size, master_addr, master_port, config, timeout_s=timeout_s)
    except BaseException as error:
        log.exception("rank %d could not start", rank)
        conn.send(
            RankStatus(
                rank,
                -1,
                StatusCode.BROKEN,
                0,
                f"rank {rank} could not start: {type(error).__name__}: {error}",
            )
        )
        return
    conn.send(worker.ready())
    worker.run(conn)


class LocalProcessRuntime(RankRuntime):
    """One process per rank on this machine: gloo on CPU, NCCL on GPU (rank r on the r-th GPU
    after the configured one); torch.distributed's rendezvous on a free port of ``address``.

    Ranks are fresh interpreters (``python -c``), not multiprocessing children: the caller's
    ``__main__`` is never re-imported, so ``LLM(model, tp=2)`` needs no ``if __name__ ==
    "__main__"`` guard. They inherit this process's environment (``NCCL_*`` variables included).
    ``threads`` sets each rank's torch CPU threads (default on CPU: the cores shared out evenly).
    """

    def __init__(
        self, timeout_s: float | None = None, threads: int | None = None, address: str = "127.0.0.1"
    ) -> None:
        self.timeout_s = timeout_s or default_timeout()
        self.threads = threads
        self.address = address
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: dict[int, Connection] = {}
        self._listener: Listener | None = None
        self._accepting: threading.Thread | None = None
        self._stopped = False

    def start(self, world_size: int, engine_config: EngineConfig) -> tuple[str, int]:
        if self._procs:
            raise RuntimeError("this runtime has already started its ranks")
        port = free_port(self.address)
        threads = self.threads
        if threads is None and not torch.cuda.is_available():
            threads = max(1, torch.get_num_threads() // world_size)
        authkey = secrets.token_bytes(32)
        listener = self._listener = Listener((self.address, 0), authkey=authkey)
        host, listen_port = listener.address
        root = str(Path(__file__).resolve().parents[2])  # so `replica` imports in the rank
        env = {
            **os.environ,
            AUTHKEY_ENV: authkey.hex(),
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        }
        for rank in range(1, world_size):
            self._procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        "from replica.tp.runtime import rank_main; rank_main()",
                        str(rank),
                        str(world_size),
                        self.address,
                        str(port),
                        host,
                        str(listen_port),
                    ],
                    env=env,
                )
            )
        setup = (engine_config, self.timeout_s, threads)
        self._accepting = threading.Thread(
            target=self._accept, args=(listener, world_size - 1, setup), daemon=True
        )
        self._accepting.start()
        return self.address, port

    def _accept(self, listener: Listener, count: int, setup: object) -> None:
        try:
            for _ in range(count):
                conn = listener.accept()
                rank = int(conn.recv())
                conn.send(setup)
                self._conns[rank] = conn
        except (OSError, EOFError, AuthenticationError):
            pass  # _stop_accepting woke us: a rank never connected
        finally:
            listener.close()

    def _connected(self, deadline: float) -> None:
        """Waits (until ``deadline``) for every rank to connect, unless one has exited."""
        while self._accepting is not None and self._accepting.is_alive():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                self._stop_accepting()
                break
            self._accepting.join(0.05)

    def _stop_accepting(self) -> None:
        """Wakes the accepting thread with a connection that fails authentication."""
        if self._listener is None or self._accepting is None or not self._accepting.is_alive():
            return
        try:
            socket.create_connection(self._listener.address, timeout=1.0).close()
        except OSError:
            pass
        self._accepting.join(1.0)

    def broadcast(self, message: StepMessage) -> None:
        for rank in range(1, len(self._procs) + 1):
            self._conns[rank].send(message)  # KeyError: that rank never connected

    def collect(self, timeout_s: float) -> list[RankStatus]:
        deadline = time.monotonic() + timeout_s
        self._connected(deadline)
        statuses = []
        for rank, proc in enumerate(self._procs, start=1):
            conn = self._conns.get(rank)
            try:
                if conn is not None and conn.poll(max(0.0, deadline - time.monotonic())):
                    statuses.append(conn.recv())
                    continue
                why = f"rank {rank} gave no answer within {timeout_s:.0f} s"
            except (EOFError, OSError):
                why = "has gone"
            if proc.poll() is not None or why == "has gone":
                try:
                    proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
                why = f"rank {rank} has gone (exit code {proc.returncode})"
            statuses.append(RankStatus(rank, -2, StatusCode.BROKEN, 0, why))
        return statuses

    def stop(self) -> None:
        self._stop_accepting()
        for conn in self._conns.values():
            try:
                conn.send(Shutdown())
            except OSError:
                pass  # that rank has gone already
        self._stopped = True

    def shutdown(self) -> None:
        if not self._stopped:
            self.stop()
        for proc in self._procs:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                log.warning("rank process %d did not stop; terminating it", proc.pid)
                proc.terminate()
                try:
                    proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5.0)
        for conn in self._conns.values():
            conn.close()
        self._procs, self._conns, self._listener = [], {}, None
        self._stopped = False
