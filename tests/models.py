"""Small random Llama models saved as real Hugging Face directories, shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from replica import LLM

#: The tiny model: 2 layers, 4 query and 2 KV heads, a vocabulary of 128 (token-id prompts only).
TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
#: Engine settings that make the tiny model's KV cache small: 4 KiB pages (8 tokens of K and V of
#: both layers in the interleaved layout; 16 tokens per range in per_layer), 256 pages.
SMALL_KV: dict[str, Any] = {
    "page_size": 4096,
    "max_model_len": 256,
    "max_running": 8,
    "kv_cache_bytes": 256 * 4096,
}


def save_random_llama(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A LlamaForCausalLM with random weights (from ``seed``), ``TINY`` unless overridden."""
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).save_pretrained(path)
    return path


def tiny_llm(model_dir: Path, **config: Any) -> LLM:
    """The offline engine on ``model_dir`` with ``SMALL_KV`` unless overridden."""
    return LLM(str(model_dir), **{**SMALL_KV, **config})
