"""flash-attn's ``flash_attn_with_kvcache`` on the vAttention cache (optional extra): the cache is
indexed by ``cache_batch_idx`` = slot ids and ``cache_seqlens`` = lengths, no block table. New K/V
are written by the shared ``write_kv`` first, so the kernel only reads."""

from __future__ import annotations

import torch

from replica.attention.base import AttentionBackend


class FlashAttnBackend(AttentionBackend):
    name = "flash-attn"

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int = 0
    ) -> torch.Tensor:
        from flash_attn import flash_attn_with_kvcache

        batch = self.batch
        assert batch is not None
        if batch.is_decode:  # [B, 1, heads, dim] queries, one per slot
            out = flash_attn_with_kvcache(
                q.unsqueeze(1),
                k_cache,
                v_cache,
                cache_seqlens=batch.kv_lens_t,
                cache_batch_idx=batch.slots_t,
                softmax_scale=self.scale,
                causal=True,
            )
            return out.squeeze(1)
        out = torch.empty_like(q)
        start = 0
        for i, query in enumerate(batch.query_lens):  # prefill chunks: one call per sequence
            out[start : start + query] = flash_attn_with_kvcache(
                q[start : start + query].unsqueeze(0),
                k_cache,
                v_cache,
                cache_seqlens=batch.kv_lens_t[i : i + 1],
                cache_batch_idx=batch.slots_t[i : i + 1],
                softmax_scale=self.scale,
                causal=True,
            ).squeeze(0)
            start += query
        return out
