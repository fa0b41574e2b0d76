"""What crosses to the metrics hub, frozen: a replica's :class:`ReplicaSnapshot` (gauges' values,
counters' totals, latency samples drained since its previous snapshot, its ranks' KV books) and the
KV-pressure autoscaler's :class:`AutoscalerSnapshot`. Snapshots carry ``KVCacheStats.as_dict()``
and the latency samples as plain mappings (the hub imports no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cluster.metrics.catalogue import LATENCY_METRICS

if TYPE_CHECKING:
    from replica.engine_stats import EngineSnapshot, RankKVSnapshot

#: Latency samples one unsent snapshot keeps per histogram (the newest), while no hub answers.
MAX_PENDING_SAMPLES = 20_000
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
