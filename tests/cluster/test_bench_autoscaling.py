"""``benchmarks.bench_autoscaling --smoke`` end to end on the session's Ray and Serve (slow: two
deployments and their scale-down waits), so it keeps working; its timings are never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_autoscaling
from tests.cluster.conftest import HTTP_PORT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_autoscaling_benchmark_smoke(ray_session: None, tmp_path: Path) -> None:
    bench_autoscaling.main(["--smoke", "--out", str(tmp_path), "--port", str(HTTP_PORT)])
    [path] = tmp_path.glob("autoscaling-*.json")
    data = json.loads(path.read_text())
    requests = data["settings"]["schedule"]["requests"]
    assert set(data["results"]) == {"kv-pressure", "ongoing-requests"}
    for policy, result in data["results"].items():
        assert result["ok"] == requests and result["errors"] == 0, (policy, result)
        assert 1 <= result["min_replicas_seen"] <= result["max_replicas_seen"] <= 2
        assert result["replicas_over_time"] and result["replica_seconds"] > 0
        # The host tier each replica ran with (rank 0's gauge): the engine's default, off on a CPU.
        assert result["host_tier_bytes_by_replica"], policy
        assert set(result["host_tier_bytes_by_replica"].values()) == {0}, policy
    assert data["settings"]["deployment"]["kv_offload_bytes"] is None
    assert path.with_name(f"{path.stem}-replicas.png").exists()
