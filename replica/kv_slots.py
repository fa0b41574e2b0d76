"""The allocator's per-slot records and the types its callers see (``replica.kv_allocator``).

A slot's ``groups[i]`` holds the page ids (one per reserved range) mapped at its page index ``i``;
``tickets[i]`` is the mapping worker's batch that maps them, so a caller waits only for the batch
its tokens need (eager groups booked ahead map in the background).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class KVCacheOutOfMemory(Exception):
    """The cache cannot back the tokens asked for, even after reclaiming; never a crash — the
    scheduler answers it by waiting or preempting."""

    def __init__(self, tokens_asked: int, pages_needed: int, pages_free: int, pages_cached: int, why: str = ""):
        self.tokens_asked = tokens_asked
        self.pages_needed = pages_needed
        self.pages_free = pages_free
        self.pages_cached = pages_cached
        super().__init__(
            f"KV cache out of memory{': ' + why if why else ''}: {tokens_asked} tokens asked need "
            f"{pages_needed} more pages; {pages_free} free (creatable included), {pages_cached} cached"
        )


class SlotState(Enum):
    FREE = "free"
    RUNNING = "running"
    CACHED = "cached"


@dataclass
class _Slot:
    state: SlotState = SlotState.FREE
    length: int = 0  # tokens stored
    reserved: int = 0  # tokens that must be backed for the coming step (>= length)
    groups: list[tuple[int, ...]] = field(default_factory=list)  # groups[i][r]: page id, range r
    tickets: list[int] = field(default_factory=list)  # tickets[i]: the worker batch that maps groups[i]
    released_at: float = 0.0


@dataclass(frozen=True)
class StepTicket:
    """The mapping submitted for the next step; ``unbacked`` slots could not grow (preempt them)."""

    ticket: int
    unbacked: tuple[int, ...]


def check_slot_tokens(slot_index: int, tokens: int, tokens_per_slot: int) -> None:
    """Raises ValueError unless a slot can hold ``tokens`` (both caches' books use it)."""
    if not 0 <= tokens <= tokens_per_slot:
        raise ValueError(f"slot {slot_index}: {tokens} tokens asked; a slot holds 0..{tokens_per_slot}")
