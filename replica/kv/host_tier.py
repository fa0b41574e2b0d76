"""A host-memory tier for the KV caches' prefix blocks: what a released slot stored is
copied to pinned host memory, and a prompt whose next blocks are there gets them copied back
instead of computed again (``replica.kv.slot_prefixes`` decides when; this module holds the bytes,
their keys and the copies).

The tier is *inclusive* and filled by *write-through at release*: when a slot is released, its
indexed blocks that the tier lacks are copied out (a conversation's next turn copies only its new
blocks), so evicting a slot's pages later is a plain drop, with no copy on the path of the request
that needs the pages. Host blocks of a sequence are taken consecutive where the free list allows,
and runs of them move in few copies (``replica.kv.host_copies``: the vAttention cache copies a
run of a slot's blocks in one copy per range; the paged mode gathers the blocks of a run of host
blocks through a device staging buffer, one copy a piece).

Blocks are keyed by their prefix key (``replica.kv.prefix``): equal keys, equal K/V. The tier
evicts the least recently used block first; a block is used when written or restored, a chain's
first blocks after its later ones, so a conversation leaves the tier from its end.

Ordering (``replica.kv.copies``' contract, extended to the host):
    offload: an event recorded on the engine's stream at release orders the copy after every step
        that wrote the blocks; the copy runs on a side stream so the engine's steps do not wait
        for it; the slot's pages are pinned (``SlotCopies.pin``) until its fence completes.
    restore: the slot's pages are mapped first: the vAttention cache decides a restore at acquire
        and enqueues its copy at the slot's first waited ensure, once the maps are done
        (``replica.kv.slot_restores``: nothing waits for them on the engine's thread), its keys
        ``reserve``\\ d until then; the copy runs on a restore stream, after an event recorded
        on the engine's stream (every earlier reader and writer of those pages), and the engine's
        stream waits for the copy's fence before the step that reads the blocks, so the copy
        overlaps the steps queued ahead of it; the pages are pinned until its fence.
    a host block being written or read is not reused until that copy's fence completes: each
        host block keeps the last fence of each stream that copied it (a stream's fences complete
        in order, so the last one covers the earlier ones), and an eviction waits for them; a
        device staging buffer (the paged mode's) is not reused until the copies using it are
        done (``replica.kv.host_copies``: stream order, and an event across streams).

The host memory is pinned when the tier is made, a chunk at a time, not as it fills: pinning is a
driver call that may take tens of milliseconds a chunk, and on the request path it stalls the
engine's thread and competes with the mapping worker's maps (an H100 run that pinned a 24 GiB tier
as it filled mapped pages at 115 us each, 44 us without the tier; ``pin_seconds`` says what
pinning cost). Serving systems pin their host KV pools at start for the same reason. On a GPU the
chunks are registered pageable memory (``replica.kv.pinned``: faster to pin than torch's
``cudaHostAlloc``, and unpinned when the tier goes); on a CPU they are plain memory.

Failures: a copy that raises propagates out of ``offload``/``restore`` with the tier's keys as
they stood at the copy; ``replica.kv.tier_faults`` (the caches' only caller) drops the keys in
doubt (``discard``) and decides what the request gets. ``before_copy`` runs just before each copy,
in both directions: its seam for mirroring another rank's failed copy and for tests.

Invariants (``check_invariants``): every stored key has one host block and every host block at
most one key; used + free == capacity; a pinned host block is stored; a reserved key
(a pending restore's) is never evicted, and each reservation is counted once per reserver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from replica.kv.copies import CopyFence, stream_fence, wait_for
from replica.kv.host_copies import HostCopies, Run
from replica.kv.pinned import PinnedChunks
from replica.kv.prefix import (
    PrefixSummary,
    extend_keys,
    is_summary_depth,
    summary_key,
    usable_blocks,
)

log = logging.getLogger(__name__)

#: Host blocks per pinned allocation (the tier is pinned at construction, a chunk at a time).
CHUNK_BLOCKS = 256
#: Where a block lives: (row, block index in the row) of the cache's views.
Located = tuple[int, int]


def _pageable(shape: Sequence[int]) -> torch.Tensor:  # a chunk on a CPU: nothing to pin
    return torch.empty(tuple(shape), dtype=torch.uint8)


class HostTier:
    """Host copies of prefix blocks, ``copies.block_bytes`` a block (its bytes in every view).

    ``copies``: how blocks move for the cache's layout (``replica.kv.host_copies``), and the
    located form of a block: (slot, block index in it) for the vAttention cache's ``RangeRuns``,
    (0, block id) for the paged mode's ``GatheredBlocks``. ``capacity_bytes``: the tier's host
    memory, every view counted. ``pin(row, blocks, fence)`` keeps a row's blocks from being
    unmapped or rewritten until ``fence`` completes. ``make_fence``: the fence of copies just
    enqueued on the current stream (a test passes one it completes by hand).
    """

    def __init__(
        self,
        copies: HostCopies,
        capacity_bytes: int,
        pin: Callable[[int, range, CopyFence], None],
        make_fence: Callable[[], CopyFence] | None = None,
    ) -> None:
        self._copies = copies
        self._device = copies.device
        self._block_bytes = copies.block_bytes  # one host block, every view
        self.capacity = capacity_bytes // self._block_bytes
        self._pin_row = pin
        self._make_fence = make_fence or (lambda: stream_fence(self._device))
        cuda = self._device.type == "cuda"
        self._side = torch.cuda.Stream(self._device) if cuda else None  # offloads
        self._restoring = torch.cuda.Stream(self._device) if cuda else None  # restores
        self._chunks: list[torch.Tensor] = []  # copies.chunk_shape(up to CHUNK_BLOCKS) each
        self._pinned = PinnedChunks(self._device) if self._side is not None else None
        self._blocks: OrderedDict[int, int] = OrderedDict()  # key -> host block, LRU first
        self._key_of: dict[int, int] = {}  # host block -> key
        self._free: list[int] = []  # host blocks holding nothing, descending
        # host block -> {copied to the host: the last such copy's fence}
        self._pins: dict[int, dict[bool, CopyFence]] = {}
        self._summary: OrderedDict[int, None] = OrderedDict()  # keys at summary depths
        self._reserved: Counter[int] = Counter()  # keys pending restores will read: not evicted
        self.offloaded_bytes = self.restored_bytes = 0
        #: Called with "offload" or "restore" just before each copy; raising fails the copy.
        self.before_copy: Callable[[str], None] = lambda direction: None
        self.pin_seconds = 0.0  # pinning the host memory
        self.wait_seconds = 0.0  # waiting for copies before reusing their host blocks
        self._pin_chunks()
        # Descending: blocks are taken lowest first, so a sequence's are consecutive.
        self._free = list(range(self.capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    def stored_after(
        self, keys: list[int], prompt: Sequence[int], root: int, per_block: int, start: int
    ) -> int:
        """How many of ``prompt``'s usable blocks from block ``start`` on, in order, the tier
        holds; ``keys`` (the prompt's blocks' keys as far as computed) is extended to them."""
        if not self._blocks:
            return 0
        extend_keys(keys, root, prompt, per_block, usable_blocks(len(prompt), per_block))
        return self.stored(keys, start)

    def stored(self, keys: Sequence[int], start: int) -> int:
        """How many of ``keys[start:]``, in order, the tier holds."""
        count = 0
        while start + count < len(keys) and keys[start + count] in self._blocks:
            count += 1
        return count

    def reserve(self, keys: Sequence[int]) -> None:
        """Keeps ``keys`` from eviction until as many ``unreserve``\\ s of them (a pending restore
        reads them later). A reserved key may still be ``discard``\\ ed (its bytes in doubt)."""
        self._reserved.update(keys)

    def unreserve(self, keys: Sequence[int]) -> None:
        for key in keys:
            self._reserved[key] -= 1
            if self._reserved[key] <= 0:
                del self._reserved[key]

    def reserved(self, key: int) -> bool:
        return key in self._reserved

    # ---- copies --------------------------------------------------------------------------------
    def offload(self, keys: Sequence[int], located: Sequence[Located], limit: int) -> None:
        """Copies blocks ``[0, limit)`` of a sequence (keys ``keys``, block ``j`` at
        ``located[j]``) whose keys the tier lacks to the host; they are written (frozen)."""
        missing = [j for j in range(limit) if keys[j] not in self._blocks]
        hosts = self._take(len(missing), protect={keys[j] for j in range(limit)})
        missing = missing[: len(hosts)]
        for j, host in zip(missing, hosts):
            self._blocks[keys[j]], self._key_of[host] = host, keys[j]
            if is_summary_depth(j + 1):
                self._summary[keys[j]] = None
        self._touch(keys, limit)
        if not missing:
            return
        runs = self._runs([located[j] for j in missing], hosts)
        self.before_copy("offload")
        if self._side is not None:
            produced = torch.cuda.current_stream(self._device).record_event()
            self._side.wait_event(produced)
            with torch.cuda.stream(self._side):
                self._copy(runs, to_host=True)
                fence = self._make_fence()
        else:
            self._copy(runs, to_host=True)
            fence = self._make_fence()
        self._pin(runs, fence, to_host=True)
        self.offloaded_bytes += len(missing) * self._block_bytes

    def restore(
        self,
        keys: Sequence[int],
        located: Sequence[Located],
        start: int,
        count: int,
        stops: Iterable[int] = (),
    ) -> None:
        """Copies the tier's blocks of ``keys[start : start + count]`` to ``located[start ..]``
        (the sequence's own), a piece at a time: ``stops`` yields each piece's end (ascending; a
        last piece runs to ``start + count``) once the blocks below it may be written, their pages
        mapped. Taking the next stop may wait (for the mapping worker) while the pieces before it
        copy. On a GPU the copies run on the tier's restore stream, after the work already on the
        current (the engine's) stream, and the current stream waits for them before its next work
        (the step that reads the blocks): they overlap the steps already queued."""
        if count <= 0:
            return
        end = start + count
        self._touch(keys, end)
        self.before_copy("restore")
        fence: CopyFence | None = None
        try:
            with self._restore_stream():
                for stop in itertools.chain(stops, (end,)):  # lazily: a stop may wait
                    blocks = range(start, min(stop, end))
                    if not blocks:
                        continue
                    hosts = [self._blocks[keys[j]] for j in blocks]
                    runs = self._runs([located[j] for j in blocks], hosts)
                    self._copy(runs, to_host=False)
                    fence = self._make_fence()
                    self._pin(runs, fence, to_host=False)
                    start = blocks.stop
        finally:
            if fence is not None:  # the pieces copied, even if a later one failed
                fence.order()  # the restore stream runs in order: its last fence covers them
        self.restored_bytes += count * self._block_bytes

    @contextlib.contextmanager
    def _restore_stream(self) -> Iterator[None]:
        """The restore stream made current (on a GPU), behind the current stream's work so far."""
        if self._restoring is None:
            yield
            return
        self._restoring.wait_event(torch.cuda.current_stream(self._device).record_event())
        with torch.cuda.stream(self._restoring):
            yield

    def _touch(self, keys: Sequence[int], limit: int) -> None:
        """Marks the stored blocks of ``keys[:limit]`` used, the first most recently: a chain's
        tail is evicted before its head (a block is of use only after the ones before it)."""
        for key in reversed(keys[:limit]):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _copy(self, runs: list[Run], to_host: bool) -> None:
        self._copies.copy(runs, self._chunks, CHUNK_BLOCKS, to_host)

    def _pin(self, runs: list[Run], fence: CopyFence, to_host: bool) -> None:
        for row, block, host, count in runs:
            self._pin_row(row, range(block, block + count), fence)
            for pinned in range(host, host + count):
                self._pins.setdefault(pinned, {})[to_host] = fence

    @staticmethod
    def _runs(located: list[Located], hosts: list[int]) -> list[Run]:
        """(row, first block, first host block, count) of the maximal runs consecutive in a row
        and in the host, inside one chunk."""
        runs: list[Run] = []
        for (row, block), host in zip(located, hosts):
            last = runs[-1] if runs else None
            if (
                last is not None
                and (last[0], last[1] + last[3], last[2] + last[3]) == (row, block, host)
                and host % CHUNK_BLOCKS  # a run stays inside one pinned chunk
            ):
                runs[-1] = (row, last[1], last[2], last[3] + 1)
            else:
                runs.append((row, block, host, 1))
        return runs

    # ---- host blocks ---------------------------------------------------------------------------
    def _take(self, count: int, protect: set[int]) -> list[int]:
        """Up to ``count`` host blocks, ascending: free ones, then the least recently used
        blocks' (not ``protect``\\ ed keys)."""
        taken: list[int] = []
        while len(taken) < count:
            if not self._free and not self._evict_one(protect):
                break
            if self._free:
                taken.append(self._free.pop())
        return sorted(taken)

    def _pin_chunks(self) -> None:
        """Pins the tier's memory a chunk at a time; pinned memory refused leaves the tier at the
        chunks pinned so far (``capacity`` lowered), with one warning."""
        started, pinned = time.perf_counter(), 0
        allocate = self._pinned.allocate if self._pinned is not None else _pageable
        while pinned < self.capacity:
            blocks = min(CHUNK_BLOCKS, self.capacity - pinned)
            try:
                self._chunks.append(allocate(self._copies.chunk_shape(blocks)))
            except RuntimeError as error:  # pinned memory refused: the tier stays smaller
                log.warning("host KV tier stays at %d blocks: %s", pinned, error)
                self.capacity = pinned
                break
            pinned += blocks
        self.pin_seconds = time.perf_counter() - started

    def _evict_one(self, protect: set[int]) -> bool:
        for key in self._blocks:
            if key not in protect and key not in self._reserved:
                self._drop(key)
                return True
        return False

    def discard(self, keys: Sequence[int]) -> list[int]:
        """Drops the stored ones of ``keys`` (their bytes are in doubt: a copy of them failed, here
        or on another rank); returns them. Their host blocks are free once their copies' fences
        complete (waited for)."""
        dropped = [key for key in dict.fromkeys(keys) if key in self._blocks]
        for key in dropped:
            self._drop(key)
        return dropped

    def _drop(self, key: int) -> None:
        host = self._blocks[key]
        self._settle(host)
        del self._blocks[key], self._key_of[host]
        self._summary.pop(key, None)
        self._free.append(host)

    def _settle(self, host: int) -> None:
        """Waits for the copies writing or reading host block ``host``."""
        for fence in self._pins.pop(host, {}).values():
            self.wait_seconds += wait_for(fence)

    def with_host_keys(self, summary: PrefixSummary, limit: int) -> PrefixSummary:
        """The cache's summary with the router's view of the tier
        (``replica.kv.prefix.PrefixSummary.host_keys``): up to ``limit`` stored keys at summary
        depths, newest last."""
        keys = list(self._summary)[-limit:] if limit > 0 else []
        return dataclasses.replace(summary, host_keys=tuple(summary_key(key) for key in keys))

    def cache_stats(self, host_hit_tokens: int, skipped_tokens: int) -> dict[str, float]:
        """The tier's ``KVCacheStats`` fields (the prompt tokens restored, and those it held but
        the cache could not restore for lack of device memory, counted by the cache)."""
        return {
            "host_tier_bytes": self.capacity * self._block_bytes,
            "host_tier_used_bytes": len(self._blocks) * self._block_bytes,
            "host_offloaded_bytes": self.offloaded_bytes,
            "host_restored_bytes": self.restored_bytes,
            "prefix_host_hits_tokens": host_hit_tokens,
            "host_tier_skipped_tokens": skipped_tokens,
            "host_tier_pin_seconds": self.pin_seconds,
            "host_tier_wait_seconds": self.wait_seconds,
        }

    def check_invariants(self) -> None:
        assert len(self._blocks) == len(self._key_of), "keys and host blocks differ in number"
        assert all(self._key_of[h] == k for k, h in self._blocks.items()), "keys disagree"
        assert not set(self._free) & set(self._key_of), "a free host block holds a key"
        assert self._summary.keys() <= self._blocks.keys(), "a summary key is not stored"
        assert len(self._free) + len(self._key_of) == self.capacity, "host blocks lost"
        live = [h for h, fences in self._pins.items() if any(not f.done() for f in fences.values())]
        assert all(h in self._key_of for h in live), "a pin on a free block"
        assert all(count > 0 for count in self._reserved.values()), "a reservation below one"
