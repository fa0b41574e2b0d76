"""What every attention backend does: write the step's new K/V into the vAttention cache in place,
then attend over each sequence's contiguous slot. No block tables, no copies.

A backend is planned once per step (``plan``) and then called once per layer with the
model's attention signature ``(layer, q, k, v) -> out``:
    q: [T, q_heads, head_dim]   k, v: [T, kv_heads, head_dim]   out: [T, q_heads, head_dim]

Backends with ``supports_graphs`` can also plan a decode batch of a fixed size for replay in a CUDA
graph (``plan_graph``): every tensor their per-layer kernels read is then a static buffer of that
size, refilled in place each step, so the captured kernels see the new step's values.

An fp8 cache (``replica.attention.fp8``) is written quantized with the layer's K and V scales
(``kv_scales``) and read back through them by every backend that supports it (``supports_fp8``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from replica.attention.batch import StepBatch
from replica.attention.fp8 import KVScales, is_fp8, quantize


class KVCacheViews(Protocol):
    """Where a backend finds layer ``l``'s cache: [slots, tokens_per_slot, kv_heads, head_dim]
    tensors (possibly strided views, as with the interleaved layout). KVCacheAllocator is one."""

    def k_cache(self, layer: int) -> torch.Tensor: ...

    def v_cache(self, layer: int) -> torch.Tensor: ...

    def token_capacity(self) -> int:
        """Tokens the cache's physical budget holds, over all slots (bounds one step's keys)."""
        ...


class AttentionBackend(ABC):
    name: str = ""
    #: Whether ``plan_graph`` is implemented (decode steps may then run as CUDA graphs).
    supports_graphs: bool = False
    #: Whether ``attend`` reads an fp8 cache (dequantizing with ``kv_scales``).
    supports_fp8: bool = False

    def __init__(
        self, cache: KVCacheViews, num_q_heads: int, num_kv_heads: int, head_dim: int
    ) -> None:
        self.cache = cache
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.batch: StepBatch | None = None
        self.graph_rows: dict[int, torch.Tensor] = {}  # batch size -> static cache rows
        self.planned_variant = 0  # of the last plan_graph
        #: The cache's element type; fp8 caches store K/V quantized with ``kv_scales``.
        self.kv_dtype = cache.k_cache(0).dtype
        self.fp8 = is_fp8(self.kv_dtype)
        if self.fp8 and not self.supports_fp8:
            raise ValueError(
                f"the {self.name} attention backend cannot read an fp8 KV cache; use flashinfer "
                "or sdpa (or kv_cache_dtype='auto')"
            )
        self.kv_scales: KVScales | None = None  # set_kv_scales: unit scales until then

    def set_kv_scales(self, scales: KVScales) -> None:
        """The fp8 cache's per-layer scales; fixed before the first step (and any graph capture:
        a captured kernel keeps the scale it was launched with)."""
        self.kv_scales = scales

    def layer_scales(self, layer: int) -> tuple[float, float]:
        """(K scale, V scale) of ``layer``: 1.0 for a cache that is not fp8 or has no scales."""
        if not self.fp8 or self.kv_scales is None:
            return 1.0, 1.0
        return self.kv_scales.k[layer], self.kv_scales.v[layer]

    @property
    def borrow_granularity(self) -> int:
        """Tokens a sequence's borrowed prefix (``StepBatch.borrows``, ``replica.kv.borrows``) is
        a multiple of for ``attend`` to read it from the holder's slot; 0: it cannot, and gets
        none."""
        return 0

    def plan(self, batch: StepBatch) -> None:
        """Prepares the step (once for all layers)."""
        if batch.borrows and not self.borrow_granularity:
            raise ValueError(f"the {self.name} attention backend cannot read borrowed prefixes")
        self.batch = batch
        # Computed once per step, so each layer's write is one index_copy_ per K and V.
        self.token_rows = self.cache_rows(batch)

    def plan_graph(self, batch: StepBatch) -> None:
        """Plans a (padded) decode batch whose layers replay from a CUDA graph captured at this
        batch size: like ``plan``, but into static buffers of that size."""
        rows = self.cache_rows(batch)
        static = self.graph_rows.get(batch.num_sequences)
        if static is None:  # first step of this size: the buffer its graph will read
            static = self.graph_rows[batch.num_sequences] = torch.empty_like(rows)
        static.copy_(rows, non_blocking=True)
        self.batch, self.token_rows = batch, static
        #: The graph variant this plan needs (``graph_variant``), computed once per step.
        self.planned_variant = self.graph_variant(batch)
        self._plan_graph(batch)

    def _plan_graph(self, batch: StepBatch) -> None:
        raise NotImplementedError(f"the {self.name} backend does not run in CUDA graphs")

    def graph_variant(self, batch: StepBatch) -> int:
        """Which captured graph of a batch's size replays it: backends whose kernels are planned
        differently by step (e.g. the page size the kernel sees) return a different key for each
        plan that a captured graph cannot follow. One variant by default."""
        return 0

    def warm_up_shapes(self, sizes: list[int], max_kv_len: int) -> list[tuple[int, int]]:
        """(batch size, keys of its first sequence) pairs whose decode steps reach every graph
        variant of ``sizes``, for the engine's warm-up (keys at most ``max_kv_len``; the batch's
        other sequences are short, so a long first one also makes the lengths uneven). One
        variant: short."""
        return [(size, 1) for size in sizes]

    def cache_rows(self, batch: StepBatch) -> torch.Tensor:
        """The row of each new token in a layer's cache seen as [rows, heads, dim]: on the
        vAttention cache, slot * tokens_per_slot + position."""
        tokens_per_slot = self.cache.k_cache(0).shape[1]
        return batch.token_slots_t * tokens_per_slot + batch.token_positions_t

    def write_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new tokens at [context, context + query) of their slots (quantized with the
        layer's scales in an fp8 cache); returns the layer's caches."""
        assert self.batch is not None, "plan() first"
        k_cache, v_cache = self.cache.k_cache(layer), self.cache.v_cache(layer)
        if not self.fp8:
            token_rows(k_cache).index_copy_(0, self.token_rows, k.to(k_cache.dtype))
            token_rows(v_cache).index_copy_(0, self.token_rows, v.to(v_cache.dtype))
            return k_cache, v_cache
        k_scale, v_scale = self.layer_scales(layer)
        # Bytes moved as bytes: index_copy_ has no fp8 kernel on the CPU.
        for cache, new, scale in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
            stored = quantize(new, scale, cache.dtype).view(torch.uint8)
            token_rows(cache.view(torch.uint8)).index_copy_(0, self.token_rows, stored)
        return k_cache, v_cache

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        k_cache, v_cache = self.write_kv(layer, k, v)
        return self.attend(q, k_cache, v_cache, layer)

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int = 0
    ) -> torch.Tensor:
        """Causal attention of the step's queries over their slots' cached tokens; ``layer``
        picks the K/V scales of an fp8 cache (``layer_scales``)."""


def token_rows(cache: torch.Tensor) -> torch.Tensor:
    """[slots, tokens, heads, dim] -> [slots * tokens, heads, dim], the same memory (a slot's
    tokens are followed by the next slot's in every layout)."""
    slots, tokens, heads, dim = cache.shape
    if cache.stride(0) != tokens * cache.stride(1):
        raise ValueError(f"cache strides {cache.stride()} are not slot-major token rows")
    return cache.as_strided((slots * tokens, heads, dim), cache.stride()[1:])
