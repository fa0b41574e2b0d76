"""Llama-family model layer of the engine: config, tensor-parallel layers, model, weight loading.

Attention is not part of the model: :meth:`LlamaForCausalLM.forward` takes an ``attention``
callable from the engine, which owns the KV cache.
"""

from .config import ModelConfig, RopeScaling
from .embedded import embedded_model_dir
from .layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SwiGLUMLP,
    VocabParallelEmbedding,
)
from .llama import AttentionFn, LlamaForCausalLM
from .weights import MissingWeightsError, init_synthetic_weights, load_hf_weights, load_model

__all__ = [
    "AttentionFn",
    "ColumnParallelLinear",
    "LlamaForCausalLM",
    "MissingWeightsError",
    "ModelConfig",
    "ParallelLMHead",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SwiGLUMLP",
    "VocabParallelEmbedding",
    "embedded_model_dir",
    "init_synthetic_weights",
    "load_hf_weights",
    "load_model",
]
