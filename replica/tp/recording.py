"""The page plan: rank 0's allocator calls, recorded so the other ranks can replay them.

Rank 0's scheduler talks to a :class:`RecordingAllocator` instead of its allocator. Every call that
changes the allocator's books (``acquire``, ``ensure``, ``release``, ``shrink``) is forwarded and
appended to a log, outcome included; reads are forwarded as they are. Each step rank 0 drains the
log into the step's message and every other rank :func:`replay`\\ s it on its own allocator.

Invariant: replaying the drained calls, in order, on an allocator that had the same books as rank
0's before them gives it the same books after them. This holds because the allocator policy is
deterministic given its calls, except for times (``released_at``, idle pages), whose *order* is the
same on every rank; so each acquire returns the same slot, and each ensure succeeds or runs out of
memory alike. :func:`replay` checks both and raises :class:`ReplayMismatch` otherwise.

``step_async`` is not recorded: every rank's ModelRunner calls it itself with the same lengths.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from replica.kv_allocator import KVCacheOutOfMemory

Op = Literal["acquire", "ensure", "release", "shrink"]


class Allocator(Protocol):
    """What the scheduler changes on a KV cache (KVCacheAllocator and PagedKVCache both fit)."""

    def acquire(self, tokens_hint: int = 0) -> int: ...
    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None: ...
    def release(self, slot_index: int) -> None: ...
    def shrink(self) -> int: ...


@dataclass(frozen=True)
class AllocatorCall:
    """One recorded call. ``slot``: the slot acquired (acquire) or operated on (ensure, release);
    ``tokens``: the hint (acquire) or the tokens backed (ensure); ``out_of_memory``: the call
    raised KVCacheOutOfMemory on rank 0 (it may still have reclaimed pages: replay it too)."""

    op: Op
    slot: int = -1
    tokens: int = 0
    out_of_memory: bool = False


class ReplayMismatch(RuntimeError):
    """A replayed call had another outcome than on rank 0: this rank's books have diverged."""


class RecordingAllocator:
    """Forwards to ``allocator`` and records its state-changing calls (see the module docstring).

    Only the names in ``READS`` are forwarded besides the recorded calls; anything else raises
    AttributeError, so a new state-changing call cannot bypass the log unnoticed.
    """

    READS = frozenset({
        "config", "reclaimable_pages", "can_allocate", "stats", "length", "check_invariants",
        "slot_states", "k_cache", "v_cache", "reservations", "device_pages", "drain_map_latencies",
        "synchronize", "wait", "done", "block_ids", "block_table",
    })

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator
        self._calls: list[AllocatorCall] = []

    def acquire(self, tokens_hint: int = 0) -> int:
        try:
            slot = self.allocator.acquire(tokens_hint)
        except KVCacheOutOfMemory:
            self._calls.append(AllocatorCall("acquire", -1, tokens_hint, True))
            raise
        self._calls.append(AllocatorCall("acquire", slot, tokens_hint))
        return slot

    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None:
        """Recorded without ``wait``: the other ranks map synchronously when they replay it."""
        try:
            self.allocator.ensure(slot_index, tokens, wait)
        except KVCacheOutOfMemory:
            self._calls.append(AllocatorCall("ensure", slot_index, tokens, True))
            raise
        self._calls.append(AllocatorCall("ensure", slot_index, tokens))

    def release(self, slot_index: int) -> None:
        self.allocator.release(slot_index)
        self._calls.append(AllocatorCall("release", slot_index))

    def shrink(self) -> int:
        released = self.allocator.shrink()
        self._calls.append(AllocatorCall("shrink"))
        return released

    def drain(self) -> tuple[AllocatorCall, ...]:
        """The calls recorded since the last drain, oldest first; the log starts empty again."""
        calls, self._calls = tuple(self._calls), []
        return calls

    @property
    def pending(self) -> int:
        return len(self._calls)

    def __getattr__(self, name: str) -> Any:
        if name in RecordingAllocator.READS:
            return getattr(self.allocator, name)
        raise AttributeError(
            f"RecordingAllocator does not forward {name!r}: under tensor parallelism every call "
            f"that changes the KV books must be recorded and replayed on each rank")


def replay(allocator: Allocator, calls: Iterable[AllocatorCall]) -> None:
    """Makes ``calls`` on ``allocator``; raises ReplayMismatch when an outcome differs from rank
    0's (a different slot, or out of memory on one side only)."""
    for index, call in enumerate(calls):
        try:
            if call.op == "acquire":
                slot = allocator.acquire(call.tokens)
                if slot != call.slot:
                    raise ReplayMismatch(
                        f"call {index}: acquire(tokens_hint={call.tokens}) gave slot {slot}, "
                        f"rank 0 got slot {call.slot}")
            elif call.op == "ensure":
                allocator.ensure(call.slot, call.tokens)
            elif call.op == "release":
                allocator.release(call.slot)
            elif call.op == "shrink":
                allocator.shrink()
            else:
                raise ReplayMismatch(f"call {index}: unknown allocator call {call.op!r}")
        except KVCacheOutOfMemory as error:
            if not call.out_of_memory:
                raise ReplayMismatch(f"call {index}: {call} ran out of memory here only: {error}") from error
            continue
        if call.out_of_memory:
            raise ReplayMismatch(f"call {index}: {call} ran out of memory on rank 0 only")
