"""bench_prefix's think workload on the tiny model: conversations whose histories outgrow the KV
budget between turns, each mode without and with the host tier (and at the engine's default,
off on a CPU); with it, later turns find their history (restored, not computed), and the
TTFT-by-turn plot renders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import bench_prefix
from benchmarks.gpu_proof_parts import prefix_counts
from benchmarks.plots import prefix_turns


def test_the_think_workload_restores_histories_with_the_host_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["bench_prefix", "--smoke", "--workloads", "think", "--cache", "on"]
    argv += ["--offload-gib", "0,0.001,auto", "--kv-cache-gib", "0.0002", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_prefix.main()
    [result] = tmp_path.glob("prefix-smoke-*.json")
    data = json.loads(result.read_text())
    think = data["results"]["think"]
    # auto: the engine's default, off on a CPU; every row records the size it ran with.
    auto = [r for r in think if r["host_tier_auto"]]
    assert [(r["host_tier_gib"], r["host_tier_bytes"]) for r in auto] == [(0, 0), (0, 0)]
    rows = {(r["mode"], r["host_tier_gib"] > 0): r for r in think if not r["host_tier_auto"]}
    assert set(rows) == {
        ("vattention", False),
        ("vattention", True),
        ("paged", False),
        ("paged", True),
    }
    assert 0 < rows[("paged", True)]["host_tier_bytes"] <= 0.001 * (1 << 30)
    for mode in ("vattention", "paged"):
        plain, tiered = rows[(mode, False)], rows[(mode, True)]
        assert plain["host_restored_bytes"] == 0 and tiered["host_restored_bytes"] > 0
        assert tiered["prefix_hits_tokens"] > plain["prefix_hits_tokens"]
        assert tiered["prefix_host_hits_tokens"] > 0
        assert len(tiered["ttft_mean_s_by_turn"]) == data["workloads"]["think"]["turns"]
        # Each turn's queueing is part of its TTFT (arrival to the first step that ran it).
        pairs = zip(tiered["queue_mean_s_by_turn"], tiered["ttft_mean_s_by_turn"], strict=True)
        assert all(0 <= queued <= ttft for queued, ttft in pairs)
    assert prefix_turns(data, tmp_path / "turns.png").stat().st_size > 0


def test_warm_up_runs_before_each_timed_run_and_is_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, int, bool]] = []
    real_run = bench_prefix.run

    def recording_run(mode, layout, prefix_cache, shape, args, offload_gib=0.0, borrow=False):  # type: ignore[no-untyped-def]
        calls.append((mode, args.conversations, shape.turns, shape.burst))
        return real_run(mode, layout, prefix_cache, shape, args, offload_gib, borrow)

    monkeypatch.setattr(bench_prefix, "run", recording_run)
    argv = ["bench_prefix", "--smoke", "--workloads", "chat", "--cache", "on", "--warmup", "on"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    bench_prefix.main()
    # Each timed run (4 conversations of 3 turns) follows a one-turn burst of 2 on its own engine.
    assert calls == [
        ("vattention", 2, 1, True),
        ("vattention", 4, 3, False),
        ("paged", 2, 1, True),
        ("paged", 4, 3, False),
    ]
    [result] = tmp_path.glob("prefix-smoke-*.json")
    rows = json.loads(result.read_text())["results"]["chat"]
    assert [(r["mode"], r["requests"]) for r in rows] == [("vattention", 12), ("paged", 12)]


def test_a_burst_runs_with_and_without_borrowed_reads_and_the_proof_compares_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--borrow off,on``: the vAttention mode runs the burst both ways (the paged mode once),
    hits are borrowed only where asked, and the proof's counts carry a row per borrow setting."""
    argv = ["bench_prefix", "--smoke", "--workloads", "burst", "--cache", "on"]
    monkeypatch.setattr(sys, "argv", [*argv, "--borrow", "off,on", "--out", str(tmp_path)])
    bench_prefix.main()
    [result] = tmp_path.glob("prefix-smoke-*.json")
    rows = json.loads(result.read_text())["results"]["burst"]
    assert [(r["mode"], r["prefix_borrow"]) for r in rows] == [
        ("vattention", False),
        ("vattention", True),
        ("paged", False),
    ]
    assert [r["prefix_borrows"] > 0 for r in rows] == [False, True, False]
    assert rows[0]["prefix_hits_tokens"] == rows[1]["prefix_hits_tokens"] > 0
    counts, layout = prefix_counts("burst", rows), rows[0]["kv_layout"]
    assert f"burst_{layout}_ttft1_over_paged" in counts
    assert f"burst_{layout}_borrow_ttft1_over_paged" in counts
