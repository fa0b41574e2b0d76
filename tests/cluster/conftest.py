"""One local Ray + Serve for the whole cluster test session (starting Ray costs seconds).

Serve's HTTP proxy listens on ``HTTP_PORT`` of 127.0.0.1, where the tests' clients point: a free
port picked per session (``VATTN_TEST_HTTP_PORT`` fixes it), so two sessions on one machine do
not answer each other's requests. Each test module deploys its own application and deletes it when
done.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


HTTP_PORT = int(os.environ.get("VATTN_TEST_HTTP_PORT") or _free_port())
BASE_URL = f"http://127.0.0.1:{HTTP_PORT}"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
