"""What the metrics hub keeps: :class:`MetricsStore` folds the snapshots it is pushed into
histograms per (model, replica) and per (model, replica, rank), keeps the latest gauges and
counters' totals, and forgets what stopped pushing."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from prometheus_client.utils import floatToGoString

from cluster.metrics.catalogue import LATENCY_METRICS, MAP_BUCKETS
from cluster.metrics.snapshots import AutoscalerSnapshot, EngineMetrics, ReplicaSnapshot


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
