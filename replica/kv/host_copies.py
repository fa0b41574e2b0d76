"""How the host tier's blocks move between a KV cache's memory and pinned host memory: the
mechanism under ``replica.kv.host_tier`` (which keeps the books and the ordering), one strategy
per cache layout, both behind ``HostCopies``.

``RangeRuns`` (the vAttention cache): the cache is one byte tensor [slots, slot bytes] per reserved
range, and a run of consecutive blocks of a slot is contiguous in each, so a run moves in one copy
per range, straight between the range and the host. A host chunk is [ranges, blocks, block bytes]
(a run's bytes of one range are contiguous there too).

``GatheredBlocks`` (the paged mode): a block is a row of every layer's K and V, scattered over the
pool, so copying it directly costs one copy per block and layer's K and V (Llama-3-8B, 1K tokens:
4,096 copies of 32 KiB, bound by the ~2.4 us a copy launch costs). Instead the blocks of a run of
consecutive host blocks (any device blocks) are gathered from all layers' K and V by one
``index_select`` into a device staging buffer, which goes to the host in one copy; a restore
copies up into staging and scatters with one ``index_copy_``. A host chunk is [blocks, block
bytes], so a run of host blocks is one contiguous region::

    pool  [num_blocks, views, words]   (a strided view of the cache's [2, layers, num_blocks, ...])
      | index_select(ids)  /  index_copy_(ids)          one kernel a piece
    staging [<= staging blocks, views, words]           on the device
      | one copy                                        host <-> device
    chunk [blocks, block bytes][first : first + count]  pinned host

Staging (``STAGING_BYTES`` a direction, two buffers: offload and restore run on two streams of the
tier's, so neither waits for the other's copies): device memory from torch's
caching allocator, made at the first copy each way and kept; outside the KV budget, inside the
engine's activation reserve (``replica.engine_config.ACTIVATION_RESERVE_BYTES``). A buffer is not
reused until the copies reading and writing it are done: its uses follow each other in stream order,
and an event recorded after each orders the next one on another stream after it.

Every copy between the cache and the host goes through ``copy_pairs`` (the seam a test counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

#: A run of blocks copied at once: (row, first block, first host block, count).
Run = tuple[int, int, int, int]
#: Device staging of the paged mode's copies, per direction (at least one block).
STAGING_BYTES = 16 << 20


def copy_pairs(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Copies ``sources[i]`` into ``targets[i]`` (contiguous byte tensors, one side pinned host
    memory), asynchronously on the current stream: every host tier copy is issued here."""
    torch._foreach_copy_(targets, sources, non_blocking=True)


class HostCopies(Protocol):
    """The copies of one cache layout. ``block_bytes``: one host block, a block's bytes in every
    view of the cache. ``copy`` moves ``runs`` (consecutive in a row and in the host, each inside
    one chunk of ``chunk_blocks`` host blocks) to or from ``chunks`` on the current stream."""

    device: torch.device
    block_bytes: int

    def chunk_shape(self, blocks: int) -> tuple[int, ...]: ...

    def copy(
        self, runs: Sequence[Run], chunks: Sequence[torch.Tensor], chunk_blocks: int, to_host: bool
    ) -> None: ...


class RangeRuns:
    """Direct copies, one per run and range. ``ranges``: the cache's byte tensors [rows, row
    bytes], a block ``range_block_bytes`` of each; a block is located by (row, index in it)."""

    def __init__(self, ranges: Sequence[torch.Tensor], range_block_bytes: int) -> None:
        self._ranges = list(ranges)
        self._size = range_block_bytes
        self.device = self._ranges[0].device
        self.block_bytes = range_block_bytes * len(self._ranges)

    def chunk_shape(self, blocks: int) -> tuple[int, ...]:
        return (len(self._ranges), blocks, self._size)

    def copy(
        self, runs: Sequence[Run], chunks: Sequence[torch.Tensor], chunk_blocks: int, to_host: bool
    ) -> None:
        targets, sources = [], []
        size = self._size
        for row, block, host, count in runs:
            chunk, first = divmod(host, chunk_blocks)
            for r, view in enumerate(self._ranges):
                device = view[row, block * size : (block + count) * size]
                stored = chunks[chunk][r, first : first + count].view(-1)
                targets.append(stored if to_host else device)
                sources.append(device if to_host else stored)
        copy_pairs(targets, sources)


