"""The one KV-cache interface the scheduler, engine, model runner and tensor-parallel driver use.

Three implementations, each in its own words:

    KVCacheAllocator  (replica.kv.allocator)  vAttention: contiguous virtual slots, physical pages
                                              mapped under them in the background
    PagedKVCache      (replica.kv.paged)      the PagedAttention comparison mode: fixed blocks and
                                              block tables, nothing to map
    RecordingKVCache  (replica.kv.recording)  rank 0 of a tensor-parallel replica: forwards to its
                                              own cache and records what changes the books

A request owns a *slot* (``acquire`` .. ``release``). A running slot has a *length* (tokens
stored) and backs at least that many tokens; ``ensure`` backs more, ``step_async`` records the
step's lengths and backs one token more for the next step. Capacity is counted in physical
*pages*: ``pages_for(tokens)`` is what a slot holding ``tokens`` holds, over every range.

Contracts every implementation keeps (ValueError before anything changes, otherwise):
    slot indices are ints in [0, max_slots); calls on a slot other than ``acquire`` need it running
    token counts are ints (not bools) in [0, tokens_per_slot]
    ``step_async`` lengths are ints with length + 1 within the slot; a slot that cannot be backed
        that far comes back ``unbacked`` and keeps a length it backs (never more)
    KVCacheOutOfMemory (never a crash, nothing lost) when pages cannot be had: the scheduler
        waits or preempts
    a StepTicket of 0 has nothing to wait for

Prefix sharing (where the cache has it on): ``acquire(hint, prompt)`` starts the slot with the
longest cached prefix of ``prompt``, whole pages of it and never its last token; the slot's length
is that many tokens (``cached_tokens(prompt)`` says how many beforehand) and those pages are
shared and immutable: ``ensure`` below them is a ValueError. ``release(slot, token_ids)`` hands the
tokens whose K/V the slot holds, so their full pages serve later requests. Caches without prefix
sharing take the arguments and start every slot empty.

Host tier (where a cache has one): a copy to or from it that raises never escapes ``acquire`` or
``release`` (``replica.kv.tier_faults``): a failed restore leaves the slot its device hit only
(the request computes the rest, never reads the blocks), a failed offload leaves its blocks out of
the tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from replica.kv.prefix import PrefixSummary
from replica.kv.stats import KVCacheStats, MappingBreakdown

if TYPE_CHECKING:
    from replica.kv.tier_faults import TierFaults


class KVCacheOutOfMemory(Exception):
    """The cache cannot back the tokens asked for, even after reclaiming; never a crash — the
    scheduler answers it by waiting or preempting."""

    def __init__(
        self,
        tokens_asked: int,
        pages_needed: int,
        pages_available: int,
        pages_cached: int,
        why: str = "",
    ):
        self.tokens_asked = tokens_asked
        self.pages_needed = pages_needed
        self.pages_available = pages_available  # free plus creatable (glossary)
        self.pages_cached = pages_cached
        super().__init__(
            f"KV cache out of memory{': ' + why if why else ''}: {tokens_asked} tokens asked need "
            f"{pages_needed} more pages; {pages_available} available (free or creatable), "
            f"{pages_cached} cached"
        )


class KVRestoreFailed(Exception):
    """A waited ``ensure`` backed its tokens, but the slot's deferred host-tier restore
    (``replica.kv.slot_restores``) could not be copied: the slot holds valid K/V below
    ``kept_tokens`` only (its device hit, or part of the restore), so the request's computed
    tokens drop to ``kept_tokens`` and it computes the rest (never wrong tokens). The call is
    complete otherwise: its tokens are backed and recorded as the slot's length."""

    def __init__(self, slot_index: int, kept_tokens: int, restored_tokens: int) -> None:
        self.slot_index = slot_index
        self.kept_tokens = kept_tokens
        super().__init__(
            f"slot {slot_index}: the host-tier restore up to token {restored_tokens} failed; "
            f"its K/V is valid below token {kept_tokens}"
        )


@dataclass(frozen=True)
class StepTicket:
    """The mapping submitted for the next step (0: nothing to wait for); ``unbacked`` slots could
    not grow (preempt them)."""

    ticket: int
    unbacked: tuple[int, ...]


