"""The engine's numbers for the layers above (router, metrics, benchmarks): a frozen snapshot, and
the latency samples behind it."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from replica.kv.stats import KVCacheStats
from replica.request import Request


@dataclass(frozen=True)
class LatencySamples:
    """Seconds, recorded since the last ``drain``: time to first token, inter-token latency,
    end-to-end latency and queue time (arrival → first scheduled)."""

    ttft: tuple[float, ...] = ()
    itl: tuple[float, ...] = ()
    e2e: tuple[float, ...] = ()
    queue: tuple[float, ...] = ()


@dataclass
class LatencyLog:
    """Collects per-request latencies; keeps a bounded recent window for snapshots and rates."""

    window: int = 4096
    _ttft: list[float] = field(default_factory=list)
    _itl: list[float] = field(default_factory=list)
    _e2e: list[float] = field(default_factory=list)
    _queue: list[float] = field(default_factory=list)
    _token_times: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def token(self, request: Request, now: float) -> None:
        if request.first_token_time is None:
            request.first_token_time = now
            self._append(self._ttft, now - request.arrival_time)
            if request.first_scheduled_time is not None:
                self._append(self._queue, request.first_scheduled_time - request.arrival_time)
        elif request.last_token_time is not None:
            self._append(self._itl, now - request.last_token_time)
        request.last_token_time = now
        self._token_times.append(now)

    def finished(self, request: Request, now: float) -> None:
        self._append(self._e2e, now - request.arrival_time)

    def _append(self, samples: list[float], value: float) -> None:
        if len(samples) >= self.window:
            del samples[: len(samples) - self.window + 1]
        samples.append(value)

    def drain(self) -> LatencySamples:
        """Returns and forgets the samples recorded so far (for histogram exporters)."""
        out = LatencySamples(
            tuple(self._ttft), tuple(self._itl), tuple(self._e2e), tuple(self._queue)
        )
        self._ttft, self._itl, self._e2e, self._queue = [], [], [], []
        return out

    def snapshot(self) -> LatencySamples:
        return LatencySamples(
            tuple(self._ttft), tuple(self._itl), tuple(self._e2e), tuple(self._queue)
        )

    def tokens_per_second(self, horizon: float = 10.0) -> float:
        now = time.monotonic()
        recent = [t for t in self._token_times if now - t <= horizon]
        if len(recent) < 2:
            return 0.0
        return len(recent) / max(now - recent[0], 1e-6)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    kv: KVCacheStats
    latency: LatencySamples
    #: The share of running requests' remaining max_tokens admission keeps pages for now
    #: (replica.growth_reserve).
    growth_reserve_ratio: float = 0.0


@dataclass(frozen=True)
class RankKVSnapshot:
    """One rank's KV cache: its own books and the seconds of its map runs since the last
    snapshot."""

    rank: int
    kv: KVCacheStats
    map_latencies: tuple[float, ...] = ()


@dataclass(frozen=True)
class EngineSnapshot:
    """What a replica reports about itself (``LLMEngine.snapshot``): the stats, whose ``latency``
    holds the samples since the previous snapshot; this process's rank cache; and why the replica
    is broken (None while it serves)."""

    stats: EngineStats
    rank_kv: RankKVSnapshot
    broken: str | None = None


@dataclass(frozen=True)
class RoutingStats:
    """What the KV-headroom router weighs (``cluster.routing``), in physical pages; the one typed
    message from a replica to the router (Serve pickles it as it is, the router reads its fields):
    ``available_pages``: a new request could get these now (the least over TP ranks; 0 when the
    replica is broken); ``queued_pages``: what the waiting requests need to be admitted;
    ``committed_pages``: what every request would hold at its max_tokens; ``tokens_per_page``:
    tokens one page holds, counting every range a token occupies; ``demand_pages``: what its
    requests are expected to hold at once (in use, the rest of the running requests' prompts
    and expected growth, the waiting requests' prompts and expected growth: the autoscaler's
    input, ``cluster.autoscaling``)."""

    available_pages: int
    queued_pages: int
    committed_pages: int
    total_pages: int
    tokens_per_page: float
    running: int
    waiting: int
    demand_pages: int = 0
    #: The prefix cache's summary (``replica.kv.prefix``: the chain's root, tokens per block, up
    #: to 2,048 keys of cached prefixes); the router estimates a prompt's hit pages from it.
    prefix_root: int = 0
    prefix_tokens_per_block: int = 0
    prefix_keys: frozenset[int] = frozenset()
    #: The same of the prefixes its host KV tier holds (``replica.kv.host_tier``): a hit there
    #: is copied back, not computed, but needs its pages.
    prefix_host_keys: frozenset[int] = frozenset()
    #: The replica's ``time.time()`` when they were taken (the router ignores stats too old).
    timestamp: float = 0.0
