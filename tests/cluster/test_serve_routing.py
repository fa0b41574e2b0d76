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
from tests.cluster.helpers import replica_stats, router_decisions
from tests.helpers import wait_until
from tests.models import save_random_llama

pytestmark = pytest.mark.integration
APP = "routing"
PAGE = 64 * 1024  # 16 tokens per page and range; K and V ranges: 8 tokens per physical page
BUDGET_PAGES = 128  # 1,024 tokens per replica


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_llama(
        tmp_path_factory.mktemp("routing-model"),
        0,
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=2048,
    )


@pytest.fixture(scope="module")
def two_replicas(ray_session: None, model_dir: Path) -> Iterator[None]:
    app = build_app(
        {
            "model": str(model_dir),
            "replicas": 2,
            "max_model_len": 1024,
            "max_running": 8,
            "kv_cache_bytes": BUDGET_PAGES * PAGE,
            "page_size": PAGE,
            "routing_stats_period_s": 0.2,
            "replica_cpus": 1,
        }
    )
    serve.run(app, name=APP, route_prefix="/")
    try:
        yield
    finally:
        serve.delete(APP)


def complete(prompt: list[int], max_tokens: int) -> tuple[str, float]:
    response = httpx.post(
        f"{BASE_URL}/v1/completions",
        timeout=120,
        json={
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        },
    )
    assert response.status_code == 200, response.text
    return response.headers["x-vattn-replica"], time.monotonic()


def test_new_requests_avoid_the_replica_near_its_budget(
    two_replicas: None, model_dir: Path
) -> None:
    def ranked_warm_up() -> bool:
        """A short request, ranked by free pages? (It is once the router holds both replicas'
        stats; until then it falls back to power of two choices.)"""
        complete([5, 6, 7], 2)
        return router_decisions(model_dir.name).get("most_free_pages", 0) >= 1

    wait_until(ranked_warm_up, 30, "a request ranked on both replicas' routing stats")
    generated = {r: s["generation_tokens_total"] for r, s in replica_stats(APP, 2).items()}
    long_result: list[tuple[str, float]] = []
    # 700 prompt + 250 output tokens: about 119 of the replica's 128 pages, for a few seconds.
    worker = threading.Thread(target=lambda: long_result.append(complete([9] * 700, 250)))
    worker.start()

    def prefilled() -> str | None:
        """The replica running the long request once its prefill is done (a token generated):
        its pages are taken, and its routing stats (every 0.2 s) show them from its admission on."""
        now = replica_stats(APP, 2)
        return next(
            (
                r
                for r, s in now.items()
                if s["running"] == 1 and s["generation_tokens_total"] > generated[r]
            ),
            None,
        )

    busy = wait_until(prefilled, 60, "the long request's prefill")
    shorts = [complete([11, 12, 13, 14], 8) for _ in range(8)]
    last_short = shorts[-1][1]
    worker.join()
    long_replica, long_done = long_result[0]
    assert long_done > last_short, (
        "the long request ended before the short ones ran: nothing was tested"
    )
    assert long_replica == busy
    assert all(replica != long_replica for replica, _ in shorts), (long_replica, shorts)
