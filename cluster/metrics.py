"""Prometheus metrics of a vattn app: the series, the snapshot a replica sends, the series the hub
accumulates, and the prometheus-client ``Collector`` the ingress renders on ``GET /metrics``.

Flow: about once a second every replica takes a :class:`ReplicaSnapshot` (gauges' values,
counters' totals, latency samples drained since its previous snapshot) and pushes it to the
``MetricsHub`` actor (``cluster.metrics_hub``), whose :class:`MetricsStore` folds the samples into
histograms per (model, replica) and per (model, replica, rank). ``GET /metrics`` on the ingress
fetches the store's :class:`ReplicaSeries` and renders them, plus the ingress's own router
decisions, through :class:`VattnCollector` in a registry of its own. The KV-pressure autoscaling
policy, which Serve runs in its controller, pushes an :class:`AutoscalerSnapshot` to the same hub.

Every series is listed in :data:`METRICS`. KV and mapping series carry ``model``, ``replica`` and
``rank`` (each rank has its own cache); engine series carry ``model`` and ``replica`` (rank 0
schedules); router series carry ``model`` (plus ``reason`` or the chosen ``replica``).
Nothing here imports Ray, torch or ``replica`` (the hub actor stays a small process): snapshots
carry ``KVCacheStats.as_dict()`` and the latency samples as plain mappings.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cluster.routing import FALLBACK, MOST_FREE_PAGES

if TYPE_CHECKING:
    from replica.engine_stats import EngineSnapshot, RankKVSnapshot

Kind = Literal["gauge", "counter", "histogram"]
REPLICA_LABELS = ("model", "replica")
RANK_LABELS = ("model", "replica", "rank")
ROUTER_LABELS = ("model",)

#: Upper bounds (seconds) of the histogram buckets; +Inf is implied.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MAP_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)

#: Latency samples one unsent snapshot keeps per histogram (the newest), while no hub answers.
MAX_PENDING_SAMPLES = 20_000


@dataclass(frozen=True)
class MetricDef:
    """One exported series family. ``source`` names what it is read from: a key of
    ``KVCacheStats.as_dict()``, an ``EngineMetrics`` field, a ``LatencySamples`` field (the key of
    ``EngineMetrics.latency``) or a key of ``RoutingDecisions.snapshot()``."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    source: str = ""
    buckets: tuple[float, ...] = ()


def _kv(name: str, kind: Kind, source: str, help: str) -> MetricDef:
    return MetricDef(name, kind, help, RANK_LABELS, source)


