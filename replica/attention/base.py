"""What every attention backend does: write the step's new K/V into the vAttention cache in place,
then attend over each sequence's contiguous slot. No block tables, no copies.

A backend is planned once per step (``plan``) and then called once per layer with the
model's attention signature ``(layer, q, k, v) -> out``:
    q: [T, q_heads, head_dim]   k, v: [T, kv_heads, head_dim]   out: [T, q_heads, head_dim]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from replica.attention.batch import StepBatch


class KVCacheViews(Protocol):
    """Where a backend finds layer ``l``'s cache: [slots, tokens_per_slot, kv_heads, head_dim]
    tensors (possibly strided views, as with the interleaved layout). KVCacheAllocator is one."""

    def k_cache(self, layer: int) -> torch.Tensor: ...

    def v_cache(self, layer: int) -> torch.Tensor: ...


class AttentionBackend(ABC):
    name: str = ""

    def __init__(self, cache: KVCacheViews, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.cache = cache
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.batch: StepBatch | None = None

    def plan(self, batch: StepBatch) -> None:
        """Prepares the step (once for all layers)."""
        self.batch = batch

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new tokens at [context, context + query) of their slots; returns the layer's
        caches."""
        assert self.batch is not None, "plan() first"
        k_cache, v_cache = self.cache.k_cache(layer), self.cache.v_cache(layer)
        index = (self.batch.token_slots_t, self.batch.token_positions_t)
        k_cache.index_put_(index, k.to(k_cache.dtype))
        v_cache.index_put_(index, v.to(v_cache.dtype))
        return k_cache, v_cache

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.write_kv(layer, k, v)
        return self.attend(q, k_cache, v_cache)

    @abstractmethod
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Causal attention of the step's queries over their slots' cached tokens."""
