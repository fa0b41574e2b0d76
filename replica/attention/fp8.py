"""An fp8 (e4m3) KV cache: how K and V are stored in one byte and read back.

As in vLLM and FlashInfer, each layer has one scale for K and one for V (floats, fixed for the
cache's life):

    stored  = saturate(x / scale)  as float8_e4m3fn   (|stored| <= 448, NaN never written)
    x      ~= stored * scale

The write quantizes (``AttentionBackend.write_kv``); the reference backends dequantize the keys
they read (``dequantize``); FlashInfer's kernels take the scales as ``k_scale`` / ``v_scale``
(``k_scale`` folds into the softmax scale, ``v_scale`` multiplies the output).

NOTE: the scales default to 1.0 (``KVScales.unit``), what vLLM uses when a checkpoint carries no
KV scales. e4m3 keeps 3 mantissa bits over [2**-6, 448] whatever the scale, so a scale only
matters for values outside that range, and K and V of the embedded SmolLM2-135M lie inside it
(largest |K| 10-21, |V| 0.6-13 per layer). Measured by ``benchmarks/kv_fp8_quality.py`` (CPU,
16 chat prompts, 528 generated positions): mean KL against the same model's full-precision cache
is 0.0064 nats (float32 model) and 0.0098 (bfloat16) with unit scales, 0.0075 and 0.0093 with
per-layer scales calibrated from the largest |K| and |V| (``KVScales.from_amax``): no consistent
gain. A fixed scale needs no calibration pass, is the same on every tensor-parallel rank and
cannot go stale under a captured CUDA graph; ``AttentionBackend.set_kv_scales`` takes others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
#: The largest finite e4m3 value (e4m3fn has no infinity: casting beyond it must saturate).
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class KVScales:
    """Per-layer dequantization scales of an fp8 KV cache: layer ``l``'s K is ``stored *
    k[l]``, its V ``stored * v[l]``. Every scale is a finite float > 0."""

    k: tuple[float, ...]
    v: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.k) != len(self.v):
            raise ValueError(f"{len(self.k)} K scales but {len(self.v)} V scales")
        for name, scales in (("k", self.k), ("v", self.v)):
            for layer, scale in enumerate(scales):
                if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
                    raise ValueError(f"KVScales.{name}[{layer}] must be a float > 0, got {scale!r}")

    @staticmethod
    def unit(num_layers: int) -> KVScales:
        """Scale 1.0 for every layer (the default; see the module docstring)."""
        return KVScales((1.0,) * num_layers, (1.0,) * num_layers)

    @staticmethod
    def from_amax(
        k_amax: Sequence[float], v_amax: Sequence[float], headroom: float = 1.0
    ) -> KVScales:
        """Scales that map each layer's largest |K| and |V| (times ``headroom``) to e4m3's
        largest value (calibration; a layer whose amax is 0 keeps 1.0)."""

        def scale(amax: float) -> float:
            return amax * headroom / FP8_MAX if amax > 0 else 1.0

        return KVScales(tuple(map(scale, k_amax)), tuple(map(scale, v_amax)))

    @property
    def num_layers(self) -> int:
        return len(self.k)


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype = FP8_DTYPE) -> torch.Tensor:
    """``x / scale`` saturated to the fp8 range, as ``dtype`` (same shape)."""
    limit = float(torch.finfo(dtype).max)
    scaled = x if scale == 1.0 else x * (1.0 / scale)
    return scaled.clamp(-limit, limit).to(dtype)


def dequantize(stored: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``stored * scale`` as ``dtype`` (the reference backends' read)."""
    out = stored.to(dtype)
    return out if scale == 1.0 else out * scale