KV_METRICS = (
    _kv(
        "vattn_kv_pages_budget",
        "gauge",
        "pages_total",
        "Physical KV pages this rank may create (its budget).",
    ),
    _kv(
        "vattn_kv_pages_created",
        "gauge",
        "pages_created",
        "Physical KV pages created (free + in use + cached).",
    ),
    _kv("vattn_kv_pages_free", "gauge", "pages_free", "Created KV pages mapped nowhere."),
    _kv(
        "vattn_kv_pages_mapped",
        "gauge",
        "pages_mapped",
        "KV pages mapped under slots (in use + cached).",
    ),
    _kv(
        "vattn_kv_pages_in_use",
        "gauge",
        "pages_in_use",
        "KV pages mapped under running requests' slots.",
    ),
    _kv(
        "vattn_kv_pages_cached",
        "gauge",
        "pages_cached",
        "KV pages still mapped under released slots (reclaimed when needed).",
    ),
    _kv(
        "vattn_kv_pages_available",
        "gauge",
        "pages_available",
        "KV pages a new request could get now (free, creatable, cached, eager surplus).",
    ),
    _kv("vattn_kv_page_size_bytes", "gauge", "page_size_bytes", "Bytes of one physical KV page."),
    _kv(
        "vattn_kv_page_size_tokens",
        "gauge",
        "tokens_per_page",
        "Tokens one physical KV page holds, counting every range a token occupies.",
    ),
    _kv(
        "vattn_kv_cache_usage_ratio",
        "gauge",
        "usage_ratio",
        "KV pages in use over the budget (0..1).",
    ),
    _kv(
        "vattn_kv_wasted_bytes",
        "gauge",
        "wasted_bytes",
        "Bytes mapped under running slots that hold no token.",
    ),
    _kv(
        "vattn_kv_released_bytes_total",
        "counter",
        "bytes_released_total",
        "Physical KV bytes the elastic pool returned to the device.",
    ),
    _kv(
        "vattn_kv_map_calls_total",
        "counter",
        "map_calls",
        "Map calls (runs of pages, one access grant each).",
    ),
    _kv(
        "vattn_kv_map_pages_total",
        "counter",
        "pages_mapped_total",
        "KV pages mapped by the mapping worker.",
    ),
    _kv(
        "vattn_kv_map_wait_seconds_total",
        "counter",
        "wait_seconds",
        "Seconds the engine waited for the mapping worker.",
    ),
    _kv(
        "vattn_prefix_cache_queries_tokens_total",
        "counter",
        "prefix_queries_tokens",
        "Prompt tokens looked up in the prefix cache.",
    ),
    _kv(
        "vattn_prefix_cache_hits_tokens_total",
        "counter",
        "prefix_hits_tokens",
        "Prompt tokens found in the prefix cache (not computed again).",
    ),
    _kv(
        "vattn_kv_pages_shared",
        "gauge",
        "pages_shared",
        "KV pages mapped under more than one slot (prefix sharing).",
    ),
    _kv(
        "vattn_prefix_cache_evicted_pages_total",
        "counter",
        "prefix_evicted_pages",
        "Indexed prefix pages dropped from the prefix cache (reclaimed or overwritten).",
    ),
)
MAP_LATENCY = MetricDef(
    "vattn_kv_map_latency_seconds",
    "histogram",
    "Latency of one map call (a run of pages).",
    RANK_LABELS,
    "map_latencies",
    MAP_BUCKETS,
)

ENGINE_METRICS = (
    MetricDef(
        "vattn_requests_running",
        "gauge",
        "Requests running (holding a KV slot).",
        REPLICA_LABELS,
        "running",
    ),
    MetricDef(
        "vattn_requests_waiting",
        "gauge",
        "Requests waiting for admission.",
        REPLICA_LABELS,
        "waiting",
    ),
    MetricDef(
        "vattn_preemptions_total",
        "counter",
        "Requests preempted (by recompute) for KV pages.",
        REPLICA_LABELS,
        "preemptions_total",
    ),
    MetricDef(
        "vattn_prompt_tokens_total",
        "counter",
        "Prompt tokens prefilled (recomputed ones again).",
        REPLICA_LABELS,
        "prompt_tokens_total",
    ),
    MetricDef(
        "vattn_generation_tokens_total",
        "counter",
        "Tokens generated.",
        REPLICA_LABELS,
        "generation_tokens_total",
    ),
    MetricDef(
        "vattn_admission_growth_reserve_ratio",
        "gauge",
        "Share of the running requests' remaining max_tokens admission keeps KV pages for "
        "(rises on preemptions, decays without).",
        REPLICA_LABELS,
        "growth_reserve_ratio",
    ),
)
LATENCY_METRICS = (
    MetricDef(
        "vattn_time_to_first_token_seconds",
        "histogram",
        "Arrival to first token.",
        REPLICA_LABELS,
        "ttft",
        TTFT_BUCKETS,
    ),
    MetricDef(
        "vattn_inter_token_latency_seconds",
        "histogram",
        "Time between two tokens of a request.",
        REPLICA_LABELS,
        "itl",
        ITL_BUCKETS,
    ),
    MetricDef(
        "vattn_e2e_request_latency_seconds",
        "histogram",
        "Arrival to last token.",
        REPLICA_LABELS,
        "e2e",
        E2E_BUCKETS,
    ),
    MetricDef(
        "vattn_request_queue_time_seconds",
        "histogram",
        "Arrival to first scheduled.",
        REPLICA_LABELS,
        "queue",
        TTFT_BUCKETS,
    ),
)
ROUTER_DECISIONS = MetricDef(
    "vattn_router_decisions_total",
    "counter",
    "Routing decisions of the free-page router, by reason.",
    (*ROUTER_LABELS, "reason"),
    "by_reason",
)
ROUTER_REQUESTS = MetricDef(
    "vattn_router_requests_total",
    "counter",
    "Requests the free-page router ranked this replica first for.",
    (*ROUTER_LABELS, "replica"),
    "by_replica",
)
ROUTER_HEADROOM = MetricDef(
    "vattn_router_last_headroom_pages",
    "gauge",
    "KV headroom in pages (available pages less its queue's, capped by the budget less its "
    "requests' max_tokens) of the replica chosen by the last ranked decision.",
    ROUTER_LABELS,
    "last_headroom_pages",
)
ROUTER_STATS_AGE = MetricDef(
    "vattn_router_last_stats_age_seconds",
    "gauge",
    "Age of the oldest replica stats at the last decision.",
    ROUTER_LABELS,
    "last_stats_age_s",
)
ROUTER_PREFIX = MetricDef(
    "vattn_router_prefix_routed_total",
    "counter",
    "Ranked decisions whose first choice holds part of the prompt in its prefix cache.",
    ROUTER_LABELS,
    "prefix_routed",
)
ROUTER_METRICS = (
    ROUTER_DECISIONS,
    ROUTER_REQUESTS,
    ROUTER_HEADROOM,
    ROUTER_STATS_AGE,
    ROUTER_PREFIX,
)

