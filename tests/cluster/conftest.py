"""One local Ray + Serve for the whole cluster test session (starting Ray costs seconds).

Serve's HTTP proxy listens on 127.0.0.1:8000, where the tests' OpenAI clients point. Each test
module deploys its own application and deletes it when done.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

HTTP_PORT = 8000
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
