"""The vAttention cache's prefix sharing: which blocks of which slots are indexed, the page groups
holding each block's bytes, how a hit is taken into a slot (aliased, copied), and the one way a
slot's pages are unmapped, which keeps the index and the copies right (``replica.kv.allocator``
chooses the slot; ``replica.kv.prefix`` keys the blocks; ``replica.kv.copies`` orders copies).

A block is ``prefix_block_tokens`` tokens (16), located by the groups holding its bytes: one
group when it lies inside a page (interleaved bf16 Llama: one block a page; per-layer: 64 blocks
a group), several when it straddles pages (a 57,344-byte Qwen2.5-7B token divides no 2 MiB
page). A slot's blocks below its ``frozen`` are immutable; the indexed ones are among them.

Invariants (``check_invariants``): every indexed block is mapped whole by some slot and immutable
in every slot mapping one of its groups at its page index; ``located`` knows every indexed block
by each of its groups.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from replica.kv.config import KVCacheConfig
from replica.kv.copies import SlotCopies, SlotCopy
from replica.kv.prefix import (
    PrefixIndex,
    PrefixQueries,
    PrefixSummary,
    root_key,
    stored_prefix,
    unfreeze_unwritten,
)
from replica.kv.slots import Group, Slot, SlotMaps, SlotState
from replica.kv.stats import OpCause, WaitCause

#: Where a prefix block lives: its index and the groups holding its bytes (one per page it spans).
BlockAt = tuple[int, tuple[Group, ...]]


class Locations(Sequence[BlockAt]):
    """Where a slot's blocks live, computed on demand from its groups (``PrefixIndex.register``)."""

    def __init__(self, config: KVCacheConfig, groups: list[Group]) -> None:
        self._config, self._groups = config, groups

    def __len__(self) -> int:
        return len(self._groups) * self._config.page_size // self._config.block_bytes

    def __getitem__(self, block: int) -> BlockAt:  # type: ignore[override]
        return block, tuple(self._groups[p] for p in self._config.block_pages(block))


