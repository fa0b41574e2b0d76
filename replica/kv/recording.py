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

Host-tier copies that raise (``replica.kv.tier_faults``) are outcomes too: a call carries rank 0's
(``tier_faults``), the replaying rank fails the same copies so its books follow, and compares the
keys each dropped. A rank's own failed offload is returned by :func:`replay` (rank 0 then drops the
keys everywhere: ``drop_host_blocks``); its own failed restore is a mismatch (its blocks would
differ from rank 0's). The vAttention cache copies a restore at the slot's first waited ``ensure``
(``replica.kv.slot_restores``), so ``ensure`` carries its faults and whether it waited: a replaying
rank waits where rank 0 waited, and its restore starts at the same call.

``step_async`` is not recorded: every rank's ModelRunner calls it itself with the same lengths.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from replica.kv.base import (
    KVCache,
    KVCacheOutOfMemory,
    KVRestoreFailed,
    PrefixSummary,
    StepTicket,
)
from replica.kv.stats import KVCacheStats, MappingBreakdown
from replica.kv.tier_faults import MirrorOutcome, TierFault, TierFaults

Op = Literal["acquire", "ensure", "release", "shrink", "drop_host", "end_borrows"]


@dataclass(frozen=True)
class AllocatorCall:
    """One recorded call. ``slot``: the slot acquired (acquire) or operated on (ensure, release);
    ``tokens``: the hint (acquire) or the tokens backed (ensure); ``out_of_memory``: the call
    raised KVCacheOutOfMemory on rank 0 (it may still have reclaimed pages: replay it too).
    Prefix sharing: ``token_ids`` is the prompt (acquire) or the stored tokens (release), so every
    rank indexes and aliases the same pages; ``cached``: the length acquire gave the slot.
    Host tier: ``tier_faults``, the call's copies that raised on rank 0 (acquire, ensure,
    release); ``host_keys``, the blocks to drop (drop_host). ``wait``: whether rank 0's ensure
    waited (only a waited ensure starts a slot's deferred restore). ``slots``: the borrows rank 0
    ended (end_borrows: its aliases were mapped there; ``replica.kv.borrows``)."""

    op: Op
    slot: int = -1
    tokens: int = 0
    out_of_memory: bool = False
    token_ids: tuple[int, ...] = ()
    cached: int = 0
    tier_faults: tuple[TierFault, ...] = ()
    host_keys: tuple[int, ...] = ()
    wait: bool = True
    slots: tuple[int, ...] = ()


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
            faults = self._tier_faults()
            self._calls.append(AllocatorCall("acquire", -1, tokens_hint, True, prompt, 0, faults))
            raise
        cached, faults = self.cache.length(slot), self._tier_faults()
        self._calls.append(
            AllocatorCall("acquire", slot, tokens_hint, False, prompt, cached, faults)
        )
        return slot

    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None:
        """Recorded with ``wait`` and the faults of the restore it may copy (KVRestoreFailed is
        an outcome the replaying ranks repeat through the mirrored fault)."""
        try:
            self.cache.ensure(slot_index, tokens, wait)
        except (KVCacheOutOfMemory, KVRestoreFailed) as error:
            self._record_ensure(slot_index, tokens, wait, isinstance(error, KVCacheOutOfMemory))
            raise
        self._record_ensure(slot_index, tokens, wait, False)

    def _record_ensure(self, slot_index: int, tokens: int, wait: bool, oom: bool) -> None:
        faults = self._tier_faults()
        self._calls.append(
            AllocatorCall("ensure", slot_index, tokens, oom, tier_faults=faults, wait=wait)
        )

    def release(self, slot_index: int, token_ids: Sequence[int] = ()) -> None:
        token_ids = tuple(token_ids)
        self.cache.release(slot_index, token_ids)
        faults = self._tier_faults()
        self._calls.append(
            AllocatorCall("release", slot_index, token_ids=token_ids, tier_faults=faults)
        )

    def shrink(self) -> int:
        released = self.cache.shrink()
        self._calls.append(AllocatorCall("shrink"))
        return released

    def drop_host_blocks(self, keys: Sequence[int]) -> None:
        keys = tuple(keys)
        self.cache.drop_host_blocks(keys)
        self._calls.append(AllocatorCall("drop_host", host_keys=keys))

    def end_borrows(self, slot_indices: Sequence[int] | None = None) -> tuple[int, ...]:
        """Recorded with the slots it ended (when any): rank 0's timing decides which."""
        ended = self.cache.end_borrows(slot_indices)
        if ended:
            self._calls.append(AllocatorCall("end_borrows", slots=ended))
        return ended

    def _tier_faults(self) -> tuple[TierFault, ...]:
        """The host-tier copies that raised in the call just made (at most one)."""
        faults = self.cache.tier_faults
        return faults.drain() if faults is not None else ()

    def enable_borrowed_reads(self, granularity: int = 1) -> bool:
        """Not recorded: every rank's model runner makes this call itself."""
        return self.cache.enable_borrowed_reads(granularity)

    def borrowed_reads(self) -> Mapping[int, tuple[int, int]]:
        return self.cache.borrowed_reads()

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

    @property
    def tier_faults(self) -> TierFaults | None:
        return self.cache.tier_faults

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


