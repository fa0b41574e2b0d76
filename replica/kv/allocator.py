"""The vAttention KV cache allocator: which slot a request gets and which pages back it.

A request owns a *slot*: a fixed region of every reserved range (see ``replica.kv.config``), so its
K and
V are ordinary strided tensors. Physical pages are mapped under a slot as it grows; the mapping
runs on the extension's background worker (FIFO), so this class only keeps the books and emits
operations. It is owned by one engine thread and is not thread-safe.

Page groups: every range maps the same page indices of a slot together, so growth is counted in
groups of ``num_ranges`` physical pages.

Invariants (``check_invariants``), in physical pages:
    free + in_use + cached == created <= budget
    in_use  = pages mapped under running slots (eager pages included)
    cached  = pages mapped under released slots, kept for reuse (deferred reclamation)
    no page id is mapped at two places, and free ids are mapped nowhere
    a running slot backs every token below its length
    wasted_bytes == sum over running slots of (mapped bytes - length * bytes_per_token)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping

import torch

from replica.kv.base import KVCache, KVCacheOutOfMemory, StepTicket
from replica.kv.config import KVCacheConfig, KVLayout
from replica.kv.page_pool import PhysicalPagePool
from replica.kv.slots import SlotState, _Slot
from replica.kv.stats import KVCacheStats
from replica.vmm import (
    Device,
    MapWorker,
    Op,
    PagePool,
    Reservation,
    open_device,
    reservation_tensor,
)

#: Set VATTN_CHECK_INVARIANTS=1 to check the books after every public call (debugging).
_CHECK_ALWAYS = os.environ.get("VATTN_CHECK_INVARIANTS") == "1"


class KVCacheAllocator(KVCache):
    def __init__(
        self,
        config: KVCacheConfig,
        device: Device | None = None,
        clock: Callable[[], float] = time.monotonic,
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
        self._ops: list[Op] = []
        self._last_ticket = 0
        self._wait_seconds = 0.0

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
    def acquire(self, tokens_hint: int = 0) -> int:
        """Gives a request a slot: the released slot whose mapped pages best fit ``tokens_hint``
        (deferred reclamation pays off here), else an empty one."""
        need = self.config.page_groups_for(self.check_hint(tokens_hint))
        cached = [i for i, s in enumerate(self._slots) if s.state is SlotState.CACHED]
        if cached:
            index = min(
                cached,
                key=lambda i: (
                    len(self._slots[i].groups) < need,
                    abs(len(self._slots[i].groups) - need),
                ),
            )
        else:
            empty = [i for i, s in enumerate(self._slots) if s.state is SlotState.FREE]
            if not empty:
                raise KVCacheOutOfMemory(
                    tokens_hint,
                    0,
                    self._pool.available,
                    0,
                    f"all {self.config.max_slots} slots are running",
                )
            index = empty[0]
        slot = self._slots[index]
        slot.state, slot.length, slot.reserved = SlotState.RUNNING, 0, 0
        self._checked()
        return index

    def release(self, slot_index: int) -> None:
        """Ends a request. Its pages stay mapped (cached) until the pool needs them, unless
        deferred reclamation is off."""
        slot = self._running(slot_index)
        slot.state, slot.length, slot.reserved = SlotState.CACHED, 0, 0
        slot.released_at = self._clock()
        if not self.config.deferred_reclamation:
            self._shrink_slot(slot_index, 0)
        self._release_idle()
        self._flush()
        self._checked()

    def length(self, slot_index: int) -> int:
        return self._running(slot_index).length

    # ---- growth --------------------------------------------------------------------------------
    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None:
        """Backs tokens [0, tokens) of a running slot and records ``tokens`` as its length; returns
        once they are mapped, or with ``wait=False`` at once, mapping in the background (a later
        ``ensure`` of these tokens waits for it). Raises KVCacheOutOfMemory (nothing lost) if the
        pages cannot be had."""
        slot = self._running(slot_index)
        self.check_tokens(slot_index, tokens)
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
            self.wait(ticket)
        slot.length = slot.reserved = tokens
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
        self._release_idle()
        ticket = StepTicket(self._flush(), tuple(unbacked))
        self._checked()
        return ticket

    def wait(self, ticket: StepTicket | int) -> tuple[int, ...]:
        """Waits for submitted mapping; re-raises the worker's VmmError; returns unbacked slots."""
        number = ticket.ticket if isinstance(ticket, StepTicket) else ticket
        if number:
            started = time.perf_counter()
            try:
                self._worker.wait(number)
            finally:
                self._wait_seconds += time.perf_counter() - started
        return ticket.unbacked if isinstance(ticket, StepTicket) else ()

    def done(self, ticket: StepTicket | int) -> bool:
        """Whether the worker has finished the ticket's mapping (waiting would not block)."""
        return bool(self._worker.done(ticket.ticket if isinstance(ticket, StepTicket) else ticket))

    def synchronize(self) -> None:
        """Submits and waits for every pending operation."""
        self.wait(self._flush())

    # ---- elastic pool --------------------------------------------------------------------------
    def shrink(self) -> int:
        """Unmaps every cached slot and releases every free page to the device at once; returns
        the pages released."""
        for index, slot in enumerate(self._slots):
            if slot.state is SlotState.CACHED:
                self._shrink_slot(index, 0)
        released = self._pool.all_free()
        if released:
            self._ops.append(Op.release(released))
        self.synchronize()
        self._checked()
        return len(released)

    def _release_idle(self) -> None:
        released = self._pool.idle_surplus()
        if released:
            self._ops.append(Op.release(released))

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
            self._ops.append(Op.create(new_ids))
        first = len(slot.groups)
        added = [tuple(ids[i : i + ranges]) for i in range(0, len(ids), ranges)]
        slot.groups.extend(added)
        slot.tickets.extend([self._last_ticket + 1] * len(added))  # the next flush carries them
        base = slot_index * self.config.pages_per_slot + first
        for r, reservation in enumerate(self._ranges):
            self._ops.append(Op.map(reservation, base, [group[r] for group in added]))
        return True

    def _reclaim(self, pages: int, exclude: int) -> None:
        """Frees at least ``pages`` if it can: first the pages of released slots (least recently
        released first), then running slots' pages beyond what their next step needs."""
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
            surplus_groups = len(slot.groups) - keep
            take = min(surplus_groups, -(-pages // self.config.num_ranges))
            if take > 0:
                self._shrink_slot(index, len(slot.groups) - take)
                pages -= take * self.config.num_ranges

    def _shrink_slot(self, slot_index: int, keep_groups: int) -> None:
        slot = self._slots[slot_index]
        dropped = slot.groups[keep_groups:]
        if not dropped:
            return
        del slot.groups[keep_groups:], slot.tickets[keep_groups:]
        if slot.state is SlotState.CACHED and not slot.groups:
            slot.state = SlotState.FREE  # nothing left to reuse
        base = slot_index * self.config.pages_per_slot + keep_groups
        for reservation in self._ranges:
            self._ops.append(Op.unmap(reservation, base, len(dropped)))
        # Safe to reuse at once: any later map of these ids is queued after this unmap (FIFO).
        self._pool.give_back([page for group in dropped for page in group])

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

    def _cached_pages(self) -> int:
        return (
            sum(len(s.groups) for s in self._slots if s.state is SlotState.CACHED)
            * self.config.num_ranges
        )

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
        in_use = sum(len(s.groups) for s in running) * ranges
        cached = self._cached_pages()
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
            wait_seconds=self._wait_seconds,
            pages_released_total=self._pool.pages_released_total,
        )

    def drain_map_latencies(self) -> list[float]:
        """Seconds each map run took since the last call."""
        return list(self._worker.drain_map_latencies())

    def check_invariants(self, deep: bool = False) -> None:
        """Asserts the invariants of the class docstring. ``deep`` also waits for the worker and
        compares the books with what the extension really mapped."""
        self._pool.check_invariants()
        ranges = self.config.num_ranges
        mapped = [page for s in self._slots for group in s.groups for page in group]
        assert len(mapped) == len(set(mapped)), "a page id is mapped twice"
        assert all(len(group) == ranges for s in self._slots for group in s.groups)
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
            if slot.state is SlotState.RUNNING:
                assert len(slot.groups) >= self.config.page_groups_for(slot.length), (
                    f"slot {index} unbacked"
                )
        if deep:
            self.synchronize()
            assert len(self._pages) == self._pool.created, (len(self._pages), self._pool.created)
            per_slot = self.config.pages_per_slot
            for r, reservation in enumerate(self._ranges):
                actual = reservation.page_ids()
                expected = [-1] * len(actual)
                for index, slot in enumerate(self._slots):
                    for g, group in enumerate(slot.groups):
                        expected[index * per_slot + g] = group[r]
                assert actual == expected, f"range {r}: extension's mapping differs from the books"

    def _checked(self) -> None:
        if _CHECK_ALWAYS:
            self.check_invariants()

    def slot_states(self) -> Iterable[SlotState]:
        return (s.state for s in self._slots)
