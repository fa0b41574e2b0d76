"""The vAttention allocator's per-slot records (``replica.kv.allocator``).

A slot's ``groups[i]`` holds the page ids (one per reserved range) mapped at its page index ``i``;
``tickets[i]`` is the mapping worker's batch that maps them, so a caller waits only for the batch
its tokens need (eager groups booked ahead map in the background).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


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
    tickets: list[int] = field(
        default_factory=list
    )  # tickets[i]: the worker batch that maps groups[i]
    released_at: float = 0.0
    # Prefix sharing: the token ids the slot's K/V stand for (the prompt while running, the stored
    # tokens once released), their blocks' prefix keys as far as computed, and how many leading
    # groups are immutable (indexed, aliased, or equal to an indexed group): nothing writes there.
    token_ids: tuple[int, ...] = ()
    keys: list[int] = field(default_factory=list)
    frozen: int = 0
