"""The autoscaling benchmark's schedule and comparison, without a cluster."""

from __future__ import annotations

from benchmarks.bench_autoscaling import FULL, GPU, Workload, compare, schedule


def test_the_schedule_is_seeded_and_puts_long_prompts_in_the_step_only() -> None:
    workload = Workload(quiet_s=5, step_s=10, tail_s=5, short_rate=2, long_rate=1)
    arrivals = schedule(workload, vocab_size=1000)
    assert arrivals == schedule(workload, vocab_size=1000)
    assert [a.at_s for a in arrivals] == sorted(a.at_s for a in arrivals)
    longs = [a for a in arrivals if a.kind == "long"]
    assert longs and all(5 <= a.at_s < 15 for a in longs)
    assert all(workload.long_prompt[0] <= len(a.prompt) <= workload.long_prompt[1] for a in longs)
    assert all(10 <= t < 1000 for a in arrivals for t in a.prompt)
    assert any(a.at_s >= 15 for a in arrivals if a.kind == "short")  # the tail keeps going


def test_every_request_fits_the_context() -> None:
    for workload, deployment in (FULL, GPU):
        assert workload.long_prompt[1] + workload.long_output[1] <= deployment.max_model_len


def result(up: float | None, p99: float, replica_seconds: float) -> dict[str, object]:
    return {
        "first_scale_up_after_step_s": up,
        "ttft_s": {"p99": p99},
        "replica_seconds": replica_seconds,
        "errors": 0,
    }


def test_compare_reports_the_issue_targets() -> None:
    met = compare(
        {"kv-pressure": result(1.0, 2.0, 90), "ongoing-requests": result(4.0, 3.0, 100)}, 1.0
    )
    assert met["kv_reacts_earlier_by_s"] == 3.0 and met["p99_ttft_ongoing_over_kv"] == 1.5
    assert all(met["targets_met"].values())
    missed = compare(
        {"kv-pressure": result(None, 2.0, 120), "ongoing-requests": result(4.0, 2.2, 100)}, 1.0
    )
    assert not any(
        missed["targets_met"][k]
        for k in ("reacts_one_push_earlier", "p99_ttft_ratio_1_3", "replica_seconds_not_more")
    )
    # The ongoing-requests policy never scaling up counts as the KV policy reacting earlier.
    alone = compare(
        {"kv-pressure": result(2.0, 1.0, 90), "ongoing-requests": result(None, 3.0, 90)}, 1.0
    )
    assert alone["targets_met"]["reacts_one_push_earlier"]