def replay(allocator: KVCache, calls: Iterable[AllocatorCall]) -> tuple[int, ...]:
    """Makes ``calls`` on ``allocator``; raises ReplayMismatch when an outcome differs from rank
    0's (a different slot, out of memory on one side only, other host-tier copies failing).
    Returns the host-tier keys this rank dropped on its own (its offload failed where rank 0's did
    not): rank 0 drops them on every rank next (``KVCache.drop_host_blocks``)."""
    faults = allocator.tier_faults
    dropped: list[int] = []
    for index, call in enumerate(calls):
        if faults is not None:
            faults.mirror(call.tier_faults)
        try:
            outcome: tuple[int, int] | KVCacheOutOfMemory | None = _make(allocator, index, call)
        except KVCacheOutOfMemory as error:
            outcome = error
        if faults is not None:
            dropped += _own_offload_faults(index, call, faults.end_mirror())
        _check_outcome(index, call, outcome)
    return tuple(dropped)


def _make(allocator: KVCache, index: int, call: AllocatorCall) -> tuple[int, int] | None:
    """Makes one call; an acquire returns its slot and the tokens it found cached."""
    if call.op == "acquire":
        slot = allocator.acquire(call.tokens, call.token_ids)
        return slot, allocator.length(slot)
    if call.op == "ensure":
        try:
            allocator.ensure(call.slot, call.tokens, call.wait)
        except KVRestoreFailed:
            pass  # as on rank 0: its fault was mirrored here (``replay`` compares them)
    elif call.op == "release":
        allocator.release(call.slot, call.token_ids)
    elif call.op == "shrink":
        allocator.shrink()
    elif call.op == "drop_host":
        allocator.drop_host_blocks(call.host_keys)
    elif call.op == "end_borrows":
        try:
            allocator.end_borrows(call.slots)
        except ValueError as error:
            raise ReplayMismatch(f"call {index}: {call.op}: {error}") from error
    else:
        raise ReplayMismatch(f"call {index}: unknown allocator call {call.op!r}")
    return None


def _check_outcome(
    index: int, call: AllocatorCall, outcome: tuple[int, int] | KVCacheOutOfMemory | None
) -> None:
    if isinstance(outcome, KVCacheOutOfMemory):
        if not call.out_of_memory:
            raise ReplayMismatch(
                f"call {index}: {call} ran out of memory here only: {outcome}"
            ) from outcome
        return
    if call.out_of_memory:
        raise ReplayMismatch(f"call {index}: {call} ran out of memory on rank 0 only")
    if outcome is not None and outcome != (call.slot, call.cached):
        slot, cached = outcome
        raise ReplayMismatch(
            f"call {index}: acquire(tokens_hint={call.tokens}) gave slot {slot} with "
            f"{cached} cached tokens, rank 0 got slot {call.slot} with {call.cached}"
        )


def _own_offload_faults(index: int, call: AllocatorCall, outcome: MirrorOutcome) -> list[int]:
    """The keys this rank's own failed offloads dropped; ReplayMismatch where the call's host
    copies did not fail as on rank 0 (``replica.kv.tier_faults``)."""
    if outcome.missed or outcome.mirrored != call.tier_faults:
        raise ReplayMismatch(
            f"call {index}: {call.op}: rank 0's failed host-tier copies {call.tier_faults} were "
            f"not repeated here alike ({outcome.mirrored}, never made: {outcome.missed})"
        )
    for fault in outcome.own:
        if fault.direction == "restore":
            raise ReplayMismatch(
                f"call {index}: {call.op}: this rank's host-tier restore failed ({fault.error}) "
                f"where rank 0's did not: its K/V of {len(fault.keys)} blocks would differ"
            )
    return [key for fault in outcome.own for key in fault.keys]