#: The KV-pressure autoscaler's series (``cluster.autoscaler``; ``source``: an
#: :class:`AutoscalerSnapshot` field), present while a deployment of the model autoscales with it.
AUTOSCALER_LABELS = ("model",)
AUTOSCALER_METRICS = (
    MetricDef(
        "vattn_autoscaler_current_replicas",
        "gauge",
        "Replicas running when the autoscaling policy last ran.",
        AUTOSCALER_LABELS,
        "current",
    ),
    MetricDef(
        "vattn_autoscaler_target_replicas",
        "gauge",
        "Replicas Serve targeted when the autoscaling policy last ran.",
        AUTOSCALER_LABELS,
        "target",
    ),
    MetricDef(
        "vattn_autoscaler_desired_replicas",
        "gauge",
        "Replicas the KV-pressure policy asks for (within min/max; Serve applies a change once "
        "it has lasted its upscale or downscale delay).",
        AUTOSCALER_LABELS,
        "desired",
    ),
    MetricDef(
        "vattn_autoscaler_kv_demand_pages",
        "gauge",
        "Policy input: KV pages the replicas' requests are expected to hold, summed.",
        AUTOSCALER_LABELS,
        "demand_pages",
    ),
    MetricDef(
        "vattn_autoscaler_kv_budget_pages",
        "gauge",
        "Policy input: the KV page budget of one replica (mean over those reporting).",
        AUTOSCALER_LABELS,
        "budget_pages",
    ),
    MetricDef(
        "vattn_autoscaler_kv_demand_ratio",
        "gauge",
        "Policy input: demand over the targeted replicas' budget (scale-up above the target "
        "utilisation).",
        AUTOSCALER_LABELS,
        "utilization",
    ),
    MetricDef(
        "vattn_autoscaler_waiting_requests",
        "gauge",
        "Policy input: requests waiting for admission, summed over replicas.",
        AUTOSCALER_LABELS,
        "waiting",
    ),
)
AUTOSCALER_DECISIONS = MetricDef(
    "vattn_autoscaler_decisions_total",
    "counter",
    "Decisions of the KV-pressure autoscaling policy (one per Serve control-loop tick), by reason.",
    (*AUTOSCALER_LABELS, "reason"),
    "decisions",
)

