"""Deferred restores of the vAttention cache's host-tier blocks: decided at ``acquire``, copied at
the slot's first waited ``ensure``.

A restore needs its pages mapped before its copy is enqueued, and the maps run on the mapping
worker. Waiting for them inside ``acquire`` stalled the engine's thread on every restoring
admission (an H100 think-time chat run: admission waits 7.2 s with the tier against 3.9 s
without), so ``acquire`` only decides the restore from the books and submits the maps; the copy is
enqueued by the slot's first ``ensure(wait=True)`` (the scheduler makes one for every request
before its first step). The maps go to the worker in batches that grow from a few pages
(``replica.kv.growth.pipelined_batches``), and each batch's blocks are copied as soon as it is
mapped, while the worker maps the next: a restore into pages it maps costs about the longer of
its maps and its copy, not their sum (on an H100 the sum was 0.61x the paged mode's restore)::

    acquire:   | taken (device hit) | count (pending: mapped later, not indexed) |
               length = (taken + count) * block tokens: the scheduler counts them as cached
               maps submitted:   [batch 1][batch 2   ][batch 3        ] ...
    ensure(wait=True):  wait 1 -> copy 1 | wait 2 -> copy 2 | ... -> index the count blocks
                                 (copy k runs on the stream while the worker maps batch k + 1)

The overlap is had where the waited ensure comes before the maps are done: a lone admission, or a
scheduler that waits for every admission (``admission_map_wait_s`` inf). A restore whose maps
outlast the scheduler's short admission wait is deferred to a later step instead (the engine's
thread does not wait for it); by then its pages are mapped and its copy runs alone.

NOTE: the copy starts only from a recorded call whose outcome does not depend on timing (a waited
``ensure``, never ``ready`` nor ``ensure(wait=False)``): under tensor parallelism the other ranks
replay rank 0's recorded calls (``replica.kv.recording``), so a restore started by whether the
worker had finished would index blocks on one rank and not on another.

Invariants (``check_invariants``): a pending restore's slot is running, maps the pages of its
``taken + count`` blocks, has frozen exactly its ``taken`` blocks (nothing after them is indexed
until the copy is enqueued), and the tier keeps its ``count`` keys reserved (never evicted); a
released slot has no pending restore.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from replica.kv.base import KVRestoreFailed
from replica.kv.growth import SlotGrowth
from replica.kv.host_tier import HostTier
from replica.kv.slot_prefixes import SlotPrefixes
from replica.kv.slots import SlotState
from replica.kv.tier_faults import TierFaults


@dataclass(frozen=True)
class PendingRestore:
    """A slot's restore decided at acquire: blocks ``[taken, taken + count)`` of ``keys`` (the
    prompt's block keys) come from the host tier; the slot's first ``taken`` blocks are its device
    hit."""

    keys: tuple[int, ...]
    taken: int
    count: int

    @property
    def restored_keys(self) -> tuple[int, ...]:
        return self.keys[self.taken : self.taken + self.count]


class SlotRestores:
    """The pending restores of a vAttention cache's slots (the module docstring's contract).
    ``hit_tokens``: prompt tokens copied back; ``skipped_tokens``: held by the tier but computed
    again for lack of pages to restore into (both counted for ``KVCacheStats``)."""

    def __init__(self, prefixes: SlotPrefixes, growth: SlotGrowth, faults: TierFaults) -> None:
        self._config = prefixes.config
        self._prefixes = prefixes
        self._maps = prefixes.maps
        self._growth = growth
        self._faults = faults
        self._tier: HostTier = faults.tier
        self._pending: dict[int, PendingRestore] = {}
        self.hit_tokens = 0
        self.skipped_tokens = 0

    def __contains__(self, slot_index: object) -> bool:
        return slot_index in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def pending_blocks(self, slot_index: int) -> int:
        """The blocks slot ``slot_index`` holds once its pending restore is copied (0 if none)."""
        restore = self._pending.get(slot_index)
        return restore.taken + restore.count if restore is not None else 0

    def pending_tokens(self, slot_index: int) -> int:
        """Tokens of the slot's length that wait for their copy (0 without a pending restore)."""
        restore = self._pending.get(slot_index)
        return restore.count * self._config.prefix_block_tokens if restore is not None else 0

    def wants_mapped_slot(
        self, prompt: Sequence[int], keys: list[int], hit: int, need: int
    ) -> bool:
        """Whether a prompt whose ``hit`` blocks are on the device should land in a released
        slot's mapped pages rather than a free slot: the tier holds its next blocks and the pool's
        unmapped pages do not cover its ``need`` page groups. Growing a free slot would then
        reclaim released slots' pages, unmapping and mapping each (~50-80 us a 2 MiB page on an
        H100); rewriting a released slot's own pages maps none, and what it cached was written
        through to the host at its release. A function of the books alone: every
        tensor-parallel rank decides alike."""
        if not self._stored_after(prompt, keys, hit):
            return False
        return self._maps.pool.available // self._config.num_ranges < need

    def _stored_after(self, prompt: Sequence[int], keys: list[int], start: int) -> int:
        """``HostTier.stored_after`` for the prompt's blocks from block ``start`` on."""
        per_block, root = self._config.prefix_block_tokens, self._prefixes.index.root
        return self._tier.stored_after(keys, prompt, root, per_block, start)

    def plan(self, index: int, prompt: Sequence[int], keys: list[int], taken: int) -> int:
        """Decides the restore of the blocks after slot ``index``'s ``taken`` that the tier holds,
        growing the slot for them (maps submitted, never waited for here) and reserving their
        host blocks; returns how many (0 where the tier holds none, block ``taken`` starts in a
        page the slot shares, or pages cannot be had)."""
        count = self._stored_after(prompt, keys, taken)
        config, per_block = self._config, self._config.prefix_block_tokens
        slot = self._maps.slots[index]
        page = taken * config.block_bytes // config.page_size
        if not count or (page < len(slot.groups) and not self._maps.private(slot.groups[page])):
            return 0
        tokens = (taken + count) * per_block
        if len(slot.groups) < config.page_groups_for(tokens) and not self._growth.grow(
            index, tokens, pipelined=True
        ):
            self.skipped_tokens += count * per_block
            return 0
        restore = PendingRestore(tuple(keys[: taken + count]), taken, count)
        self._tier.reserve(restore.restored_keys)
        self._pending[index] = restore
        return count

    def start(self, index: int, wait: Callable[[int], None]) -> None:
        """Copies slot ``index``'s pending restore (``HostTier.restore``: the current stream
        reads the blocks after the copy), a piece per mapping batch: ``wait(ticket)`` waits for a
        batch, and each piece is enqueued once the batch mapping its pages has run, so it copies
        while the worker maps the next (``plan`` grew the slot pipelined). Then indexes the
        blocks copied. KVRestoreFailed where fewer than ``count`` were copied: the copy raised
        (``replica.kv.tier_faults``: those keys leave the tier) or the tier dropped some of the
        keys since (a failed copy elsewhere); the slot holds valid K/V below the kept blocks only,
        the rest are never indexed and the request computes them. The caller still waits for
        the slot's later batches (a failed copy may leave some unwaited). A wait that raises (a
        failed map) leaves the restore pending, so a release indexes only the device hit."""
        restore, per_block = self._pending.pop(index), self._config.prefix_block_tokens
        self._tier.unreserve(restore.restored_keys)
        count = min(self._tier.stored(restore.keys, restore.taken), restore.count)
        located = [(index, j) for j in range(restore.taken + count)]
        stops = self._mapped_stops(index, restore.taken, restore.taken + count, wait)
        try:
            if count and not self._faults.restore(
                restore.keys, located, restore.taken, count, stops
            ):
                count = 0
        except BaseException:  # a wait raised (a failed map): still pending, nothing indexed
            self._pending[index] = restore
            self._tier.reserve(restore.restored_keys)
            raise
        self.hit_tokens += count * per_block
        kept = (restore.taken + count) * per_block
        self._prefixes.register(self._maps.slots[index], kept)
        if count < restore.count:
            raise KVRestoreFailed(index, kept, (restore.taken + restore.count) * per_block)

    def _mapped_stops(
        self, index: int, start: int, end: int, wait: Callable[[int], None]
    ) -> Iterator[int]:
        """The ends of the pieces of blocks ``[start, end)`` of slot ``index`` that one mapping
        batch maps (a block straddling two groups goes with the later one's), each yielded after
        ``wait``\\ ing for its batch (tickets ascend with the page index)."""
        config, tickets = self._config, self._maps.slots[index].tickets
        per_block = config.prefix_block_tokens
        batches = [
            tickets[config.page_groups_for(j * per_block) - 1] for j in range(start + 1, end + 1)
        ]
        for j, ticket in enumerate(batches, start + 1):  # block j - 1 maps in batch ``ticket``
            if j == end or ticket != batches[j - start]:
                wait(ticket)
                yield j

    def drop(self, index: int) -> int:
        """Forgets slot ``index``'s pending restore, if any (the slot is released before its
        copy); returns the blocks the slot holds valid: its device hit (all of them without a
        pending restore: -1)."""
        restore = self._pending.pop(index, None)
        if restore is None:
            return -1
        self._tier.unreserve(restore.restored_keys)
        return restore.taken

    def check_invariants(self) -> None:
        config = self._config
        for index, restore in self._pending.items():
            slot = self._maps.slots[index]
            assert slot.state is SlotState.RUNNING, f"slot {index} restores while not running"
            tokens = (restore.taken + restore.count) * config.prefix_block_tokens
            assert len(slot.groups) >= config.page_groups_for(tokens), f"slot {index} unmapped"
            assert slot.frozen == restore.taken, f"slot {index} indexed blocks not copied yet"
            assert slot.length >= tokens, f"slot {index} is shorter than its restore"
            assert all(self._tier.reserved(key) for key in restore.restored_keys), (
                f"slot {index}'s restored blocks are not reserved"
            )
