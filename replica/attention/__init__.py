"""Attention backends over the vAttention cache, chosen by name."""

from __future__ import annotations

import importlib.util

import torch

from replica.attention.base import AttentionBackend, KVCacheViews
from replica.attention.batch import StepBatch
from replica.attention.flashinfer_limits import require_head_dim, supports_head_dim
from replica.attention.fp8 import is_fp8

BACKENDS = ("auto", "flashinfer", "torch-fa2", "flash-attn", "sdpa")


def available(name: str, device: torch.device) -> bool:
    if name == "sdpa":
        return True
    if device.type != "cuda":
        return False
    if name == "torch-fa2":
        return True
    module = {"flashinfer": "flashinfer", "flash-attn": "flash_attn"}[name]
    return importlib.util.find_spec(module) is not None


def make_attention_backend(
    name: str,
    cache: KVCacheViews,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    prefill: str = "auto",
) -> AttentionBackend:
    """``auto`` picks flashinfer (for head sizes it compiles), then torch-fa2 on CUDA (not for an
    fp8 cache, which it cannot read), else sdpa. ``dtype`` is the queries'; the cache's is its
    tensors'. ``prefill``: FlashInfer's prefill kernel
    (``replica.attention.flashinfer_limits.PREFILL_KERNELS``)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        fp8 = is_fp8(cache.k_cache(0).dtype)
        order = ("flashinfer", "sdpa") if fp8 else ("flashinfer", "torch-fa2", "sdpa")
        if not supports_head_dim(head_dim):
            order = tuple(n for n in order if n != "flashinfer")
        name = next(n for n in order if available(n, device))
    if not available(name, device):
        raise ValueError(
            f"attention backend {name!r} is unavailable on {device} (not installed, or CPU)"
        )
    if name == "flashinfer":
        from replica.attention.flashinfer_backend import FlashInferBackend

        require_head_dim(head_dim)

        return FlashInferBackend(cache, num_q_heads, num_kv_heads, head_dim, dtype, prefill)
    if name == "torch-fa2":
        from replica.attention.torch_fa2 import TorchFlashBackend

        return TorchFlashBackend(cache, num_q_heads, num_kv_heads, head_dim)
    if name == "flash-attn":
        from replica.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend(cache, num_q_heads, num_kv_heads, head_dim)
    from replica.attention.sdpa import SdpaBackend

    return SdpaBackend(cache, num_q_heads, num_kv_heads, head_dim)


__all__ = ["BACKENDS", "AttentionBackend", "KVCacheViews", "StepBatch", "make_attention_backend"]
