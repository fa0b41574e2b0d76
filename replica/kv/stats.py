"""A snapshot of the KV cache's books, cheap to take at any time (router, metrics, benchmarks)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum


class OpCause(IntEnum):
    """Why the vAttention cache asked the mapping worker for an operation (its time breakdown)."""

    GROWTH = 0  # a running slot grows: create and map fresh pages (eager ones included)
    ALIAS = 1  # a prefix hit maps another slot's pages under a new slot
    REUSE = 2  # a released slot taken by a new request: its tail that is not the prefix goes
    RECLAIM = 3  # pages freed for another slot's growth (cached slots first)
    RELEASE = 4  # a slot released with deferred reclamation off
    IDLE = 5  # idle free pages returned to the device (elastic pool)
    SHRINK = 6  # ``shrink()``: everything cached and free returned
    PREMAP = 7  # the page budget mapped under the empty slots at start (``KVCacheConfig.premap``)
    SPARE = 8  # free pages created ahead of need (``KVCacheConfig.spare_pages``)


class WaitCause(IntEnum):
    """What a caller waited on the mapping worker for."""

    ADMISSION = 0  # a newly admitted request's first chunk (aliases and growth)
    STEP = 1  # a running request's next tokens
    SYNC = 2  # ``synchronize`` / ``shrink`` / an explicit ``wait``


@dataclass(frozen=True)
class MappingBreakdown:
    """The mapping worker's time by operation kind and cause, and the callers' waits by cause,
    since the cache was made. ``ops``: (kind, cause, operations, pages, seconds) with kind one of
    create / map / unmap / release and cause an ``OpCause`` name; ``waits``: (cause, waits,
    seconds) with cause a ``WaitCause`` name."""

    ops: tuple[tuple[str, str, int, int, float], ...]
    waits: tuple[tuple[str, int, float], ...]

    def seconds(self, kind: str | None = None, cause: str | None = None) -> float:
        return sum(
            s
            for k, c, _, _, s in self.ops
            if (kind is None or k == kind) and (cause is None or c == cause)
        )

    def pages(self, kind: str | None = None, cause: str | None = None) -> int:
        return sum(
            p
            for k, c, _, p, _ in self.ops
            if (kind is None or k == kind) and (cause is None or c == cause)
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: per (kind, cause) and per wait cause, with microseconds a page."""
        return {
            "ops": [
                {
                    "kind": k,
                    "cause": c,
                    "ops": n,
                    "pages": p,
                    "seconds": s,
                    "us_per_page": 1e6 * s / p if p else None,
                }
                for k, c, n, p, s in self.ops
            ],
            "waits": [{"cause": c, "waits": n, "seconds": s} for c, n, s in self.waits],
        }


@dataclass(frozen=True)
class KVCacheStats:
    page_size_bytes: int
    tokens_per_page: float  # tokens per physical page, every range a token occupies counted
    pages_total: int  # the budget
    pages_created: int
    pages_free: int  # created, mapped nowhere
    pages_in_use: int  # mapped under running slots
    pages_cached: int  # mapped under released slots (deferred reclamation)
    pages_available: (
        int  # a new request could get these now (free, creatable, cached, eager surplus)
    )
    wasted_bytes: int  # mapped under running slots but holding no token
    slots_running: int
    slots_cached: int
    map_calls: int  # map runs executed (one access grant each)
    pages_mapped_total: int
    map_seconds: float  # time the worker spent in the driver
    wait_seconds: float  # time callers waited on the worker
    pages_released_total: int  # returned to the device by the elastic pool
    # Prefix sharing (0 where it is off).
    pages_shared: int = 0  # pages mapped under more than one slot (refcount > 1)
    prefix_queries_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits_tokens: int = 0  # of which were found cached (not computed again)
    prefix_evicted_pages: int = 0  # indexed pages dropped (reclaimed or overwritten)
    prefix_copied_bytes: int = 0  # hit bytes copied into a slot's own pages (every range counted)
    prefix_takeovers: int = 0  # hits served in a released slot holding another conversation
    prefix_borrows: int = 0  # hits read from their holder's pages until aliased (kv.borrows)
    prefix_borrows_forced: int = 0  # of which ended before their aliases were mapped (a host wait)
    # The host tier (0 where it is off): its memory, the bytes copied out and back, the prompt
    # tokens restored from it (counted in prefix_hits_tokens too).
    host_tier_bytes: int = 0
    host_tier_used_bytes: int = 0
    host_offloaded_bytes: int = 0
    host_restored_bytes: int = 0
    prefix_host_hits_tokens: int = 0
    host_tier_skipped_tokens: int = 0  # held by the tier, computed again: no device memory free
    host_tier_pin_seconds: float = 0.0  # pinning the tier's host memory (at start)
    host_tier_wait_seconds: float = 0.0  # callers waiting for host copies to reuse host blocks
    # Callers waiting on the host for copies (between slots, or to and from the host) before
    # unmapping the pages those copies read or write (vAttention; a rewrite waits on the device).
    copy_wait_seconds: float = 0.0

    @property
    def pages_mapped(self) -> int:
        return self.pages_in_use + self.pages_cached

    @property
    def bytes_released_total(self) -> int:
        return self.pages_released_total * self.page_size_bytes

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens found cached over those looked up."""
        return (
            self.prefix_hits_tokens / self.prefix_queries_tokens
            if self.prefix_queries_tokens
            else 0.0
        )

    @property
    def usage_ratio(self) -> float:
        """In-use pages over the budget (the number other routers scrape as KV usage)."""
        return self.pages_in_use / self.pages_total if self.pages_total else 0.0

    def summary(self) -> str:
        """One line for people: where the pages are and what they cost."""
        mib = 1024 * 1024
        return (
            f"pages: {self.pages_in_use} in use, {self.pages_cached} cached, {self.pages_free} "
            "free, "
            f"{self.pages_created}/{self.pages_total} created, {self.pages_available} available; "
            f"waste {self.wasted_bytes / mib:.1f} MiB; {self.map_calls} map calls "
            f"({self.map_seconds * 1e3:.2f} ms), waited {self.wait_seconds * 1e3:.2f} ms; "
            f"{self.pages_released_total} released to the device"
        )

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = dict(asdict(self))
        out.update(
            pages_mapped=self.pages_mapped,
            bytes_released_total=self.bytes_released_total,
            usage_ratio=self.usage_ratio,
            prefix_hit_rate=self.prefix_hit_rate,
        )
        return out
