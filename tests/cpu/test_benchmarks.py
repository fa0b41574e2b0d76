"""Each benchmark runs end to end in its smoke size, so they keep working (timings are never
asserted: they live in benchmarks/results). The mapping smoke (seconds) runs by default; the engine
and soak smokes (tens of seconds on two cores) are marked ``slow``: ``pytest --run-slow`` or
``pytest -m slow`` runs them (tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(module: str, tmp_path: Path, *extra: str, timeout: float = 120) -> dict:
    """The benchmark's JSON; a smoke run still going after ``timeout`` seconds has hung."""
    subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(tmp_path), *extra],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    [path] = tmp_path.glob("*.json")
    return json.loads(path.read_text())


def test_mapping_benchmark_smoke(tmp_path: Path) -> None:
    result = run("benchmarks.bench_mapping", tmp_path, "--backend", "host", "--step-ms", "2")
    assert result["environment"]["backend"] == "host"
    assert {row["run_pages"] for row in result["batched"]} == {1, 8}
    assert all(row["wait_pct_of_step"] >= 0 for row in result["decode_overlap"])
    idle, loaded = result["under_load"]  # the driver's costs idle, then under a copy load
    assert (idle["load"], idle["launches"]) == ("idle", 0)
    assert loaded["load"] == "hbm" and loaded["launches"] >= 4  # busy while the timings ran
    assert all(row[key] > 0 for row in (idle, loaded) for key in ("create_us", "map_us_run16"))


def test_openai_serialize_benchmark_smoke(tmp_path: Path) -> None:
    result = run("benchmarks.bench_openai_serialize", tmp_path)
    assert result["same_content"]
    for workload in ("content", "logprobs"):
        assert set(result["results"][workload]) == {"dicts", "openai-types", "ours"}


@pytest.mark.slow
@pytest.mark.parametrize("modes", ["vattention,paged,paged-eager,vattention-sync,hf"])
def test_engine_benchmark_smoke(tmp_path: Path, modes: str) -> None:
    result = run("benchmarks.bench_engine", tmp_path, "--modes", modes, timeout=600)
    decode = {row["mode"]: row for row in result["results"]["decode"]}
    assert set(decode) == {
        "vattention",
        "paged",
        "paged-eager",
        "vattention-sync",
        "hf-transformers-generate",
    }
    assert not decode["vattention"]["cuda_graphs"]  # CPU: no graphs, the same engine otherwise
    assert decode["vattention"]["generated_tokens"] == decode["paged"]["generated_tokens"] == 4 * 24
    assert decode["vattention-sync"]["generated_tokens"] == 4 * 24
    assert "decode_step" in decode["vattention"] and decode["vattention"]["profile_top_ops"]
    # The engine's default host tier (off on a CPU), recorded with what each row pinned.
    assert result["settings"]["offload_gib"] is None
    assert decode["vattention"]["host_tier_bytes"] == decode["paged"]["host_tier_bytes"] == 0


@pytest.mark.slow
def test_engine_benchmark_records_its_host_tier(tmp_path: Path) -> None:
    """``--offload-gib`` gives every mode a tier; each row records the bytes it pinned."""
    extra = ("--modes", "vattention,paged", "--workloads", "decode", "--offload-gib", "0.001")
    result = run("benchmarks.bench_engine", tmp_path, *extra, timeout=600)
    assert result["settings"]["offload_gib"] == 0.001
    for row in result["results"]["decode"]:
        assert 0 < row["host_tier_bytes"] <= 0.001 * (1 << 30), row


@pytest.mark.slow
def test_engine_benchmark_profiles_its_floor_cases_in_each_mode(tmp_path: Path) -> None:
    """``--floor --floor-modes vattention,paged --floor-profile``: a row per mode and case, each
    with its step against the floor's, the device's busy share and the host's stages."""
    extra = ("--workloads", "none", "--floor", "--floor-modes", "vattention,paged")
    result = run("benchmarks.bench_engine", tmp_path, *extra, "--floor-profile", timeout=600)
    rows = result["results"]["floor"]
    assert [(r["mode"], r["batch"]) for r in rows] == [
        ("vattention", 1),
        ("vattention", 4),
        ("paged", 1),
        ("paged", 4),
    ]
    for row in rows:
        assert row["step_ms"] > 0 and row["profile_top_ops"], row
        assert row["device_busy_share"] == 0.0  # a CPU: no device time
        assert row["host_profile"]["stages_cumulative_ms"], row


def test_floor_cases_parse_batch_by_context() -> None:
    from benchmarks.bench_engine import FLOOR_CASES, floor_cases

    assert floor_cases("1x1024,8x1024") == ((1, 1024), (8, 1024))
    assert floor_cases(None) == FLOOR_CASES
    with pytest.raises(SystemExit, match="BATCHxCONTEXT"):
        floor_cases("8-1024")


@pytest.mark.slow
def test_soak_smoke(tmp_path: Path) -> None:
    result = run("benchmarks.soak_gpu", tmp_path, timeout=600)["results"]
    machine, engine = result["state_machine"], result["engine"]
    assert machine["backend"] == "host" and machine["passed"] and machine["operations"] >= 2000
    assert engine["passed"] and engine["requests_finished"] > 0 and engine["errors"] == 0
    assert len(engine["phases"]) == 2
    for phase in engine["phases"]:
        assert phase["at_rest"]["pages_in_use"] == 0 and phase["pages_created_after_shrink"] == 0
