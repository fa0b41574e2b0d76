"""PyTorch's bundled FlashAttention-2 (``aten._flash_attention_forward``) on the vAttention cache.

The layer's cache [slots, tokens_per_slot, kv_heads, head_dim] is read as one flat token array
(a strided view, no copy); sequence i's keys start at ``slot_i * tokens_per_slot`` and
``seqused_k`` limits each to its length. Needs nothing beyond torch, on CUDA. In a CUDA graph the
offsets and lengths live in static buffers per batch size and ``max_seqlen_k`` is the slot's size.
"""

from __future__ import annotations

import torch

from replica.attention.base import AttentionBackend, KVCacheViews, token_rows
from replica.attention.batch import StepBatch


class TorchFlashBackend(AttentionBackend):
    name = "torch-fa2"
    supports_graphs = True

    def __init__(
        self, cache: KVCacheViews, num_q_heads: int, num_kv_heads: int, head_dim: int
    ) -> None:
        super().__init__(cache, num_q_heads, num_kv_heads, head_dim)
        #: batch size -> static (cu_query, cu_key, seqused_k) read by a captured graph
        self.graph_buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def plan(self, batch: StepBatch) -> None:
        super().plan(batch)
        # Slots ascend, so these offsets ascend; the last sequence ends at the end of its slot.
        self.cu_k = self._key_offsets(batch)
        self.cu_q, self.seqused_k = batch.cu_query_t, batch.kv_lens_t
        self.max_q, self.max_k = batch.max_query_len, batch.max_kv_len

    def _key_offsets(self, batch: StepBatch) -> torch.Tensor:
        return torch.cat([batch.slots_t, batch.slots_t[-1:] + 1]) * self.cache.k_cache(0).shape[1]

    def _plan_graph(self, batch: StepBatch) -> None:
        size = batch.num_sequences
        if size not in self.graph_buffers:
            # A padded batch repeats its last slot: a repeated start offset reads the same keys.
            self.graph_buffers[size] = (
                torch.empty_like(batch.cu_query_t),
                torch.empty_like(batch.cu_query_t),
                torch.empty_like(batch.kv_lens_t),
            )
        self.cu_q, self.cu_k, self.seqused_k = self.graph_buffers[size]
        self.cu_q.copy_(batch.cu_query_t)
        self.cu_k.copy_(self._key_offsets(batch))
        self.seqused_k.copy_(batch.kv_lens_t)
        self.max_q, self.max_k = 1, self.cache.k_cache(0).shape[1]  # fixed for every replay

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int = 0
    ) -> torch.Tensor:
        out = torch.ops.aten._flash_attention_forward(
            q,
            token_rows(k_cache),
            token_rows(v_cache),
            self.cu_q,
            self.cu_k,
            self.max_q,
            self.max_k,
            0.0,
            True,
            False,
            scale=self.scale,
            seqused_k=self.seqused_k,
        )[0]
        return out
