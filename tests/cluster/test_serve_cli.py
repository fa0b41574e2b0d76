"""``vattn serve`` as a user runs it: a subprocess that starts its own Ray, serves a model (a tiny
random Llama, to start fast), logs no line per request (no ``--verbose``), and stops cleanly on
SIGTERM while a stream is in flight: it exits 0 without Serve's "Controller failed to shut down"
(Serve's graceful shutdown, which it no longer waits for, would wait for every request). Slow: a
Ray of its own starts (~30-50 s on a loaded 2-core host)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_until
from tests.models import save_random_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_sigterm_stops_vattn_serve_with_a_stream_in_flight(tmp_path: Path) -> None:
    port = free_port()
    model = save_random_llama(tmp_path / "model", 0)
    log = (tmp_path / "serve.log").open("w+")
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own Ray, not the test session's
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--max-model-len",
            "512",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output = ""
    try:

        def ready() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            return "Ctrl-C stops it" in (tmp_path / "serve.log").read_text()

        wait_until(ready, 180, "vattn serve to print its URL", interval=0.5)
        short = {"prompt": [5, 6, 7], "max_tokens": 2}
        url = f"http://127.0.0.1:{port}/v1/completions"
        assert httpx.post(url, json=short, timeout=120).status_code == 200
        streamed = threading.Event()
        body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}

        def stream() -> None:
            try:
                with httpx.stream(
                    "POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120
                ) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            streamed.set()
            except httpx.HTTPError:
                pass  # the server goes away mid-stream: expected

        client = threading.Thread(target=stream, daemon=True)
        client.start()
        assert streamed.wait(120), "no token streamed"
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)  # a hang bound, not a timing: it used to take ~40 s or more
        output = (tmp_path / "serve.log").read_text()
        assert server.returncode == 0, output[-3000:]
        assert "stopped in" in output and "failed to shut down" not in output, output[-3000:]
        assert "POST /v1/completions" not in output  # quiet: no access log without --verbose
        client.join(30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