class GatheredBlocks:
    """Gathered copies through a bounded device staging buffer (the module docstring).

    ``pool``: the cache's blocks [num_blocks, views, words], a block's bytes in every view (any
    strides, the last dimension contiguous); a block is located by (0, block id). ``staging_bytes``
    (default ``STAGING_BYTES``) bounds each direction's buffer (at least one block, at most the
    pool)."""

    def __init__(self, pool: torch.Tensor, staging_bytes: int | None = None) -> None:
        self._pool = pool
        self.device = pool.device
        self.block_bytes = pool[0].numel() * pool.element_size()
        staging_bytes = STAGING_BYTES if staging_bytes is None else staging_bytes
        self.staging_blocks = min(max(1, staging_bytes // self.block_bytes), pool.shape[0])
        self._staging: dict[bool, torch.Tensor] = {}  # by direction (to_host), made at first use
        self._last_use: dict[bool, torch.cuda.Event] = {}  # by direction, CUDA only

    @staticmethod
    def of_pool(kv: torch.Tensor) -> torch.Tensor:
        """The ``pool`` view of a paged cache's K and V, ``kv`` [2, layers, num_blocks, ...]
        (contiguous): [num_blocks, 2 * layers, words] in the widest integer words a layer's block
        divides into (an 8-byte word moves 8 bytes a thread in the index kernels)."""
        views, num_blocks = kv.shape[0] * kv.shape[1], kv.shape[2]
        as_bytes = kv.view(torch.uint8).view(views, num_blocks, -1)  # [2L, N, layer block bytes]
        word = next(
            w
            for w in (torch.int64, torch.int32, torch.int16, torch.uint8)
            if as_bytes.shape[-1] % w.itemsize == 0
        )
        return as_bytes.view(word).transpose(0, 1)  # [N, 2L, words], strided

    def chunk_shape(self, blocks: int) -> tuple[int, ...]:
        return (blocks, self.block_bytes)

    def copy(
        self, runs: Sequence[Run], chunks: Sequence[torch.Tensor], chunk_blocks: int, to_host: bool
    ) -> None:
        pieces = self._pieces(runs, chunk_blocks)
        order = [block for _, blocks in pieces for block in blocks]
        cuda = self.device.type == "cuda"
        # One upload of every piece's block ids, pinned and asynchronous: a pageable one would
        # synchronize the stream (and the engine's, with its queued steps, that it waits behind).
        ids = torch.tensor(order, dtype=torch.int64, pin_memory=cuda)
        ids = ids.to(self.device, non_blocking=True)
        staging = self._claim(to_host)
        done = 0
        for host, blocks in pieces:
            chunk, first = divmod(host, chunk_blocks)
            stored = chunks[chunk][first : first + len(blocks)].view(-1)
            staged = staging[: len(blocks)]  # [count, views, words]
            index = ids[done : done + len(blocks)]
            if to_host:
                torch.index_select(self._pool, 0, index, out=staged)
                copy_pairs([stored], [staged.view(torch.uint8).view(-1)])
            else:
                copy_pairs([staged.view(torch.uint8).view(-1)], [stored])
                self._pool.index_copy_(0, index, staged)
            done += len(blocks)
        if cuda:
            self._last_use[to_host] = torch.cuda.current_stream(self.device).record_event()

    def _claim(self, to_host: bool) -> torch.Tensor:
        """The direction's staging buffer, its next use ordered after its last."""
        staging = self._staging.get(to_host)
        if staging is None:
            shape = (self.staging_blocks, *self._pool.shape[1:])
            staging = torch.empty(shape, dtype=self._pool.dtype, device=self.device)
            self._staging[to_host] = staging
        last = self._last_use.get(to_host)
        if last is not None:  # free on the same stream; another stream waits for it
            torch.cuda.current_stream(self.device).wait_event(last)
        return staging

    def _pieces(self, runs: Sequence[Run], chunk_blocks: int) -> list[tuple[int, list[int]]]:
        """(first host block, device blocks) of the pieces: consecutive host blocks inside one
        chunk, at most ``staging_blocks`` of them, whatever the device blocks."""
        pieces: list[tuple[int, list[int]]] = []
        for _, block, host, count in runs:
            for offset in range(count):
                last = pieces[-1] if pieces else None
                if (
                    last is not None
                    and last[0] + len(last[1]) == host + offset
                    and (host + offset) % chunk_blocks  # a piece stays inside one chunk
                    and len(last[1]) < self.staging_blocks
                ):
                    last[1].append(block + offset)
                else:
                    pieces.append((host + offset, [block + offset]))
        return pieces
