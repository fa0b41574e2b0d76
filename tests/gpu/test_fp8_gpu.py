"""The fp8 (e4m3) KV cache on the GPU: every backend that reads it against the sdpa reference on
the same cache, in both vAttention layouts and the paged mode, eager and in CUDA graphs; the
backends that cannot read it refuse it.

Attention alone: per-layer scales far from 1 (so ``k_scale`` / ``v_scale`` reach the kernels), a
mixed step (prefill chunks and decodes: FlashInfer's fa2 prefill), a decode step and a long
decode step (FlashInfer on 16-token virtual pages). The engine's runner: the same step plans with
CUDA graphs, eagerly, and on sdpa, compared by logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from replica import EngineConfig, KVCacheAllocator, KVCacheConfig, LLMEngine, open_device
from replica.attention import StepBatch, available, make_attention_backend
from replica.attention.base import AttentionBackend
from replica.attention.fp8 import KVScales, quantize
from replica.attention.paged import make_paged_attention_backend
from replica.kv import PagedKVCache, PagedKVConfig
from replica.model import ModelConfig
from replica.model_runner import StepPlan
from tests.gpu.test_engine_gpu import assert_logits_close, small_llama

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 2
SCALES = KVScales(k=(0.05, 2.0), v=(0.02, 0.5))
# (context already cached, new tokens)
MIXED = [(0, 7), (5, 1), (33, 1), (20, 12), (70, 1)]
DECODE = [(9, 1), (40, 1), (1, 1), (100, 1)]
LONG_DECODE = [(2100, 1), (3000, 1)]  # 2 x 8 KV heads at >= 1K keys: 16-token virtual pages
SHAPES = {"mixed": MIXED, "decode": DECODE, "long-decode": LONG_DECODE}


def needs_flashinfer() -> None:
    if not available("flashinfer", torch.device("cuda")):
        pytest.skip("flashinfer is not installed")


def build(kind: str) -> KVCacheAllocator | PagedKVCache:
    if kind == "paged":
        return PagedKVCache(
            PagedKVConfig(LAYERS, KV_HEADS, HEAD_DIM, FP8, 8, 4096, 1 << 30), torch.device("cuda")
        )
    device = open_device("cuda")
    config = KVCacheConfig(
        LAYERS, KV_HEADS, HEAD_DIM, FP8, 8, 4096, device.page_size, 512 * device.page_size,
        layout=kind,
    )  # fmt: skip
    return KVCacheAllocator(config, device)


def backend(name: str, cache: KVCacheAllocator | PagedKVCache) -> AttentionBackend:
    make = (
        make_paged_attention_backend if isinstance(cache, PagedKVCache) else make_attention_backend
    )
    made = make(name, cache, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, torch.device("cuda"))  # type: ignore[arg-type]
    made.set_kv_scales(SCALES)
    return made


def step(cache: KVCacheAllocator | PagedKVCache, shape: list[tuple[int, int]]):  # type: ignore[no-untyped-def]
    """Slots whose contexts hold random K/V, stored quantized with SCALES; the step's batch and
    new q/k/v (bf16)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    slots = []
    for context, query in shape:
        slot = cache.acquire()
        cache.ensure(slot, context + query)
        slots.append(slot)
    contexts = [c for c, _ in shape]
    if any(contexts):  # a prefill of the contexts through the sdpa backend writes them
        writer = backend("paged-sdpa" if isinstance(cache, PagedKVCache) else "sdpa", cache)
        keep = [i for i, c in enumerate(contexts) if c]
        batch = StepBatch.build(
            [slots[i] for i in keep], [0] * len(keep), [contexts[i] for i in keep],
            torch.device("cuda"),
        )  # fmt: skip
        writer.plan(batch)
        for layer in range(LAYERS):
            k, v = (
                torch.randn(
                    batch.num_tokens, KV_HEADS, HEAD_DIM, generator=generator, device="cuda"
                ).to(torch.bfloat16)
                for _ in range(2)
            )
            writer.write_kv(layer, k, v)
    batch = StepBatch.build(slots, contexts, [q for _, q in shape], torch.device("cuda"))

    def rand(heads: int) -> torch.Tensor:
        shape = (batch.num_tokens, heads, HEAD_DIM)
        return torch.randn(shape, generator=generator, device="cuda").to(torch.bfloat16)

    return batch, rand(Q_HEADS), rand(KV_HEADS), rand(KV_HEADS)


def attend_all_layers(name: str, cache, batch, q, k, v) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    attention = backend(name, cache)
    attention.plan(batch)
    return [attention(layer, q, k, v) for layer in range(LAYERS)]


