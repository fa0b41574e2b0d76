"""The vAttention cache's slots and the pages mapped under them (``replica.kv.allocator`` decides;
this module keeps the books and turns them into the mapping worker's operations).

A slot's ``groups[i]`` holds the page ids (one per reserved range) mapped at its page index ``i``;
``tickets[i]`` is the mapping worker's batch that maps them, so a caller waits only for the batch
its tokens need (eager groups booked ahead map in the background). Operations queue in ``ops``
and go to the worker, in order, at ``flush``; the worker runs them FIFO, so an id unmapped here
may be mapped again at once.

*Late* runs: a slot's leading aliases may be booked late (``map_groups(late=True)``, a borrowed
prefix: ``replica.kv.borrows``). Their ops wait in ``late_ops`` under the ticket ``PENDING``
until ``flush_late`` sends them behind the growth already queued, or until anything needs them:
an unmap of that slot, a wait on ``PENDING`` (``promote``). So a burst's first chunks map before
its aliases, and nothing ever sees the books ahead of the worker's order.

Invariants (``check_invariants``):
    a page's mapping count == the slots mapping its group, always at the same page index;
        free ids are mapped nowhere; two groups share no page
    ``group_slots`` / ``group_running`` count the groups of all / running slots
    ``in_state[state]`` is the set of the slots in that state (lookups stay O(slots in a state)
        where the cache has many more slots than running requests)
    a slot's tickets ascend with its page index, one per group, except its ``late`` leading
        groups, mapped by one run under one ticket (``PENDING`` while its ops wait in
        ``late_ops``); a free slot maps nothing
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from replica.kv.config import KVCacheConfig, KVLayout
from replica.kv.page_pool import PhysicalPagePool
from replica.kv.stats import MappingBreakdown, OpCause, WaitCause
from replica.vmm import Device, MapWorker, Op, PagePool, Reservation, reservation_tensor

#: A page group: the page ids mapped at one page index of a slot, one per range.
Group = tuple[int, ...]

#: The ticket of groups booked in a late run whose ops have not gone to the worker yet.
PENDING = 1 << 62


class SlotState(Enum):
    FREE = "free"
    RUNNING = "running"
    CACHED = "cached"


@dataclass
class Slot:
    index: int = 0  # its place in ``SlotMaps.slots``
    state: SlotState = SlotState.FREE
    length: int = 0  # tokens stored
    reserved: int = 0  # tokens that must be backed for the coming step (>= length)
    groups: list[Group] = field(default_factory=list)  # groups[i][r]: page id, range r
    tickets: list[int] = field(default_factory=list)  # tickets[i]: the batch mapping groups[i]
    late: int = 0  # leading groups mapped by a late run (their ticket may follow later groups')
    released_at: float = 0.0
    # Prefix sharing: the token ids the slot's K/V stand for (the prompt while running, the stored
    # tokens once released), their blocks' prefix keys as far as computed, and how many leading
    # blocks are immutable (indexed, aliased, or equal to an indexed block): nothing writes there.
    token_ids: tuple[int, ...] = ()
    keys: list[int] = field(default_factory=list)
    frozen: int = 0


class SlotMaps:
    """The slots, the reserved ranges they live in, and the mapping worker's queue."""

    def __init__(self, config: KVCacheConfig, device: Device, pool: PhysicalPagePool) -> None:
        self.config, self.pool = config, pool
        self.pages = PagePool(device.backend)
        self.worker = MapWorker(self.pages)
        pages_per_range = config.max_slots * config.pages_per_slot
        self.ranges = [Reservation(self.pages, pages_per_range) for _ in range(config.num_ranges)]
        self.tensors = [
            reservation_tensor(r, device, config.dtype, config.range_shape) for r in self.ranges
        ]
        self.slots = [Slot(index=i) for i in range(config.max_slots)]
        self.in_state: dict[SlotState, set[int]] = {state: set() for state in SlotState}
        self.in_state[SlotState.FREE].update(range(config.max_slots))
        self.ops: list[Op] = []
        self.late_ops: dict[int, list[Op]] = {}  # slot -> its late run's ops, oldest slot first
        self.last_ticket = 0
        self.waits: dict[WaitCause, list[float]] = {cause: [0, 0.0] for cause in WaitCause}
        # Slots mapping each group, and running slots mapping it: the page split in O(1).
        self.group_slots: Counter[Group] = Counter()
        self.group_running: Counter[Group] = Counter()

    # ---- changing the books --------------------------------------------------------------------
    def map_groups(
        self, slot_index: int, groups: Sequence[Group], cause: OpCause, late: bool = False
    ) -> None:
        """Maps ``groups`` at the slot's next page indices (one run per range), under the ticket
        the next ``flush`` returns; ``late`` (the slot's first groups only): a late run, under
        ``PENDING`` until ``flush_late`` or ``promote`` sends it."""
        if not groups:
            return
        slot = self.slots[slot_index]
        if late and slot.groups:
            raise ValueError(f"slot {slot_index}: only a slot's first groups map late")
        base = slot_index * self.config.pages_per_slot + len(slot.groups)
        slot.groups.extend(groups)
        self.group_slots.update(groups)
        if slot.state is SlotState.RUNNING:
            self.group_running.update(groups)
        slot.tickets.extend([PENDING if late else self.last_ticket + 1] * len(groups))
        ops = self.late_ops.setdefault(slot_index, []) if late else self.ops
        slot.late = len(groups) if late else slot.late
        for r, reservation in enumerate(self.ranges):
            ops.append(Op.map(reservation, base, [g[r] for g in groups], cause=cause))

    def promote(self, slot_index: int) -> None:
        """Queues the slot's late run (if still waiting) with the ordinary operations: it maps
        under the next ``flush``'s ticket."""
        ops = self.late_ops.pop(slot_index, None)
        if ops is None:
            return
        self.ops.extend(ops)
        slot = self.slots[slot_index]
        slot.tickets[: slot.late] = [self.last_ticket + 1] * slot.late

    def flush_late(self, max_pages: int) -> int:
        """Submits the waiting late runs, oldest first, as one batch of about ``max_pages`` pages
        at most (at least one run) behind what is queued; returns the newest ticket."""
        pages = 0
        for slot_index in list(self.late_ops):
            if pages and pages + self.slots[slot_index].late * len(self.ranges) > max_pages:
                break
            pages += self.slots[slot_index].late * len(self.ranges)
            self.promote(slot_index)
        return self.flush()

    def create(self, page_ids: Sequence[int], cause: OpCause) -> None:
        if page_ids:
            self.ops.append(Op.create(list(page_ids), cause=cause))

    def release_to_device(self, page_ids: Sequence[int], cause: OpCause) -> None:
        if page_ids:
            self.ops.append(Op.release(list(page_ids), cause=cause))

    def unmap_tail(self, slot_index: int, keep_groups: int, cause: OpCause) -> list[Group]:
        """Unmaps the slot's groups from ``keep_groups`` on and gives their pages back to the
        pool; returns the groups dropped (a page another slot still maps stays handed out)."""
        slot = self.slots[slot_index]
        dropped = slot.groups[keep_groups:]
        if not dropped:
            return []
        if keep_groups < slot.late:
            self.promote(slot_index)  # the run maps before this unmap
            slot.late = keep_groups
        counters = [self.group_slots]
        if slot.state is SlotState.RUNNING:
            counters.append(self.group_running)
        for counter in counters:
            counter.subtract(dropped)
            for group in dropped:
                if counter[group] <= 0:
                    del counter[group]
        del slot.groups[keep_groups:], slot.tickets[keep_groups:]
        base = slot_index * self.config.pages_per_slot + keep_groups
        for reservation in self.ranges:
            self.ops.append(Op.unmap(reservation, base, len(dropped), cause=cause))
        # Safe to reuse at once: any later map of these ids is queued after this unmap (FIFO).
        self.pool.give_back([page for group in dropped for page in group])
        return dropped

    def set_state(self, slot: Slot, state: SlotState) -> None:
        was_running = slot.state is SlotState.RUNNING
        if was_running and state is not SlotState.RUNNING:
            self.group_running.subtract(slot.groups)
            for group in slot.groups:
                if self.group_running[group] <= 0:
                    del self.group_running[group]
        elif state is SlotState.RUNNING and not was_running:
            self.group_running.update(slot.groups)
        self.in_state[slot.state].discard(slot.index)
        self.in_state[state].add(slot.index)
        slot.state = state

    def flush(self) -> int:
        """Submits the queued operations; returns the newest ticket."""
        if self.ops:
            ticket = self.worker.submit(self.ops)
            if ticket != self.last_ticket + 1:  # map_groups books groups under the next ticket
                raise RuntimeError(f"bug: worker ticket {ticket} after {self.last_ticket}")
            self.last_ticket = ticket
            self.ops = []
        return self.last_ticket

    # ---- waiting -------------------------------------------------------------------------------
    def wait(self, ticket: int, cause: WaitCause) -> None:
        """Waits for the worker's batch ``ticket``, counting the wait under ``cause`` (none if it
        had run: its error, if any, is still raised). ``PENDING``: every late run is sent first."""
        if not ticket:
            return
        ticket = self._sent(ticket)
        if self.worker.done(ticket):
            self.worker.wait(ticket)
            return
        started = time.perf_counter()
        try:
            self.worker.wait(ticket)
        finally:
            self.count_wait(cause, time.perf_counter() - started)

    def wait_for(self, ticket: int, timeout_s: float, cause: WaitCause) -> bool:
        ticket = self._sent(ticket)
        started = time.perf_counter()
        try:
            return bool(self.worker.wait_for(ticket, timeout_s))
        finally:
            self.count_wait(cause, time.perf_counter() - started)

    def done(self, ticket: int) -> bool:
        """Whether batch ``ticket`` has run (``PENDING``: not sent, so not run)."""
        return ticket <= self.last_ticket and bool(self.worker.done(ticket))

    def _sent(self, ticket: int) -> int:
        """``ticket``, or for ``PENDING`` the ticket that maps every late run, sent now."""
        if ticket <= self.last_ticket:
            return ticket
        for slot_index in list(self.late_ops):
            self.promote(slot_index)
        return self.flush()

    def count_wait(self, cause: WaitCause, seconds: float) -> None:
        self.waits[cause][0] += 1
        self.waits[cause][1] += seconds

    # ---- reading the books ---------------------------------------------------------------------
    def private(self, group: Group) -> bool:
        """Whether only one slot maps ``group``."""
        return all(self.pool.mappings(p) == 1 for p in group)

    def best_fit(self, need: int) -> int | None:
        """The released slot whose mapped groups best fit ``need`` (covering it first), else an
        empty slot, else None."""
        cached = sorted(self.in_state[SlotState.CACHED])  # ties: the lowest index
        if cached:
            size = {i: len(self.slots[i].groups) for i in cached}
            return min(cached, key=lambda i: (size[i] < need, abs(size[i] - need)))
        return self.free_slot()

    def free_slot(self) -> int | None:
        """The lowest-numbered free slot, or None."""
        free = self.in_state[SlotState.FREE]
        return min(free) if free else None

    def released(self) -> list[int]:
        """The released (cached) slots, least recently released first (ties: lowest index)."""
        cached = self.in_state[SlotState.CACHED]
        return sorted(cached, key=lambda i: (self.slots[i].released_at, i))

    def spare_groups(self, exclude: int) -> int:
        """Page groups free in the pool or mapped under empty released slots (premapped, nothing
        cached) other than ``exclude``: memory that nothing would miss."""
        empty = sum(
            len(self.slots[i].groups)
            for i in self.in_state[SlotState.CACHED]
            if i != exclude and not self.slots[i].token_ids
        )
        return self.pool.available // self.config.num_ranges + empty

    def page_split(self) -> tuple[int, int]:
        """(in_use, cached): distinct pages mapped under running slots, and those mapped only
        under released ones."""
        ranges, running = self.config.num_ranges, len(self.group_running)
        return running * ranges, (len(self.group_slots) - running) * ranges

    def breakdown(self) -> MappingBreakdown:
        """The worker's time by operation kind and cause, and the callers' waits by cause."""
        by_op = self.worker.stats()["by_op"]
        ops = tuple(
            (str(kind), OpCause(cause).name.lower(), int(n), int(pages), float(seconds))
            for (kind, cause), (n, pages, seconds) in sorted(by_op.items())
        )
        waits = tuple(
            (cause.name.lower(), int(n), float(seconds))
            for cause, (n, seconds) in self.waits.items()
            if n
        )
        return MappingBreakdown(ops, waits)

    def layer_tensor(self, layer: int, kv: int) -> torch.Tensor:
        """Layer ``layer``'s K (``kv`` 0) or V (1): [max_slots, tokens_per_slot, heads, dim]."""
        if not 0 <= layer < self.config.num_layers:
            raise IndexError(f"layer {layer} outside [0, {self.config.num_layers})")
        if self.config.layout is KVLayout.PER_LAYER:  # K and V of each layer a range apiece
            return self.tensors[2 * layer + kv]
        return self.tensors[0][:, :, layer, kv]  # [slots, tokens, layers, 2, heads, dim]

    # ---- invariants ----------------------------------------------------------------------------
    def check_invariants(self, deep: bool = False) -> Counter[Group]:
        """Asserts the module docstring's invariants; returns each group's mapping count. ``deep``
        also waits for the worker and compares the books with what the extension mapped."""
        self.pool.check_invariants()
        mappings = Counter(group for s in self.slots for group in s.groups)
        pages = [page for group in mappings for page in group]
        assert len(pages) == len(set(pages)), "two groups share a page"
        assert all(len(group) == self.config.num_ranges for group in mappings)
        position: dict[Group, int] = {}
        for index, s in enumerate(self.slots):
            for j, group in enumerate(s.groups):
                assert position.setdefault(group, j) == j, f"group {group} at two page indices"
            late = s.tickets[: s.late]
            assert len(s.tickets) == len(s.groups) and s.tickets[s.late :] == sorted(
                s.tickets[s.late :]
            ), index
            assert len(set(late)) <= 1 and (index in self.late_ops) == (PENDING in late), index
            assert s.state is not SlotState.FREE or not s.groups, f"free slot {index} holds pages"
            assert s.index == index and index in self.in_state[s.state], f"slot {index}'s state"
        assert sum(map(len, self.in_state.values())) == len(self.slots), "a slot in two states"
        assert self.group_slots == mappings, "the group counts differ from the slots"
        running = Counter(g for s in self.slots if s.state is SlotState.RUNNING for g in s.groups)
        assert self.group_running == running, "the running group counts differ from the slots"
        for group, count in mappings.items():
            assert all(self.pool.mappings(p) == count for p in group), (group, count)
        if deep:
            self._check_extension(mappings)
        return mappings

    def _check_extension(self, mappings: Counter[Group]) -> None:
        """The books against the extension once the sent operations ran; late runs not sent yet
        are not mapped there."""
        self.wait(self.flush(), WaitCause.SYNC)
        assert len(self.pages) == self.pool.created, (len(self.pages), self.pool.created)
        unsent = Counter(
            g for i in self.late_ops for g in self.slots[i].groups[: self.slots[i].late]
        )
        for group, count in mappings.items():
            assert all(self.pages.mappings(p) == count - unsent[group] for p in group), (
                f"the extension counts other mappings of {group} than the books ({count})"
            )
        per_slot = self.config.pages_per_slot
        for r, reservation in enumerate(self.ranges):
            actual = reservation.page_ids()
            expected = [-1] * len(actual)
            for index, slot in enumerate(self.slots):
                first = slot.late if index in self.late_ops else 0
                for g, group in enumerate(slot.groups[first:], first):
                    expected[index * per_slot + g] = group[r]
            assert actual == expected, f"range {r}: extension's mapping differs from the books"
