"""The rule that keeps FlashInfer's Hopper prefill (32-bit row addressing) off caches it cannot
reach: the interleaved layout at many long slots goes to fa2, everything else keeps fa3."""

from __future__ import annotations

import pytest
import torch

from replica.attention.flashinfer_limits import (
    FA3_ADDRESSABLE_BYTES,
    FA3_MAX_STEP_KV_TOKENS,
    MAX_ROWS,
    choose_prefill_kernel,
)
from replica.kv.config import KVCacheConfig
from replica.kv.paged_config import PagedKVConfig


def llama8b(layout: str, slots: int, tokens: int) -> KVCacheConfig:
    return KVCacheConfig(
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        max_slots=slots,
        max_tokens=tokens,
        page_size=2 << 20,
        budget_bytes=100 << 30,
        layout=layout,
    )


def kernel_for(config: KVCacheConfig) -> str:
    """What the vAttention FlashInfer backend asks for: rows of one layer's view, their stride."""
    rows = config.max_slots * config.tokens_per_slot
    stride = (
        config.bytes_per_token
        if config.layout.value == "interleaved"
        else config.num_kv_heads * 128 * 2
    )
    return choose_prefill_kernel(rows, stride, rows, requested="fa3").backend


def test_the_reported_crash_configuration_is_kept_off_fa3() -> None:
    # Llama-3-8B shapes, max_model_len ~4,700: slot 112 starts beyond fa3's 64 GiB (the H200 fault).
    config = llama8b("interleaved", 256, 4700)
    assert config.bytes_per_token == 128 * 1024
    assert kernel_for(config) == "fa2"
    assert (
        kernel_for(llama8b("interleaved", 111, 4700)) == "auto"
    )  # 111 * 4704 rows * 128 KiB < 64 GiB
    assert kernel_for(llama8b("interleaved", 112, 4700)) == "fa2"
    assert kernel_for(llama8b("interleaved", 256, 650)) == "auto"  # ran on the H200


def test_per_layer_and_paged_caches_keep_fa3() -> None:
    assert kernel_for(llama8b("per_layer", 256, 32768)) == "auto"
    paged = PagedKVConfig(
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        max_slots=256,
        max_tokens=32768,
        budget_bytes=100 << 30,
    )
    rows = paged.num_blocks * paged.block_size
    assert choose_prefill_kernel(rows, 8 * 128 * 2, rows, requested="fa3").backend == "auto"


def test_boundaries_are_exact() -> None:
    stride = 128 * 1024
    rows = FA3_ADDRESSABLE_BYTES // stride
    assert choose_prefill_kernel(rows, stride, 1, requested="fa3").backend == "auto"
    over = choose_prefill_kernel(rows + 1, stride, 1, requested="fa3")
    assert over.backend == "fa2" and "64 GiB" in over.reason
    assert choose_prefill_kernel(10, 16, FA3_MAX_STEP_KV_TOKENS, requested="fa3").backend == "auto"
    many = choose_prefill_kernel(10, 16, FA3_MAX_STEP_KV_TOKENS + 1, requested="fa3")
    assert many.backend == "fa2" and f"{FA3_MAX_STEP_KV_TOKENS:,}" in many.reason


def test_a_cache_no_kernel_can_index_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"2,147,483,648 token rows.*max_running or max_model_len"):
        choose_prefill_kernel(MAX_ROWS + 1, 16, 1)


def test_flashinfer_refuses_a_head_size_it_cannot_compile_and_auto_passes_it_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import replica.attention
    from replica.attention import make_attention_backend
    from replica.attention.flashinfer_limits import HEAD_DIMS, require_head_dim, supports_head_dim

    assert [d for d in (16, 32, 64, 80, 96, 128, 256) if supports_head_dim(d)] == list(HEAD_DIMS)
    with pytest.raises(ValueError, match="head_dim in"):
        require_head_dim(16)

    class Cache:
        def k_cache(self, layer: int) -> torch.Tensor:
            return torch.zeros(2, 16, 2, 16)

        v_cache = k_cache

        def token_capacity(self) -> int:
            return 32

    # As on a GPU with FlashInfer installed: auto would take flashinfer first.
    monkeypatch.setattr(replica.attention, "available", lambda name, device: True)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="head_dim in"):
        make_attention_backend("flashinfer", Cache(), 4, 2, 16, torch.float32, cpu)
    monkeypatch.setattr(replica.attention, "available", lambda name, device: name != "torch-fa2")
    assert make_attention_backend("auto", Cache(), 4, 2, 16, torch.float32, cpu).name == "sdpa"


def test_fa2_on_request_and_the_option_names_the_same_kernels() -> None:
    from replica.attention.flashinfer_limits import PREFILL_KERNELS
    from replica.engine_config import EngineConfig
    from replica.options import declared_options

    assert choose_prefill_kernel(10, 16, 10, requested="fa2").backend == "fa2"
    assert choose_prefill_kernel(10, 16, 10, requested="fa3").backend == "auto"
    # auto is fa2 (mixed prefill + decode steps), fp8 or not, with the measured reason.
    for fp8 in (False, True):
        kernel = choose_prefill_kernel(10, 16, 10, fp8_kv=fp8)
        assert kernel.backend == "fa2" and "1.165x" in kernel.reason
    with pytest.raises(ValueError, match="prefill kernel 'fa4'"):
        choose_prefill_kernel(10, 16, 10, requested="fa4")
    spec = next(s for s in declared_options(EngineConfig) if s.field == "prefill_kernel")
    assert spec.choices == PREFILL_KERNELS and spec.flag == "--prefill-kernel"