METRICS: tuple[MetricDef, ...] = (
    *KV_METRICS,
    MAP_LATENCY,
    *ENGINE_METRICS,
    *LATENCY_METRICS,
    *ROUTER_METRICS,
    *AUTOSCALER_METRICS,
    AUTOSCALER_DECISIONS,
)
"""Every series family /metrics exports."""


# ---- what a replica sends ---------------------------------------------------------------------
LATENCY_FIELDS = tuple(m.source for m in LATENCY_METRICS)  # the fields of replica's LatencySamples
Samples = tuple[float, ...]


@dataclass(frozen=True)
class RankSnapshot:
    """One rank's KV cache: its books now (``KVCacheStats.as_dict()``) and the map-call latencies
    since its previous snapshot."""

    rank: int
    kv: Mapping[str, float]
    map_latencies: Samples = ()


@dataclass(frozen=True)
class EngineMetrics:
    """The scheduler's gauges and counters' totals now; ``latency``: samples since the previous
    snapshot, by ``LatencySamples`` field (ttft, itl, e2e, queue)."""

    running: int
    waiting: int
    preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    latency: Mapping[str, Samples] = field(default_factory=dict)
    growth_reserve_ratio: float = 0.0


@dataclass(frozen=True)
class ReplicaSnapshot:
    """What one process of a replica pushes: its engine (None for a process that only holds a
    rank's cache) and its ranks' caches."""

    model: str
    replica: str
    engine: EngineMetrics | None
    ranks: tuple[RankSnapshot, ...] = ()

    def then(self, later: ReplicaSnapshot) -> ReplicaSnapshot:
        """``later``'s values with this (unsent) snapshot's samples prepended, so none is lost."""
        engine = later.engine
        if engine is not None and self.engine is not None:
            old, new = self.engine.latency, engine.latency
            engine = replace(
                engine,
                latency={
                    name: _newest(tuple(old.get(name, ())) + tuple(new.get(name, ())))
                    for name in LATENCY_FIELDS
                },
            )
        earlier = {r.rank: r for r in self.ranks}
        ranks = tuple(
            replace(r, map_latencies=_newest(earlier[r.rank].map_latencies + r.map_latencies))
            if r.rank in earlier
            else r
            for r in later.ranks
        )
        return replace(later, engine=engine, ranks=ranks)


def _newest(samples: Samples) -> Samples:
    return samples[-MAX_PENDING_SAMPLES:]


def take_snapshot(model: str, replica: str, snapshot: EngineSnapshot) -> ReplicaSnapshot:
    """What a replica pushes, from its engine's frozen ``LLMEngine.snapshot()`` (which drained the
    latency samples and this rank's map latencies: nothing else may drain them)."""
    stats = snapshot.stats
    return ReplicaSnapshot(
        model,
        replica,
        EngineMetrics(
            stats.running,
            stats.waiting,
            stats.preemptions_total,
            stats.prompt_tokens_total,
            stats.generation_tokens_total,
            {name: tuple(getattr(stats.latency, name)) for name in LATENCY_FIELDS},
            stats.growth_reserve_ratio,
        ),
        (rank_snapshot(snapshot.rank_kv),),
    )


def rank_snapshot(rank_kv: RankKVSnapshot) -> RankSnapshot:
    """One rank's cache: its own books (under tensor parallelism the engine's stats hold the least
    available pages over ranks instead) and its map latencies. A process that hosts another rank
    pushes ``ReplicaSnapshot(model, replica, None, (rank_snapshot(...),))`` itself."""
    return RankSnapshot(rank_kv.rank, rank_kv.kv.as_dict(), rank_kv.map_latencies)


