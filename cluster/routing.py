"""Free-page routing policy for vattn replicas (pure Python, no Ray imports).

Rule: a replica's *effective free pages* are ``max(free_pages - queued_pages, 0)``, where
``queued_pages`` are the KV pages its waiting requests need to be admitted (prompt plus tokens
already generated): they hold no pages yet, so without it a replica with a long queue would still
look free and keep receiving work. A request needing ``n`` KV pages goes first to the replica with
the most effective free pages (equivalently the most ``effective - n``, since ``n`` is the same for
every candidate); replicas that cannot fit it (``effective < n``) come after every replica that
can, still ordered by effective free pages. Ties break on fewer ``running + waiting`` requests, then
on replica id, so the order is deterministic (among replicas whose queues use up all their free
pages, effective 0, the fewest requests wins). Each rank holds one replica, so Serve's queue-length
tie-break inside a rank cannot reorder them. If ``n`` is unknown, or any candidate's stats are
missing, malformed or older than ``max_age_s``, the policy returns reason ``"fallback"`` and the
caller routes by power of two choices instead. Stats without ``queued_pages`` (older replicas)
count as no queue.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MOST_FREE_PAGES = "most_free_pages"
FALLBACK = "fallback"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ReplicaStats:
    """What a replica's ``record_routing_stats()`` reports (see the contract in the module doc)."""

    free_pages: int  # min over TP ranks of pages a new request could get now
    total_pages: int
    tokens_per_page: float
    running: int
    waiting: int
    timestamp: float  # replica's time.time() when the stats were taken
    queued_pages: int = 0  # pages the waiting requests need to be admitted (0 if not reported)

    @property
    def effective_free_pages(self) -> int:
        """Free pages less those the queue will take first (never below 0)."""
        return max(self.free_pages - self.queued_pages, 0)

    @classmethod
    def from_dict(cls, d: Any) -> ReplicaStats | None:
        """Parse a stats dict; None if it is missing, incomplete or malformed (extra keys are ok).
        ``queued_pages`` is optional (missing means 0) but must be valid when present."""
        ints = ("free_pages", "total_pages", "running", "waiting")
        if not (isinstance(d, Mapping) and all(_is_int(d.get(k)) for k in ints)):
            return None
        tpp, ts, queued = d.get("tokens_per_page"), d.get("timestamp"), d.get("queued_pages", 0)
        if not (_is_real(tpp) and tpp > 0 and _is_real(ts) and _is_int(queued)):
            return None
        free, total, run, wait = (d[k] for k in ints)
        return cls(free, total, float(tpp), run, wait, float(ts), queued)


def pages_needed(request: Any, tokens_per_page: float) -> int | None:
    """ceil((prompt_tokens + max_tokens) / tokens_per_page), or None if the request lacks them."""
    p, m = getattr(request, "prompt_tokens", None), getattr(request, "max_tokens", None)
    if not (_is_int(p) and _is_int(m) and _is_real(tokens_per_page) and tokens_per_page > 0):
        return None
    return math.ceil((p + m) / tokens_per_page)


@dataclass(frozen=True)
class RankedChoice:
    """Outcome of one ranking: ``ranks`` is ``[[best_id], [next_id], ...]`` (empty on fallback)."""

    ranks: list[list[str]]
    reason: str  # MOST_FREE_PAGES or FALLBACK
    free_pages: int | None  # effective free pages of the first choice (None on fallback)
    oldest_stats_age_s: float | None = None  # now - oldest timestamp seen (None if any missing)

    @property
    def first(self) -> str | None:
        return self.ranks[0][0] if self.ranks else None


def rank_replicas(
    candidates: Sequence[tuple[str, ReplicaStats | None]],
    pages_needed: int | None,
    now: float,
    max_age_s: float,
) -> RankedChoice:
    """Order ``candidates`` (replica id, stats) by the rule in the module docstring."""
    stamps = [s.timestamp for _, s in candidates if s is not None]
    age = now - min(stamps) if stamps and len(stamps) == len(candidates) else None
    if pages_needed is None or age is None or age > max_age_s:
        return RankedChoice([], FALLBACK, None, age)

    def key(item: tuple[str, ReplicaStats | None]) -> tuple[bool, int, int, str]:
        rid, s = item
        assert s is not None
        free = s.effective_free_pages
        return (free < pages_needed, -free, s.running + s.waiting, rid)

    ordered = sorted(candidates, key=key)
    first = ordered[0][1]
    assert first is not None
    return RankedChoice([[rid] for rid, _ in ordered], MOST_FREE_PAGES, first.effective_free_pages, age)


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
            self.last_free_pages: int | None = None
            self.last_reason: str | None = None
            self.last_replica: str | None = None
            self.last_stats_age_s: float | None = None

    def record(self, choice: RankedChoice) -> None:
        with self._lock:
            self.by_reason[choice.reason] += 1
            if choice.first is not None:
                self.by_replica[choice.first] += 1
                self.last_free_pages = choice.free_pages
            self.last_reason, self.last_replica = choice.reason, choice.first
            self.last_stats_age_s = choice.oldest_stats_age_s

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy: by_reason, by_replica (dicts) and the last_* fields."""
        with self._lock:
            return {
                k: dict(v) if isinstance(v, Counter) else v
                for k, v in vars(self).items()
                if not k.startswith("_")
            }


DECISIONS = RoutingDecisions()
"""The process-wide tally every FreePageRouter in this process writes to."""


class SharedDecisions:
    """Descriptor returning ``DECISIONS`` at access time (Serve pickles router classes by value)."""

    def __get__(self, obj: object, objtype: type | None = None) -> RoutingDecisions:
        return DECISIONS
