"""Many slots at long context on the GPU, both layouts: the configuration that faulted inside
FlashInfer's Hopper prefill (32-bit row addressing past 64 GiB of an interleaved cache) serves.

Attention alone: slots 0, 128 and 255 of a 256-slot Llama-3-8B-shaped cache (4,704 tokens a slot)
against sdpa. The engine: a 256-slot replica with a long max_model_len warms up (every graph size
up to 256) and serves 256 requests at once, the last slot included."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from replica import (
    EngineConfig,
    KVCacheAllocator,
    KVCacheConfig,
    LLMEngine,
    SamplingParams,
    open_device,
)
from replica.attention import StepBatch, available, make_attention_backend
from replica.model import ModelConfig

pytestmark = pytest.mark.gpu

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128


def needs_flashinfer() -> None:
    if not available("flashinfer", torch.device("cuda")):
        pytest.skip("flashinfer is not installed")


def long_cache(layout: str, slots: int, tokens: int) -> KVCacheAllocator:
    """A Llama-3-8B-shaped cache of ``slots`` slots of ``tokens`` tokens, 8 GiB of pages."""
    device = open_device("cuda")
    config = KVCacheConfig(
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=torch.bfloat16,
        max_slots=slots,
        max_tokens=tokens,
        page_size=device.page_size,
        budget_bytes=8 << 30,
        layout=layout,
    )
    return KVCacheAllocator(config, device)


def random_step(
    kv: KVCacheAllocator,
    used: list[int],
    shape: list[tuple[int, int]],
    layers: tuple[int, ...],
    generator: torch.Generator,
):
    """Backs ``used`` slots for (context, new tokens) ``shape``, fills the contexts of ``layers``
    with random K/V; returns the step's batch and its random q, k, v."""
    for slot, (context, query) in zip(used, shape):
        kv.ensure(slot, context + query)
        for layer in layers:
            for cache in (kv.k_cache(layer), kv.v_cache(layer)):
                cache[slot, :context] = (
                    torch.randn(context, KV_HEADS, HEAD_DIM, generator=generator).cuda().bfloat16()
                )
    batch = StepBatch.build(
        used, [c for c, _ in shape], [q for _, q in shape], torch.device("cuda")
    )
    q, k, v = (
        torch.randn(batch.num_tokens, h, HEAD_DIM, generator=generator).cuda().bfloat16()
        for h in (Q_HEADS, KV_HEADS, KV_HEADS)
    )
    return batch, q, k, v


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_attention_at_slot_255_of_a_long_cache_matches_sdpa(layout: str) -> None:
    needs_flashinfer()
    kv = long_cache(layout, 256, 4700)
    slots = [kv.acquire() for _ in range(256)]
    used = [slots[0], slots[128], slots[255]]
    shape = [(0, 300), (40, 1), (700, 20)]  # a prompt, a decode, a chunk on a long context
    generator = torch.Generator().manual_seed(0)
    batch, q, k, v = random_step(kv, used, shape, (0, LAYERS - 1), generator)
    backends = [
        make_attention_backend(
            name, kv, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, torch.device("cuda"), "fa3"
        )
        for name in ("sdpa", "flashinfer")
    ]
    # fa3 asked for: the interleaved cache past 64 GiB is kept off it (it would fault).
    expected_kernel = "fa2" if layout == "interleaved" else "auto"
    assert backends[1].kernels.prefill_kernel.backend == expected_kernel  # type: ignore[attr-defined]
    for layer in (0, LAYERS - 1):
        outs = []
        for backend in backends:
            backend.plan(batch)
            outs.append(backend(layer, q, k, v))
        torch.cuda.synchronize()
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_a_256_slot_engine_with_long_context_warms_up_and_serves_every_slot(layout: str) -> None:
    needs_flashinfer()
    model = dataclasses.replace(
        ModelConfig.llama3_8b(), num_layers=8
    )  # 32 KiB a token: 64 GiB at 2M rows
    engine = LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=model,
            kv_layout=layout,
            max_running=256,
            max_model_len=12288,
            max_batch_tokens=8192,
            kv_cache_bytes=16 << 30,
            seed=3,
            prefill_kernel="fa3",  # the reach guard under test (auto is fa2 anyway)
        )
    )
    kernel = engine.runner.attention.kernels.prefill_kernel  # type: ignore[attr-defined]
    assert kernel.backend == ("fa2" if layout == "interleaved" else "auto"), kernel.reason
    assert engine.warm_up() > 30  # 1, 2, 4, 8, 16, ..., 256
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for i in range(256):
        engine.add_request(f"r{i}", [(7 * i + j) % 1000 + 3 for j in range(16 + i % 48)], params)
    slots_seen: set[int] = set()
    finished = 0
    while engine.has_work():
        slots_seen.update(r.slot for r in engine.running_requests() if r.slot is not None)
        finished += sum(o.finished for o in engine.step())
    torch.cuda.synchronize()
    assert finished == 256
    assert max(slots_seen) == 255
    engine.kv.check_invariants(deep=True)


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_small_batches_at_long_context_see_virtual_pages_and_match_sdpa(layout: str) -> None:
    """Two to three sequences past 2K keys: the kernel sees 16-token virtual pages over the
    slots."""
    needs_flashinfer()
    kv = long_cache(layout, 8, 8192)
    slots = [kv.acquire() for _ in range(8)]
    generator = torch.Generator().manual_seed(1)
    for shape in ([(3000, 1), (5000, 1)], [(4000, 100), (2500, 1), (7000, 1)]):
        batch, q, k, v = random_step(kv, slots[-len(shape) :], shape, (0,), generator)
        outs = []
        for name in ("sdpa", "flashinfer"):
            backend = make_attention_backend(
                name, kv, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, torch.device("cuda")
            )
            backend.plan(batch)
            outs.append(backend(0, q, k, v))
        assert backend.page_tokens == 16  # type: ignore[attr-defined]
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
