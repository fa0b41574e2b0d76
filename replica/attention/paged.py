"""Attention backends over the paged KV cache (the PagedAttention comparison mode).

Same contract as ``replica.attention.base``: ``plan(batch)`` once per step, then one call per layer
``(layer, q, k, v) -> out`` that first writes the step's new K/V into the cache, then attends. The
difference is where a token lives: token t of the sequence in slot s is row
``block_table[s, t // block_size] * block_size + t % block_size`` of a layer's cache viewed as
[num_blocks * block_size, kv_heads, head_dim]. ``plan`` computes that *slot mapping* for the new
tokens once on the device, so each layer's write is one index_put per K and V.

``paged-sdpa``: gathers each sequence's blocks and runs PyTorch SDPA (reference, runs anywhere).
``paged-flashinfer``: FlashInfer's paged decode (tensor cores) and prefill kernels, page_size =
block_size, kv_indices gathered from the device block table on the device (no host sync).
Both read an fp8 cache (``replica.attention.fp8``): sdpa dequantizes, FlashInfer takes the scales.
"""

from __future__ import annotations

import importlib.util

import torch

from replica.attention.base import AttentionBackend
from replica.attention.batch import StepBatch
from replica.attention.flashinfer_backend import FlashInferKernels
from replica.attention.flashinfer_limits import (
    choose_prefill_kernel,
    require_head_dim,
    supports_head_dim,
)
from replica.attention.sdpa import sdpa_per_sequence
from replica.kv.paged import PagedKVCache

PAGED_BACKENDS = ("auto", "paged-flashinfer", "paged-sdpa")
#: The vAttention backend names that have a paged counterpart, so ``attention="sdpa"`` works in
#: either mode.
ALIASES = {"flashinfer": "paged-flashinfer", "sdpa": "paged-sdpa"}


