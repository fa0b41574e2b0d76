"""How the vAttention cache's slots grow: the pages a slot's tokens need, eager pages ahead of
them, and the pages reclaimed for them (released slots least recently released first, from their
ends, then running slots' surplus). ``KVCacheAllocator`` calls it; ``SlotMaps`` keeps the books.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from replica.kv.config import KVCacheConfig
from replica.kv.slot_prefixes import SlotPrefixes
from replica.kv.slots import Group, Slot, SlotMaps, SlotState
from replica.kv.stats import OpCause

#: A pipelined growth's batches (``SlotGrowth.grow``): the first maps this many pages, each next
#: twice the last, up to the most. Small batches keep the copy fed: mapping a page (~32 us with its
#: creation) is nearly as slow as copying it (~38 us), so the copy of one batch hides the maps of
#: the next only while batches grow slowly, and the copy of the last batch follows every map. On
#: the H100 batches of up to 64 pages made a 1K-token restore (64 pages) 4.3 ms against its copy's
#: 2.5 ms; a model of the two rates puts batches of up to 16 about 0.45 ms lower there and within
#: 1% of 64 at 1,024 pages while a batch costs the worker under 0.1 ms.
FIRST_BATCH_PAGES, MOST_BATCH_PAGES = 2, 16


def groups_of(ids: Sequence[int], ranges: int) -> list[Group]:
    """Page ids taken for whole groups, cut into groups (one page per range)."""
    return [tuple(ids[i : i + ranges]) for i in range(0, len(ids), ranges)]


def pipelined_batches(groups: int, ranges: int) -> list[int]:
    """How many of ``groups`` page groups (``ranges`` pages each) each worker batch maps when a
    growth is pipelined: ``FIRST_BATCH_PAGES`` first, doubling up to ``MOST_BATCH_PAGES`` (why
    those: their comment), at least one group each. A restore's copy of a batch's blocks starts
    when that batch is mapped, while the worker maps the next."""
    sizes: list[int] = []
    pages, left = FIRST_BATCH_PAGES, groups
    while left > 0:
        sizes.append(min(max(1, pages // ranges), left))
        pages, left = min(2 * pages, MOST_BATCH_PAGES), left - sizes[-1]
    return sizes


class SlotGrowth:
    def __init__(self, config: KVCacheConfig, maps: SlotMaps, prefixes: SlotPrefixes) -> None:
        self.config, self.maps, self.prefixes = config, maps, prefixes

    def backed_tokens(self, slot: Slot) -> int:
        return min(
            len(slot.groups) * self.config.page_size // self.config.bytes_per_token,
            self.config.tokens_per_slot,
        )

    def premap(self) -> None:
        """Maps the page budget under the empty slots, a group at a time round the slots (up to
        ``pages_per_slot`` each); they become released slots holding nothing, older than any."""
        ranges, slots = self.config.num_ranges, self.maps.slots
        groups = min(self.maps.pool.available // ranges, len(slots) * self.config.pages_per_slot)
        for i in range(len(slots)):
            count = groups // len(slots) + (i < groups % len(slots))
            taken = self.maps.pool.take(count * ranges) if count else None
            if taken is None:
                continue
            self.maps.create(taken.new_ids, OpCause.PREMAP)
            self.maps.map_groups(i, groups_of(taken.ids, ranges), OpCause.PREMAP)
            self.maps.set_state(slots[i], SlotState.CACHED)
            slots[i].released_at = -math.inf
        self.maps.flush()

    def create_spare(self) -> None:
        """Submits the creation of the pool's spare pages (``PhysicalPagePool.spare``) as a batch
        of its own, so the tickets of the growth before it do not wait for it."""
        spare = self.maps.pool.spare()
        if spare:
            self.maps.create(spare, OpCause.SPARE)
            self.maps.flush()

    def eager_target(self, tokens: int) -> int:
        """Groups a slot holding ``tokens`` keeps mapped: what they need, plus up to ``eager_pages``
        more once the slot is within ``eager_lookahead_tokens`` of its mapped end."""
        config = self.config
        target = config.page_groups_for(tokens) + config.eager_pages
        if config.eager_lookahead_tokens is not None:
            target = min(target, config.page_groups_for(tokens + config.eager_lookahead_tokens))
        return min(target, config.pages_per_slot)

    def grow(self, slot_index: int, tokens: int, pipelined: bool = False) -> bool:
        """Queues mapping so the slot backs ``tokens``, then eager groups (``eager_target``) if
        they can be had without reclaiming. False, with nothing queued for this slot, if
        ``tokens`` cannot be backed. ``pipelined``: the groups go to the worker in several batches
        (``pipelined_batches``, each flushed but the last), so a caller can start on the first
        groups while the worker maps the others."""
        slot, ranges = self.maps.slots[slot_index], self.config.num_ranges
        need = self.config.page_groups_for(tokens)
        pages = max(need - len(slot.groups), 0) * ranges
        if self.maps.pool.available < pages:
            self._reclaim(pages - self.maps.pool.available, exclude=slot_index)
        taken = self.maps.pool.take(pages)
        if taken is None:
            return False
        eager = min(
            self.eager_target(tokens) - len(slot.groups) - pages // ranges,
            self.maps.pool.available // ranges,
        )
        extra = self.maps.pool.take(eager * ranges) if eager > 0 else None
        ids = list(taken.ids) + (list(extra.ids) if extra else [])
        if not ids:
            return True
        new = {*taken.new_ids, *(extra.new_ids if extra else ())}
        added = groups_of(ids, ranges)
        sizes = pipelined_batches(len(added), ranges) if pipelined else [len(added)]
        for i, size in enumerate(sizes):
            if i:  # the batch before goes to the worker
                self.maps.flush()
            batch, added = added[:size], added[size:]
            self.maps.create([p for group in batch for p in group if p in new], OpCause.GROWTH)
            self.maps.map_groups(slot_index, batch, OpCause.GROWTH)  # the next flush carries it
        return True

    def _reclaim(self, pages: int, exclude: int) -> None:
        """Frees at least ``pages`` if it can: first the pages of released slots (least recently
        released first, from their ends: a prefix's first pages are the most shared), then running
        slots' pages beyond what their next step needs. A page another slot still maps is not
        freed by unmapping it here."""
        cached = self.maps.released()
        running = sorted(self.maps.in_state[SlotState.RUNNING] - {exclude})
        for index in cached + running:
            if pages <= 0:
                return
            slot = self.maps.slots[index]
            keep = (
                0 if slot.state is SlotState.CACHED else self.config.page_groups_for(slot.reserved)
            )
            # One unmap run for the tail that frees enough (pages mapped elsewhere free nothing).
            end, freeing = len(slot.groups), 0
            while end > keep and freeing < pages:
                end -= 1
                freeing += sum(self.maps.pool.mappings(p) == 1 for p in slot.groups[end])
            if end < len(slot.groups):
                pages -= self.prefixes.shrink_slot(index, end, OpCause.RECLAIM)
