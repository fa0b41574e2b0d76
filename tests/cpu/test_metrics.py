"""Snapshot → store → collector, without Ray: the series /metrics renders, their types, labels
and values; and the dashboards only use series that exist."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics.catalogue import METRICS
from cluster.metrics.render import MetricsExporter, RouterView
from cluster.metrics.snapshots import (
    MAX_PENDING_SAMPLES,
    AutoscalerSnapshot,
    EngineMetrics,
    RankSnapshot,
    ReplicaSnapshot,
    take_snapshot,
)
from cluster.metrics.store import HistogramData, MetricsStore
from cluster.metrics_hub import MetricsPusher
from replica import EngineConfig, LLMEngine, SamplingParams
from replica.kv.stats import KVCacheStats
from tests.models import save_random_llama

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "dashboards").glob("*.json"))


def kv_stats(**changes: float) -> dict[str, float]:
    stats = KVCacheStats(
        page_size_bytes=2 << 20,
        tokens_per_page=16.0,
        pages_total=100,
        pages_created=40,
        pages_free=10,
        pages_in_use=20,
        pages_cached=10,
        pages_available=80,
        wasted_bytes=12345,
        slots_running=3,
        slots_cached=2,
        map_calls=7,
        pages_mapped_total=30,
        map_seconds=0.01,
        wait_seconds=0.25,
        pages_released_total=5,
    )
    return dataclasses.replace(stats, **changes).as_dict()  # type: ignore[arg-type]


def snapshot(
    replica: str = "r1",
    ranks: tuple[int, ...] = (0,),
    ttft: tuple[float, ...] = (),
    generated: int = 0,
    map_latencies: tuple[float, ...] = (),
) -> ReplicaSnapshot:
    engine = EngineMetrics(
        running=2,
        waiting=1,
        preemptions_total=3,
        prompt_tokens_total=100,
        generation_tokens_total=generated,
        latency={"ttft": ttft, "itl": (0.01, 0.02)},
        growth_reserve_ratio=0.35,
    )
    return ReplicaSnapshot(
        "m", replica, engine, tuple(RankSnapshot(r, kv_stats(), map_latencies) for r in ranks)
    )


def scrape(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}, parsed by prometheus-client's own parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_histogram_buckets_are_cumulative_with_le_semantics() -> None:
    histogram = HistogramData((0.1, 1.0))
    histogram.observe([0.05, 0.1, 0.5, 1.0, 7.0])
    assert histogram.buckets() == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert histogram.count == 5 and histogram.sum == pytest.approx(8.65)


def test_the_store_accumulates_histograms_and_keeps_the_latest_totals() -> None:
    store = MetricsStore()
    store.push(snapshot(ttft=(0.02, 0.3), generated=10, map_latencies=(2e-5,)))
    store.push(snapshot(ttft=(0.04,), generated=25, map_latencies=(3e-5, 1.0)))
    [series] = store.series()
    assert series.engine is not None and series.engine.generation_tokens_total == 25
    assert series.engine.latency == {}  # samples live in the histograms only
    assert series.latency["ttft"].count == 3 and series.latency["ttft"].sum == pytest.approx(0.36)
    assert series.latency["itl"].count == 4 and series.latency["e2e"].count == 0
    assert series.ranks[0].map_latency.count == 3


def test_stale_replicas_and_ranks_are_forgotten() -> None:
    clock = Clock()
    store = MetricsStore(stale_after_s=30, clock=clock)
    store.push(snapshot("a", ranks=(0, 1)))
    store.push(snapshot("b"))
    clock.now += 20
    store.push(snapshot("a", ranks=(0,)))  # rank 1 stopped reporting
    clock.now += 15
    [series] = store.series()
    assert series.replica == "a" and sorted(series.ranks) == [0]


def test_a_rank_only_snapshot_adds_a_rank_without_touching_the_engine() -> None:
    store = MetricsStore()
    store.push(snapshot(generated=5))
    store.push(ReplicaSnapshot("m", "r1", None, (RankSnapshot(1, kv_stats(pages_in_use=7)),)))
    [series] = store.series()
    assert sorted(series.ranks) == [0, 1] and series.ranks[1].kv["pages_in_use"] == 7
    assert series.engine is not None and series.engine.generation_tokens_total == 5


def test_unsent_samples_go_with_the_next_snapshot() -> None:
    first, second = snapshot(ttft=(1.0,), map_latencies=(1e-5,)), snapshot(ttft=(2.0,), generated=9)
    merged = first.then(second)
    assert merged.engine is not None and merged.engine.latency["ttft"] == (1.0, 2.0)
    assert merged.engine.generation_tokens_total == 9 and merged.ranks[0].map_latencies == (1e-5,)
    huge = snapshot(ttft=tuple(float(i) for i in range(MAX_PENDING_SAMPLES))).then(
        snapshot(ttft=(-1.0,))
    )
    assert huge.engine is not None and len(huge.engine.latency["ttft"]) == MAX_PENDING_SAMPLES
    assert huge.engine.latency["ttft"][-1] == -1.0


def test_the_pusher_keeps_samples_while_there_is_no_hub() -> None:
    snapshots = iter([snapshot(ttft=(1.0,)), snapshot(ttft=(2.0,))])
    pusher = MetricsPusher(lambda: next(snapshots), find=lambda: None)
    assert not pusher.push_once() and not pusher.push_once()
    assert pusher._pending is not None and pusher._pending.engine is not None
    assert pusher._pending.engine.latency["ttft"] == (1.0, 2.0)


def test_the_collector_renders_every_series_with_its_type_labels_and_value() -> None:
    store = MetricsStore()
    store.push(snapshot("r1", ranks=(0, 1), ttft=(0.02, 0.3), generated=10, map_latencies=(2e-5,)))
    store.push(snapshot("r2", generated=4))
    store.push(AutoscalerSnapshot("m", 1, 1, 3, 170.0, 100.0, 1.7, 2.0, {"kv_pressure": 4}))
    decisions = {
        "by_reason": {"most_free_pages": 5},
        "by_replica": {"r1": 3, "r2": 2},
        "last_headroom_pages": 42,
        "last_stats_age_s": 0.25,
        "last_reason": "most_free_pages",
        "last_replica": "r2",
        "prefix_routed": 2,
    }
    text = MetricsExporter().render(store.series(), RouterView("m", decisions)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for metric in METRICS:
        name = metric.name.removesuffix("_total") if metric.kind == "counter" else metric.name
        assert families[name].type == metric.kind, metric.name
        assert families[name].documentation == metric.help
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == set(metric.labels), (metric.name, sample)
        assert families[name].samples, f"{metric.name} has no sample"
    samples = scrape(text)
    r1 = (("model", "m"), ("rank", "0"), ("replica", "r1"))
    assert samples["vattn_kv_pages_in_use"][r1] == 20
    assert samples["vattn_kv_pages_budget"][r1] == 100
    assert samples["vattn_kv_pages_mapped"][r1] == 30
    assert samples["vattn_kv_cache_usage_ratio"][r1] == pytest.approx(0.2)
    assert samples["vattn_kv_released_bytes_total"][r1] == 5 * (2 << 20)
    assert samples["vattn_kv_map_wait_seconds_total"][r1] == 0.25
    assert samples["vattn_kv_map_latency_seconds_count"][r1] == 1
    assert len(samples["vattn_kv_pages_free"]) == 3  # r1 ranks 0 and 1, r2 rank 0
    engine_r1 = (("model", "m"), ("replica", "r1"))
    assert samples["vattn_generation_tokens_total"] == {
        engine_r1: 10,
        (("model", "m"), ("replica", "r2")): 4,
    }
    assert samples["vattn_admission_growth_reserve_ratio"][engine_r1] == 0.35
    assert samples["vattn_time_to_first_token_seconds_bucket"][(("le", "0.025"), *engine_r1)] == 1
    assert samples["vattn_time_to_first_token_seconds_bucket"][(("le", "+Inf"), *engine_r1)] == 2
    assert samples["vattn_time_to_first_token_seconds_count"][engine_r1] == 2
    assert samples["vattn_router_decisions_total"] == {
        (("model", "m"), ("reason", "fallback")): 0,
        (("model", "m"), ("reason", "most_free_pages")): 5,
    }
    assert samples["vattn_router_requests_total"][(("model", "m"), ("replica", "r1"))] == 3
    assert samples["vattn_router_last_headroom_pages"] == {(("model", "m"),): 42}
    assert samples["vattn_router_prefix_routed_total"] == {(("model", "m"),): 2}
    model = (("model", "m"),)
    assert samples["vattn_autoscaler_desired_replicas"] == {model: 3}
    assert samples["vattn_autoscaler_current_replicas"] == {model: 1}
    assert samples["vattn_autoscaler_kv_demand_ratio"] == {model: 1.7}
    assert samples["vattn_autoscaler_decisions_total"] == {(*model, ("reason", "kv_pressure")): 4}


def test_the_store_keeps_the_latest_autoscaler_snapshot_until_it_goes_stale() -> None:
    clock = Clock()
    store = MetricsStore(stale_after_s=10, clock=clock)
    store.push(snapshot("a"))
    store.push(AutoscalerSnapshot("m", 1, 1, 1, 0.0, 100.0, 0.0, 0.0, {"steady": 1}))
    store.push(AutoscalerSnapshot("m", 1, 1, 2, 90.0, 100.0, 0.9, 0.0, {"kv_pressure": 1}))
    [replica, autoscaler] = store.series()
    assert replica.replica == "a" and autoscaler.desired == 2
    clock.now += 11
    assert store.series() == []


def test_without_decisions_or_replicas_the_families_are_empty_not_missing() -> None:
    decisions = {
        "by_reason": {},
        "by_replica": {},
        "last_headroom_pages": None,
        "last_stats_age_s": None,
    }
    text = MetricsExporter().render([], RouterView("m", decisions)).decode()
    samples = scrape(text)
    assert samples == {
        "vattn_router_decisions_total": {
            (("model", "m"), ("reason", "fallback")): 0,
            (("model", "m"), ("reason", "most_free_pages")): 0,
        }
    }
    assert len(re.findall(r"^# TYPE ", text, re.MULTILINE)) == len(METRICS)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_llama(tmp_path_factory.mktemp("metrics-llama"))


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(engine_dir),
            page_size=4096,
            max_model_len=256,
            max_running=4,
            kv_cache_bytes=64 * 4096,
        )
    )


def test_take_snapshot_reads_the_engine_and_drains_its_samples_once(engine: LLMEngine) -> None:
    for i in range(3):
        engine.add_request(
            f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        )
    while engine.has_work():
        engine.step()
    first = take_snapshot("m", "r1", engine.snapshot())
    assert first.engine is not None and first.engine.generation_tokens_total == 18
    assert first.engine.growth_reserve_ratio == engine.scheduler.growth.ratio
    assert len(first.engine.latency["ttft"]) == 3 and len(first.engine.latency["e2e"]) == 3
    assert len(first.engine.latency["itl"]) == 15 and len(first.engine.latency["queue"]) == 3
    [rank] = first.ranks
    assert rank.rank == 0 and rank.kv == engine.kv.stats().as_dict()
    assert 0 < len(rank.map_latencies) <= rank.kv["map_calls"]
    second = take_snapshot("m", "r1", engine.snapshot())
    assert second.engine is not None and all(not s for s in second.engine.latency.values())
    assert second.ranks[0].map_latencies == ()
    store = MetricsStore()
    store.push(first)
    store.push(second)
    text = MetricsExporter().render(store.series(), None).decode()
    labels = (("model", "m"), ("replica", "r1"))
    assert scrape(text)["vattn_e2e_request_latency_seconds_count"][labels] == 3


def test_under_tensor_parallelism_rank_0_reports_its_own_cache(
    engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 of a 2-rank replica (local processes): its own books through the recording
    allocator, not the engine's minimum over ranks."""
    monkeypatch.setenv("VATTN_TP_TIMEOUT_S", "30")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = LLMEngine(
        EngineConfig(
            model=str(engine_dir),
            page_size=4096,
            max_model_len=256,
            max_running=4,
            kv_cache_bytes=64 * 4096,
            tensor_parallel_size=2,
        )
    )
    try:
        engine.add_request(
            "a", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        )
        while engine.has_work():
            engine.step()
        snap = take_snapshot("m", "r1", engine.snapshot())
        [rank] = snap.ranks
        assert rank.rank == 0 and rank.kv == engine.kv.stats().as_dict() and rank.map_latencies
        assert snap.engine is not None and snap.engine.generation_tokens_total == 5
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)


