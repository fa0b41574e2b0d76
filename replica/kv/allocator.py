"""The vAttention KV cache allocator: which slot a request gets and which pages back it.

A request owns a *slot*: a fixed region of every reserved range (see ``replica.kv.config``), so its
K and
V are ordinary strided tensors. Physical pages are mapped under a slot as it grows; the mapping
runs on the extension's background worker (FIFO), so this class only keeps the books and emits
operations. It is owned by one engine thread and is not thread-safe.

Page groups: every range maps the same page indices of a slot together, so growth is counted in
groups of ``num_ranges`` physical pages.

Prefix sharing (``config.prefix_cache``): a slot's full page groups are indexed by the prefix key
of the tokens they hold (``replica.kv.prefix``) once those tokens are written (a running slot's
prompt, at ``step_async``; everything it stored, at ``release``). ``acquire`` with a prompt takes
the longest indexed prefix: a released slot that already holds the start of it is continued (or
taken over) in place; the groups it lacks are *aliased* (the same physical pages mapped again at the
same page indices of the new slot: zero copy, no block table) or *copied* into pages the slot
already maps (no driver call; ``acquire`` says when, ``replica.kv.copies`` the ordering contract).
Indexed groups are immutable: a slot writes only at and above its ``frozen`` groups. A page is
freed when its last mapping goes; reclaiming the least recently released slots first is the prefix
cache's LRU eviction as well as deferred reclamation (a page a running slot maps is never freed by
it)::

    slot 3 (released):  | g0 | g1 | g2 | g3'|        g0..g2 indexed, g3' partial (private)
    slot 5 (running):   | g0 | g1 | n2 | n3 |        aliases g0, g1; writes from n2 on
    slot 6 (running):   | c0 | c1 | n2 |             its own pages, g0 and g1 copied in

Invariants (``check_invariants``), in physical pages:
    free + in_use + cached == created <= budget
    in_use  = distinct pages mapped under running slots (eager pages included)
    cached  = pages mapped only under released slots, kept for reuse (deferred reclamation)
    a page's mapping count == the slots mapping its group, always at the same page index; a page
        mapped twice is indexed; free ids are mapped nowhere; two groups share no page
    a running slot backs every token below its length, and length >= frozen * tokens_per_group;
        an indexed group of a slot lies below its ``frozen``
    wasted_bytes == sum over running slots of (mapped bytes - length * bytes_per_token)
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from replica.kv.base import KVCache, KVCacheOutOfMemory, StepTicket
from replica.kv.config import KVCacheConfig, KVLayout
from replica.kv.copies import CopyFence, SlotCopies, SlotCopy
from replica.kv.page_pool import PhysicalPagePool
from replica.kv.prefix import (
    PrefixIndex,
    PrefixQueries,
    PrefixSummary,
    root_key,
    stored_prefix,
    unfreeze_unwritten,
)
from replica.kv.slots import SlotState, _Slot
from replica.kv.stats import KVCacheStats, MappingBreakdown, OpCause, WaitCause
from replica.vmm import (
    Device,
    MapWorker,
    Op,
    PagePool,
    Reservation,
    open_device,
    reservation_tensor,
)

log = logging.getLogger(__name__)

#: A page group: the page ids mapped at one page index of a slot, one per range.
Group = tuple[int, ...]
#: Where a prefix block lives: its index and the groups holding its bytes (one per page it spans).
BlockAt = tuple[int, tuple[Group, ...]]


class _Locations(Sequence[BlockAt]):
    """Where a slot's blocks live, computed on demand from its groups (``PrefixIndex.register``)."""

    def __init__(self, config: KVCacheConfig, groups: list[Group]) -> None:
        self._config, self._groups = config, groups

    def __len__(self) -> int:
        return len(self._groups) * self._config.page_size // self._config.block_bytes

    def __getitem__(self, block: int) -> BlockAt:  # type: ignore[override]
        return block, tuple(self._groups[p] for p in self._config.block_pages(block))


#: Set VATTN_CHECK_INVARIANTS=1 to check the books after every public call (debugging).
_CHECK_ALWAYS = os.environ.get("VATTN_CHECK_INVARIANTS") == "1"


