"""The page plan: rank 0's allocator calls, recorded so the other ranks can replay them.

Rank 0's scheduler talks to a :class:`RecordingKVCache` instead of its own cache. Every call that
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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from replica.kv.base import KVCache, KVCacheOutOfMemory, PrefixSummary, StepTicket
from replica.kv.stats import KVCacheStats, MappingBreakdown

Op = Literal["acquire", "ensure", "release", "shrink"]


@dataclass(frozen=True)
class AllocatorCall:
    """One recorded call. ``slot``: the slot acquired (acquire) or operated on (ensure, release);
    ``tokens``: the hint (acquire) or the tokens backed (ensure); ``out_of_memory``: the call
    raised KVCacheOutOfMemory on rank 0 (it may still have reclaimed pages: replay it too).
    Prefix sharing: ``token_ids`` is the prompt (acquire) or the stored tokens (release), so every
    rank indexes and aliases the same pages; ``cached``: the length acquire gave the slot."""

    op: Op
    slot: int = -1
    tokens: int = 0
    out_of_memory: bool = False
    token_ids: tuple[int, ...] = ()
    cached: int = 0


class ReplayMismatch(RuntimeError):
    """A replayed call had another outcome than on rank 0: this rank's books have diverged."""


class RecordingKVCache(KVCache):
    """Forwards every call to ``cache`` and records the calls that change its books (see the
    module docstring). Every method of the interface is spelt out here, so a call that changes
    the books cannot bypass the log unnoticed."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self._calls: list[AllocatorCall] = []

    # ---- recorded ------------------------------------------------------------------------------
    def acquire(self, tokens_hint: int = 0, prompt: Sequence[int] = ()) -> int:
        prompt = tuple(prompt)
        try:
            slot = self.cache.acquire(tokens_hint, prompt)
        except KVCacheOutOfMemory:
            self._calls.append(AllocatorCall("acquire", -1, tokens_hint, True, prompt))
            raise
        cached = self.cache.length(slot)
        self._calls.append(AllocatorCall("acquire", slot, tokens_hint, False, prompt, cached))
        return slot

    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None:
        """Recorded without ``wait``: the other ranks map synchronously when they replay it."""
        try:
            self.cache.ensure(slot_index, tokens, wait)
        except KVCacheOutOfMemory:
            self._calls.append(AllocatorCall("ensure", slot_index, tokens, True))
            raise
        self._calls.append(AllocatorCall("ensure", slot_index, tokens))

    def release(self, slot_index: int, token_ids: Sequence[int] = ()) -> None:
        token_ids = tuple(token_ids)
        self.cache.release(slot_index, token_ids)
        self._calls.append(AllocatorCall("release", slot_index, token_ids=token_ids))

    def shrink(self) -> int:
        released = self.cache.shrink()
        self._calls.append(AllocatorCall("shrink"))
        return released

    def step_async(self, lengths: Mapping[int, int]) -> StepTicket:
        """Not recorded: every rank's model runner makes this call itself with the same lengths."""
        return self.cache.step_async(lengths)

    def drain(self) -> tuple[AllocatorCall, ...]:
        """The calls recorded since the last drain, oldest first; the log starts empty again."""
        calls, self._calls = tuple(self._calls), []
        return calls

    @property
    def pending(self) -> int:
        return len(self._calls)

    # ---- forwarded reads -----------------------------------------------------------------------
    @property
    def max_slots(self) -> int:
        return self.cache.max_slots

    @property
    def tokens_per_slot(self) -> int:
        return self.cache.tokens_per_slot

    @property
    def budget_pages(self) -> int:
        return self.cache.budget_pages

    def pages_for(self, tokens: int) -> int:
        return self.cache.pages_for(tokens)

    def length(self, slot_index: int) -> int:
        return self.cache.length(slot_index)

    def slot_pages(self, slot_index: int) -> int:
        return self.cache.slot_pages(slot_index)

    @property
    def prefix_block_tokens(self) -> int:
        return self.cache.prefix_block_tokens

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        return self.cache.cached_tokens(prompt)

    def prefix_summary(self, limit: int = 2048) -> PrefixSummary | None:
        return self.cache.prefix_summary(limit)

    def wait(self, ticket: StepTicket | int) -> tuple[int, ...]:
        return self.cache.wait(ticket)

    def done(self, ticket: StepTicket | int) -> bool:
        return self.cache.done(ticket)

    def synchronize(self) -> None:
        self.cache.synchronize()

    def ready(self, slot_index: int, tokens: int, timeout_s: float = 0.0) -> bool:
        return self.cache.ready(slot_index, tokens, timeout_s)

    def mapping_breakdown(self) -> MappingBreakdown | None:
        return self.cache.mapping_breakdown()

    def reclaimable_pages(self) -> int:
        return self.cache.reclaimable_pages()

    def can_allocate(self, tokens: int) -> bool:
        return self.cache.can_allocate(tokens)

    def stats(self) -> KVCacheStats:
        return self.cache.stats()

    def drain_map_latencies(self) -> list[float]:
        return self.cache.drain_map_latencies()

    def check_invariants(self, deep: bool = False) -> None:
        self.cache.check_invariants(deep)

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.cache.k_cache(layer)

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.cache.v_cache(layer)

    def token_capacity(self) -> int:
        return self.cache.token_capacity()


def replay(allocator: KVCache, calls: Iterable[AllocatorCall]) -> None:
    """Makes ``calls`` on ``allocator``; raises ReplayMismatch when an outcome differs from rank
    0's (a different slot, or out of memory on one side only)."""
    for index, call in enumerate(calls):
        try:
            if call.op == "acquire":
                slot = allocator.acquire(call.tokens, call.token_ids)
                cached = allocator.length(slot)
                if (slot, cached) != (call.slot, call.cached):
                    raise ReplayMismatch(
                        f"call {index}: acquire(tokens_hint={call.tokens}) gave slot {slot} with "
                        f"{cached} cached tokens, rank 0 got slot {call.slot} with {call.cached}"
                    )
            elif call.op == "ensure":
                allocator.ensure(call.slot, call.tokens)
            elif call.op == "release":
                allocator.release(call.slot, call.token_ids)
            elif call.op == "shrink":
                allocator.shrink()
            else:
                raise ReplayMismatch(f"call {index}: unknown allocator call {call.op!r}")
        except KVCacheOutOfMemory as error:
            if not call.out_of_memory:
                raise ReplayMismatch(
                    f"call {index}: {call} ran out of memory here only: {error}"
                ) from error
            continue
        if call.out_of_memory:
            raise ReplayMismatch(f"call {index}: {call} ran out of memory on rank 0 only")