class PagedAttentionBackend(AttentionBackend):
    """Writes new K/V through the block table; subclasses attend over the blocks."""

    def __init__(
        self, cache: PagedKVCache, num_q_heads: int, num_kv_heads: int, head_dim: int
    ) -> None:
        super().__init__(cache, num_q_heads, num_kv_heads, head_dim)
        self.paged = cache
        self.block_size = cache.config.block_size

    def cache_rows(self, batch: StepBatch) -> torch.Tensor:
        """Block-table lookup: block id * block_size + offset in the block (the slot mapping)."""
        table = self.paged.block_table()  # flushes this step's new entries first
        positions = batch.token_positions_t
        blocks = table[batch.token_slots_t, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size


class PagedSdpaBackend(PagedAttentionBackend):
    name = "paged-sdpa"
    supports_fp8 = True

    def plan(self, batch: StepBatch) -> None:
        super().plan(batch)
        table, size = self.paged.block_table(), self.block_size
        offsets = torch.arange(size, device=table.device)
        # Per sequence, the flat cache rows of its tokens [0, kv_len), read from the device table.
        self.rows = [
            (table[slot, : -(-kv_len // size)].long()[:, None] * size + offsets).flatten()[:kv_len]
            for slot, kv_len in zip(batch.slots, batch.kv_lens)
        ]

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int = 0
    ) -> torch.Tensor:
        batch = self.batch
        assert batch is not None
        k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        if self.fp8:  # gathered as bytes: indexing kernels need not cover fp8 on every device
            k_flat, v_flat = k_flat.view(torch.uint8), v_flat.view(torch.uint8)
        keys = [
            (k_flat[rows].view(self.kv_dtype), v_flat[rows].view(self.kv_dtype))
            for rows in self.rows
        ]  # gathered blocks
        return sdpa_per_sequence(
            q, keys, batch.context_lens, batch.query_lens, self.scale, self.layer_scales(layer)
        )


class PagedFlashInferBackend(PagedAttentionBackend):
    name = "paged-flashinfer"
    supports_graphs = True
    supports_fp8 = True

    def __init__(
        self,
        cache: PagedKVCache,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        prefill: str = "auto",
    ) -> None:
        """``prefill``: ``replica.attention.flashinfer_limits.PREFILL_KERNELS``."""
        super().__init__(cache, num_q_heads, num_kv_heads, head_dim)
        k0 = cache.k_cache(0)
        rows = k0.shape[0] * k0.shape[1]  # every block's every token
        prefill_kernel = choose_prefill_kernel(
            rows,
            k0.stride(1) * k0.element_size(),
            min(rows, cache.token_capacity()),
            self.fp8,
            prefill,
        )
        self.kernels = FlashInferKernels(
            cache.device,
            num_q_heads,
            num_kv_heads,
            head_dim,
            self.block_size,
            dtype,
            self.scale,
            prefill_kernel,
            self.kv_dtype,
        )

    def _pages(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr, kv_indices, last_page_len) of the batch's blocks. indptr and last_page_len are
        built on the host (pinned): FlashInfer's plan reads them there anyway, so handing it device
        tensors would force a sync per step; kv_indices are gathered from the block table on the
        device."""
        size, device = self.block_size, self.paged.device
        blocks = [-(-kv_len // size) for kv_len in batch.kv_lens]
        indptr = [0]
        for count in blocks:
            indptr.append(indptr[-1] + count)
        last_page_len = [
            kv_len - (count - 1) * size for kv_len, count in zip(batch.kv_lens, blocks)
        ]
        pinned = device.type == "cuda"
        indptr_host = torch.tensor(indptr, dtype=torch.int32, pin_memory=pinned)
        last_host = torch.tensor(last_page_len, dtype=torch.int32, pin_memory=pinned)
        # Entry j of sequence i is table[slot_i, j - indptr[i]].
        indptr_dev = indptr_host.to(device, non_blocking=True)
        j = torch.arange(indptr[-1], device=device, dtype=torch.int32)
        sequence = torch.searchsorted(indptr_dev[1:], j, right=True)
        columns = j - indptr_dev[sequence]
        kv_indices = self.paged.block_table()[batch.slots_t[sequence].long(), columns.long()]
        return indptr_host, kv_indices, last_host

    def plan(self, batch: StepBatch) -> None:
        super().plan(batch)
        self.kernels.plan(batch, *self._pages(batch))

    def _plan_graph(self, batch: StepBatch) -> None:
        max_pages = batch.num_sequences * self.paged.config.max_blocks_per_seq
        self.kernels.plan(batch, *self._pages(batch), graph_pages=max_pages)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int = 0
    ) -> torch.Tensor:
        return self.kernels.run(q, k_cache, v_cache, self.layer_scales(layer))


def make_paged_attention_backend(
    name: str,
    cache: PagedKVCache,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    prefill: str = "auto",
) -> PagedAttentionBackend:
    """``auto`` picks paged-flashinfer on CUDA when FlashInfer is installed and compiles the
    head size, else paged-sdpa;
    ``flashinfer`` and ``sdpa`` name their paged counterparts. ``prefill``: FlashInfer's prefill
    kernel (``replica.attention.flashinfer_limits.PREFILL_KERNELS``)."""
    name = ALIASES.get(name, name)
    if name not in PAGED_BACKENDS:
        choices = ", ".join(PAGED_BACKENDS + tuple(ALIASES))
        raise ValueError(f"unknown paged attention backend {name!r}; choose one of {choices}")
    flashinfer_ok = device.type == "cuda" and importlib.util.find_spec("flashinfer") is not None
    if name == "auto":
        fits = flashinfer_ok and supports_head_dim(head_dim)
        name = "paged-flashinfer" if fits else "paged-sdpa"
    if name == "paged-flashinfer":
        if not flashinfer_ok:
            raise ValueError(
                f"attention backend {name!r} is unavailable on {device} (not installed, or CPU)"
            )
        require_head_dim(head_dim)
        return PagedFlashInferBackend(cache, num_q_heads, num_kv_heads, head_dim, dtype, prefill)
    return PagedSdpaBackend(cache, num_q_heads, num_kv_heads, head_dim)