@dataclass(frozen=True)
class AutoscalerSnapshot:
    """What the KV-pressure policy pushes from Serve's controller (``cluster.autoscaler``): the
    replica counts, its decision and inputs at its last run, and its decisions' totals by
    reason."""

    model: str
    current: int
    target: int
    desired: int
    demand_pages: float
    budget_pages: float
    utilization: float
    waiting: float
    decisions: Mapping[str, int] = field(default_factory=dict)


# ---- what the hub keeps -----------------------------------------------------------------------
@dataclass
class HistogramData:
    """A cumulative histogram: per-bucket counts (``le`` semantics, the last bucket is +Inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, samples: Iterable[float]) -> None:
        for value in samples:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, as prometheus-client wants
        them."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append((floatToGoString(bound), float(running)))
        return out


@dataclass
class RankSeries:
    kv: Mapping[str, float]
    map_latency: HistogramData
    updated: float


@dataclass
class ReplicaSeries:
    """Everything known about one replica: the latest engine values, its latency histograms
    (keyed by ``LatencySamples`` field) and its ranks' books and map-latency histograms."""

    model: str
    replica: str
    updated: float
    engine: EngineMetrics | None = None
    latency: dict[str, HistogramData] = field(
        default_factory=lambda: {m.source: HistogramData(m.buckets) for m in LATENCY_METRICS}
    )
    ranks: dict[int, RankSeries] = field(default_factory=dict)


