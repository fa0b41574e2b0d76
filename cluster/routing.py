"""KV-headroom routing policy for vattn replicas (pure Python, no Ray imports).

Rule: a replica's *headroom* is what a new request can count on, in KV pages:

    available after the queue = max(available_pages - queued_pages, 0)
    headroom                  = min(available after the queue, total_pages - committed_pages)
                                (may be negative)

``available_pages`` are the pages a new request could get now (the least over the replica's TP
ranks).

``queued_pages`` are the pages its waiting requests need to be admitted (prompt plus tokens already
generated): they hold no pages yet, so without them a replica with a long queue would still look
free. ``committed_pages`` are the pages every running and waiting request would hold at its
``max_tokens``: requests that just started hold little now and will grow, and a replica that
admitted more growth than it has pages preempts later; ranking by what is left once those promises
are kept sends work where it will not be preempted (and, since promised pages are work still to
do, where the queue of work is shortest). A request needing ``n`` KV pages (prompt + max_tokens)
goes first to the replica with the most headroom; replicas that cannot fit it (``headroom < n``)
come after every replica that can, still ordered by headroom (the least over-committed first).
Ties break on fewer ``running + waiting`` requests, then on replica id, so the order is
deterministic. Each rank holds one replica, so Serve's queue-length tie-break inside a rank cannot
reorder them. With ``hold``, replicas whose available pages after the queue cannot fit the request
are
left out, and when none can, the reason is ``"hold"`` and no replica is chosen: the request waits
at the router (Serve retries with backoff) for the first replica with room, instead of queueing
at one replica behind requests that hold its pages (and pushing it into preemption when it is
admitted there). Holding goes by the pages available now, not by the promises: requests that stop
long before their ``max_tokens`` must not keep a half-empty replica from getting work. The
caller bounds how long a request is held. If ``n`` is unknown, or any candidate's stats are
missing (not yet reported) or older than ``max_age_s``, the policy returns reason ``"fallback"``
and the caller routes by power of two choices instead. The stats are the replica's own frozen
``replica.engine_stats.RoutingStats``, read field by field (no parsing on the way).

Prefix sharing: a replica also reports a bounded summary of the prefixes it caches (the chain
root, tokens per block and up to 2,048 keys at depths 1..8 and powers of two,
``replica.kv.prefix``); a prompt's *expected hit pages* ``h`` on it are the deepest reported block
its key chain matches, in pages (within a factor of two of the truth, and 0 where the replica
never saw the prefix). NOTE: a replica's own report, not a record the router keeps of what it
sent, because the replica knows what it still holds after eviction and preemption, and what other
routers (every proxy and ingress process has one) sent it; the router adds only the prompts it
sent in the last few seconds, which a report cannot show yet (``cluster.router``). Each
candidate then gets one score::

    after  = headroom - (n - h)                   pages left after this request (it adds n - h)
    short  = max(low_water * total_pages - after, 0)      how far below the low-water mark
    score  = h + w * g - short

Replicas that can fit the request (``after >= 0``) come first, by score (highest first), then by
``after``; the rest after them by ``after`` as before. So with room everywhere the replica holding
the longest prefix wins (work saved: its pages are not computed again); one short of pages loses a
point per page below the low-water mark (default 10% of its pages) and wins only if it saves more
than that; and where no replica holds the prefix (``h = 0`` everywhere) the order is exactly the
headroom rule's. ``RoutingDecisions.prefix_routed`` counts the decisions whose first choice
holds part of the prompt.

A replica with a host KV tier (``replica.kv.host_tier``) also reports the summary of the prefixes
held there; ``g`` is the prompt's expected hit pages there beyond ``h``. They are copied back, not
computed, but need their pages (``after`` counts them as added), so each weighs ``w`` =
``HOST_HIT_WEIGHT`` (0.9: a copy back at PCIe speed costs a small part of computing the tokens).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.protocol import GenerateRequest
from replica.engine_stats import RoutingStats
from replica.kv.prefix import hit_blocks, summary_chain

MOST_FREE_PAGES = "most_free_pages"
FALLBACK = "fallback"
HOLD = "hold"
#: The low-water mark, a share of a replica's pages, below which headroom outweighs prefix hits.
LOW_WATER = 0.1
#: What a hit page in a replica's host tier is worth against one on its device (the docstring).
HOST_HIT_WEIGHT = 0.9
#: The routers an app can use: vattn's FreePageRouter (prefix hits weighed against headroom), or
#: for comparison (``benchmarks.bench_router``) Serve's default power of two choices, the
#: FreePageRouter blind to prefixes (headroom alone), or Ray Serve LLM's prefix-affinity router
#: (``cluster.affinity_router``: prefix matches alone, blind to memory).
ROUTERS = ("free-pages", "power-of-two", "headroom-only", "prefix-affinity")


def reported(value: object) -> RoutingStats | None:
    """A replica's stats as Serve hands them to the router: the ``RoutingStats`` its
    ``record_routing_stats()`` returned, or None where it has reported none yet (Serve's
    placeholder is an empty dict)."""
    return value if isinstance(value, RoutingStats) else None


def available_after_queue(stats: RoutingStats) -> int:
    """Available pages less those the queue will take first (never below 0)."""
    return max(stats.available_pages - stats.queued_pages, 0)


def headroom(stats: RoutingStats) -> int:
    """What a new request can count on (the module's rule); negative when over-committed."""
    return min(available_after_queue(stats), stats.total_pages - stats.committed_pages)


def hit_pages(
    stats: RoutingStats, chains: dict[tuple[int, int], tuple[tuple[int, int], ...]]
) -> int:
    """Expected hit pages of a prompt on the replica; ``chains`` maps (root, tokens per block) to
    the prompt's summary chain (``prompt_chains``)."""
    chain = chains.get((stats.prefix_root, stats.prefix_tokens_per_block), ())
    if not chain or not stats.prefix_keys:
        return 0
    tokens = hit_blocks(chain, stats.prefix_keys) * stats.prefix_tokens_per_block
    return int(tokens // stats.tokens_per_page)


def host_hit_pages(
    stats: RoutingStats, chains: dict[tuple[int, int], tuple[tuple[int, int], ...]]
) -> int:
    """Expected hit pages of a prompt in the replica's host tier beyond those on its device."""
    chain = chains.get((stats.prefix_root, stats.prefix_tokens_per_block), ())
    if not chain or not stats.prefix_host_keys:
        return 0
    beyond = hit_blocks(chain, stats.prefix_host_keys) - hit_blocks(chain, stats.prefix_keys)
    return int(max(beyond, 0) * stats.prefix_tokens_per_block // stats.tokens_per_page)


def prompt_chains(
    prompt: Sequence[int] | None, candidates: Sequence[tuple[str, RoutingStats | None]]
) -> dict[tuple[int, int], tuple[tuple[int, int], ...]]:
    """The prompt's summary chain for each (root, tokens per block) the candidates report
    (computed once per distinct pair: replicas of one model share it)."""
    chains: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
    if not prompt:
        return chains
    for _, s in candidates:
        if s is not None and (s.prefix_keys or s.prefix_host_keys):
            pair = (s.prefix_root, s.prefix_tokens_per_block)
            if pair not in chains:
                chains[pair] = summary_chain(prompt, *pair)
    return chains


def prefix_score(
    hit_pages: int, after: int, total_pages: int, low_water: float = LOW_WATER
) -> float:
    """The module's score: hit pages less the pages below the low-water mark after the request."""
    return hit_pages - max(low_water * total_pages - after, 0.0)


def pages_needed(request: GenerateRequest, tokens_per_page: float) -> int | None:
    """ceil((prompt_tokens + max_tokens) / tokens_per_page), or None without a page size."""
    if not (math.isfinite(tokens_per_page) and tokens_per_page > 0):
        return None
    return math.ceil((request.prompt_tokens + request.max_tokens) / tokens_per_page)


@dataclass(frozen=True)
class RankedChoice:
    """Outcome of one ranking: ``ranks`` is ``[[best_id], [next_id], ...]`` (empty on fallback)."""

    ranks: list[list[str]]
    reason: str  # MOST_FREE_PAGES, FALLBACK or HOLD
    oldest_stats_age_s: float | None = None  # now - oldest timestamp seen (None if any missing)
    headrooms: dict[str, int] = field(default_factory=dict)  # every ranked candidate's headroom
    hit_pages: dict[str, int] = field(default_factory=dict)  # expected hits, where any

    @property
    def first(self) -> str | None:
        return self.ranks[0][0] if self.ranks else None

    @property
    def headroom_pages(self) -> int | None:
        """Headroom of the first choice (None when none was ranked)."""
        return self.headrooms.get(self.first) if self.first is not None else None


def rank_replicas(
    candidates: Sequence[tuple[str, RoutingStats | None]],
    pages_needed: int | None,
    now: float,
    max_age_s: float,
    hold: bool = False,
    hit_pages: Mapping[str, int] | None = None,
    low_water: float = LOW_WATER,
    host_hit_pages: Mapping[str, int] | None = None,
) -> RankedChoice:
    """Order ``candidates`` (replica id, stats) by the rule in the module docstring; with
    ``hit_pages`` (replica id -> expected hit pages of the prompt) and ``host_hit_pages`` (those
    in its host tier beyond them), by the prefix score."""
    stamps = [s.timestamp for _, s in candidates if s is not None]
    age = now - min(stamps) if stamps and len(stamps) == len(candidates) else None
    if pages_needed is None or age is None or age > max_age_s:
        return RankedChoice([], FALLBACK, age)
    hits = {rid: max(int((hit_pages or {}).get(rid, 0)), 0) for rid, _ in candidates}
    hits = {rid: min(h, pages_needed) for rid, h in hits.items()}
    host = {
        rid: min(max(int((host_hit_pages or {}).get(rid, 0)), 0), pages_needed - hits[rid])
        for rid, _ in candidates
    }
    if hold:
        candidates = [
            (rid, s)
            for rid, s in candidates
            if s is not None and available_after_queue(s) >= pages_needed - hits[rid]
        ]
        if not candidates:
            return RankedChoice([], HOLD, age)

    def key(item: tuple[str, RoutingStats | None]) -> tuple[bool, float, int, int, str]:
        rid, s = item
        assert s is not None
        after = headroom(s) - (pages_needed - hits[rid])
        score = prefix_score(hits[rid], after, s.total_pages, low_water) if scored else 0.0
        score += HOST_HIT_WEIGHT * host[rid]
        return (after < 0, -score if after >= 0 else 0.0, -after, s.running + s.waiting, rid)

    scored = any(hits.values()) or any(host.values())  # else the headroom rule, exactly

    ordered = sorted(candidates, key=key)
    headrooms = {rid: headroom(s) for rid, s in ordered if s is not None}
    found = {rid: h for rid, h in hits.items() if h > 0}
    return RankedChoice([[rid] for rid, _ in ordered], MOST_FREE_PAGES, age, headrooms, found)


class RoutingDecisions:
    """Thread-safe in-process tally of routing decisions (one per ``choose_replicas`` call).

    ``by_replica`` counts the first choice of ranked decisions only (on fallback Serve picks).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.by_reason: Counter[str] = Counter()
            self.by_replica: Counter[str] = Counter()
            self.last_headroom_pages: int | None = None  # of the first choice
            self.last_reason: str | None = None
            self.last_replica: str | None = None
            self.last_stats_age_s: float | None = None
            self.last_headrooms: dict[str, int] = {}  # of every candidate, at the last ranking
            self.prefix_routed = 0  # ranked decisions whose first choice holds part of the prompt

    def record(self, choice: RankedChoice) -> None:
        with self._lock:
            self.by_reason[choice.reason] += 1
            if choice.first is not None:
                self.by_replica[choice.first] += 1
                self.last_headroom_pages = choice.headroom_pages
                self.last_headrooms = dict(choice.headrooms)
                self.prefix_routed += choice.hit_pages.get(choice.first, 0) > 0
            self.last_reason, self.last_replica = choice.reason, choice.first
            self.last_stats_age_s = choice.oldest_stats_age_s

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy: by_reason, by_replica (dicts) and the last_* fields."""
        with self._lock:
            return {
                k: dict(v) if isinstance(v, (Counter, dict)) else v
                for k, v in vars(self).items()
                if not k.startswith("_")
            }


DECISIONS = RoutingDecisions()
"""The process-wide tally every FreePageRouter in this process writes to."""


class SharedDecisions:
    """Descriptor returning ``DECISIONS`` at access time (Serve pickles router classes by value)."""

    def __get__(self, obj: object, objtype: type | None = None) -> RoutingDecisions:
        return DECISIONS
