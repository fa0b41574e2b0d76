"""Tensor-parallel building blocks of a Llama-family decoder.

Every sharded module takes ``rank``/``world_size`` (the rank within ``process_group``) and owns only
its shard. Each module has ``weight_loader(param, source, shard_id=None)``: ``source`` is a full
(unsharded) checkpoint tensor, either a ``torch.Tensor`` or a lazy ``safetensors`` slice, and the
loader reads only the rows/columns this rank owns, so no rank ever materialises a full matrix.

Shapes use ``T`` for the number of tokens in the step (all sequences packed together).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import RopeScaling

# A full checkpoint tensor: torch.Tensor or safetensors' lazy PySafeSlice (both support basic
# slicing).
TensorSource = Any


def source_shape(source: TensorSource) -> tuple[int, ...]:
    """Shape of a full tensor without reading it."""
    if isinstance(source, torch.Tensor):
        return tuple(source.shape)
    return tuple(source.get_shape())


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise ValueError(f"{name}: checkpoint tensor has shape {got}, expected {want}")


def _new_param(*shape: int) -> nn.Parameter:
    # Inference only: no autograd bookkeeping even if the caller forgets inference_mode.
    # Uses the ambient default dtype/device so a model can be built directly in bf16 on the GPU.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _split_evenly(size: int, world_size: int, what: str) -> int:
    if size % world_size:
        raise ValueError(f"{what} ({size}) is not divisible by world_size ({world_size})")
    return size // world_size


class ColumnParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with the output dim sharded; optionally several matrices merged.

    ``output_sizes`` lists the full output sizes of the merged matrices (``[q, k, v]`` or
    ``[gate, up]``). Each is split evenly across ranks and the local weight is the concatenation of
    this rank's slices: ``[sum(output_sizes) / world_size, input_size]``. Input ``[T, input_size]``,
    output ``[T, sum(output_sizes) / world_size]`` (no gather: the consumer works on local heads).
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.input_size, self.output_sizes = input_size, list(output_sizes)
        self.rank, self.world_size = rank, world_size
        self.local_sizes = [_split_evenly(s, world_size, "output size") for s in output_sizes]
        self.weight = _new_param(sum(self.local_sizes), input_size)
        self.bias = _new_param(sum(self.local_sizes)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def weight_loader(
        self, param: nn.Parameter, source: TensorSource, shard_id: int | None = None
    ) -> None:
        """Load merged matrix ``shard_id`` (its full ``[output_sizes[i], ...]`` tensor), or, with
        ``shard_id=None``, an already-fused tensor of all of them concatenated along dim 0."""
        ids = range(len(self.output_sizes)) if shard_id is None else [shard_id]
        full_rows = sum(self.output_sizes[i] for i in ids)
        trailing = (self.input_size,) if param.dim() == 2 else ()
        _check_shape(
            f"column-parallel shard {shard_id}", source_shape(source), (full_rows,) + trailing
        )
        src_base = 0
        for i in ids:
            local = self.local_sizes[i]
            start = src_base + self.rank * local
            dst = sum(self.local_sizes[:i])
            param[dst : dst + local].copy_(source[start : start + local])
            src_base += self.output_sizes[i]


class RowParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with the input dim sharded; partial outputs are summed across ranks.

    Local weight ``[output_size, input_size / world_size]``; input ``[T, input_size / world_size]``
    (this rank's heads / intermediate slice), output ``[T, output_size]`` replicated on every rank.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        rank: int = 0,
        world_size: int = 1,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.rank, self.world_size, self.process_group = rank, world_size, process_group
        self.local_input = _split_evenly(input_size, world_size, "input size")
        self.weight = _new_param(output_size, self.local_input)
        self.bias = _new_param(output_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.world_size > 1:
            dist.all_reduce(y, group=self.process_group)
        # Bias is replicated, so it is added once after the reduction, not once per rank.
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def weight_loader(
        self, param: nn.Parameter, source: TensorSource, shard_id: int | None = None
    ) -> None:
        if param is self.bias:
            _check_shape("row-parallel bias", source_shape(source), (self.output_size,))
            param.copy_(source[:])
            return
        _check_shape(
            "row-parallel weight", source_shape(source), (self.output_size, self.input_size)
        )
        start = self.rank * self.local_input
        param.copy_(source[:, start : start + self.local_input])


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary sharded in contiguous ranges.

    The vocab is padded up to a multiple of ``world_size``; padding rows are zero. Local weight
    ``[ceil(vocab / world_size), hidden]``. Input ids ``[T]``, output ``[T, hidden]``.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        rank: int = 0,
        world_size: int = 1,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.rank, self.world_size, self.process_group = rank, world_size, process_group
        self.per_rank = math.ceil(vocab_size / world_size)
        self.vocab_start = min(rank * self.per_rank, vocab_size)
        self.vocab_end = min(self.vocab_start + self.per_rank, vocab_size)
        self.weight = _new_param(self.per_rank, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids owned by other ranks look up row 0 and are zeroed; the all-reduce fills them in.
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(mine, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(out, group=self.process_group)
        return out

    @torch.no_grad()
    def weight_loader(
        self, param: nn.Parameter, source: TensorSource, shard_id: int | None = None
    ) -> None:
        _check_shape(
            "vocab-parallel weight", source_shape(source), (self.vocab_size, self.hidden_size)
        )
        n = self.vocab_end - self.vocab_start
        if n:
            param[:n].copy_(source[self.vocab_start : self.vocab_end])
        param[n:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-sharded output projection: hidden ``[N, hidden]`` -> float32 logits ``[N, vocab]``.

    With ``tie_to`` the weight *is* the embedding's parameter (same shard layout), so a tied
    checkpoint needs no ``lm_head.weight``.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        rank: int = 0,
        world_size: int = 1,
        process_group: dist.ProcessGroup | None = None,
        tie_to: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__(vocab_size, hidden_size, rank, world_size, process_group)
        if tie_to is not None:
            self.weight = tie_to.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.world_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.world_size)]
            dist.all_gather(parts, logits.contiguous(), group=self.process_group)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.vocab_size].float()


class RMSNorm(nn.Module):
    """``x / rms(x) * w`` computed in float32; optionally fuses the residual add first.

    ``forward(x [T, H], residual [T, H] | None) -> (normed [T, H], new_residual [T, H])``. With a
    residual, ``new_residual = x + residual`` is both what gets normalised and what is returned for
    the next skip connection; without one, ``new_residual = x``.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _new_param(hidden_size)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """May update ``x`` and ``residual`` in place (one fused kernel on CUDA)."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)

    @torch.no_grad()
    def weight_loader(
        self, param: nn.Parameter, source: TensorSource, shard_id: int | None = None
    ) -> None:
        _check_shape("norm weight", source_shape(source), tuple(param.shape))
        param.copy_(source[:])


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim / 2]`` (float64), with Llama-3.1 scaling if configured.

    Llama-3 scaling leaves high-frequency (short-wavelength) dims alone, divides low-frequency ones
    by ``factor``, and interpolates linearly (in ``context / wavelength``) in between.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    ctx = scaling.original_max_position_embeddings
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = ((ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
    # smooth == 1 for wavelen <= ctx/hi (unchanged), 0 for wavelen >= ctx/lo (fully scaled).
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq


class RotaryEmbedding(nn.Module):
    """Rotate-half (GPT-NeoX layout) rotary embedding with a precomputed float32 cache.

    ``cos_sin`` ``[max_positions, head_dim]`` holds cos in its first half and sin in its second (the
    layout of FlashInfer's fused kernel). It is a plain attribute rather than a buffer so that
    ``model.to(torch.bfloat16)`` cannot degrade it; it follows the inputs' device on first use.
    """

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None = None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        angles = torch.outer(
            torch.arange(max_positions, dtype=torch.float64),
            rope_inv_freq(head_dim, theta, scaling),
        )
        self.cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).float()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """positions ``[T]``; rotates q ``[T, Hq, D]`` and k ``[T, Hkv, D]`` in place (views with a
        contiguous last dim, such as slices of a fused qkv output)."""
        if self.cos_sin.device != positions.device:
            self.cos_sin = self.cos_sin.to(positions.device)
        kernels.rotate_in_place(positions, q, k, self.cos_sin)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up merged into one column-parallel matmul.

    Input/output ``[T, hidden]``; the intermediate ``[T, intermediate / world_size]`` stays local.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        rank: int = 0,
        world_size: int = 1,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias, rank, world_size
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias, rank, world_size, process_group
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))
