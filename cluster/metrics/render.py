"""Rendering: the prometheus-client ``Collector`` that turns the hub's series, the autoscalers'
latest snapshots and one router's decisions into the Prometheus text exposition, in a registry of
its own (:class:`MetricsExporter`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cluster.metrics.catalogue import (
    AUTOSCALER_DECISIONS,
    AUTOSCALER_METRICS,
    ENGINE_METRICS,
    KV_METRICS,
    LATENCY_METRICS,
    MAP_LATENCY,
    ROUTER_DECISIONS,
    ROUTER_HEADROOM,
    ROUTER_PREFIX,
    ROUTER_REQUESTS,
    ROUTER_STATS_AGE,
    MetricDef,
)
from cluster.metrics.snapshots import AutoscalerSnapshot
from cluster.metrics.store import ReplicaSeries
from cluster.routing import FALLBACK, MOST_FREE_PAGES


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
