"""One rank of a tensor-parallel replica: its place in the process group, its ModelRunner (its
shard of the weights and of the KV heads), and how it executes rank 0's messages.

:class:`RankWorker` is a plain class so any runtime can host it: a local process
(:class:`~replica.tp.runtime.LocalProcessRuntime` calls :meth:`RankWorker.run`), or a Ray actor
(which calls :meth:`RankWorker.execute` per message). Rank 0 builds one too, in the engine's
process, and the driver uses its runner, :meth:`agree` and :meth:`abort`.

Invariants:
    * every rank's KV cache has the same geometry, the same budget (the construction agrees on
      the smallest budget) and the same host tier size (rank 0 decides it before the ranks start:
      ``replica.tp.driver``), so replaying rank 0's page plan gives identical books;
    * every rank takes part in exactly the same collectives, in the same order: one all-reduce of
      the budget at start, then per model step one all-reduce of the status before the model and
      the model's own; a rank that fails inside the model leaves the group at once so that the
      others' pending collective fails instead of hanging.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from replica.engine_config import EngineConfig
from replica.engine_stats import RankKVSnapshot
from replica.kv.recording import replay
from replica.model.source import model_source
from replica.model_runner import ModelRunner
from replica.tp.plan import RankStatus, Shutdown, StatusCode, StepMessage, books

log = logging.getLogger(__name__)

#: Seconds a collective (or rank 0 waiting for a rank's answer) may take before it counts as lost.
TIMEOUT_ENV = "VATTN_TP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
#: Test hook: "<rank>:<step>:<phase>", see :class:`Fault`.
FAULT_ENV = "VATTN_TP_FAULT"
FAULT_PHASES = ("prepare", "model", "offload", "restore")


def default_timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


class InjectedFault(RuntimeError):
    """Raised by the ``VATTN_TP_FAULT`` test hook."""


@dataclass(frozen=True)
class Fault:
    """``VATTN_TP_FAULT="<rank>:<step>:<phase>"``: rank ``rank`` (>= 1) raises InjectedFault at
    message ``step``, in phase ``prepare`` (after replaying the page plan, before the model: the
    step fails and the replica goes on) or ``model`` (inside the forward, between collectives: the
    replica breaks); or from message ``step`` on, in every host-tier copy of phase ``offload`` or
    ``restore`` (``replica.kv.tier_faults``)."""

    rank: int
    step: int
    phase: str

    @classmethod
    def from_env(cls) -> Fault | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        rank, step, phase = spec.split(":")
        if phase not in FAULT_PHASES:
            raise ValueError(f"{FAULT_ENV}={spec!r}: the phase must be one of {FAULT_PHASES}")
        return cls(int(rank), int(step), phase)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """Rank ``rank``'s device: the configured one shifted by ``rank`` among the visible GPUs (a
    local group uses cuda:0..tp-1; a Ray actor sees one GPU and uses cuda:0), or the CPU."""
    base = config.torch_device()
    if base.type != "cuda":
        return base
    return torch.device("cuda", ((base.index or 0) + rank) % torch.cuda.device_count())


def rank_config(config: EngineConfig, rank: int, world_size: int) -> EngineConfig:
    return replace(config, rank=rank, world_size=world_size, device=str(rank_device(config, rank)))


class RankWorker:
    """Joins the group seeded at ``master_addr:master_port`` (rank 0 hosts it) and loads its shard.

    Blocks until all ``world_size`` ranks have joined and loaded; raises if any rank failed to
    load (each rank learns it from the budget all-reduce, where a failed rank contributes -1).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        engine_config: EngineConfig,
        timeout_s: float | None = None,
    ) -> None:
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process: one process hosts one "
                "rank of one tensor-parallel replica (shut the other engine down first)"
            )
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s or default_timeout()
        self.config = rank_config(engine_config, rank, world_size)
        self.device = self.config.torch_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=self.timeout_s),
        )
        self.group = dist.group.WORLD
        self._next_step = 0
        fault = Fault.from_env()
        self.fault = fault if fault is not None and fault.rank == rank and rank > 0 else None
        self._armed = False
        try:
            self.runner = self._load()
        except BaseException:
            self.shutdown()
            raise
        if self.fault is not None and self.fault.phase == "model":
            layers = self.runner.decoder_layers
            layers[len(layers) // 2].register_forward_pre_hook(self._model_fault)

    def _load(self) -> ModelRunner:
        runner: ModelRunner | None = None
        error: BaseException | None = None
        try:
            model_dir, model_config = model_source(self.config.model, self.config.synthetic)
            runner = ModelRunner(self.config, model_dir, model_config, process_group=self.group)
            budget = runner.kv_budget_bytes
        except Exception as caught:  # noqa: BLE001 - re-raised below, after the collective
            error, budget = caught, -1
        agreed = self._all_reduce(budget, dist.ReduceOp.MIN)
        if error is not None:
            raise error
        if agreed < 0 or runner is None:
            raise RuntimeError(f"rank {self.rank}: another rank failed to load its shard")
        if budget != agreed:  # e.g. free GPU memory differed by a few pages
            runner.rebuild_kv_cache(agreed)
        return runner

    def _all_reduce(self, value: int, op: Any) -> int:
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=op, group=self.group)
        return int(tensor.item())

    # ---- steps ---------------------------------------------------------------------------------
    def agree(self, code: StatusCode) -> StatusCode:
        """The worst status over all ranks (a collective: every rank calls it once per model
        step)."""
        return StatusCode(self._all_reduce(int(code), dist.ReduceOp.MAX))

    def status(
        self,
        step: int,
        code: StatusCode = StatusCode.OK,
        error: str | None = None,
        host_dropped: tuple[int, ...] = (),
    ) -> RankStatus:
        kv = self.runner.kv
        pages = int(kv.reclaimable_pages())
        return RankStatus(self.rank, step, code, pages, error, books(kv), host_dropped)

    def kv_snapshot(self) -> RankKVSnapshot:
        """This rank's cache: its books and the map latencies since the last call (drained)."""
        kv = self.runner.kv
        return RankKVSnapshot(self.rank, kv.stats(), tuple(kv.drain_map_latencies()))

    def ready(self) -> RankStatus:
        return self.status(-1)

    def execute(self, message: StepMessage) -> RankStatus:
        """Replays the page plan, agrees with the other ranks, runs the model (rank >= 1)."""
        code, error = StatusCode.OK, None
        dropped: tuple[int, ...] = ()  # host-tier blocks this rank dropped on its own
        if message.step != self._next_step:
            code, error = (
                StatusCode.BROKEN,
                f"got message {message.step}, expected {self._next_step}",
            )
        else:
            self._next_step += 1
            self._arm_tier_fault(message.step)
            try:
                dropped = replay(self.runner.kv, message.page_plan)
            except Exception as caught:
                log.exception("rank %d failed replaying the page plan", self.rank)
                code, error = StatusCode.BROKEN, self._describe("replaying the page plan", caught)
        if message.plan is None:
            return self.status(message.step, code, error, dropped)
        if code is StatusCode.OK and self._fault_now(message.step, "prepare"):
            code, error = (
                StatusCode.STEP_FAILED,
                self._describe("preparing", InjectedFault("injected fault")),
            )
        try:
            agreed = self.agree(code)
        except Exception as caught:
            log.exception("rank %d failed agreeing on the step's status", self.rank)
            return self.status(message.step, StatusCode.BROKEN, self._describe("agreeing", caught))
        if agreed is not StatusCode.OK:  # some rank failed: nobody runs the model this step
            return self.status(message.step, code, error, dropped)
        try:
            self._armed = self._fault_now(message.step, "model")
            self.runner.execute(message.plan)
        except Exception as caught:
            log.exception("rank %d failed running the model", self.rank)
            code, error = StatusCode.BROKEN, self._describe("running the model", caught)
            self.abort()
        finally:
            self._armed = False
        return self.status(message.step, code, error, dropped)

    def run(self, conn: Connection) -> None:
        """The loop of a rank hosted in its own process: execute each message, answer its status;
        returns on Shutdown, when rank 0 has gone, or once this rank is broken."""
        try:
            while True:
                try:
                    message = conn.recv()
                except EOFError:
                    return
                if isinstance(message, Shutdown):
                    return
                status = self.execute(message)
                conn.send(status)
                if status.code is StatusCode.BROKEN:
                    return
        finally:
            self.shutdown()

    # ---- failures ------------------------------------------------------------------------------
    def _fault_now(self, step: int, phase: str) -> bool:
        return self.fault is not None and (self.fault.step, self.fault.phase) == (step, phase)

    def _arm_tier_fault(self, step: int) -> None:
        """From the fault's message on, this rank's host-tier copies of its phase raise."""
        faults = self.runner.kv.tier_faults
        fault = self.fault
        if fault is None or fault.phase not in ("offload", "restore") or step != fault.step:
            return
        if faults is not None:

            def inject(direction: str) -> None:
                if direction == fault.phase:
                    raise InjectedFault(f"injected {direction} fault on rank {self.rank}")

            faults.inject = inject

    def _model_fault(self, module: torch.nn.Module, args: Any) -> None:
        if self._armed:
            raise InjectedFault(f"injected fault in the model on rank {self.rank}")

    def _describe(self, doing: str, error: BaseException) -> str:
        return f"rank {self.rank} failed {doing}: {type(error).__name__}: {error}"

    def abort(self) -> None:
        """Leaves the process group now: peers blocked in a collective with this rank fail at
        once."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def shutdown(self) -> None:
        self.abort()
