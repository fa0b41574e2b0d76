"""Qwen3's per-head q/k RMSNorm on the GPU (FlashInfer's fused RMSNorm on [tokens * heads,
head_dim]): decode steps in CUDA graphs match eager steps and sdpa, with a bf16 and an fp8 cache.
Its agreement with transformers is proven on the CPU (tests/cpu/test_model.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from replica.model import ModelConfig
from tests.gpu.test_engine_gpu import assert_logits_close
from tests.gpu.test_fp8_gpu import needs_flashinfer, runner_logits

pytestmark = pytest.mark.gpu

#: Qwen3-8B's attention shapes (32 q / 8 KV heads of 128, q/k norm), 4 layers, a small vocabulary.
QWEN3 = dataclasses.replace(
    ModelConfig.llama3_8b(),
    model_type="qwen3",
    num_layers=4,
    vocab_size=32000,
    intermediate_size=12288,
    rope_theta=1000000.0,
    rope_scaling=None,
    max_position_embeddings=40960,
    qk_norm=True,
)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_qwen3_graphs_match_eager_and_sdpa(kv_cache_dtype: str) -> None:
    needs_flashinfer()
    args = ("vattention", "interleaved")
    graphed, replays = runner_logits(*args, "flashinfer", True, kv_cache_dtype, QWEN3)
    torch.cuda.empty_cache()
    eager, _ = runner_logits(*args, "flashinfer", False, kv_cache_dtype, QWEN3)
    torch.cuda.empty_cache()
    expected, _ = runner_logits(*args, "sdpa", False, kv_cache_dtype, QWEN3)
    assert replays == 2
    assert_logits_close(tuple(graphed), tuple(eager))
    assert_logits_close(tuple(eager), tuple(expected))
