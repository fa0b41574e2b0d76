"""The PagedAttention comparison mode on the GPU: paged-flashinfer against paged-sdpa on the same
blocks (bf16 tolerance); paged mode against vAttention mode through a 4-layer Llama-3-8B-shaped
model (logits within bf16 tolerance); a batch of 64 at Llama-3-8B shapes served in paged mode."""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Iterator

import pytest
import torch

from replica import EngineConfig, LLMEngine
from replica.attention.paged import make_paged_attention_backend
from replica.kv import PagedKVCache
from tests.cpu.test_paged_mode import (
    DECODE,
    HEAD_DIM,
    KV_HEADS,
    MIXED,
    Q_HEADS,
    build_cache,
    new_rows,
    paged_step,
)
from tests.gpu.test_engine_gpu import (
    assert_logits_close,
    prefill_then_decode_logits,
    serve_a_batch_of_64,
    small_llama,
)

pytestmark = pytest.mark.gpu
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None


@pytest.fixture(autouse=True)
def free_gpu_memory() -> Iterator[None]:
    """A paged engine preallocates its whole budget: hand it back before the next test measures
    free memory."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_paged_flashinfer_matches_paged_sdpa(block_size: int, shape) -> None:
    if not HAS_FLASHINFER:
        pytest.skip("flashinfer is not installed")
    cache = build_cache(block_size, torch.bfloat16, "cuda")
    batch, q, k, v = paged_step(cache, shape)
    device = cache.device
    reference = make_paged_attention_backend(
        "paged-sdpa", cache, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device
    )
    reference.plan(batch)
    expected = reference(1, q, k, v)
    backend = make_paged_attention_backend(
        "auto", cache, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device
    )
    assert backend.name == "paged-flashinfer"
    backend.plan(batch)
    out = backend(1, q, k, v)
    rows = new_rows(cache, batch)
    torch.testing.assert_close(cache.k_cache(1).flatten(0, 1)[rows], k)
    torch.testing.assert_close(cache.v_cache(1).flatten(0, 1)[rows], v)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def engine(kv_mode: str, attention: str) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=small_llama(),
            attention=attention,
            kv_mode=kv_mode,
            max_running=8,
            max_model_len=2048,
            kv_cache_bytes=2 << 30,
            seed=7,
        )
    )


@pytest.mark.parametrize("name", ["paged-sdpa", "paged-flashinfer"])
def test_paged_mode_matches_vattention_through_the_model(name: str) -> None:
    if name == "paged-flashinfer" and not HAS_FLASHINFER:
        pytest.skip("flashinfer is not installed")
    generator = torch.Generator().manual_seed(0)
    # 130 and 600 tokens span several 16-token blocks and end mid-block; 1 and 5 fit one block.
    prompts = [
        torch.randint(0, 128000, (n,), generator=generator).tolist() for n in (5, 130, 37, 1, 600)
    ]
    reference = prefill_then_decode_logits(engine("vattention", "sdpa"), prompts)
    gc.collect()
    torch.cuda.empty_cache()
    paged = engine("paged", name)
    assert isinstance(paged.kv, PagedKVCache) and paged.runner.attention.name == name
    assert_logits_close(prefill_then_decode_logits(paged, prompts), reference)
    paged.kv.check_invariants(deep=True)


def test_paged_mode_serves_a_batch_of_64_at_llama3_8b_shapes() -> None:
    llm = LLMEngine(
        EngineConfig(model="synthetic", kv_mode="paged", max_running=64, max_model_len=1024)
    )
    steps = serve_a_batch_of_64(llm)
    stats = llm.stats()
    assert stats.kv.pages_in_use == 0
    print(
        f"attention={llm.runner.attention.name} steps={steps} "
        f"blocks={llm.kv.config.num_blocks} {stats.kv.summary()}"
    )