@pytest.mark.parametrize("kind", ["per_layer", "interleaved", "paged"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_flashinfer_reads_fp8_like_sdpa(kind: str, shape: str) -> None:
    needs_flashinfer()
    cache = build(kind)
    batch, q, k, v = step(cache, SHAPES[shape])
    paged = kind == "paged"
    expected = attend_all_layers("paged-sdpa" if paged else "sdpa", cache, batch, q, k, v)
    # The same new K/V again: the cache holds the same bytes when FlashInfer reads it.
    got = attend_all_layers("paged-flashinfer" if paged else "flashinfer", cache, batch, q, k, v)
    for layer, (out, ref) in enumerate(zip(got, expected)):
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2, msg=f"layer {layer}")
    # The stored bytes are quantize(new / scale): the write path on the device.
    if not paged:
        written = cache.k_cache(1)[batch.token_slots_t, batch.token_positions_t]
        assert written.dtype == FP8
        expected_bytes = quantize(k, SCALES.k[1]).view(torch.uint8)
        assert torch.equal(written.view(torch.uint8), expected_bytes)


@pytest.mark.parametrize("name", ["torch-fa2", "flash-attn"])
def test_backends_without_fp8_refuse_it(name: str) -> None:
    if not available(name, torch.device("cuda")):
        pytest.skip(f"{name} is not installed")
    with pytest.raises(ValueError, match="cannot read an fp8 KV cache"):
        backend(name, build("interleaved"))


def runner_logits(
    kv_mode: str,
    layout: str,
    attention: str,
    cuda_graphs: bool,
    kv_cache_dtype: str = "fp8",
    model: ModelConfig | None = None,
) -> tuple[list[torch.Tensor], int]:
    """A prefill, then decode steps of 5 sequences (graph of 8) and 3 (graph of 4), two of them
    long (16-token virtual pages in FlashInfer); logits of every step and the graph replays.
    ``model``: synthetic shapes (default: 4 layers of Llama-3-8B, vocabulary 32,000)."""
    lengths = [5, 2100, 37, 1, 3000]
    llm = LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=model or dataclasses.replace(small_llama(), vocab_size=32000),
            attention=attention,
            kv_mode=kv_mode,
            kv_layout=layout,
            kv_cache_dtype=kv_cache_dtype,
            max_running=8,
            max_model_len=4096,
            kv_cache_bytes=1 << 30,
            seed=7,
            cuda_graphs=cuda_graphs,
        )
    )
    runner, kv = llm.runner, llm.runner.kv
    assert (kv.k_cache(0).dtype == FP8) == (kv_cache_dtype == "fp8")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32000, (n,), generator=generator).tolist() for n in lengths]
    slots = [kv.acquire() for _ in prompts]
    for slot, prompt in zip(slots, prompts):
        kv.ensure(slot, len(prompt) + 8)
    rows = tuple(sum(lengths[: i + 1]) - 1 for i in range(len(prompts)))
    ids = tuple(t for p in prompts for t in p)
    logits = [runner.execute(StepPlan(tuple(slots), (0,) * 5, tuple(lengths), ids, rows)).clone()]
    for step in range(4):  # fixed next tokens: argmax may flip between kernels on a near tie
        live = slots if step < 2 else slots[:3]
        plan = StepPlan(
            tuple(live),
            tuple(lengths[: len(live)]),
            (1,) * len(live),
            tuple(1000 + 7 * step + i for i in range(len(live))),
            tuple(range(len(live))),
        )
        logits.append(runner.execute(plan).clone())
        lengths = [n + 1 for n in lengths[: len(live)]] + lengths[len(live) :]
    kv.synchronize()
    torch.cuda.synchronize()
    return logits, runner.graphs.replays if runner.graphs is not None else 0


@pytest.mark.parametrize(
    ("kv_mode", "layout", "attention", "reference"),
    [
        ("vattention", "per_layer", "flashinfer", "sdpa"),
        ("vattention", "interleaved", "flashinfer", "sdpa"),
        ("paged", "interleaved", "paged-flashinfer", "paged-sdpa"),
    ],
)
def test_fp8_engine_steps_in_graphs_match_eager_and_sdpa(
    kv_mode: str, layout: str, attention: str, reference: str
) -> None:
    needs_flashinfer()
    graphed, replays = runner_logits(kv_mode, layout, attention, cuda_graphs=True)
    torch.cuda.empty_cache()
    eager, _ = runner_logits(kv_mode, layout, attention, cuda_graphs=False)
    torch.cuda.empty_cache()
    expected, _ = runner_logits(kv_mode, layout, reference, cuda_graphs=False)
    assert replays == 2  # steps 0 and 2 capture (sizes 8 and 4); steps 1 and 3 replay
    assert_logits_close(tuple(graphed), tuple(eager))
    assert_logits_close(tuple(eager), tuple(expected))
