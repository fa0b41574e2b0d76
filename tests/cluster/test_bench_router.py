"""``benchmarks.bench_router --smoke`` end to end on the session's Ray and Serve, so CI keeps it
working (its timings are never asserted: they live in benchmarks/results).

The chat workload's smoke runs by default (``bench_router.main``: deploying each router's app,
replaying, reading the replicas' books and the router's tally); the arrival-schedule smoke (about a
minute on two cores: two more deployments of the embedded model) is marked ``slow``, like the other
benchmarks' smokes of tens of seconds (``pytest --run-slow``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_router
from tests.cluster.conftest import HTTP_PORT

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_router_benchmark_smoke(ray_session: None, tmp_path: Path) -> None:
    bench_router.main(["--smoke", "--out", str(tmp_path), "--port", str(HTTP_PORT)])
    [path] = tmp_path.glob("router-*.json")
    [run] = json.loads(path.read_text())["runs"]  # the smoke test runs one arrival rate
    requests = run["schedule"]["requests"]
    assert set(run["results"]) == {"free-pages", "power-of-two"}
    for router, r in run["results"].items():
        assert r["ok"] == requests and r["errors"] == 0, (router, r["error_samples"])
        assert r["replicas_at_rest_after"], router
        assert (
            sum(s["generation_tokens_total"] for s in r["replicas"].values())
            == r["completion_tokens"]
        )
    decisions = run["results"]["free-pages"]["router_decisions"]["by_reason"]
    # One per routing attempt: the ranked rule or its fallback.
    assert sum(decisions.values()) >= requests
    assert decisions.get("most_free_pages", 0) > 0
    by_reason = run["results"]["power-of-two"]["router_decisions"]["by_reason"]
    assert by_reason == {}  # Serve's router: no tally


def test_router_benchmark_chat_smoke(ray_session: None, tmp_path: Path) -> None:
    """Multi-turn chat through ours and Ray Serve LLM's prefix-affinity router: every turn
    answered, the second turns read back their history and find part of it cached."""
    routers = "free-pages,prefix-affinity"
    argv = ["--workload", "chat", "--smoke", "--routers", routers]
    bench_router.main([*argv, "--out", str(tmp_path), "--port", str(HTTP_PORT)])
    [path] = tmp_path.glob("router-prefix-*.json")
    data = json.loads(path.read_text())
    turns = data["schedule"]["conversations"] * data["schedule"]["turns"]
    assert set(data["results"]) == {"free-pages", "prefix-affinity"}
    for router, r in data["results"].items():
        assert r["ok"] == turns and r["failed"] == 0, (router, r["error_samples"])
        assert r["replicas_at_rest_after"], router
        assert r["hit_rate"] > 0 and 0 < r["theoretical_hit_rate"] <= 1, router
        assert r["hit_rate_of_theoretical"] <= 1.0, router
    decisions = data["results"]["free-pages"]["router_decisions"]["by_reason"]
    assert sum(decisions.values()) >= turns
    # The host tier each replica ran with: the engine's default, off on a CPU.
    assert data["settings"]["deployment"]["kv_offload_bytes"] is None
    for r in data["results"].values():
        assert [s["host_tier_bytes"] for s in r["replicas"].values()] == [0] * len(r["replicas"])