# ---- dashboards ------------------------------------------------------------------------------
def _panels(dashboard: dict) -> list[dict]:
    panels, out = list(dashboard["panels"]), []
    while panels:
        panel = panels.pop(0)
        panels += panel.get("panels", [])
        out.append(panel)
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_use_the_current_schema_and_only_exported_series(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource"
        and variables["datasource"]["query"] == "prometheus"
    )
    for name in ("model", "replica"):
        assert variables[name]["type"] == "query"
        assert re.fullmatch(
            rf"label_values\(vattn_\w+(\{{.*\}})?, {name}\)", variables[name]["query"]["query"]
        )
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    exported = {m.name for m in METRICS} | {
        f"{m.name}_{s}"
        for m in METRICS
        if m.kind == "histogram"
        for s in ("bucket", "sum", "count")
    }
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\bvattn_\w+", target["expr"]))
            assert used and used <= exported, (panel["title"], used - exported)
            if "rate(" in target["expr"] or "increase(" in target["expr"]:
                assert "[$__rate_interval]" in target["expr"] or "[$__range]" in target["expr"], (
                    target["expr"]
                )


EXPOSITION = Path(__file__).resolve().parents[1] / "data" / "metrics_exposition.txt"


def full_exposition() -> str:
    """Every kind of series at once (two replicas, two ranks, latencies, map latencies, an
    autoscaler, router decisions), rendered."""
    store = MetricsStore()
    store.push(snapshot("r1", ranks=(0, 1), ttft=(0.02, 0.3), generated=10, map_latencies=(2e-5,)))
    store.push(snapshot("r2", generated=4, ttft=(7.0,), map_latencies=(1e-3, 0.5)))
    store.push(AutoscalerSnapshot("m", 1, 1, 3, 170.0, 100.0, 1.7, 2.0, {"kv_pressure": 4}))
    decisions = {
        "by_reason": {"most_free_pages": 5, "hold": 1},
        "by_replica": {"r1": 3, "r2": 2},
        "last_headroom_pages": 42,
        "last_stats_age_s": 0.25,
        "last_reason": "most_free_pages",
        "last_replica": "r2",
        "prefix_routed": 2,
    }
    return MetricsExporter().render(store.series(), RouterView("m", decisions)).decode()


def test_the_exposition_is_byte_for_byte_the_recorded_one() -> None:
    """The rendered text, names, help, types, labels, order and values, is the one recorded in
    ``tests/data/metrics_exposition.txt`` (dashboards and alerts query it: a refactoring of the
    metrics modules must not change a byte)."""
    assert full_exposition() == EXPOSITION.read_text()
