"""Autoscaling on KV pressure on a live Ray Serve: 1 to 3 replicas of a small random Llama (the
embedded tokenizer's ids), each with a 512-token KV budget, autoscaling pushes every 0.25 s, up
after 0.5 s, down after 2 s.

A few long prompts (four of 200 tokens + 120 generated: twice one replica's pages, while four
ongoing requests would keep Serve's default policy at two replicas) scale the deployment up; a
trickle of short requests runs from the start to the end, so replicas are stopped while requests
are in flight. Every request completes; the deployment never leaves [1, 3]; it goes back to one
replica; the one left holds no page, and the stopped ones gave every page back before they went
(their last metrics push).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster.app import build_app
from tests.cluster.conftest import BASE_URL
from tests.cluster.helpers import Completion, replica_stats
from tests.helpers import wait_until
from tests.models import save_random_llama

pytestmark = pytest.mark.integration
APP = "autoscaling"
PAGE = 32 * 1024  # 16 tokens per page and range; K and V ranges: 8 tokens per physical page
BUDGET_PAGES = 64  # 512 tokens per replica
LONG_PROMPT, LONG_TOKENS = 200, 120
SHORT_PROMPT, SHORT_TOKENS = 8, 24


@pytest.fixture(scope="module")
def app(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model_dir: Path = save_random_llama(
        tmp_path_factory.mktemp("autoscaling-model"),
        0,
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        max_position_embeddings=1024,
    )
    serve.run(
        build_app(
            {
                "model": str(model_dir),
                "min_replicas": 1,
                "max_replicas": 3,
                "max_model_len": 512,
                "max_running": 8,
                "kv_cache_bytes": BUDGET_PAGES * PAGE,
                "page_size": PAGE,
                "routing_stats_period_s": 0.2,
                "metrics_period_s": 0.5,
                "autoscaling_metrics_interval_s": 0.25,
                "upscale_delay_s": 0.5,
                "downscale_delay_s": 2.0,
                "replica_cpus": 1,
            }
        ),
        name=APP,
        route_prefix="/",
    )
    try:
        yield model_dir.name
    finally:
        serve.delete(APP)


class ReplicaCounts(threading.Thread):
    """Serve's RUNNING replicas of the deployment, polled until ``stop``; ``seen`` keeps every
    count observed."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: list[int] = []
        self.done = threading.Event()
        self.start()

    def now(self) -> int:
        deployment = serve.status().applications[APP].deployments["VattnReplica"]
        return sum(n for state, n in deployment.replica_states.items() if state == "RUNNING")

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.seen.append(self.now())

    def latest(self) -> int:
        return self.seen[-1] if self.seen else 0


class Trickle(threading.Thread):
    """Short completions, two at a time, until ``done``; ``requests`` keeps every one."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.requests: list[Completion] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        index = 0
        while not self.done.is_set():
            pair = [
                Completion([20 + (index + i) % 50] * SHORT_PROMPT, SHORT_TOKENS, stream=i == 0)
                for i in range(2)
            ]
            self.requests += pair
            index += 2
            for request in pair:
                request.ended.wait()


def metric(name: str, model: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{BASE_URL}/metrics", timeout=10).text
    return {
        tuple(sorted((k, v) for k, v in s.labels.items() if k != "model")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels.get("model") == model
    }


def test_kv_pressure_scales_up_and_back_down_losing_nothing(app: str) -> None:
    counts = ReplicaCounts()
    wait_until(lambda: counts.latest() == 1, 60, "the first replica")
    trickle = Trickle()
    long_requests: list[Completion] = []

    def fill() -> bool:
        """Keeps four long requests in flight; True once Serve runs more than one replica."""
        running = [r for r in long_requests if not r.ended.is_set()]
        for i in range(4 - len(running)):
            prompt = [100 + (len(long_requests) + i) % 900] * LONG_PROMPT
            long_requests.append(Completion(prompt, LONG_TOKENS, stream=True))
        return counts.latest() >= 2

    wait_until(fill, 120, "a scale-up under KV pressure", interval=0.2)
    for request in long_requests:
        assert request.ended.wait(120), request.describe()
    wait_until(lambda: counts.latest() == 1, 120, "the scale-down to one replica")
    trickle.done.set()
    trickle.join(120)
    counts.done.set()
    counts.join(10)

    failed = [r.describe() for r in long_requests + trickle.requests if not r.completed()]
    assert not failed, f"{len(failed)} requests did not complete:\n" + "\n".join(failed)
    assert len(trickle.requests) >= 2 and len(long_requests) >= 4
    assert 1 <= min(counts.seen) and max(counts.seen) <= 3, counts.seen

    # The replica left holds no page; the stopped ones pushed their books last: nothing created.
    [left] = replica_stats(APP, 1).values()
    wait_until(
        lambda: replica_stats(APP, 1)[left["replica"]]["kv"]["pages_in_use"] == 0,
        30,
        "the last replica's pages back at rest",
    )

    def stopped_replicas_created() -> dict[tuple[tuple[str, str], ...], float]:
        created = metric("vattn_kv_pages_created", app)
        return {k: n for k, n in created.items() if ("replica", left["replica"]) not in k}

    wait_until(
        lambda: stopped_replicas_created() and set(stopped_replicas_created().values()) == {0.0},
        60,
        "every stopped replica's last push: no KV page left created",
    )

    decisions = metric("vattn_autoscaler_decisions_total", app)
    assert decisions[(("reason", "kv_pressure"),)] >= 1, decisions
    assert decisions[(("reason", "low_demand"),)] >= 1, decisions
    wait_until(
        lambda: metric("vattn_autoscaler_desired_replicas", app) == {(): 1.0},
        30,
        "the autoscaler's desired replicas back at 1 on /metrics",
    )
