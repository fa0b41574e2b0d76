"""Fused kernels for the decoder's small per-token operations, from FlashInfer on CUDA.

At decode batch sizes the step's time goes to weight reads (the linears) and to the many small
kernels around them; PyTorch spells an RMSNorm as ~6 kernels and a rotary embedding as ~12. These
functions run one FlashInfer kernel each when the tensors are on CUDA and FlashInfer is installed,
and fall back to the PyTorch composition (the reference semantics) everywhere else:

    add_rms_norm(x, residual, w, eps) -> (normed, residual')   residual' = x + residual
    silu_and_mul(gate_up [T, 2I])      -> silu(gate) * up [T, I]
    rotate_in_place(positions, q, k, cos_sin) -> None           NeoX rotate-half RoPE

The fused norm keeps ``x + residual`` in float32 before normalising (PyTorch rounds it to the
activation dtype first); both are within bf16 rounding of each other. float32 tensors (the
reference runs on a GPU) always take the PyTorch path.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch
import torch.nn.functional as F


@functools.cache
def _flashinfer() -> ModuleType | None:
    if importlib.util.find_spec("flashinfer") is None:
        return None
    import flashinfer

    return flashinfer


def fused(x: torch.Tensor) -> ModuleType | None:
    """FlashInfer when ``x`` is a 16-bit tensor on CUDA (what its kernels are built for) and it is
    installed, else None (use PyTorch)."""
    return _flashinfer() if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else None


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) * weight, x + residual)``; without a residual, ``(norm(x), x)``.
    The fused path updates ``x`` and ``residual`` in place (both are the step's own activations)."""
    fi = fused(x)
    if fi is not None:
        if residual is None:
            return fi.norm.rmsnorm(x, weight, eps), x
        fi.norm.fused_add_rmsnorm(x, residual, weight, eps)  # residual += x; x = norm(residual)
        return x, residual
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    fi = fused(gate_up)
    if fi is not None:
        return fi.activation.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_in_place(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Rotates q ``[T, Hq, D]`` and k ``[T, Hkv, D]`` (views with a contiguous last dim) in place;
    ``cos_sin`` is float32 ``[positions, D]``: cos in the first half, sin in the second."""
    fi = fused(q)
    if fi is not None:
        head_dim = q.shape[-1]
        fi.rope.apply_rope_with_cos_sin_cache_inplace(
            positions,
            q.view(q.shape[0], -1),
            k.view(k.shape[0], -1),
            head_dim,
            cos_sin,
            is_neox=True,
        )
        return
    half = cos_sin.shape[-1] // 2
    table = cos_sin[positions].unsqueeze(1)  # [T, 1, D]
    cos, sin = table[..., :half], table[..., half:]
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
