"""The vAttention KV cache allocator: which slot a request gets and which pages back it.

A request owns a *slot*: a fixed region of every reserved range (see ``replica.kv.config``), so its
K and V are ordinary strided tensors. Physical pages are mapped under a slot as it grows; the
mapping runs on the extension's background worker (FIFO), so this class only keeps the books
(``replica.kv.slots``) and emits operations. It is owned by one engine thread and is not
thread-safe.

Page groups: every range maps the same page indices of a slot together, so growth is counted in
groups of ``num_ranges`` physical pages.

Prefix sharing (``config.prefix_cache``, ``replica.kv.slot_prefixes``): a slot's 16-token blocks
are indexed once written; ``acquire`` with a prompt takes the longest indexed prefix, continued
in place, aliased (the same physical pages mapped again at the same page indices of the new slot:
zero copy, no block table) or copied into pages the slot already maps. A page is freed when its
last mapping goes; reclaiming the least recently released slots first is the prefix cache's LRU
eviction as well as deferred reclamation (a page a running slot maps is never freed by it)::

    slot 3 (released):  | g0 | g1 | g2 | g3'|        g0..g2 indexed, g3' partial (private)
    slot 5 (running):   | g0 | g1 | n2 | n3 |        aliases g0, g1; writes from n2 on
    slot 6 (running):   | c0 | c1 | n2 |             its own pages, g0 and g1 copied in

Borrowed reads (``enable_borrowed_reads``, ``replica.kv.borrows``): a hit aliased into a fresh
slot maps late and is read from its holder's pages meanwhile; ``ensure`` waits for the rest only.

Host tier (``config.host_tier_bytes``, ``replica.kv.host_tier``): ``acquire`` also takes the
blocks after the hit that the tier holds, *deferred* (``replica.kv.slot_restores``): it submits
maps only; the slot's first waited ``ensure`` copies and indexes them (or ``KVRestoreFailed``).

Invariants (``check_invariants``, with those of ``SlotMaps``, ``SlotPrefixes`` and
``SlotRestores``), in pages:
    free + in_use + cached == created <= budget
    in_use  = distinct pages mapped under running slots (eager pages included)
    cached  = pages mapped only under released slots, kept for reuse (deferred reclamation)
    a page mapped twice is indexed and lies wholly below the frozen blocks of every slot mapping it
    a running slot backs every token below its length, and length >= its frozen blocks' tokens
    wasted_bytes == sum over running slots of (mapped bytes - length * bytes_per_token)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from replica.kv.base import KVCache, KVCacheOutOfMemory, StepTicket
from replica.kv.borrows import SlotBorrows
from replica.kv.config import KVCacheConfig
from replica.kv.copies import CopyFence, SlotCopies
from replica.kv.growth import SlotGrowth
from replica.kv.host_copies import RangeRuns
from replica.kv.host_tier import HostTier
from replica.kv.page_pool import PhysicalPagePool
from replica.kv.prefix import PrefixSummary
from replica.kv.slot_prefixes import SlotPrefixes
from replica.kv.slot_restores import SlotRestores
from replica.kv.slots import Slot, SlotMaps, SlotState
from replica.kv.stats import KVCacheStats, MappingBreakdown, OpCause, WaitCause
from replica.kv.tier_faults import TierFaults
from replica.vmm import Device, Reservation, open_device

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
        self._pool = PhysicalPagePool.of(config, clock)
        self._maps = SlotMaps(config, self.device, self._pool)
        self._slots = self._maps.slots
        slot_bytes = config.pages_per_slot * config.page_size
        views = [t.view(-1).view(torch.uint8).view(-1, slot_bytes) for t in self._maps.tensors]
        self._copies = SlotCopies(views, config.page_size, self._slots, make_fence)
        self._prefixes = SlotPrefixes(config, self._maps, self._copies)
        self._borrows = SlotBorrows(config, self._maps, self._copies)
        self._prefix = config.prefix_cache
        self._tier = (
            HostTier(
                RangeRuns(views, config.block_bytes), config.host_tier_bytes, self._pin, make_fence
            )
            if config.prefix_cache and config.host_tier_bytes
            else None
        )
        self._tier_faults = (
            TierFaults(self._tier, views[0].device) if self._tier is not None else None
        )
        self._admitting: set[int] = set()  # slots acquired and not backed by an ensure yet
        self._growth = SlotGrowth(config, self._maps, self._prefixes)
        faults = self._tier_faults
        self._restores = SlotRestores(self._prefixes, self._growth, faults) if faults else None
        if config.premap:
            self._growth.premap()

    # ---- tensors -------------------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K: [max_slots, tokens_per_slot, kv_heads, head_dim] (maybe strided)."""
        return self._maps.layer_tensor(layer, 0)

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._maps.layer_tensor(layer, 1)

    # ---- geometry ------------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        """A page group (one page per range) per ``page_size`` bytes of a token's range."""
        return self.config.page_groups_for(tokens) * self.config.num_ranges

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        """The reserved ranges (K/V per layer, or K and V), in the order described in kv_config."""
        return tuple(self._maps.ranges)

    def device_pages(self) -> int:
        """Physical pages the extension holds right now (after pending operations ran)."""
        return len(self._maps.pages)

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

        Host-tier blocks after the hit: restored deferred (``SlotRestores``, ``wants_mapped_slot``).

        Without the prefix cache, the released slot whose mapped pages best fit ``tokens_hint``
        (deferred reclamation pays off here), else an empty one."""
        need = self.config.page_groups_for(self.check_hint(tokens_hint))
        prompt = tuple(prompt)
        hit, keys = self._prefixes.lookup(prompt)
        hit_keys = keys[: len(hit)]
        restores = self._restores
        mapped = restores is not None and restores.wants_mapped_slot(prompt, keys, len(hit), need)
        index = self._prefixes.choose_slot(hit, hit_keys, mapped) if self._prefix else None
        if index is None:
            index = self._pick_slot(need, tokens_hint)
        slot = self._slots[index]
        kept = self._prefixes.holds(slot, hit_keys)  # its leading blocks holding the hit's
        taken = self._prefixes.take_hit(index, hit, kept) if self._prefix else 0
        self._borrows.start(index)  # its late aliases, read from their holder meanwhile
        self._maps.set_state(slot, SlotState.RUNNING)
        restored = restores.plan(index, prompt, keys, taken) if restores is not None else 0
        cached_tokens = (taken + restored) * self.config.prefix_block_tokens
        if self._prefix:
            self._prefixes.queries.acquired(index, len(prompt), cached_tokens)
        self._admitting.add(index)
        slot.length, slot.reserved = cached_tokens, cached_tokens
        slot.token_ids, slot.keys, slot.frozen = prompt, keys[:taken], taken
        self._maps.flush()
        self._checked()
        return index

    def _pin(self, slot: int, blocks: range, fence: CopyFence) -> None:
        """A host copy's pin: the slot's pages holding ``blocks``."""
        block, page = self.config.block_bytes, self.config.page_size
        self._copies.pin(
            slot, range(blocks.start * block // page, -(-blocks.stop * block // page)), fence
        )

    @property
    def prefix_block_tokens(self) -> int:
        return self.config.prefix_block_tokens if self._prefix else 0

    @property
    def tier_faults(self) -> TierFaults | None:
        return self._tier_faults

    def restoring_tokens(self, slot_index: int) -> int:
        """Tokens of the running slot's length its pending restore will copy at its first waited
        ``ensure`` (0 without one): they hold no valid K/V yet."""
        self._running(slot_index)
        return self._restores.pending_tokens(slot_index) if self._restores is not None else 0

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        """Tokens of ``prompt`` that ``acquire`` would find cached now (whole prefix blocks, never
        the last prompt token)."""
        return len(self._prefixes.lookup(tuple(prompt))[0]) * self.prefix_block_tokens

    def _pick_slot(self, need: int, tokens_hint: int) -> int:
        """A slot without the prefix cache: the released slot that best fits ``need`` groups, else
        an empty one."""
        index = self._maps.best_fit(need)
        if index is not None:
            return index
        raise KVCacheOutOfMemory(
            tokens_hint,
            0,
            self._pool.available,
            0,
            f"all {self.config.max_slots} slots are running",
        )

    def release(self, slot_index: int, token_ids: Sequence[int] = ()) -> None:
        """Ends a request. Its pages stay mapped (cached) until the pool needs them, unless
        deferred reclamation is off. With the prefix cache, ``token_ids`` are the tokens whose
        K/V the slot holds (at most its length; without them, its prompt): its full groups are
        indexed for later requests."""
        slot = self._running(slot_index)
        self._borrows.end(slot_index, wait=self._tier_faults is not None)  # offloads read it
        self._prefixes.queries.released(slot_index)
        self._admitting.discard(slot_index)
        held = self._restores.drop(slot_index) if self._restores is not None else -1
        if held >= 0:  # its restore was never copied: only its device hit is stored
            token_ids = tuple(token_ids)[: held * self.config.prefix_block_tokens]
        if self._prefix:
            self._prefixes.release(slot_index, slot, token_ids)
            if self._tier_faults is not None:  # write-through: eviction is a drop later
                self._tier_faults.offload(
                    slot.keys, [(slot_index, j) for j in range(slot.frozen)], slot.frozen
                )
        self._maps.set_state(slot, SlotState.CACHED)
        slot.length, slot.reserved = 0, 0
        slot.released_at = self._clock()
        if not self.config.deferred_reclamation:
            self._prefixes.shrink_slot(slot_index, 0, OpCause.RELEASE)
        self._release_idle()
        self._maps.flush()
        self._checked()

    def length(self, slot_index: int) -> int:
        return self._running(slot_index).length

    def slot_pages(self, slot_index: int) -> int:
        return len(self._running(slot_index).groups) * self.config.num_ranges

    # ---- growth --------------------------------------------------------------------------------
    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None:
        """Backs tokens [0, tokens) of a running slot and records ``tokens`` as its length; returns
        once they are mapped, or with ``wait=False`` at once, mapping in the background (a later
        ``ensure`` of these tokens waits for it). Raises KVCacheOutOfMemory (nothing lost) if the
        pages cannot be had. The slot's first waited call enqueues its deferred restore's copy
        after its wait, then indexes the blocks; KVRestoreFailed if the copy failed."""
        slot = self._running(slot_index)
        self.check_tokens(slot_index, tokens)
        restores = self._restores
        held = max(slot.frozen, restores.pending_blocks(slot_index) if restores else 0)
        if tokens < held * self.config.prefix_block_tokens:
            raise ValueError(
                f"slot {slot_index}: {tokens} tokens asked, below its "
                f"{held * self.config.prefix_block_tokens} shared, immutable or restored ones"
            )
        need = self.config.page_groups_for(tokens)
        grown = len(slot.groups) >= need or self._growth.grow(slot_index, tokens)
        self._maps.flush()
        if not grown:
            groups = need - len(slot.groups)
            raise KVCacheOutOfMemory(
                tokens, groups * self.config.num_ranges, self._pool.available, self._cached_pages()
            )
        # Waits only for the batch that maps these tokens' pages: eager pages booked ahead may
        # still be mapping (the common decode case: they were submitted steps ago and are done).
        ticket = self._borrows.ticket(slot_index, need)  # a borrower's run is read elsewhere
        cause = WaitCause.ADMISSION if slot_index in self._admitting else WaitCause.STEP
        slot.length = slot.reserved = tokens
        self._prefixes.queries.backed(slot_index)
        try:  # a restore copies each piece once its batch is mapped: its waits come first
            if wait and restores is not None and slot_index in restores:
                restores.start(slot_index, lambda t: self._maps.wait(t, cause))  # KVRestoreFailed
        finally:
            if wait:
                self._maps.wait(ticket, cause)
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
        if self._restores:  # a restore pending (rare): a waited ensure copies its slot first
            if pending := [i for i in lengths if i in self._restores]:
                raise ValueError(f"slots {pending} have restores pending: ensure them first")
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
                len(slot.groups) < self._growth.eager_target(slot.reserved) and available
            ):
                if not self._growth.grow(slot_index, slot.reserved):
                    unbacked.append(slot_index)
                    # Its books never claim tokens it cannot store.
                    slot.length = slot.reserved = min(slot.length, self._growth.backed_tokens(slot))
                available = self._pool.available
        if self._prefix:
            for slot_index in lengths:
                self._prefixes.register(self._slots[slot_index], self._slots[slot_index].length)
        self._release_idle()
        ticket = StepTicket(self._maps.flush(), tuple(unbacked))
        self._borrows.send_late()  # behind this step's growth
        self._growth.create_spare()  # behind both, a batch no ensure waits for
        self._checked()
        return ticket

    def wait(self, ticket: StepTicket | int) -> tuple[int, ...]:
        """Waits for submitted mapping; re-raises the worker's VmmError; returns unbacked slots."""
        self._maps.wait(ticket.ticket if isinstance(ticket, StepTicket) else ticket, WaitCause.SYNC)
        return ticket.unbacked if isinstance(ticket, StepTicket) else ()

    def ready(self, slot_index: int, tokens: int, timeout_s: float = 0.0) -> bool:
        """Whether tokens [0, tokens) of the running slot are mapped (``ensure`` of them would
        not wait), waiting up to ``timeout_s`` for their batch."""
        slot = self._running(slot_index)
        need = self.config.page_groups_for(tokens)
        if need > len(slot.groups):
            return False
        ticket = self._borrows.ticket(slot_index, need)
        if not need or self._maps.done(ticket):
            return True
        if timeout_s <= 0:
            return False
        return self._maps.wait_for(ticket, timeout_s, WaitCause.ADMISSION)

    def done(self, ticket: StepTicket | int) -> bool:
        """Whether the worker has finished the ticket's mapping (waiting would not block)."""
        return self._maps.done(ticket.ticket if isinstance(ticket, StepTicket) else ticket)

    # ---- borrowed prefix reads (replica.kv.borrows) --------------------------------------------
    def enable_borrowed_reads(self, granularity: int = 1) -> bool:
        """Hits aliased into fresh slots are read from their holder until mapped, in multiples of
        ``granularity`` tokens; False where the geometry cannot (``SlotBorrows.enable``)."""
        self._prefixes.late_aliases = self._borrows.enable(granularity)
        return self._prefixes.late_aliases

    def borrowed_reads(self) -> Mapping[int, tuple[int, int]]:
        return self._borrows.reads()

    def end_borrows(self, slot_indices: Sequence[int] | None = None) -> tuple[int, ...]:
        """Ends the borrows whose aliases are mapped (None), or those of ``slot_indices``."""
        if slot_indices is None:
            return self._borrows.end_ready()
        return self._borrows.end_listed(tuple(slot_indices))

    def synchronize(self) -> None:
        """Submits and waits for every pending operation and copy (borrows end)."""
        self._copies.settle_all()  # ends every borrow: their late runs are queued
        self.wait(self._maps.flush())

    # ---- elastic pool --------------------------------------------------------------------------
    def shrink(self) -> int:
        """Unmaps every cached slot and releases every free page to the device at once; returns
        the pages released. The host tier keeps its blocks (host memory, still worth a hit)."""
        for index, slot in enumerate(self._slots):
            if slot.state is SlotState.CACHED:
                self._prefixes.shrink_slot(index, 0, OpCause.SHRINK)
        released = self._pool.all_free()
        self._maps.release_to_device(released, OpCause.SHRINK)
        self.synchronize()
        self._checked()
        return len(released)

    def _release_idle(self) -> None:
        self._maps.release_to_device(self._pool.idle_surplus(), OpCause.IDLE)

    # ---- policy internals ----------------------------------------------------------------------
    def _running(self, slot_index: int) -> Slot:
        slot = self._slots[self.check_slot(slot_index)]
        if slot.state is not SlotState.RUNNING:
            raise ValueError(f"slot {slot_index} is {slot.state.value}, not running")
        return slot

    def _running_slots(self) -> list[Slot]:  # for counts and sums: in no particular order
        return [self._slots[i] for i in self._maps.in_state[SlotState.RUNNING]]

    def _cached_pages(self) -> int:
        return self._maps.page_split()[1]

    # ---- accounting ----------------------------------------------------------------------------
    def reclaimable_pages(self) -> int:
        """Pages a new request could get now: free or creatable, cached, and eager surplus."""
        surplus = sum(
            len(s.groups) - self.config.page_groups_for(s.reserved) for s in self._running_slots()
        )
        return self._pool.available + self._cached_pages() + surplus * self.config.num_ranges

    def can_allocate(self, tokens: int) -> bool:
        """Whether a new request of ``tokens`` tokens could be backed now."""
        pages = self.config.page_groups_for(tokens) * self.config.num_ranges
        slot_free = len(self._maps.in_state[SlotState.RUNNING]) < len(self._slots)
        return slot_free and pages <= self.reclaimable_pages()

    def stats(self) -> KVCacheStats:
        config, ranges = self.config, self.config.num_ranges
        running = self._running_slots()
        in_use, cached = self._maps.page_split()
        wasted = (
            sum(
                len(s.groups) * config.page_size - s.length * config.bytes_per_token
                for s in running
            )
            * ranges
        )
        worker = self._maps.worker.stats()
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
            slots_cached=len(self._maps.in_state[SlotState.CACHED]),
            map_calls=int(worker["map_runs"]),
            pages_mapped_total=int(worker["pages_mapped"]),
            map_seconds=float(worker["busy_seconds"]),
            wait_seconds=sum(seconds for _, seconds in self._maps.waits.values()),
            pages_released_total=self._pool.pages_released_total,
            pages_shared=sum(count > 1 for count in self._maps.group_slots.values()) * ranges,
            prefix_queries_tokens=self._prefixes.queries.queries,
            prefix_hits_tokens=self._prefixes.queries.hits,
            prefix_evicted_pages=self._prefixes.evicted_pages,
            prefix_copied_bytes=self._copies.bytes_copied,
            copy_wait_seconds=self._copies.wait_seconds,
            prefix_takeovers=self._prefixes.takeovers,
            prefix_borrows=self._borrows.started,
            prefix_borrows_forced=self._borrows.forced,
            **self._tier_stats(),
        )

    def _tier_stats(self) -> dict[str, float]:
        if self._tier is None or self._restores is None:
            return {}
        return self._tier.cache_stats(self._restores.hit_tokens, self._restores.skipped_tokens)

    def mapping_breakdown(self) -> MappingBreakdown:
        """The worker's time by operation kind and cause, and the callers' waits by cause."""
        return self._maps.breakdown()

    def drain_map_latencies(self) -> list[float]:
        """Seconds each map run took since the last call."""
        return list(self._maps.worker.drain_map_latencies())

    def prefix_summary(self, limit: int = 2048) -> PrefixSummary | None:
        summary = self._prefixes.summary(limit)
        if summary is None or self._tier is None:
            return summary
        return self._tier.with_host_keys(summary, limit)

    def check_invariants(self, deep: bool = False) -> None:
        """Asserts the module docstring's invariants. ``deep`` also waits for the worker (not for
        copies: their pins are checked) and compares the books with what the extension mapped."""
        if deep:
            self.wait(self._maps.flush())
        mappings = self._maps.check_invariants(deep)
        self._prefixes.check_invariants(mappings)
        self._copies.check_invariants()
        self._borrows.check_invariants()
        if self._tier is not None:
            self._tier.check_invariants()
        if self._restores is not None:
            self._restores.check_invariants()
        stats = self.stats()
        assert stats.pages_free + stats.pages_in_use + stats.pages_cached == stats.pages_created, (
            stats
        )
        self._prefixes.check_slots(mappings)

    def _checked(self) -> None:
        if _CHECK_ALWAYS:
            self.check_invariants()

    def slot_states(self) -> Iterable[SlotState]:
        return (s.state for s in self._slots)
