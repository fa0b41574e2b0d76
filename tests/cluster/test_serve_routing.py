"""Routing on a live cluster: two replicas of a small random model; while one holds a long
request near its page budget, new requests go to the other."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from cluster.app import build_app
from tests.cluster.conftest import BASE_URL
from tests.models import save_random_llama

pytestmark = pytest.mark.integration
PAGE = 64 * 1024  # 16 tokens per page and range; K and V ranges: 8 tokens per physical page
BUDGET_PAGES = 128  # 1,024 tokens per replica


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_llama(tmp_path_factory.mktemp("routing-model"), 0, vocab_size=2048, hidden_size=512,
                             intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                             max_position_embeddings=2048)


@pytest.fixture(scope="module")
def two_replicas(ray_session: None, model_dir: Path) -> Iterator[None]:
    app = build_app({
        "model": str(model_dir), "replicas": 2, "max_model_len": 1024, "max_running": 8,
        "kv_cache_bytes": BUDGET_PAGES * PAGE, "page_size": PAGE, "routing_stats_period_s": 0.2,
        "replica_cpus": 1,
    })
    serve.run(app, name="routing", route_prefix="/")
    try:
        yield
    finally:
        serve.delete("routing")


def complete(prompt: list[int], max_tokens: int) -> tuple[str, float]:
    response = httpx.post(f"{BASE_URL}/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
    })
    assert response.status_code == 200, response.text
    return response.headers["x-vattn-replica"], time.monotonic()


def test_new_requests_avoid_the_replica_near_its_budget(two_replicas: None) -> None:
    complete([5, 6, 7], 2)  # both replicas report stats by now
    time.sleep(1.0)
    long_result: list[tuple[str, float]] = []
    # 700 prompt + 250 output tokens: about 119 of the replica's 128 pages, for a few seconds.
    worker = threading.Thread(target=lambda: long_result.append(complete([9] * 700, 250)))
    worker.start()
    time.sleep(1.5)  # prefill done and the stats (every 0.2 s) show the pages taken
    shorts = [complete([11, 12, 13, 14], 8) for _ in range(8)]
    last_short = shorts[-1][1]
    worker.join()
    long_replica, long_done = long_result[0]
    assert long_done > last_short, "the long request ended before the short ones ran: nothing was tested"
    assert all(replica != long_replica for replica, _ in shorts), (long_replica, shorts)
