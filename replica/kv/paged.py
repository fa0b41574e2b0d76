"""The PagedAttention comparison mode's KV cache: a preallocated pool of fixed-size blocks and one
block table per request, behind the one KV-cache interface (``replica.kv.base.KVCache``), so
everything above the cache runs unchanged. Its page is a block: ``block_size`` tokens of every
layer's K and V.

A request owns a *slot*: a row of the block table. Its tokens [0, n) live in blocks
``blocks[0 .. ceil(n / block_size))``, token t at row ``t % block_size`` of block
``blocks[t // block_size]`` of every layer's K and V. There is nothing to map: blocks are taken
from and given back to the free list synchronously, and ``step_async`` only reserves.

The block table is a preallocated int32 tensor [max_slots, max_blocks_per_seq] on the cache's
device, written incrementally: appending a block queues one (slot, column, block) entry, and the
queued entries of a step go to the device in one copy and one index_put when the table is next
read (``block_table``). Released or trimmed entries are left stale: only the first
``ceil(kv_len / block_size)`` columns of a row are ever read.

Prefix cache (``config.prefix_cache``), the block-level equivalent of the vAttention cache's
aliasing, so the two modes compare fairly: full blocks are indexed by the prefix key of their
tokens (``replica.kv.prefix``; a running slot's prompt at ``step_async``, everything it stored at
``release``), ``acquire`` with a prompt starts the slot's table row with the longest indexed prefix
(reference counts, no copy), indexed blocks are immutable, and a block no slot holds stays indexed
on an LRU list (``cached``) that ``_take`` empties oldest first when the free list runs dry.

Host tier (``config.host_tier_bytes``, ``replica.kv.host_tier``): at release a sequence's indexed
blocks the tier lacks are gathered to pinned host memory, from every layer's K and V at once, a
piece of consecutive host blocks in one copy through a device staging buffer
(``replica.kv.host_copies.GatheredBlocks``; K and V are one allocation for this); a prompt's blocks
found there after its hit get fresh blocks and are scattered back. A block a copy reads or writes
is taken again behind the copy's fence: the engine's stream waits for it on the device, the host
does not (offloads run on a side stream; blocks are never unmapped). A copy that raises
(``replica.kv.tier_faults``): its keys leave the tier; a failed restore's blocks go back and the
request computes them.

Invariants (``check_invariants``), in blocks:
    free + in_use + cached == num_blocks     (in_use: distinct blocks held by running slots;
                                              cached: held by none, indexed, LRU order)
    a block's reference count == the slots holding it; a block held twice is indexed; free blocks
    are not indexed; an indexed block of a running slot lies below its ``frozen`` blocks
    a running slot holds exactly ceil(reserved / block_size) blocks, reserved in {length, length +
    1}
    a free slot holds no block
    the device table's first len(blocks) columns of a running slot's row equal its host list
    wasted_bytes == sum over running slots of (blocks * block_size - length) * bytes_per_token
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from replica.kv.base import KVCache, KVCacheOutOfMemory, StepTicket
from replica.kv.copies import CopyFence, order_all
from replica.kv.host_copies import GatheredBlocks
from replica.kv.host_tier import HostTier
from replica.kv.paged_config import PagedKVConfig
from replica.kv.prefix import (
    PrefixIndex,
    PrefixQueries,
    PrefixSummary,
    root_key,
    stored_prefix,
    unfreeze_unwritten,
)
from replica.kv.stats import KVCacheStats
from replica.kv.tier_faults import TierFaults

#: Set VATTN_CHECK_INVARIANTS=1 to check the books after every public call (debugging).
_CHECK_ALWAYS = os.environ.get("VATTN_CHECK_INVARIANTS") == "1"


@dataclass
class _Sequence:
    running: bool = False
    length: int = 0  # tokens stored
    reserved: int = 0  # tokens backed for the coming step (length, or length + 1 after a step)
    blocks: list[int] = field(default_factory=list)
    token_ids: tuple[int, ...] = ()  # the prompt (prefix cache)
    keys: list[int] = field(default_factory=list)  # its full blocks' prefix keys, as computed
    frozen: int = 0  # leading blocks that are shared and immutable


class PagedKVCache(KVCache):
    def __init__(
        self,
        config: PagedKVConfig,
        device: torch.device | str = "cpu",
        make_fence: Callable[[], CopyFence] | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        # Zeroed, not empty: a kernel that loads a whole tile and masks by multiplying would turn
        # stale NaN bit patterns in rows past a sequence's end into NaN outputs.
        # NOTE: K and V in one allocation [2, *block_shape], so that the host tier gathers a
        # block from every layer's K and V with one index kernel; each stays its own contiguous
        # tensor.
        kv = torch.zeros((2, *config.block_shape), dtype=config.dtype, device=self.device)
        self._k, self._v = kv[0], kv[1]
        # A stack popped from the end, so the first requests get blocks 0, 1, 2, ...
        self._free = list(range(config.num_blocks - 1, -1, -1))
        self._seqs = [_Sequence() for _ in range(config.max_slots)]
        self._table = torch.zeros(
            (config.max_slots, config.max_blocks_per_seq), dtype=torch.int32, device=self.device
        )
        # (slot, column) -> block, not yet on the device. A dict: a column rewritten before the
        # flush (slot released and reused) must reach index_put once, duplicates are undefined.
        self._pending: dict[tuple[int, int], int] = {}
        self.table_entries_written = 0  # block ids copied into the device table, over all time
        self.table_flushes = 0  # index_put calls on the device table
        self.blocks_allocated_total = 0
        self._refs = [0] * config.num_blocks  # slots holding each block
        self._cached: OrderedDict[int, None] = OrderedDict()  # indexed, held by none; LRU first
        root = root_key(
            "paged",
            config.prefix_key,
            config.block_size,
            config.dtype,
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
        )
        self._index: PrefixIndex[int] = PrefixIndex(root, config.block_size)  # key -> block
        self._queries = PrefixQueries()
        self.prefix_evicted_pages = 0
        self._pins: dict[int, list[CopyFence]] = {}  # block -> host copies reading or writing it
        self._tier = (
            HostTier(
                GatheredBlocks(GatheredBlocks.of_pool(kv)),
                config.host_tier_bytes,
                self._pin,
                make_fence,
            )
            if config.prefix_cache and config.host_tier_bytes
            else None
        )
        self._tier_faults = TierFaults(self._tier, self.device) if self._tier is not None else None
        self._host_hit_tokens = 0
        self._host_skipped_tokens = 0  # held by the tier, computed again: no blocks to restore into

    # ---- tensors -------------------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K blocks: contiguous [num_blocks, block_size, kv_heads, head_dim]."""
        return self._k[self._layer(layer)]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._v[self._layer(layer)]

    # ---- geometry ------------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return self.config.blocks_for(tokens)

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.config.num_layers:
            raise IndexError(f"layer {layer} outside [0, {self.config.num_layers})")
        return layer

    def block_table(self) -> torch.Tensor:
        """The device block table [max_slots, max_blocks_per_seq], with every queued entry
        written."""
        if self._pending:
            rows = [(slot, column, block) for (slot, column), block in self._pending.items()]
            entries = torch.tensor(rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            entries = entries.to(self.device, non_blocking=True)  # one copy for the whole step
            self._table.index_put_((entries[:, 0], entries[:, 1]), entries[:, 2].to(torch.int32))
            self.table_entries_written += len(self._pending)
            self.table_flushes += 1
            self._pending = {}
        return self._table

    def block_ids(self, slot_index: int) -> tuple[int, ...]:
        """The blocks of a running slot, in token order (the host copy of its table row)."""
        return tuple(self._running(slot_index).blocks)

    # ---- slots ---------------------------------------------------------------------------------
    def acquire(self, tokens_hint: int = 0, prompt: Sequence[int] = ()) -> int:
        """Gives a request the lowest free slot; blocks come with ``ensure``. The hint does not
        matter here: there is no cached slot to fit. With the prefix cache the slot starts with
        the longest cached prefix of ``prompt`` (shared blocks; its length)."""
        self.check_hint(tokens_hint)
        index = next((i for i, s in enumerate(self._seqs) if not s.running), None)
        if index is None:
            raise KVCacheOutOfMemory(
                tokens_hint,
                0,
                len(self._free),
                len(self._cached),
                f"all {self.config.max_slots} slots are running",
            )
        prompt = tuple(prompt)
        hit, keys = self._lookup(prompt)
        for block in hit:
            self._refs[block] += 1
            self._cached.pop(block, None)  # held again: not the LRU's to take
        seq = self._seqs[index]
        seq.blocks = list(hit)
        self._pending.update(((index, j), block) for j, block in enumerate(hit))
        restored = self._restore(index, prompt, keys, len(hit)) if self._tier else 0
        blocks = len(hit) + restored
        cached = blocks * self.config.block_size
        if self.config.prefix_cache:
            self._queries.acquired(index, len(prompt), cached)
        seq.running, seq.length, seq.reserved = True, cached, cached
        seq.token_ids, seq.keys, seq.frozen = prompt, keys[:blocks], len(hit)
        self._register(seq, cached)  # the restored blocks: indexed now, read after the copy
        self._checked()
        return index

    def _restore(self, index: int, prompt: tuple[int, ...], keys: list[int], hit: int) -> int:
        """Scatters back the blocks after the hit that the host tier holds into fresh blocks;
        returns how many (0 where the blocks cannot be had, or the copy raised:
        ``replica.kv.tier_faults``; the fresh blocks go back and the request computes them)."""
        tier, faults, size = self._tier, self._tier_faults, self.config.block_size
        assert tier is not None and faults is not None
        count = tier.stored_after(keys, prompt, self._index.root, size, hit)
        if not count:
            return 0
        if not self._resize(index, hit + count):
            self._host_skipped_tokens += count * size
            return 0
        blocks = self._seqs[index].blocks
        if not faults.restore(keys, [(0, block) for block in blocks], hit, count):
            self._resize(index, hit)
            return 0
        self._host_hit_tokens += count * size
        return count

    @property
    def prefix_block_tokens(self) -> int:
        return self.config.block_size if self.config.prefix_cache else 0

    @property
    def tier_faults(self) -> TierFaults | None:
        return self._tier_faults

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        return len(self._lookup(tuple(prompt))[0]) * self.config.block_size

    def _lookup(self, prompt: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """The indexed blocks of the longest usable prefix of ``prompt``, and the keys computed."""
        return self._index.lookup(prompt) if self.config.prefix_cache else ([], [])

    def release(self, slot_index: int, token_ids: Sequence[int] = ()) -> None:
        """Ends a request; its blocks go back to the free list at once, or with the prefix cache,
        its full blocks of ``token_ids`` (the tokens it stores; default its prompt) are indexed
        and kept until taken."""
        seq = self._running(slot_index)
        self._queries.released(slot_index)
        if self.config.prefix_cache:
            size = self.config.block_size
            stored = stored_prefix(
                slot_index, token_ids, seq.length, seq.token_ids, seq.frozen * size
            )
            seq.frozen, unindexed = unfreeze_unwritten(
                self._index,
                seq.blocks,
                seq.frozen,
                len(stored) // size,
                lambda block: self._refs[block] == 1,
            )
            self.prefix_evicted_pages += unindexed
            del seq.keys[seq.frozen :]
            seq.token_ids = stored[: seq.length]
            self._register(seq, seq.length)
            if self._tier_faults is not None:  # write-through: eviction is a drop later
                located = [(0, block) for block in seq.blocks[: seq.frozen]]
                self._tier_faults.offload(seq.keys, located, seq.frozen)
        self._resize(slot_index, 0)
        seq.running, seq.length, seq.reserved = False, 0, 0
        seq.token_ids, seq.keys, seq.frozen = (), [], 0
        self._checked()

    def _register(self, seq: _Sequence, tokens: int) -> None:
        """Indexes the sequence's full blocks of known tokens below ``tokens`` and freezes them."""
        limit = min(min(tokens, len(seq.token_ids)) // self.config.block_size, len(seq.blocks))
        if limit > seq.frozen:
            self._index.register(seq.keys, seq.token_ids, seq.blocks, seq.frozen, limit)
            seq.frozen = limit

    def prefix_summary(self, limit: int = 2048) -> PrefixSummary | None:
        if not self.config.prefix_cache:
            return None
        summary = self._index.summary(limit)
        return summary if self._tier is None else self._tier.with_host_keys(summary, limit)

    def length(self, slot_index: int) -> int:
        return self._running(slot_index).length

    def slot_pages(self, slot_index: int) -> int:
        return len(self._running(slot_index).blocks)

    # ---- growth --------------------------------------------------------------------------------
    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None:
        """Backs tokens [0, tokens) of a running slot with exactly the blocks they need and records
        ``tokens`` as its length. Blocks are taken synchronously, so they are usable on return with
        or without ``wait``. Raises KVCacheOutOfMemory (nothing changed) if blocks run out."""
        seq = self._running(slot_index)
        self.check_tokens(slot_index, tokens)
        if tokens < seq.frozen * self.config.block_size:
            raise ValueError(
                f"slot {slot_index}: {tokens} tokens asked, below its "
                f"{seq.frozen * self.config.block_size} shared, immutable ones"
            )
        need = self.config.blocks_for(tokens)
        if not self._resize(slot_index, need):
            raise KVCacheOutOfMemory(
                tokens, need - len(seq.blocks), len(self._free), len(self._cached)
            )
        seq.length = seq.reserved = tokens
        self._queries.backed(slot_index)
        self._checked()

    def step_async(self, lengths: Mapping[int, int]) -> StepTicket:
        """Records each running slot's length and reserves, right away, the blocks the next step
        needs (length + 1 tokens): there is no mapping to overlap with the model. Slots that cannot
        get a block come back in the ticket's ``unbacked`` (the scheduler preempts them). The
        ticket is 0: nothing runs in the background."""
        for slot_index in lengths:
            self._running(slot_index)
        self.check_step_lengths(lengths)
        unbacked = []
        for slot_index, length in lengths.items():
            seq = self._seqs[slot_index]
            seq.length = length
            if self._resize(slot_index, self.config.blocks_for(length + 1)):
                seq.reserved = length + 1
            else:  # its books never claim tokens it cannot store
                seq.length = seq.reserved = min(length, len(seq.blocks) * self.config.block_size)
                unbacked.append(slot_index)
        if self.config.prefix_cache:
            for slot_index in lengths:
                self._register(self._seqs[slot_index], self._seqs[slot_index].length)
        self._checked()
        return StepTicket(0, tuple(unbacked))

    def wait(self, ticket: StepTicket | int) -> tuple[int, ...]:
        """Nothing runs in the background; returns the slots that could not grow."""
        return ticket.unbacked if isinstance(ticket, StepTicket) else ()

    def done(self, ticket: StepTicket | int) -> bool:
        return True

    def synchronize(self) -> None:
        """Writes queued block-table entries to the device and waits for the host tier's
        copies."""
        self.block_table()
        for fences in self._pins.values():
            for fence in fences:
                fence.wait()
        self._pins.clear()

    def _pin(self, _: int, blocks: range, fence: CopyFence) -> None:
        """A host copy's pin on ``blocks`` (ids): one taken again puts ``fence`` ahead of the
        stream that writes it."""
        for block in blocks:
            self._pins[block] = [f for f in self._pins.get(block, ()) if not f.done()] + [fence]

    def shrink(self) -> int:
        """The pool is preallocated and fixed: nothing goes back to the device; returns 0. The
        host tier keeps its blocks."""
        return 0

    def _resize(self, slot_index: int, need: int) -> bool:
        """Makes the slot hold exactly ``need`` blocks; False, with nothing changed, if the free
        list is short."""
        blocks = self._seqs[slot_index].blocks
        if need <= len(blocks):
            # Tail first: popped again in token order, and a prefix's last blocks are the LRU's
            # first to go.
            for block in reversed(blocks[need:]):
                self._refs[block] -= 1
                if self._refs[block] == 0:
                    if block in self._index:
                        self._cached[block] = None
                    else:
                        self._free.append(block)
            del blocks[need:]
            return True
        count = need - len(blocks)
        if count > len(self._free) + len(self._cached):
            return False
        while len(self._free) < count:  # evict the least recently used cached blocks
            block, _ = self._cached.popitem(last=False)
            self._index.remove(block)
            self.prefix_evicted_pages += 1
            self._free.append(block)
        taken = self._free[-count:][::-1]
        del self._free[-count:]
        # A host copy may still read or write them: the steps writing them wait for it, on the
        # device.
        order_all(f for block in taken for f in self._pins.pop(block, ()))
        for block in taken:
            self._refs[block] = 1
        first = len(blocks)
        blocks.extend(taken)
        self._pending.update(((slot_index, first + i), block) for i, block in enumerate(taken))
        self.blocks_allocated_total += count
        return True

    def _running(self, slot_index: int) -> _Sequence:
        seq = self._seqs[self.check_slot(slot_index)]
        if not seq.running:
            raise ValueError(f"slot {slot_index} is free, not running")
        return seq

    # ---- accounting ----------------------------------------------------------------------------
    def reclaimable_pages(self) -> int:
        """Blocks a new request could get now: the free ones and the cached ones (nothing is
        eager)."""
        return len(self._free) + len(self._cached)

    def can_allocate(self, tokens: int) -> bool:
        slot_free = any(not s.running for s in self._seqs)
        return slot_free and self.config.blocks_for(tokens) <= self.reclaimable_pages()

    def stats(self) -> KVCacheStats:
        """Pages are blocks (``page_size_bytes`` = one block over all layers, K and V). The pool is
        created whole, so created == total; mapping and release counters stay 0."""
        config = self.config
        running = [s for s in self._seqs if s.running]
        in_use = config.num_blocks - len(self._free) - len(self._cached)
        wasted_rows = sum(len(s.blocks) * config.block_size - s.length for s in running)
        return KVCacheStats(
            page_size_bytes=config.page_size,
            tokens_per_page=float(config.block_size),
            pages_total=config.num_blocks,
            pages_created=config.num_blocks,
            pages_free=len(self._free),
            pages_in_use=in_use,
            pages_cached=len(self._cached),
            pages_available=self.reclaimable_pages(),
            wasted_bytes=wasted_rows * config.bytes_per_token,
            slots_running=len(running),
            slots_cached=0,
            map_calls=0,
            pages_mapped_total=0,
            map_seconds=0.0,
            wait_seconds=0.0,
            pages_released_total=0,
            pages_shared=sum(refs > 1 for refs in self._refs),
            prefix_queries_tokens=self._queries.queries,
            prefix_hits_tokens=self._queries.hits,
            prefix_evicted_pages=self.prefix_evicted_pages,
            **self._tier_stats(),
        )

    def _tier_stats(self) -> dict[str, float]:
        if self._tier is None:
            return {}
        return self._tier.cache_stats(self._host_hit_tokens, self._host_skipped_tokens)

    def check_invariants(self, deep: bool = False) -> None:
        """Asserts the invariants of the module docstring; ``deep`` also reads the device table
        back and compares it with the host lists."""
        holders = Counter(b for s in self._seqs for b in s.blocks)
        assert all(len(s.blocks) == len(set(s.blocks)) for s in self._seqs), "a block held twice"
        assert all(self._refs[b] == holders.get(b, 0) for b in range(self.config.num_blocks)), (
            "reference counts differ from the slots holding the blocks"
        )
        assert all(count == 1 or b in self._index for b, count in holders.items()), (
            "a shared block is not indexed"
        )
        free, cached = set(self._free), set(self._cached)
        assert not set(holders) & (free | cached) and not free & cached, "a block held and free"
        assert len(self._free) == len(free), "a block is free twice"
        assert len(holders) + len(free) + len(cached) == self.config.num_blocks
        indexed = self._index.locations()
        assert cached <= indexed and not free & indexed, "a cached block unindexed, or a free one"
        self._index.check_invariants()
        if self._tier is not None:
            self._tier.check_invariants()
        for index, seq in enumerate(self._seqs):
            if not seq.running:
                assert not seq.blocks and seq.length == seq.reserved == 0, (
                    f"free slot {index} holds blocks"
                )
                continue
            assert seq.reserved in (seq.length, seq.length + 1), f"slot {index}: {seq}"
            assert seq.length >= seq.frozen * self.config.block_size, f"slot {index}: {seq}"
            assert all(b not in self._index for b in seq.blocks[seq.frozen :]), (
                f"slot {index} may write an indexed block"
            )
            assert len(seq.blocks) == self.config.blocks_for(seq.reserved), f"slot {index}: {seq}"
        if deep:
            table = self.block_table().cpu()
            for index, seq in enumerate(self._seqs):
                if seq.running:
                    assert table[index, : len(seq.blocks)].tolist() == seq.blocks, (
                        f"slot {index}'s table row"
                    )

    def _checked(self) -> None:
        if _CHECK_ALWAYS:
            self.check_invariants()