class SlotPrefixes:
    """The prefix index over the slots of one ``SlotMaps``, with its hit and eviction counts."""

    def __init__(self, config: KVCacheConfig, maps: SlotMaps, copies: SlotCopies) -> None:
        self.config, self.maps, self.copies = config, maps, copies
        self.enabled = config.prefix_cache
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
        self.index: PrefixIndex[BlockAt] = PrefixIndex(
            root, config.prefix_block_tokens if self.enabled else 0
        )
        self.located: dict[Group, set[BlockAt]] = {}
        self.queries = PrefixQueries()  # lookups by acquire, and hits
        self.evicted_pages = 0  # indexed pages dropped from the index
        self.takeovers = 0  # hits served in a slot holding another conversation's history
        #: A fresh slot's leading aliases map late (the allocator's borrowed reads are on).
        self.late_aliases = False

    def lookup(self, prompt: tuple[int, ...]) -> tuple[list[BlockAt], list[int]]:
        """Where the blocks of the longest cached usable prefix of ``prompt`` live, and the keys
        computed on the way (one more than the blocks where the chain broke)."""
        return self.index.lookup(prompt) if self.enabled else ([], [])

    # ---- slots holding a hit -------------------------------------------------------------------
    @staticmethod
    def holds(slot: Slot, hit_keys: list[int]) -> int:
        """How many leading blocks of ``slot`` hold the hit's (equal keys: equal K/V, aliased or
        copied)."""
        held = 0
        limit = min(slot.frozen, len(hit_keys))
        while held < limit and slot.keys[held] == hit_keys[held]:
            held += 1
        return held

    def choose_slot(
        self, hit: list[BlockAt], hit_keys: list[int], mapped: bool = False
    ) -> int | None:
        """The slot ``KVCacheAllocator.acquire`` gives a hit (its docstring's order 1-4), or None
        when every slot is running; ``mapped``: a released slot mapping pages before a free one
        (a restore rewrites its pages)."""
        if hit:
            index = self.continuation(hit_keys)
            if index is not None:
                return index
        cached = self.maps.released()  # least recently released first
        if mapped:
            cached = [i for i in cached if self.maps.slots[i].groups] or cached
        empty = self.maps.free_slot()
        if empty is not None and not (mapped and cached):
            return empty
        slots = self.maps.slots
        holders = [i for i in cached if hit and self.holds(slots[i], hit_keys) == len(hit)]
        if holders:
            self.takeovers += 1
        return (holders or cached or [None])[0]

    def continuation(self, hit_keys: list[int]) -> int | None:
        """The released slot whose whole cached prefix starts the hit (the same conversation,
        continued), the longest such (most recently released among equals), or None. A slot that
        cached more than the hit holds another conversation: it is left to its own next turn."""
        best, best_key = None, (0, 0.0)
        for index in sorted(self.maps.in_state[SlotState.CACHED]):  # ties: the lowest index
            slot = self.maps.slots[index]
            # Keys chain every block before them: equal last keys, equal blocks (``holds``).
            frozen = slot.frozen
            if not 0 < frozen <= len(hit_keys) or slot.keys[frozen - 1] != hit_keys[frozen - 1]:
                continue
            if (slot.frozen, slot.released_at) > best_key:
                best, best_key = index, (slot.frozen, slot.released_at)
        return best

    def whole_pages(self, hit: list[BlockAt]) -> dict[int, Group]:
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

    def maps_block(self, slot: Slot, located: BlockAt) -> bool:
        """Whether ``slot`` maps every group of a block, each at its page index."""
        j, groups = located
        pages = self.config.block_pages(j)
        return len(slot.groups) >= pages.stop and all(
            slot.groups[p] == g for p, g in zip(pages, groups)
        )

    def plan_copies(
        self, slot_index: int, hit: list[BlockAt], spans: list[tuple[int, int]]
    ) -> list[SlotCopy]:
        """The copies that fill the slot's byte ``spans`` with the hit's bytes, each from a slot
        that maps the blocks' groups (the same source while it serves), adjacent ranges merged."""
        block = self.config.block_bytes
        copies: list[SlotCopy] = []
        source = -1
        for lo, hi in spans:
            for j in range(lo // block, -(-hi // block)):
                if source < 0 or not self.maps_block(self.maps.slots[source], hit[j]):
                    source = self._holder(hit[j], exclude=slot_index)
                a, b = max(lo, j * block), min(hi, (j + 1) * block)
                last = copies[-1] if copies else None
                if last and last.source == source and last.stop == a:
                    copies[-1] = SlotCopy(source, slot_index, last.start, b)
                else:
                    copies.append(SlotCopy(source, slot_index, a, b))
        return copies

    def _holder(self, located: BlockAt, exclude: int) -> int:
        """A slot other than ``exclude`` that maps the block's groups (at their page indices)."""
        for index, slot in enumerate(self.maps.slots):
            if index != exclude and self.maps_block(slot, located):
                return index
        raise RuntimeError(f"bug: no slot maps the indexed block {located}")

    # ---- taking a hit --------------------------------------------------------------------------
    def take_hit(self, slot_index: int, hit: list[BlockAt], kept: int) -> int:
        """Gives the slot, whose first ``kept`` blocks already hold the hit's, the rest of ``hit``
        (``KVCacheAllocator.acquire``'s rule, page by page from the one holding block ``kept``):
        a page wholly inside the hit whose blocks all live in one group is copied into the slot's
        own page there while free pages cover such copies, else aliased; the hit's bytes of other
        pages are copied into the slot's own page (a fresh one if it maps none). The slot keeps
        the pages only it maps beyond, unindexed from block ``kept`` on (their history is
        evicted); pages it shares with others and cannot write go. Returns the blocks the slot
        holds: all of the hit's, or fewer where no free page was left for a partial page's copy."""
        config, slot = self.config, self.maps.slots[slot_index]
        size, hit_end = config.page_size, len(hit) * config.block_bytes
        start = kept * config.block_bytes  # the first byte to fill
        first = start // size
        self.copies.order(slot_index, first)  # its pages from `first` on are rewritten
        end = first  # the slot's pages [first, end) are its own: rewritten in place
        while end < len(slot.groups) and self.maps.private(slot.groups[end]):
            self.unindex(slot.groups[end], from_block=kept)
            end += 1
        if end == first < len(slot.groups):
            start = first * size  # a shared page the slot cannot write: refilled whole
        whole = self.whole_pages(hit)
        budget = self.maps.spare_groups(exclude=slot_index)  # pages copies may keep
        spans: list[tuple[int, int]] = []  # byte ranges to copy from the hit's holders
        taken, shrunk = len(hit), False
        aliases: list[Group] = []  # consecutive pages to alias: one map run per range
        for page in range(first, -(-hit_end // size)):
            lo, hi = max(page * size, start), min((page + 1) * size, hit_end)
            group = whole.get(page) if (lo, hi) == (page * size, (page + 1) * size) else None
            if page < end and (group is None or budget > 0):
                budget -= group is not None
                spans.append((lo, hi))
                continue
            if not shrunk:  # from here on the slot's pages go: shared, or pages are scarce
                self.shrink_slot(slot_index, page, OpCause.REUSE, exact=True)
                shrunk, end = True, page
            if group is not None:
                self.maps.pool.share(group)
                aliases.append(group)
                continue
            self._alias(slot_index, aliases)  # the pages before this one, in order
            if self._add_fresh_group(slot_index):
                spans.append((lo, hi))
            else:  # no page for the partial page's copy: the hit ends before it, and aliases
                # reaching past its end go (a shared page lies wholly below the frozen blocks)
                slot.frozen = page * size // config.block_bytes
                self.shrink_slot(slot_index, len(slot.groups), OpCause.REUSE)
                taken, shrunk = slot.frozen, True
                break
        self._alias(slot_index, aliases)
        if not shrunk:  # the pages it shares beyond its own go: the request writes there
            self.shrink_slot(slot_index, end, OpCause.REUSE, exact=True)
        limit = min(taken * config.block_bytes, hit_end, len(slot.groups) * size)
        self._copy_spans(slot_index, hit[:taken], spans, limit)
        return taken

    def _alias(self, slot_index: int, aliases: list[Group]) -> None:
        """Maps the shared groups ``aliases`` at the slot's next page indices as one run per range
        (one access grant each, not one a page), then empties the list. A slot's first groups map
        late where ``late_aliases`` (borrowed reads, ``replica.kv.borrows``)."""
        late = self.late_aliases and not self.maps.slots[slot_index].groups
        self.maps.map_groups(slot_index, aliases, OpCause.ALIAS, late=late)
        aliases.clear()

    def _add_fresh_group(self, slot_index: int) -> bool:
        """Maps a free page group at the slot's next page index without reclaiming (a reclaim
        could unmap a copy's source): False if none is free."""
        taken = self.maps.pool.take(self.config.num_ranges)
        if taken is None:
            return False
        self.maps.create(taken.new_ids, OpCause.GROWTH)
        self.maps.map_groups(slot_index, [taken.ids], OpCause.GROWTH)
        return True

    def _copy_spans(
        self, slot_index: int, hit: list[BlockAt], spans: list[tuple[int, int]], limit: int
    ) -> None:
        """Copies the hit's bytes in ``spans`` (below ``limit``) into the slot, from slots that
        map the blocks' groups, once both sides are mapped (ordering contract 2)."""
        spans = [(lo, min(hi, limit)) for lo, hi in spans if lo < limit]
        if not spans:
            return
        self.maps.flush()  # fresh target pages' maps go out first
        copies = self.plan_copies(slot_index, hit, spans)
        slots, size = self.maps.slots, self.config.page_size
        for c in copies:
            last_page = c.pages(size)[-1]
            for ticket in (
                slots[c.source].tickets[last_page],
                slots[slot_index].tickets[last_page],
            ):
                self.maps.wait(ticket, WaitCause.ADMISSION)  # none if it has run; its error raised
        self.copies.copy(copies)

    def shrink_slot(
        self, slot_index: int, keep_groups: int, cause: OpCause, exact: bool = False
    ) -> int:
        """Unmaps the slot's groups from ``keep_groups`` on; returns the pages that freed (their
        index entries go: eviction). Its blocks no longer wholly mapped thaw, and unless
        ``exact`` (the caller refills the slot) a shared page they reach goes too: a slot maps a
        shared page only wholly below its frozen blocks. Copies reading or writing the dropped
        pages are waited for first."""
        config, slot = self.config, self.maps.slots[slot_index]
        frozen = min(slot.frozen, keep_groups * config.page_size // config.block_bytes)
        while not exact:
            below = frozen * config.block_bytes // config.page_size  # pages wholly frozen
            shared = [i for i in range(below, keep_groups) if not self.maps.private(slot.groups[i])]
            if not shared:
                break
            keep_groups = shared[0]
            frozen = min(frozen, keep_groups * config.page_size // config.block_bytes)
        if keep_groups >= len(slot.groups):
            return 0
        self.copies.settle(slot_index, keep_groups)  # no copy reads or writes them any more
        dropped = self.maps.unmap_tail(slot_index, keep_groups, cause)
        slot.frozen = frozen
        if slot.state is SlotState.CACHED and not slot.groups:
            self.maps.set_state(slot, SlotState.FREE)  # nothing left to reuse
            slot.token_ids, slot.keys, slot.frozen = (), [], 0
        freed = [group for group in dropped if self.maps.pool.mappings(group[0]) == 0]
        if self.index:
            for group in freed:
                self.unindex(group)
        return len(freed) * config.num_ranges

    # ---- indexing ------------------------------------------------------------------------------
    def release(self, slot_index: int, slot: Slot, token_ids: Sequence[int]) -> None:
        """Indexes what the released slot stores (``token_ids``, at most its length; without
        them, its prompt); blocks it froze but never wrote thaw and leave the index."""
        per_block = self.config.prefix_block_tokens
        stored = stored_prefix(
            slot_index, token_ids, slot.length, slot.token_ids, slot.frozen * per_block
        )
        slot.frozen, unindexed = unfreeze_unwritten(
            self.index,
            Locations(self.config, slot.groups),
            slot.frozen,
            len(stored) // per_block,
            lambda located: all(self.maps.private(g) for g in located[1]),
        )
        self.evicted_pages += unindexed * self.config.num_ranges
        del slot.keys[slot.frozen :]
        slot.token_ids = stored
        # Copied blocks whose first holder has gone are held here now.
        self.index_blocks(slot, 0, slot.frozen)
        self.register(slot, len(stored))

    def register(self, slot: Slot, tokens: int) -> None:
        """Indexes the slot's full blocks of its known tokens below ``tokens`` (written, or
        written by the step just launched, before any later step reads them) and freezes them."""
        config = self.config
        limit = min(
            min(tokens, len(slot.token_ids)) // config.prefix_block_tokens,
            len(slot.groups) * config.page_size // config.block_bytes,
        )
        if limit > slot.frozen:
            self.index_blocks(slot, slot.frozen, limit)
            slot.frozen = limit

    def index_blocks(self, slot: Slot, start: int, limit: int) -> None:
        """Indexes the slot's blocks ``[start, limit)`` where their keys are not indexed yet."""
        located = Locations(self.config, slot.groups)
        for block in self.index.register(slot.keys, slot.token_ids, located, start, limit):
            for group in block[1]:
                self.located.setdefault(group, set()).add(block)

    def unindex(self, group: Group, from_block: int = 0) -> None:
        """Drops the index entries of the blocks (from ``from_block`` on) whose bytes lie in
        ``group``: it is about to be rewritten or freed (eviction, counted in pages)."""
        located = self.located.get(group)
        if not located:
            return
        gone = [block for block in located if block[0] >= from_block]
        removed = sum(self.index.remove(block) for block in gone)
        located.difference_update(gone)
        if not located:
            del self.located[group]
        if removed:
            self.evicted_pages += len(group)

    def summary(self, limit: int = 2048) -> PrefixSummary | None:
        return self.index.summary(limit) if self.enabled else None

    def check_slots(self, mappings: Counter[Group]) -> None:
        """Each slot's frozen blocks against its pages (the allocator's invariants): mapped, a
        shared page wholly below them, a running slot backing its length and them."""
        config = self.config
        for index, slot in enumerate(self.maps.slots):
            frozen_bytes = slot.frozen * config.block_bytes
            assert frozen_bytes <= len(slot.groups) * config.page_size, (
                f"slot {index} froze unmapped blocks"
            )
            for page, group in enumerate(slot.groups):
                assert mappings[group] == 1 or (page + 1) * config.page_size <= frozen_bytes, (
                    f"slot {index} may write its shared page {page}"
                )
            if slot.state is SlotState.RUNNING:
                assert len(slot.groups) >= config.page_groups_for(slot.length), (
                    f"slot {index} unbacked"
                )
                assert slot.length >= slot.frozen * config.prefix_block_tokens, (
                    f"slot {index} is shorter than its immutable prefix"
                )

    def check_invariants(self, mappings: Counter[Group]) -> None:
        """The module docstring's invariants, given each group's mapping count."""
        self.index.check_invariants()
        for j, groups in self.index.locations():
            pages = self.config.block_pages(j)
            assert len(groups) == len(pages), f"block {j} located in {groups}"
            slots = self.maps.slots
            assert any(self.maps_block(s, (j, groups)) for s in slots), f"block {j} is unmapped"
            for slot in slots:
                if any(p < len(slot.groups) and slot.groups[p] == g for p, g in zip(pages, groups)):
                    assert slot.frozen > j, f"indexed block {j} is writable in a slot"
            assert all((j, groups) in self.located.get(g, ()) for g in groups), "unlocated"
            assert all(g in mappings for g in groups)
