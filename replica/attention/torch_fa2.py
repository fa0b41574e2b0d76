"""PyTorch's bundled FlashAttention-2 (``aten._flash_attention_forward``) on the vAttention cache.

The layer's cache [slots, tokens_per_slot, kv_heads, head_dim] is read as one flat token array
(a strided view, no copy); sequence i's keys start at ``slot_i * tokens_per_slot`` and
``seqused_k`` limits each to its length. Needs nothing beyond torch, on CUDA.
"""

from __future__ import annotations

import torch

from replica.attention.base import AttentionBackend, token_rows
from replica.attention.batch import StepBatch


class TorchFlashBackend(AttentionBackend):
    name = "torch-fa2"

    def plan(self, batch: StepBatch) -> None:
        super().plan(batch)
        tokens_per_slot = self.cache.k_cache(0).shape[1]
        # Slots ascend, so these offsets ascend; the last sequence ends at the end of its slot.
        self.cu_k = torch.cat([batch.slots_t, batch.slots_t[-1:] + 1]) * tokens_per_slot
        self.max_q, self.max_k = batch.max_query_len, batch.max_kv_len

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        assert batch is not None
        out = torch.ops.aten._flash_attention_forward(
            q, token_rows(k_cache), token_rows(v_cache), batch.cu_query_t, self.cu_k,
            self.max_q, self.max_k, 0.0, True, False, scale=self.scale, seqused_k=batch.kv_lens_t,
        )[0]
        return out