def require_positive_ints(config: object, names: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of ``names`` that is not a positive int."""
    for name in names:
        value = getattr(config, name)
        if not is_int(value) or value <= 0:
            raise ValueError(
                f"{type(config).__name__}.{name} must be a positive int, got {value!r}"
            )


def require_non_negative_ints(config: object, names: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of ``names`` that is not an int >= 0 (None passes)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (not is_int(value) or value < 0):
            raise ValueError(f"{type(config).__name__}.{name} must be an int >= 0, got {value!r}")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class KVGeometry(Protocol):
    """What a cache's config states about its shape (KVCacheConfig and PagedKVConfig do)."""

    max_slots: int

    @property
    def tokens_per_slot(self) -> int: ...

    @property
    def budget_pages(self) -> int: ...


class KVCache(ABC):
    """What the layers above a KV cache call (see the module docstring for the contracts). A cache
    built on a config (``self.config``, a KVGeometry) gets its geometry from it; one that wraps
    another cache overrides the three properties."""

    config: KVGeometry

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def max_slots(self) -> int:
        """Requests that can hold a slot at once."""
        return self.config.max_slots

    @property
    def tokens_per_slot(self) -> int:
        """The most tokens one slot holds (max_model_len rounded up to whole pages)."""
        return self.config.tokens_per_slot

    @property
    def budget_pages(self) -> int:
        """Physical pages the cache may hold at most."""
        return self.config.budget_pages

    @abstractmethod
    def pages_for(self, tokens: int) -> int:
        """Physical pages a slot holding ``tokens`` tokens holds (over every range)."""

    @property
    def tokens_per_page(self) -> float:
        """Tokens one physical page holds, counting every range a token occupies: a request of
        T tokens needs about T / this many pages (the router's conversion)."""
        return self.tokens_per_slot / self.pages_for(self.tokens_per_slot)

    def token_capacity(self) -> int:
        """Tokens the physical budget holds over all slots (bounds the keys of one step)."""
        return int(self.budget_pages * self.tokens_per_page)

    # ---- slots ---------------------------------------------------------------------------------
    @abstractmethod
    def acquire(self, tokens_hint: int = 0, prompt: Sequence[int] = ()) -> int:
        """A slot for a new request, running, its length the cached prefix of ``prompt`` (0
        without prefix sharing); KVCacheOutOfMemory if every slot runs."""

    @abstractmethod
    def release(self, slot_index: int, token_ids: Sequence[int] = ()) -> None:
        """Ends the slot's request; ``token_ids``: the tokens its K/V holds (prefix sharing)."""

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        """Tokens of ``prompt`` that ``acquire`` would find cached now (0 without sharing)."""
        return 0

    @property
    def prefix_block_tokens(self) -> int:
        """Tokens of one shareable block (a page group of the vAttention cache, a block of the
        paged mode), 0 without prefix sharing. A running slot's prompt is indexed in blocks of
        this many tokens as its steps write them (at ``step_async``), so the scheduler can tell
        which blocks of a waiting prompt a running prefill is about to index."""
        return 0

    def prefix_summary(self, limit: int = 2048) -> PrefixSummary | None:
        """What the router learns of the cached prefixes (``replica.kv.prefix``): the chain's
        root, the tokens per block, and up to ``limit`` summary keys, the newest last (None
        without sharing)."""
        return None

    @property
    def tier_faults(self) -> TierFaults | None:
        """The host tier's copies and their failures (``replica.kv.tier_faults``; None without a
        host tier): what tensor parallelism records and mirrors."""
        return None

    def drop_host_blocks(self, keys: Sequence[int]) -> None:
        """Drops the prefix blocks ``keys`` from the host tier (a copy of them failed on another
        rank: every rank's tier keeps the same keys). Changes the books: recorded under tensor
        parallelism."""
        if self.tier_faults is not None:
            self.tier_faults.drop(keys)

    @abstractmethod
    def length(self, slot_index: int) -> int:
        """Tokens the running slot stores."""

    def slot_pages(self, slot_index: int) -> int:
        """Physical pages mapped under the running slot, shared ones included (by default what
        its length holds)."""
        return self.pages_for(self.length(slot_index))

    # ---- growth --------------------------------------------------------------------------------
    @abstractmethod
    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None:
        """Backs tokens [0, tokens) of a running slot and records ``tokens`` as its length. With
        ``wait`` they are usable on return; without, they may still be mapping (a later ``ensure``
        of them, ``wait`` or ``synchronize`` waits). KVCacheOutOfMemory if they cannot be had."""

    @abstractmethod
    def step_async(self, lengths: Mapping[int, int]) -> StepTicket:
        """Records each running slot's length after a step and backs length + 1 tokens for the
        next step, possibly in the background; slots that cannot grow come back ``unbacked`` with
        their length cut to what they back."""

    @abstractmethod
    def wait(self, ticket: StepTicket | int) -> tuple[int, ...]:
        """Waits for a ticket's mapping; returns its unbacked slots."""

    @abstractmethod
    def done(self, ticket: StepTicket | int) -> bool:
        """Whether waiting for the ticket would return at once."""

    @abstractmethod
    def synchronize(self) -> None:
        """Completes every pending operation."""

    def ready(self, slot_index: int, tokens: int, timeout_s: float = 0.0) -> bool:
        """Whether tokens [0, tokens) of a running slot are backed and usable: ``ensure`` of them
        would not wait. Waits up to ``timeout_s`` for their mapping (True at once where nothing
        maps in the background)."""
        self.check_slot(slot_index)
        return True

    # ---- borrowed prefix reads (replica.kv.borrows) ---------------------------------------------
    def enable_borrowed_reads(self, granularity: int = 1) -> bool:
        """Lets a prefix hit be read from the slot holding it until the hit is the slot's own (the
        engine's attention backend reads a borrowed prefix of a multiple of ``granularity``
        tokens); whether this cache can."""
        return False

    def borrowed_reads(self) -> Mapping[int, tuple[int, int]]:
        """Running slot -> (holder slot, leading tokens of it to read from the holder's pages)."""
        return {}

    def end_borrows(self, slot_indices: Sequence[int] | None = None) -> tuple[int, ...]:
        """Ends the borrows that no longer need their holder (None), or those of
        ``slot_indices`` (another rank's); returns the slots. Changes the books: recorded under
        tensor parallelism."""
        return ()

    # ---- pressure ------------------------------------------------------------------------------
    @abstractmethod
    def reclaimable_pages(self) -> int:
        """Pages a new request could get now (free, creatable, and reclaimable from others)."""

    @abstractmethod
    def can_allocate(self, tokens: int) -> bool:
        """Whether a new request of ``tokens`` tokens could get a slot and its pages now."""

    @abstractmethod
    def shrink(self) -> int:
        """Gives every page nobody needs back to the device; returns the pages released."""

    # ---- reading -------------------------------------------------------------------------------
    @abstractmethod
    def stats(self) -> KVCacheStats:
        """A frozen snapshot of the books."""

    def mapping_breakdown(self) -> MappingBreakdown | None:
        """The mapping worker's time by operation kind and cause and the callers' waits by
        cause (None where nothing maps)."""
        return None

    def drain_map_latencies(self) -> list[float]:
        """Seconds each map run took since the last call (empty where nothing is mapped)."""
        return []

    @abstractmethod
    def check_invariants(self, deep: bool = False) -> None:
        """Asserts the implementation's written invariants (``deep``: against the device too)."""

    @abstractmethod
    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K as the attention backends read it."""

    @abstractmethod
    def v_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s V as the attention backends read it."""

    # ---- contracts -----------------------------------------------------------------------------
    def check_slot(self, slot_index: object) -> int:
        """``slot_index`` as an int in [0, max_slots), else ValueError."""
        if not is_int(slot_index) or not 0 <= slot_index < self.max_slots:  # type: ignore[operator]
            raise ValueError(f"slot {slot_index!r} is not an int in [0, {self.max_slots})")
        return slot_index  # type: ignore[return-value]

    def check_tokens(self, slot_index: int, tokens: object) -> int:
        """``tokens`` as an int a slot can hold, else ValueError."""
        if not is_int(tokens) or not 0 <= tokens <= self.tokens_per_slot:  # type: ignore[operator]
            raise ValueError(
                f"slot {slot_index}: {tokens!r} tokens asked; a slot holds "
                f"0..{self.tokens_per_slot}"
            )
        return tokens  # type: ignore[return-value]

    def check_hint(self, tokens_hint: object) -> int:
        """An ``acquire`` hint: an int >= 0, else ValueError."""
        if not is_int(tokens_hint) or tokens_hint < 0:  # type: ignore[operator]
            raise ValueError(f"tokens_hint must be an int >= 0, got {tokens_hint!r}")
        return tokens_hint  # type: ignore[return-value]

    def check_step_lengths(self, lengths: Mapping[int, int]) -> None:
        """The ``step_async`` contract: every length an int, length + 1 within the slot."""
        for slot_index, length in lengths.items():
            self.check_tokens(slot_index, length)
            if length + 1 > self.tokens_per_slot:
                raise ValueError(
                    f"slot {slot_index}: a step after {length} tokens passes the slot's "
                    f"{self.tokens_per_slot}"
                )