class MetricsStore:
    """Accumulates snapshots per (model, replica) and rank; forgets what stopped pushing for
    ``stale_after_s`` (a replica that died, or a rank that left)."""

    def __init__(
        self, stale_after_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._series: dict[tuple[str, str], ReplicaSeries] = {}
        self._autoscalers: dict[str, tuple[AutoscalerSnapshot, float]] = {}  # model -> (, when)

    def push(self, snapshot: ReplicaSnapshot | AutoscalerSnapshot) -> None:
        now = self.clock()
        if isinstance(snapshot, AutoscalerSnapshot):
            self._autoscalers[snapshot.model] = (snapshot, now)
            return
        key = (snapshot.model, snapshot.replica)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = ReplicaSeries(snapshot.model, snapshot.replica, now)
        series.updated = now
        if snapshot.engine is not None:
            for name, histogram in series.latency.items():
                histogram.observe(snapshot.engine.latency.get(name, ()))
            series.engine = replace(snapshot.engine, latency={})
        for rank in snapshot.ranks:
            kept = series.ranks.get(rank.rank)
            if kept is None:
                kept = series.ranks[rank.rank] = RankSeries(
                    rank.kv, HistogramData(MAP_BUCKETS), now
                )
            kept.kv, kept.updated = rank.kv, now
            kept.map_latency.observe(rank.map_latencies)

    def series(self) -> list[ReplicaSeries | AutoscalerSnapshot]:
        """The live series, sorted by (model, replica), then the live autoscalers' latest
        snapshots, sorted by model."""
        horizon = self.clock() - self.stale_after_s
        for model, (_, updated) in list(self._autoscalers.items()):
            if updated < horizon:
                del self._autoscalers[model]
        for key, series in list(self._series.items()):
            if series.updated < horizon:
                del self._series[key]
                continue
            for rank, kept in list(series.ranks.items()):
                if kept.updated < horizon:
                    del series.ranks[rank]
        replicas: list[ReplicaSeries | AutoscalerSnapshot] = [
            self._series[key] for key in sorted(self._series)
        ]
        return replicas + [self._autoscalers[model][0] for model in sorted(self._autoscalers)]


# ---- rendering --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RouterView:
    """The ingress's model name and its process's ``routing.DECISIONS.snapshot()``."""

    model: str
    decisions: Mapping[str, Any]


def _family(metric: MetricDef) -> Metric:
    kinds: dict[str, Any] = {
        "gauge": GaugeMetricFamily,
        "counter": CounterMetricFamily,
        "histogram": HistogramMetricFamily,
    }
    return kinds[metric.kind](metric.name, metric.help, labels=list(metric.labels))


def _add(family: Metric, metric: MetricDef, labels: list[str], value: Any) -> None:
    if metric.kind == "histogram":
        family.add_metric(labels, buckets=value.buckets(), sum_value=value.sum)  # type: ignore[attr-defined]
    else:
        family.add_metric(labels, float(value))  # type: ignore[attr-defined]


class VattnCollector(Collector):
    """Renders the hub's series and one router's decisions (set them with :meth:`update`)."""

    def __init__(self) -> None:
        self.series: list[ReplicaSeries] = []
        self.autoscalers: list[AutoscalerSnapshot] = []
        self.router: RouterView | None = None

    def update(
        self, series: list[ReplicaSeries | AutoscalerSnapshot], router: RouterView | None
    ) -> None:
        self.series = [s for s in series if isinstance(s, ReplicaSeries)]
        self.autoscalers = [s for s in series if isinstance(s, AutoscalerSnapshot)]
        self.router = router

    def collect(self) -> Iterator[Metric]:
        yield from self._kv()
        yield from self._engine()
        yield from self._router()
        yield from self._autoscaler()

    def _kv(self) -> Iterator[Metric]:
        for metric in (*KV_METRICS, MAP_LATENCY):
            family = _family(metric)
            for s in self.series:
                for rank, kept in sorted(s.ranks.items()):
                    value = kept.map_latency if metric is MAP_LATENCY else kept.kv[metric.source]
                    _add(family, metric, [s.model, s.replica, str(rank)], value)
            yield family

    def _engine(self) -> Iterator[Metric]:
        for metric in (*ENGINE_METRICS, *LATENCY_METRICS):
            family = _family(metric)
            for s in self.series:
                if s.engine is not None:
                    value = (
                        s.latency[metric.source]
                        if metric.kind == "histogram"
                        else getattr(s.engine, metric.source)
                    )
                    _add(family, metric, [s.model, s.replica], value)
            yield family

    def _router(self) -> Iterator[Metric]:
        if self.router is None:
            return
        model, decisions = self.router.model, self.router.decisions
        reasons = {MOST_FREE_PAGES: 0, FALLBACK: 0, **decisions.get("by_reason", {})}
        family = _family(ROUTER_DECISIONS)
        for reason, count in sorted(reasons.items()):
            _add(family, ROUTER_DECISIONS, [model, reason], count)
        yield family
        family = _family(ROUTER_REQUESTS)
        for replica, count in sorted(decisions.get("by_replica", {}).items()):
            _add(family, ROUTER_REQUESTS, [model, replica], count)
        yield family
        family = _family(ROUTER_PREFIX)
        if ROUTER_PREFIX.source in decisions:
            _add(family, ROUTER_PREFIX, [model], decisions[ROUTER_PREFIX.source])
        yield family
        for metric in (ROUTER_HEADROOM, ROUTER_STATS_AGE):
            family = _family(metric)
            if decisions.get(metric.source) is not None:
                _add(family, metric, [model], decisions[metric.source])
            yield family

    def _autoscaler(self) -> Iterator[Metric]:
        for metric in AUTOSCALER_METRICS:
            family = _family(metric)
            for snapshot in self.autoscalers:
                _add(family, metric, [snapshot.model], getattr(snapshot, metric.source))
            yield family
        family = _family(AUTOSCALER_DECISIONS)
        for snapshot in self.autoscalers:
            for reason, count in sorted(snapshot.decisions.items()):
                _add(family, AUTOSCALER_DECISIONS, [snapshot.model, reason], count)
        yield family


class MetricsExporter:
    """A registry of its own (not prometheus-client's global one) holding one VattnCollector."""

    def __init__(self) -> None:
        self.collector = VattnCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def render(
        self, series: list[ReplicaSeries | AutoscalerSnapshot], router: RouterView | None
    ) -> bytes:
        """The Prometheus text exposition format (version 0.0.4)."""
        self.collector.update(series, router)
        return generate_latest(self.registry)
