"""Llama-family model layer of the engine: config, tensor-parallel layers, model, weight loading.

Attention is not part of the model: :meth:`LlamaForCausalLM.forward` takes an ``attention``
callable from the engine, which owns the KV cache. Names load on first use (PEP 562): the light
modules (``config``, ``embedded``, ``source``) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from replica.lazy import lazy_exports

_EXPORTS = {
    "ModelConfig": "config",
    "RopeScaling": "config",
    "embedded_model_dir": "embedded",
    "ColumnParallelLinear": "layers",
    "ParallelLMHead": "layers",
    "RMSNorm": "layers",
    "RotaryEmbedding": "layers",
    "RowParallelLinear": "layers",
    "SwiGLUMLP": "layers",
    "VocabParallelEmbedding": "layers",
    "AttentionFn": "llama",
    "LlamaForCausalLM": "llama",
    "MissingWeightsError": "weights",
    "init_synthetic_weights": "weights",
    "load_hf_weights": "weights",
    "load_model": "weights",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from replica.model.config import ModelConfig, RopeScaling
    from replica.model.embedded import embedded_model_dir
    from replica.model.layers import (
        ColumnParallelLinear,
        ParallelLMHead,
        RMSNorm,
        RotaryEmbedding,
        RowParallelLinear,
        SwiGLUMLP,
        VocabParallelEmbedding,
    )
    from replica.model.llama import AttentionFn, LlamaForCausalLM
    from replica.model.weights import (
        MissingWeightsError,
        init_synthetic_weights,
        load_hf_weights,
        load_model,
    )
