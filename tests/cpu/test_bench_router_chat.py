"""``bench_router --workload chat`` without a cluster: the conversations it replays, its summary
of the turns (hit rate against the theoretical one, next turns on the same replica) and the
report's table of it."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_router as bench
from benchmarks.load_test import Outcome
from benchmarks.report import router_tables

BLOCK = 16


def test_conversations_are_seeded_and_share_their_system_prompts() -> None:
    workload = bench.ChatWorkload(conversations=40, turns=3, system_weights=(3.0, 1.0))
    systems, convs = bench.conversations(workload, 4096)
    assert (systems, convs) == bench.conversations(workload, 4096)
    assert len(systems) == 2 and all(len(s) == workload.system_tokens for s in systems)
    assert len(convs) == 40 and convs[0].start_s == 0.0
    assert [c.start_s for c in convs] == sorted(c.start_s for c in convs)
    popular = sum(c.system == 0 for c in convs)
    assert 20 < popular < 40  # weights 3:1
    for conv in convs:
        assert [len(m) for m in conv.messages] == [64, 48, 48]
        assert len(conv.think_s) == 2
        assert all(100 <= t < 4096 for m in conv.messages for t in m)


def turn(conv: int, index: int, sent: float, prompt: tuple[int, ...], cached: int, replica: str):
    outcome = Outcome("ok", 200, 0.1 * (index + 1), 1.0, 4)
    return bench.ChatTurn(conv, index, sent, prompt, (7, 8, 9, 10), cached, replica, outcome)


def test_the_summary_sets_the_hit_rate_against_one_unbounded_cache() -> None:
    system = tuple(range(100, 100 + 3 * BLOCK))  # 3 blocks
    first = (*system, 1, 2)
    second = (*first, 7, 8, 9, 10, 3, 4)  # the first turn's history, its answer, a message
    turns = [
        turn(0, 0, 0.0, first, 0, "a"),
        turn(1, 0, 0.5, first, 3 * BLOCK, "b"),  # another conversation, same system prompt
        turn(0, 1, 2.0, second, 3 * BLOCK, "a"),
        turn(1, 1, 2.5, second, 0, "c"),  # moved: nothing cached
    ]
    failed = bench.Outcome("error", 500, None, 0.2, 0, "boom")
    turns.append(bench.ChatTurn(2, 0, 3.0, first, (), 0, None, failed))
    summary = bench.chat_summary(turns, 10.0, 2, expected_turns=6, tokens_per_block=BLOCK)
    assert summary["ok"] == 4 and summary["errors"] == 1
    assert summary["failed"] == 2 and summary["turns_not_sent"] == 1
    prompts = 2 * len(first) + 2 * len(second)
    assert summary["prompt_tokens"] == prompts
    # Ideal: the second first-turn finds the system prompt's 3 blocks; each second turn finds
    # its first turn's prompt and answer but the last token: 50 + 3 tokens, 3 whole blocks.
    assert summary["theoretical_hit_rate"] == 9 * BLOCK / prompts
    assert summary["hit_rate"] == 6 * BLOCK / prompts
    assert summary["hit_rate_of_theoretical"] == 6 / 9
    assert summary["next_turn_same_replica"] == 0.5
    assert abs(summary["ttft_s"]["mean"] - 0.15) < 1e-9
    assert summary["ttft_mean_s_by_turn"] == {"1": 0.1, "2": 0.2}


def test_the_comparison_and_the_report_table() -> None:
    def result(mean: float, hit: float) -> dict[str, object]:
        return {
            "ok": 8,
            "failed": 0,
            "ttft_s": {"mean": mean, "p50": mean, "p99": 2 * mean},
            "hit_rate": hit,
            "hit_rate_of_theoretical": hit / 0.9,
            "next_turn_same_replica": 1.0,
            "preemptions": 0,
            "prefix_evicted_pages": 3,
            "requests_per_s": 1.5,
            "output_tokens_per_s": 40.0,
            "router_decisions": {"by_reason": {}, "by_replica": {}},
        }

    results = {
        "free-pages": result(0.5, 0.85),
        "prefix-affinity": result(0.75, 0.86),
        "power-of-two": result(1.5, 0.6),
    }
    comparison = bench.compare_chat(results)
    assert comparison["mean_ttft_power-of-two_over_free_pages"] == 3.0
    assert comparison["mean_ttft_prefix-affinity_over_free_pages"] == 1.5
    assert comparison["power-of-two_target_met"] and comparison["prefix-affinity_target_met"]
    workload, deployment = bench.CHAT_SMOKE
    data = {
        "benchmark": "router-prefix",
        "environment": {
            "device": "CPU (x86_64)",
            "torch": "2",
            "python": "3.11",
            "date": "2026-12-02T00:00:00+00:00",
        },
        "settings": {
            "workload": bench.asdict(workload),
            "deployment": bench.asdict(deployment),
        },
        "schedule": {
            "conversations": 4,
            "turns": 2,
            "by_system_prompt": [4],
            "last_start_s": 0.4,
            "last_prompt_tokens": 68,
        },
        "results": results,
        "comparison": comparison,
    }
    lines = router_tables(Path("router-prefix-cpu-x86_64-2026-12-02.json"), data)
    rows = [line for line in lines if line.startswith("| free-pages")]
    assert rows == [
        "| free-pages | 8 | 0 | 500 | 500 | 1000 | 85.0% | 94% | 100% | 0 | 3 | 1.50 | 40.0 | – |"
    ]
    assert any("power-of-two 3.00x" in line for line in lines)