class KVCacheAllocator(KVCache):
    def __init__(
        self,
        config: KVCacheConfig,
        device: Device | None = None,
        clock: Callable[[], float] = time.monotonic,
        make_fence: Callable[[], CopyFence] | None = None,
    ) -> None:
        self.config = config
        self.device = device or open_device("auto", config.page_size)
        if self.device.page_size != config.page_size:
            raise ValueError(
                f"config page size {config.page_size} != backend page size {self.device.page_size}"
            )
        self._clock = clock
        self._pool = PhysicalPagePool(
            config.budget_pages, config.max_idle_pages, config.idle_seconds, clock
        )
        self._pages = PagePool(self.device.backend)
        self._worker = MapWorker(self._pages)
        pages_per_range = config.max_slots * config.pages_per_slot
        self._ranges = [Reservation(self._pages, pages_per_range) for _ in range(config.num_ranges)]
        self._tensors = [
            reservation_tensor(r, self.device, config.dtype, config.range_shape)
            for r in self._ranges
        ]
        self._slots = [_Slot() for _ in range(config.max_slots)]
        slot_bytes = config.pages_per_slot * config.page_size
        self._copies = SlotCopies(
            [t.view(-1).view(torch.uint8).view(-1, slot_bytes) for t in self._tensors],
            config.page_size,
            make_fence,
        )
        self._ops: list[Op] = []
        self._last_ticket = 0
        self._waits: dict[WaitCause, list[float]] = {cause: [0, 0.0] for cause in WaitCause}
        self._admitting: set[int] = set()  # slots acquired and not backed by an ensure yet
        self._prefix = config.prefix_cache
        root = root_key(
            "vattention",
            config.prefix_key,
            config.layout.value,
            config.dtype,
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
            config.page_size,
        )
        # Prefix key -> the block and the groups holding its bytes; each group's located blocks.
        self._index: PrefixIndex[BlockAt] = PrefixIndex(
            root, config.prefix_block_tokens if self._prefix else 0
        )
        self._located: dict[Group, set[BlockAt]] = {}
        self._queries = PrefixQueries()  # lookups by acquire, and hits
        self.prefix_evicted_pages = 0  # indexed pages dropped from the index
        self.prefix_takeovers = 0  # hits served in a slot holding another conversation's history
        # Slots mapping each group, and running slots mapping it: the page split in O(1).
        self._group_slots: Counter[tuple[int, ...]] = Counter()
        self._group_running: Counter[tuple[int, ...]] = Counter()

    # ---- tensors -------------------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K: [max_slots, tokens_per_slot, kv_heads, head_dim] (maybe strided)."""
        return self._layer_view(layer, 0)

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._layer_view(layer, 1)

    def _layer_view(self, layer: int, kv: int) -> torch.Tensor:
        if not 0 <= layer < self.config.num_layers:
            raise IndexError(f"layer {layer} outside [0, {self.config.num_layers})")
        if self.config.layout is KVLayout.PER_LAYER:
            return self._tensors[2 * layer + kv]
        return self._tensors[0][
            :, :, layer, kv
        ]  # [slots, tokens, layers, 2, heads, dim] -> strided

    # ---- geometry ------------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        """A page group (one page per range) per ``page_size`` bytes of a token's range."""
        return self.config.page_groups_for(tokens) * self.config.num_ranges

    def _backed_tokens(self, slot: _Slot) -> int:
        return min(
            len(slot.groups) * self.config.page_size // self.config.bytes_per_token,
            self.config.tokens_per_slot,
        )

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        """The reserved ranges (K/V per layer, or K and V), in the order described in kv_config."""
        return tuple(self._ranges)

    def device_pages(self) -> int:
        """Physical pages the extension holds right now (after pending operations ran)."""
        return len(self._pages)

    # ---- slots ---------------------------------------------------------------------------------
    def acquire(self, tokens_hint: int = 0, prompt: Sequence[int] = ()) -> int:
        """Gives a request a slot. With the prefix cache, the slot starts with the longest cached
        prefix of ``prompt`` (its length: ``cached_tokens(prompt)``), taken in this order:

        1. *continued* in the released slot whose whole cached prefix starts the hit (the same
           conversation's next turn: nothing moves);
        2. *aliased* into a free slot (the hit's pages mapped again, zero copy);
        3. *taken over*: the least recently released slot that holds the whole hit at its start
           (another conversation over the same prefix): its tail beyond the hit is evicted and
           counted (``prefix_takeovers``), nothing moves;
        4. else into the least recently released slot, whose pages are mapped: where it maps a
           page only it holds, the hit's page is *copied* into it while free pages cover the
           copies (a copy forgoes the memory aliasing would free; ~1.5 us a 2 MiB page against
           ~50-80 us to unmap and map), else the slot's pages are unmapped and the rest of the
           hit aliased (pages are scarce: aliasing keeps one copy). Copies follow the ordering
           contract of ``replica.kv.copies``.

        Without the prefix cache, the released slot whose mapped pages best fit ``tokens_hint``
        (deferred reclamation pays off here), else an empty one."""
        need = self.config.page_groups_for(self.check_hint(tokens_hint))
        prompt = tuple(prompt)
        hit, keys = self._lookup(prompt)
        hit_keys = keys[: len(hit)]
        index = self._choose_slot(hit, hit_keys, need, tokens_hint)
        slot = self._slots[index]
        kept = self._holds(slot, hit_keys)  # leading blocks of the slot that already hold the hit
        taken = self._take_hit(index, hit, kept) if self._prefix else 0
        cached_tokens = taken * self.config.prefix_block_tokens
        if self._prefix:
            self._queries.acquired(index, len(prompt), cached_tokens)
        self._set_state(slot, SlotState.RUNNING)
        self._admitting.add(index)
        slot.length, slot.reserved = cached_tokens, cached_tokens
        slot.token_ids, slot.keys, slot.frozen = prompt, hit_keys[:taken], taken
        self._flush()
        self._checked()
        return index

    @property
    def prefix_block_tokens(self) -> int:
        return self.config.prefix_block_tokens if self._prefix else 0

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        """Tokens of ``prompt`` that ``acquire`` would find cached now (whole prefix blocks, never
        the last prompt token)."""
        return len(self._lookup(tuple(prompt))[0]) * self.prefix_block_tokens

    def _lookup(self, prompt: tuple[int, ...]) -> tuple[list[BlockAt], list[int]]:
        """Where the blocks of the longest cached usable prefix of ``prompt`` live, and the keys
        computed on the way (one more than the blocks where the chain broke)."""
        return self._index.lookup(prompt) if self._prefix else ([], [])

    def _choose_slot(
        self, hit: list[BlockAt], hit_keys: list[int], need: int, tokens_hint: int
    ) -> int:
        """The slot ``acquire`` gives (its docstring's order)."""
        if hit:
            index = self._continuation(hit_keys)
            if index is not None:
                return index
        if self._prefix:
            empty = self._free_slot()
            if empty is not None:
                return empty
            cached = [i for i, s in enumerate(self._slots) if s.state is SlotState.CACHED]
            holders = [
                i for i in cached if hit and self._holds(self._slots[i], hit_keys) == len(hit)
            ]
            if holders:
                self.prefix_takeovers += 1
            if holders or cached:
                return min(holders or cached, key=lambda i: self._slots[i].released_at)
        return self._pick_slot(need, tokens_hint)

    def _free_slot(self) -> int | None:
        return next((i for i, s in enumerate(self._slots) if s.state is SlotState.FREE), None)

    @staticmethod
    def _holds(slot: _Slot, hit_keys: list[int]) -> int:
        """How many leading blocks of ``slot`` hold the hit's (equal keys: equal K/V, aliased or
        copied)."""
        held = 0
        limit = min(slot.frozen, len(hit_keys))
        while held < limit and slot.keys[held] == hit_keys[held]:
            held += 1
        return held

    def _continuation(self, hit_keys: list[int]) -> int | None:
        """The released slot whose whole cached prefix starts the hit (the same conversation,
        continued), the longest such (most recently released among equals), or None. A slot that
        cached more than the hit holds another conversation: it is left to its own next turn."""
        best, best_key = None, (0, 0.0)
        for index, slot in enumerate(self._slots):
            if (
                slot.state is not SlotState.CACHED
                or not 0 < slot.frozen <= len(hit_keys)
                or self._holds(slot, hit_keys) < slot.frozen
            ):
                continue
            if (slot.frozen, slot.released_at) > best_key:
                best, best_key = index, (slot.frozen, slot.released_at)
        return best

    def _pick_slot(self, need: int, tokens_hint: int) -> int:
        """A slot without the prefix cache: the released slot that best fits ``need`` groups, else
        an empty one."""
        cached = [i for i, s in enumerate(self._slots) if s.state is SlotState.CACHED]
        if cached:
            return min(
                cached,
                key=lambda i: (
                    len(self._slots[i].groups) < need,
                    abs(len(self._slots[i].groups) - need),
                ),
            )
        empty = self._free_slot()
        if empty is not None:
            return empty
        raise KVCacheOutOfMemory(
            tokens_hint,
            0,
            self._pool.available,
            0,
            f"all {self.config.max_slots} slots are running",
        )

    def _alias(self, slot_index: int, group: Group) -> None:
        """Maps ``group`` (indexed, held by other slots) at the slot's next page index."""
        slot = self._slots[slot_index]
        self._pool.share(group)
        base = slot_index * self.config.pages_per_slot + len(slot.groups)
        self._add_groups(slot, [group])
        slot.tickets.append(self._last_ticket + 1)
        for reservation, page in zip(self._ranges, group):
            self._ops.append(Op.map(reservation, base, [page], cause=OpCause.ALIAS))

    def _take_hit(self, slot_index: int, hit: list[BlockAt], kept: int) -> int:
        """Gives the slot, whose first ``kept`` blocks already hold the hit's, the rest of ``hit``
        (``acquire``'s rule, page by page from the one holding block ``kept``): a page wholly
        inside the hit whose blocks all live in one group is copied into the slot's own page
        there while free pages cover such copies, else aliased; the hit's bytes of other pages
        are copied into the slot's own page (a fresh one if it maps none). The slot keeps the
        pages only it maps beyond, unindexed from block ``kept`` on (their history is evicted);
        pages it shares with others and cannot write go. Returns the blocks the slot holds: all
        of the hit's, or fewer where no free page was left for a partial page's copy."""
        config, slot = self.config, self._slots[slot_index]
        size, hit_end = config.page_size, len(hit) * config.block_bytes
        start = kept * config.block_bytes  # the first byte to fill
        first = start // size
        self._copies.settle(slot_index, first)  # its pages from `first` on are rewritten
        end = first  # the slot's pages [first, end) are its own: rewritten in place
        while end < len(slot.groups) and self._private(slot.groups[end]):
            self._unindex(slot.groups[end], from_block=kept)
            end += 1
        if end == first < len(slot.groups):
            start = first * size  # a shared page the slot cannot write: refilled whole
        whole = self._whole_pages(hit)
        budget = self._pool.available // config.num_ranges  # pages copies may keep from aliasing
        spans: list[tuple[int, int]] = []  # byte ranges to copy from the hit's holders
        taken, shrunk = len(hit), False
        for page in range(first, -(-hit_end // size)):
            lo, hi = max(page * size, start), min((page + 1) * size, hit_end)
            group = whole.get(page) if (lo, hi) == (page * size, (page + 1) * size) else None
            if page < end and (group is None or budget > 0):
                budget -= group is not None
                spans.append((lo, hi))
                continue
            if not shrunk:  # from here on the slot's pages go: shared, or pages are scarce
                self._shrink_slot(slot_index, page, OpCause.REUSE, exact=True)
                shrunk, end = True, page
            if group is not None:
                self._alias(slot_index, group)
            elif self._add_fresh_group(slot_index):
                spans.append((lo, hi))
            else:  # no page for the partial page's copy: the hit ends before it, and aliases
                # reaching past its end go (a shared page lies wholly below the frozen blocks)
                slot.frozen = page * size // config.block_bytes
                self._shrink_slot(slot_index, len(slot.groups), OpCause.REUSE)
                taken, shrunk = slot.frozen, True
                break
        if not shrunk:  # the pages it shares beyond its own go: the request writes there
            self._shrink_slot(slot_index, end, OpCause.REUSE, exact=True)
        limit = min(taken * config.block_bytes, hit_end, len(slot.groups) * size)
        self._copy_spans(slot_index, hit[:taken], spans, limit)
        return taken

    def _whole_pages(self, hit: list[BlockAt]) -> dict[int, Group]:
        """Page index -> the one group every block of the hit touching that page lives in (pages
        whose blocks live in several groups are left out: they can only be copied)."""
        groups: dict[int, Group] = {}
        mixed: set[int] = set()
        for j, located in hit:
            for page, group in zip(self.config.block_pages(j), located):
                if groups.setdefault(page, group) != group:
                    mixed.add(page)
        for page in mixed:
            del groups[page]
        return groups

    def _add_fresh_group(self, slot_index: int) -> bool:
        """Maps a free page group at the slot's next page index without reclaiming (a reclaim
        could unmap a copy's source): False if none is free."""
        slot, ranges = self._slots[slot_index], self.config.num_ranges
        taken = self._pool.take(ranges)
        if taken is None:
            return False
        if taken.new_ids:
            self._ops.append(Op.create(list(taken.new_ids), cause=OpCause.GROWTH))
        base = slot_index * self.config.pages_per_slot + len(slot.groups)
        self._add_groups(slot, [taken.ids])
        slot.tickets.append(self._last_ticket + 1)
        for reservation, page in zip(self._ranges, taken.ids):
            self._ops.append(Op.map(reservation, base, [page], cause=OpCause.GROWTH))
        return True

    def _copy_spans(
        self, slot_index: int, hit: list[BlockAt], spans: list[tuple[int, int]], limit: int
    ) -> None:
        """Copies the hit's bytes in ``spans`` (below ``limit``) into the slot, from slots that
        map the blocks' groups, once both sides are mapped (ordering contract 2)."""
        spans = [(lo, min(hi, limit)) for lo, hi in spans if lo < limit]
        if not spans:
            return
        self._flush()  # fresh target pages' maps go out first
        config, slot = self.config, self._slots[slot_index]
        size, block = config.page_size, config.block_bytes
        copies: list[SlotCopy] = []
        source = -1
        for lo, hi in spans:
            for j in range(lo // block, -(-hi // block)):
                if source < 0 or not self._maps(self._slots[source], hit[j]):
                    source = self._holder(hit[j], exclude=slot_index)
                a, b = max(lo, j * block), min(hi, (j + 1) * block)
                last = copies[-1] if copies else None
                if last and last.source == source and last.stop == a:
                    copies[-1] = SlotCopy(source, slot_index, last.start, b)
                else:
                    copies.append(SlotCopy(source, slot_index, a, b))
        for c in copies:
            last_page = c.pages(size)[-1]
            for ticket in (self._slots[c.source].tickets[last_page], slot.tickets[last_page]):
                if not self._worker.done(ticket):
                    self._wait(ticket, WaitCause.ADMISSION)
        self._copies.copy(copies)

    def _maps(self, slot: _Slot, located: BlockAt) -> bool:
        """Whether ``slot`` maps every group of a block, each at its page index."""
        j, groups = located
        pages = self.config.block_pages(j)
        return len(slot.groups) >= pages.stop and all(
            slot.groups[p] == g for p, g in zip(pages, groups)
        )

    def _holder(self, located: BlockAt, exclude: int) -> int:
        """A slot other than ``exclude`` that maps the block's groups (at their page indices)."""
        for index, slot in enumerate(self._slots):
            if index != exclude and self._maps(slot, located):
                return index
        raise RuntimeError(f"bug: no slot maps the indexed block {located}")

    def release(self, slot_index: int, token_ids: Sequence[int] = ()) -> None:
        """Ends a request. Its pages stay mapped (cached) until the pool needs them, unless
        deferred reclamation is off. With the prefix cache, ``token_ids`` are the tokens whose
        K/V the slot holds (at most its length; without them, its prompt): its full groups are
        indexed for later requests."""
        slot = self._running(slot_index)
        self._queries.released(slot_index)
        self._admitting.discard(slot_index)
        if self._prefix:
            per_block = self.config.prefix_block_tokens
            stored = stored_prefix(
                slot_index, token_ids, slot.length, slot.token_ids, slot.frozen * per_block
            )
            slot.frozen, unindexed = unfreeze_unwritten(
                self._index,
                _Locations(self.config, slot.groups),
                slot.frozen,
                len(stored) // per_block,
                lambda located: all(self._private(g) for g in located[1]),
            )
            self.prefix_evicted_pages += unindexed * self.config.num_ranges
            del slot.keys[slot.frozen :]
            slot.token_ids = stored
            # Copied blocks whose first holder has gone are held here now.
            self._index_blocks(slot, 0, slot.frozen)
            self._register(slot, len(stored))
        self._set_state(slot, SlotState.CACHED)
        slot.length, slot.reserved = 0, 0
        slot.released_at = self._clock()
        if not self.config.deferred_reclamation:
            self._shrink_slot(slot_index, 0, OpCause.RELEASE)
        self._release_idle()
        self._flush()
        self._checked()

    def _register(self, slot: _Slot, tokens: int) -> None:
        """Indexes the slot's full blocks of its known tokens below ``tokens`` (written, or
        written by the step just launched, before any later step reads them) and freezes them."""
        config = self.config
        limit = min(
            min(tokens, len(slot.token_ids)) // config.prefix_block_tokens,
            len(slot.groups) * config.page_size // config.block_bytes,
        )
        if limit > slot.frozen:
            self._index_blocks(slot, slot.frozen, limit)
            slot.frozen = limit

    def _index_blocks(self, slot: _Slot, start: int, limit: int) -> None:
        """Indexes the slot's blocks ``[start, limit)`` where their keys are not indexed yet."""
        located = _Locations(self.config, slot.groups)
        for block in self._index.register(slot.keys, slot.token_ids, located, start, limit):
            for group in block[1]:
                self._located.setdefault(group, set()).add(block)

    def prefix_summary(self, limit: int = 2048) -> PrefixSummary | None:
        return self._index.summary(limit) if self._prefix else None

    def _private(self, group: tuple[int, ...]) -> bool:
        """Whether only one slot maps ``group``."""
        return all(self._pool.mappings(p) == 1 for p in group)

    def _unindex(self, group: Group, from_block: int = 0) -> None:
        """Drops the index entries of the blocks (from ``from_block`` on) whose bytes lie in
        ``group``: it is about to be rewritten or freed (eviction, counted in pages)."""
        located = self._located.get(group)
        if not located:
            return
        gone = [block for block in located if block[0] >= from_block]
        removed = sum(self._index.remove(block) for block in gone)
        located.difference_update(gone)
        if not located:
            del self._located[group]
        if removed:
            self.prefix_evicted_pages += len(group)

    def length(self, slot_index: int) -> int:
        return self._running(slot_index).length

    def slot_pages(self, slot_index: int) -> int:
        return len(self._running(slot_index).groups) * self.config.num_ranges

    # ---- growth --------------------------------------------------------------------------------
    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None:
        """Backs tokens [0, tokens) of a running slot and records ``tokens`` as its length; returns
        once they are mapped, or with ``wait=False`` at once, mapping in the background (a later
        ``ensure`` of these tokens waits for it). Raises KVCacheOutOfMemory (nothing lost) if the
        pages cannot be had."""
        slot = self._running(slot_index)
        self.check_tokens(slot_index, tokens)
        if tokens < slot.frozen * self.config.prefix_block_tokens:
            raise ValueError(
                f"slot {slot_index}: {tokens} tokens asked, below its "
                f"{slot.frozen * self.config.prefix_block_tokens} shared, immutable ones"
            )
        need = self.config.page_groups_for(tokens)
        grown = len(slot.groups) >= need or self._grow(slot_index, tokens)
        self._flush()
        if not grown:
            groups = need - len(slot.groups)
            raise KVCacheOutOfMemory(
                tokens, groups * self.config.num_ranges, self._pool.available, self._cached_pages()
            )
        # Waits only for the batch that maps these tokens' pages: eager pages booked ahead may
        # still be mapping (the common decode case: they were submitted steps ago and are done).
        ticket = slot.tickets[need - 1] if need else 0  # tickets ascend with the page index
        if wait and ticket and not self._worker.done(ticket):
            admission = slot_index in self._admitting
            self._wait(ticket, WaitCause.ADMISSION if admission else WaitCause.STEP)
        slot.length = slot.reserved = tokens
        self._queries.backed(slot_index)
        if wait:
            self._admitting.discard(slot_index)
        self._checked()

    def step_async(self, lengths: Mapping[int, int]) -> StepTicket:
        """Records each running slot's length and submits, to the background worker, the mapping
        the *next* step needs (length + 1 tokens), keeping ``eager_pages`` groups mapped beyond it
        when they can be had without reclaiming: a slot growing into its eager group finds it
        mapped long ago, so the worker has many steps to map the next one. Call ``wait`` (or
        ``ensure``) before the next step writes K/V. Slots that cannot grow even after reclamation
        come back in ``unbacked``."""
        for slot_index in lengths:
            self._running(slot_index)
        self.check_step_lengths(lengths)
        for slot_index, length in lengths.items():
            slot = self._slots[slot_index]
            slot.length, slot.reserved = length, length + 1
        unbacked = []
        available = self._pool.available
        for slot_index in lengths:
            slot = self._slots[slot_index]
            need = self.config.page_groups_for(slot.reserved)
            if len(slot.groups) < need or (
                len(slot.groups) < self._eager_target(slot.reserved) and available
            ):
                if not self._grow(slot_index, slot.reserved):
                    unbacked.append(slot_index)
                    # Its books never claim tokens it cannot store.
                    slot.length = slot.reserved = min(slot.length, self._backed_tokens(slot))
                available = self._pool.available
        if self._prefix:
            for slot_index in lengths:
                self._register(self._slots[slot_index], self._slots[slot_index].length)
        self._release_idle()
        ticket = StepTicket(self._flush(), tuple(unbacked))
        self._checked()
        return ticket

    def wait(self, ticket: StepTicket | int) -> tuple[int, ...]:
        """Waits for submitted mapping; re-raises the worker's VmmError; returns unbacked slots."""
        self._wait(ticket.ticket if isinstance(ticket, StepTicket) else ticket, WaitCause.SYNC)
        return ticket.unbacked if isinstance(ticket, StepTicket) else ()

    def _wait(self, ticket: int, cause: WaitCause) -> None:
        if not ticket:
            return
        started = time.perf_counter()
        try:
            self._worker.wait(ticket)
        finally:
            self._count_wait(cause, time.perf_counter() - started)

    def _count_wait(self, cause: WaitCause, seconds: float) -> None:
        self._waits[cause][0] += 1
        self._waits[cause][1] += seconds

    def ready(self, slot_index: int, tokens: int, timeout_s: float = 0.0) -> bool:
        """Whether tokens [0, tokens) of the running slot are mapped (``ensure`` of them would
        not wait), waiting up to ``timeout_s`` for their batch."""
        slot = self._running(slot_index)
        need = self.config.page_groups_for(tokens)
        if need > len(slot.groups):
            return False
        if not need or self._worker.done(slot.tickets[need - 1]):
            return True
        if timeout_s <= 0:
            return False
        started = time.perf_counter()
        try:
            return bool(self._worker.wait_for(slot.tickets[need - 1], timeout_s))
        finally:
            self._count_wait(WaitCause.ADMISSION, time.perf_counter() - started)

    def done(self, ticket: StepTicket | int) -> bool:
        """Whether the worker has finished the ticket's mapping (waiting would not block)."""
        return bool(self._worker.done(ticket.ticket if isinstance(ticket, StepTicket) else ticket))

    def synchronize(self) -> None:
        """Submits and waits for every pending operation and copy."""
        self.wait(self._flush())
        self._copies.settle_all()

    # ---- elastic pool --------------------------------------------------------------------------
    def shrink(self) -> int:
        """Unmaps every cached slot and releases every free page to the device at once; returns
        the pages released."""
        for index, slot in enumerate(self._slots):
            if slot.state is SlotState.CACHED:
                self._shrink_slot(index, 0, OpCause.SHRINK)
        released = self._pool.all_free()
        if released:
            self._ops.append(Op.release(released, cause=OpCause.SHRINK))
        self.synchronize()
        self._checked()
        return len(released)

    def _release_idle(self) -> None:
        released = self._pool.idle_surplus()
        if released:
            self._ops.append(Op.release(released, cause=OpCause.IDLE))

    # ---- policy internals ----------------------------------------------------------------------
    def _eager_target(self, tokens: int) -> int:
        """Groups a slot holding ``tokens`` keeps mapped: what they need, plus up to ``eager_pages``
        more once the slot is within ``eager_lookahead_tokens`` of its mapped end."""
        config = self.config
        target = config.page_groups_for(tokens) + config.eager_pages
        if config.eager_lookahead_tokens is not None:
            target = min(target, config.page_groups_for(tokens + config.eager_lookahead_tokens))
        return min(target, config.pages_per_slot)

    def _grow(self, slot_index: int, tokens: int) -> bool:
        """Queues mapping so the slot backs ``tokens``, then eager groups (``_eager_target``) if
        they can be had without reclaiming. False, with nothing queued for this slot, if
        ``tokens`` cannot be backed."""
        slot, ranges = self._slots[slot_index], self.config.num_ranges
        need = self.config.page_groups_for(tokens)
        pages = max(need - len(slot.groups), 0) * ranges
        if self._pool.available < pages:
            self._reclaim(pages - self._pool.available, exclude=slot_index)
        taken = self._pool.take(pages)
        if taken is None:
            return False
        eager = min(
            self._eager_target(tokens) - len(slot.groups) - pages // ranges,
            self._pool.available // ranges,
        )
        extra = self._pool.take(eager * ranges) if eager > 0 else None
        ids = list(taken.ids) + (list(extra.ids) if extra else [])
        if not ids:
            return True
        new_ids = list(taken.new_ids) + (list(extra.new_ids) if extra else [])
        if new_ids:
            self._ops.append(Op.create(new_ids, cause=OpCause.GROWTH))
        first = len(slot.groups)
        added = [tuple(ids[i : i + ranges]) for i in range(0, len(ids), ranges)]
        self._add_groups(slot, added)
        slot.tickets.extend([self._last_ticket + 1] * len(added))  # the next flush carries them
        base = slot_index * self.config.pages_per_slot + first
        for r, reservation in enumerate(self._ranges):
            ops = [group[r] for group in added]
            self._ops.append(Op.map(reservation, base, ops, cause=OpCause.GROWTH))
        return True

    def _reclaim(self, pages: int, exclude: int) -> None:
        """Frees at least ``pages`` if it can: first the pages of released slots (least recently
        released first, from their ends: a prefix's first pages are the most shared), then running
        slots' pages beyond what their next step needs. A page another slot still maps is not
        freed by unmapping it here."""
        cached = sorted(
            (i for i, s in enumerate(self._slots) if s.state is SlotState.CACHED),
            key=lambda i: self._slots[i].released_at,
        )
        running = [
            i for i, s in enumerate(self._slots) if s.state is SlotState.RUNNING and i != exclude
        ]
        for index in cached + running:
            if pages <= 0:
                return
            slot = self._slots[index]
            keep = (
                0 if slot.state is SlotState.CACHED else self.config.page_groups_for(slot.reserved)
            )
            # One unmap run for the tail that frees enough (pages mapped elsewhere free nothing).
            end, freeing = len(slot.groups), 0
            while end > keep and freeing < pages:
                end -= 1
                freeing += sum(self._pool.mappings(p) == 1 for p in slot.groups[end])
            if end < len(slot.groups):
                pages -= self._shrink_slot(index, end, OpCause.RECLAIM)

    def _shrink_slot(
        self, slot_index: int, keep_groups: int, cause: OpCause, exact: bool = False
    ) -> int:
        """Unmaps the slot's groups from ``keep_groups`` on; returns the pages that freed (their
        index entries go: eviction). Its blocks no longer wholly mapped thaw, and unless
        ``exact`` (the caller refills the slot) a shared page they reach goes too: a slot maps a
        shared page only wholly below its frozen blocks."""
        slot = self._slots[slot_index]
        config = self.config
        frozen = min(slot.frozen, keep_groups * config.page_size // config.block_bytes)
        while not exact:
            below = frozen * config.block_bytes // config.page_size  # pages wholly frozen
            shared = [i for i in range(below, keep_groups) if not self._private(slot.groups[i])]
            if not shared:
                break
            keep_groups = shared[0]
            frozen = min(frozen, keep_groups * config.page_size // config.block_bytes)
        dropped = slot.groups[keep_groups:]
        if not dropped:
            return 0
        self._copies.settle(slot_index, keep_groups)  # no copy reads or writes them any more
        self._drop_groups(slot, dropped)
        del slot.groups[keep_groups:], slot.tickets[keep_groups:]
        slot.frozen = frozen
        if slot.state is SlotState.CACHED and not slot.groups:
            self._set_state(slot, SlotState.FREE)  # nothing left to reuse
            slot.token_ids, slot.keys, slot.frozen = (), [], 0
        base = slot_index * self.config.pages_per_slot + keep_groups
        for reservation in self._ranges:
            self._ops.append(Op.unmap(reservation, base, len(dropped), cause=cause))
        # Safe to reuse at once: any later map of these ids is queued after this unmap (FIFO).
        freed = self._pool.give_back([page for group in dropped for page in group])
        if freed and len(self._index):
            for group in dropped:
                if self._pool.mappings(group[0]) == 0:
                    self._unindex(group)
        return len(freed)

    def _add_groups(self, slot: _Slot, groups: list[tuple[int, ...]]) -> None:
        slot.groups.extend(groups)
        self._group_slots.update(groups)
        if slot.state is SlotState.RUNNING:
            self._group_running.update(groups)

    def _drop_groups(self, slot: _Slot, groups: list[tuple[int, ...]]) -> None:
        """Books ``groups`` (the slot's tail, about to go) as mapped by the slot no more."""
        counters = [self._group_slots]
        if slot.state is SlotState.RUNNING:
            counters.append(self._group_running)
        for counter in counters:
            counter.subtract(groups)
            for group in groups:
                if counter[group] <= 0:
                    del counter[group]

    def _set_state(self, slot: _Slot, state: SlotState) -> None:
        was_running = slot.state is SlotState.RUNNING
        if was_running and state is not SlotState.RUNNING:
            self._group_running.subtract(slot.groups)
            for group in slot.groups:
                if self._group_running[group] <= 0:
                    del self._group_running[group]
        elif state is SlotState.RUNNING and not was_running:
            self._group_running.update(slot.groups)
        slot.state = state

    def _flush(self) -> int:
        if self._ops:
            ticket = self._worker.submit(self._ops)
            if ticket != self._last_ticket + 1:  # _grow books groups under the next ticket
                raise RuntimeError(f"bug: worker ticket {ticket} after {self._last_ticket}")
            self._last_ticket = ticket
            self._ops = []
        return self._last_ticket

    def _running(self, slot_index: int) -> _Slot:
        slot = self._slots[self.check_slot(slot_index)]
        if slot.state is not SlotState.RUNNING:
            raise ValueError(f"slot {slot_index} is {slot.state.value}, not running")
        return slot

    def _page_split(self) -> tuple[int, int]:
        """(in_use, cached): distinct pages mapped under running slots, and those mapped only
        under released ones."""
        ranges, running = self.config.num_ranges, len(self._group_running)
        return running * ranges, (len(self._group_slots) - running) * ranges

    def _cached_pages(self) -> int:
        return self._page_split()[1]

    # ---- accounting ----------------------------------------------------------------------------
    def reclaimable_pages(self) -> int:
        """Pages a new request could get now: free or creatable, cached, and eager surplus."""
        surplus = sum(
            len(s.groups) - self.config.page_groups_for(s.reserved)
            for s in self._slots
            if s.state is SlotState.RUNNING
        )
        return self._pool.available + self._cached_pages() + surplus * self.config.num_ranges

    def can_allocate(self, tokens: int) -> bool:
        """Whether a new request of ``tokens`` tokens could be backed now."""
        pages = self.config.page_groups_for(tokens) * self.config.num_ranges
        slot_free = any(s.state is not SlotState.RUNNING for s in self._slots)
        return slot_free and pages <= self.reclaimable_pages()

    def stats(self) -> KVCacheStats:
        config, ranges = self.config, self.config.num_ranges
        running = [s for s in self._slots if s.state is SlotState.RUNNING]
        in_use, cached = self._page_split()
        wasted = (
            sum(
                len(s.groups) * config.page_size - s.length * config.bytes_per_token
                for s in running
            )
            * ranges
        )
        worker = self._worker.stats()
        return KVCacheStats(
            page_size_bytes=config.page_size,
            tokens_per_page=self.tokens_per_page,
            pages_total=config.budget_pages,
            pages_created=self._pool.created,
            pages_free=self._pool.free,
            pages_in_use=in_use,
            pages_cached=cached,
            pages_available=self.reclaimable_pages(),
            wasted_bytes=wasted,
            slots_running=len(running),
            slots_cached=sum(s.state is SlotState.CACHED for s in self._slots),
            map_calls=int(worker["map_runs"]),
            pages_mapped_total=int(worker["pages_mapped"]),
            map_seconds=float(worker["busy_seconds"]),
            wait_seconds=sum(seconds for _, seconds in self._waits.values()),
            pages_released_total=self._pool.pages_released_total,
            pages_shared=sum(count > 1 for count in self._group_slots.values()) * ranges,
            prefix_queries_tokens=self._queries.queries,
            prefix_hits_tokens=self._queries.hits,
            prefix_evicted_pages=self.prefix_evicted_pages,
            prefix_copied_bytes=self._copies.bytes_copied,
            prefix_takeovers=self.prefix_takeovers,
        )

    def mapping_breakdown(self) -> MappingBreakdown:
        """The worker's time by operation kind and cause, and the callers' waits by cause."""
        by_op = self._worker.stats()["by_op"]
        ops = tuple(
            (str(kind), OpCause(cause).name.lower(), int(n), int(pages), float(seconds))
            for (kind, cause), (n, pages, seconds) in sorted(by_op.items())
        )
        waits = tuple(
            (cause.name.lower(), int(n), float(seconds))
            for cause, (n, seconds) in self._waits.items()
            if n
        )
        return MappingBreakdown(ops, waits)

    def drain_map_latencies(self) -> list[float]:
        """Seconds each map run took since the last call."""
        return list(self._worker.drain_map_latencies())

    def check_invariants(self, deep: bool = False) -> None:
        """Asserts the invariants of the class docstring. ``deep`` also waits for the worker and
        compares the books with what the extension really mapped."""
        self._pool.check_invariants()
        ranges = self.config.num_ranges
        mappings = Counter(group for s in self._slots for group in s.groups)
        pages = [page for group in mappings for page in group]
        assert len(pages) == len(set(pages)), "two groups share a page"
        assert all(len(group) == ranges for group in mappings)
        position: dict[tuple[int, ...], int] = {}
        for s in self._slots:
            for j, group in enumerate(s.groups):
                assert position.setdefault(group, j) == j, f"group {group} at two page indices"
        assert self._group_slots == mappings, "the group counts differ from the slots"
        running = Counter(g for s in self._slots if s.state is SlotState.RUNNING for g in s.groups)
        assert self._group_running == running, "the running group counts differ from the slots"
        for group, count in mappings.items():
            assert all(self._pool.mappings(p) == count for p in group), (group, count)
        self._check_index(mappings)
        stats = self.stats()
        assert stats.pages_free + stats.pages_in_use + stats.pages_cached == stats.pages_created, (
            stats
        )
        for index, slot in enumerate(self._slots):
            assert len(slot.tickets) == len(slot.groups) and slot.tickets == sorted(slot.tickets), (
                index
            )
            if slot.state is SlotState.FREE:
                assert not slot.groups, f"free slot {index} holds pages"
            frozen_bytes = slot.frozen * self.config.block_bytes
            assert frozen_bytes <= len(slot.groups) * self.config.page_size, (
                f"slot {index} froze unmapped blocks"
            )
            for page, group in enumerate(slot.groups):
                assert mappings[group] == 1 or (page + 1) * self.config.page_size <= frozen_bytes, (
                    f"slot {index} may write its shared page {page}"
                )
            if slot.state is SlotState.RUNNING:
                assert len(slot.groups) >= self.config.page_groups_for(slot.length), (
                    f"slot {index} unbacked"
                )
                assert slot.length >= slot.frozen * self.config.prefix_block_tokens, (
                    f"slot {index} is shorter than its immutable prefix"
                )
        if deep:
            self.synchronize()
            assert len(self._pages) == self._pool.created, (len(self._pages), self._pool.created)
            for group, count in mappings.items():
                assert all(self._pages.mappings(p) == count for p in group), (
                    f"the extension counts other mappings of {group} than the books ({count})"
                )
            per_slot = self.config.pages_per_slot
            for r, reservation in enumerate(self._ranges):
                actual = reservation.page_ids()
                expected = [-1] * len(actual)
                for index, slot in enumerate(self._slots):
                    for g, group in enumerate(slot.groups):
                        expected[index * per_slot + g] = group[r]
                assert actual == expected, f"range {r}: extension's mapping differs from the books"

    def _check_index(self, mappings: Counter[Group]) -> None:
        """Every indexed block is mapped whole by some slot and immutable in every slot mapping
        one of its groups there; ``_located`` knows it."""
        self._index.check_invariants()
        self._copies.check_invariants()
        for j, groups in self._index.locations():
            pages = self.config.block_pages(j)
            assert len(groups) == len(pages), f"block {j} located in {groups}"
            assert any(self._maps(s, (j, groups)) for s in self._slots), f"block {j} is unmapped"
            for slot in self._slots:
                if any(p < len(slot.groups) and slot.groups[p] == g for p, g in zip(pages, groups)):
                    assert slot.frozen > j, f"indexed block {j} is writable in a slot"
            assert all((j, groups) in self._located.get(g, ()) for g in groups), "unlocated"
            assert all(g in mappings for g in groups)

    def _checked(self) -> None:
        if _CHECK_ALWAYS:
            self.check_invariants()

    def slot_states(self) -> Iterable[SlotState]:
        return (s.state for s in self._slots)
