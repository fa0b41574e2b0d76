"""Reference backend: PyTorch SDPA per sequence over its slot (a view, no copy; a borrowed prefix
is gathered from its holder's slot). Runs anywhere; the GPU backends are tested against it. An
fp8 cache is dequantized per sequence as it is read."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from replica.attention.base import AttentionBackend
from replica.attention.fp8 import dequantize


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    supports_fp8 = True

    @property
    def borrow_granularity(self) -> int:
        return 1  # gathered per sequence: any prefix

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int = 0
    ) -> torch.Tensor:
        batch = self.batch
        assert batch is not None
        keys = [(k_cache[slot], v_cache[slot]) for slot in batch.slots]  # slot views, no copy
        for i, (holder, borrowed) in enumerate(batch.borrows):
            if borrowed:  # its first keys from the holder: its own pages there may be unmapped
                slot, end = batch.slots[i], batch.kv_lens[i]
                keys[i] = tuple(  # type: ignore[assignment]
                    torch.cat((cache[holder][:borrowed], cache[slot][borrowed:end]))
                    for cache in (k_cache, v_cache)
                )
        return sdpa_per_sequence(
            q, keys, batch.context_lens, batch.query_lens, self.scale, self.layer_scales(layer)
        )


def sdpa_per_sequence(
    q: torch.Tensor,
    keys: list[tuple[torch.Tensor, torch.Tensor]],
    context_lens: tuple[int, ...],
    query_lens: tuple[int, ...],
    scale: float,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Causal SDPA for packed queries q [T, q_heads, dim]; sequence i's K/V are ``keys[i]``, each
    [>= context + query tokens, kv_heads, dim] (only the first context + query are read), read as
    ``q``'s dtype times ``kv_scales`` (K's, V's: an fp8 cache's dequantization)."""
    k_scale, v_scale = kv_scales
    out = torch.empty_like(q)
    start = 0
    for (k_seq, v_seq), context, query in zip(keys, context_lens, query_lens):
        kv_len = context + query
        # [tokens, heads, dim] -> [1, heads, tokens, dim]
        q_i = q[start : start + query].transpose(0, 1).unsqueeze(0)
        k_i = dequantize(k_seq[:kv_len], k_scale, q.dtype).transpose(0, 1).unsqueeze(0)
        v_i = dequantize(v_seq[:kv_len], v_scale, q.dtype).transpose(0, 1).unsqueeze(0)
        mask = None
        if query > 1:  # query j sits at position context + j and sees keys 0 .. context + j
            positions = torch.arange(kv_len, device=q.device)
            mask = positions[None, :] <= (context + torch.arange(query, device=q.device))[:, None]
        o_i = F.scaled_dot_product_attention(
            q_i, k_i, v_i, attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[start : start + query] = o_i.squeeze(0).transpose(0, 1)
        start += query
    return out
