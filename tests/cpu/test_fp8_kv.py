"""The fp8 (e4m3) KV cache on the CPU: quantize / dequantize error bounds, the sdpa path (both
caches, every layout) against a float64 reference, twice the tokens per byte in the books the
scheduler and router read, and the engine generating with it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from replica import KVCacheAllocator, KVCacheConfig, SamplingParams, open_device
from replica.attention import StepBatch, make_attention_backend
from replica.attention.flashinfer_limits import choose_prefill_kernel
from replica.attention.fp8 import FP8_MAX, KVScales, dequantize, quantize
from replica.attention.paged import make_paged_attention_backend
from replica.attention.torch_fa2 import TorchFlashBackend
from replica.engine import LLMEngine
from replica.engine_config import EngineConfig
from replica.kv import PagedKVCache, PagedKVConfig
from replica.kv.config import resolve_kv_cache_dtype
from tests.cpu.test_model import make_hf_checkpoint
from tests.models import tiny_llm

FP8 = torch.float8_e4m3fn
Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 64, 2
#: Per-layer scales far from 1 in both directions: values are stored as x / scale.
SCALES = KVScales(k=(0.05, 2.0), v=(0.02, 0.5))


@pytest.mark.parametrize("scale", [1.0, 0.01, 3.0])
def test_round_trip_error_bounds(scale: float) -> None:
    """e4m3 keeps 3 mantissa bits: a normal value (|x / scale| in [2**-6, 448]) comes back within
    2**-4 of itself, relatively; a subnormal one within 2**-10 * scale; beyond 448 * scale it
    saturates, never NaN."""
    gen = torch.Generator().manual_seed(0)
    exponent = torch.empty(20_000).uniform_(-6, math.log2(FP8_MAX), generator=gen)
    sign = torch.randint(0, 2, (20_000,), generator=gen) * 2 - 1
    normal = sign * torch.exp2(exponent) * scale
    back = dequantize(quantize(normal, scale), scale, torch.float32)
    relative = ((back - normal).abs() / normal.abs()).max()
    assert relative <= 2**-4 + 1e-6
    assert relative > 2**-6  # it does quantize

    tiny = torch.empty(5_000).uniform_(-(2**-6), 2**-6, generator=gen) * scale
    back = dequantize(quantize(tiny, scale), scale, torch.float32)
    assert (back - tiny).abs().max() <= 2**-10 * scale * (1 + 1e-6)

    huge = torch.tensor([500.0, -1e6, 449.0, float(FP8_MAX)]) * scale
    stored = quantize(huge, scale)
    assert stored.dtype == FP8 and not stored.float().isnan().any()
    torch.testing.assert_close(
        dequantize(stored, scale, torch.float32), torch.tensor([1.0, -1.0, 1.0, 1.0]) * 448 * scale
    )


def test_scales_validate_and_calibrate() -> None:
    with pytest.raises(ValueError, match="2 K scales but 1 V"):
        KVScales((1.0, 1.0), (1.0,))
    for bad in (0.0, -1.0, float("inf"), float("nan"), "1"):
        with pytest.raises(ValueError, match=r"KVScales.v\[0\] must be a float > 0"):
            KVScales((1.0,), (bad,))  # type: ignore[arg-type]
    assert KVScales.unit(3) == KVScales((1.0,) * 3, (1.0,) * 3)
    calibrated = KVScales.from_amax([448.0, 0.0], [112.0, 896.0])
    assert calibrated == KVScales((1.0, 1.0), (0.25, 2.0))  # amax -> 448; amax 0 keeps 1.0
    x = torch.tensor([-896.0, 300.0])
    assert dequantize(quantize(x, 2.0), 2.0, torch.float32).tolist() == [
        -896.0,
        288.0,
    ]  # 150 -> 144


def reference_attention(
    q: torch.Tensor, keys: list[tuple[torch.Tensor, torch.Tensor]], batch: StepBatch
) -> torch.Tensor:
    """Float64 causal GQA attention; ``keys[i]``: sequence i's K and V [kv_len, kv_heads, dim]."""
    out, start = [], 0
    group = Q_HEADS // KV_HEADS
    for (k_seq, v_seq), context, query in zip(keys, batch.context_lens, batch.query_lens):
        q_seq = q[start : start + query].double()  # [query, q_heads, dim]
        k_seq = k_seq.double().repeat_interleave(group, 1)  # [kv_len, q_heads, dim]
        v_seq = v_seq.double().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q_seq, k_seq) / math.sqrt(HEAD_DIM)
        visible = torch.arange(k_seq.shape[0])[None, :] <= context + torch.arange(query)[:, None]
        probs = scores.masked_fill(~visible, -math.inf).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", probs, v_seq))
        start += query
    return torch.cat(out)


def make_cache(kind: str, dtype: torch.dtype) -> KVCacheAllocator | PagedKVCache:
    if kind == "paged":
        config = PagedKVConfig(LAYERS, KV_HEADS, HEAD_DIM, dtype, 4, 128, 64 * 16 * 1024)
        return PagedKVCache(config)
    device = open_device("host", 64 * 1024)
    return KVCacheAllocator(
        KVCacheConfig(
            LAYERS, KV_HEADS, HEAD_DIM, dtype, 4, 128, device.page_size, 64 * device.page_size,
            layout=kind,
        ),
        device,
    )  # fmt: skip


def make_sdpa(cache: KVCacheAllocator | PagedKVCache):  # type: ignore[no-untyped-def]
    make = (
        make_paged_attention_backend if isinstance(cache, PagedKVCache) else make_attention_backend
    )
    return make("sdpa", cache, Q_HEADS, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["interleaved", "per_layer", "paged"])
def test_sdpa_reads_fp8_cache_within_tolerance(kind: str) -> None:
    """Two steps through the engine's path (write_kv quantizes, attend dequantizes) with per-layer
    scales far from 1: a prefill of every sequence's context, then a mixed step (decodes, prefill
    chunks, a fresh prompt). The output equals float64 attention over the *round-tripped* K/V
    (the cache holds exactly quantize(x / scale)), and float64 attention over the exact K/V
    within fp8's error."""
    cache = make_cache(kind, FP8)
    backend = make_sdpa(cache)
    backend.set_kv_scales(SCALES)
    gen = torch.Generator().manual_seed(1)
    shape = [(0, 9), (5, 1), (33, 1), (20, 12)]  # (context, new tokens)
    slots = [cache.acquire() for _ in shape]
    for slot, (context, query) in zip(slots, shape):
        cache.ensure(slot, context + query)
    dense: dict[tuple[int, int], list[torch.Tensor]] = {}  # (slot, layer) -> [K, V] so far
    for step, (contexts, queries) in enumerate(
        [([0] * len(shape), [c for c, _ in shape]), ([c for c, _ in shape], [q for _, q in shape])]
    ):
        keep = [i for i, n in enumerate(queries) if n > 0]  # a sequence without context skips
        batch = StepBatch.build(
            [slots[i] for i in keep], [contexts[i] for i in keep], [queries[i] for i in keep],
            torch.device("cpu"),
        )  # fmt: skip
        backend.plan(batch)
        for layer in range(LAYERS):
            q, k, v = (
                torch.randn(batch.num_tokens, heads, HEAD_DIM, generator=gen) * spread
                for heads, spread in ((Q_HEADS, 1.0), (KV_HEADS, 1.0), (KV_HEADS, 1.0))
            )
            out = backend(layer, q, k, v)
            k_scale, v_scale = SCALES.k[layer], SCALES.v[layer]
            exact, rounded, start = [], [], 0
            for slot, query in zip(batch.slots, batch.query_lens):
                k_all, v_all = dense.get((slot, layer), (k[:0], v[:0]))
                k_all = torch.cat([k_all, k[start : start + query]])
                v_all = torch.cat([v_all, v[start : start + query]])
                dense[(slot, layer)] = [k_all, v_all]
                exact.append((k_all, v_all))
                rounded.append(
                    (
                        dequantize(quantize(k_all, k_scale), k_scale, torch.float32),
                        dequantize(quantize(v_all, v_scale), v_scale, torch.float32),
                    )
                )
                start += query
            torch.testing.assert_close(
                out.double(), reference_attention(q, rounded, batch), rtol=1e-5, atol=1e-5
            )
            error = (out.double() - reference_attention(q, exact, batch)).abs()
            # Each stored value is within 2**-4 of itself, relatively: a query seeing one key
            # returns that V (|V| < 4 here, so off by < 0.25); with more keys the errors average
            # out (measured: mean 0.011, max 0.145).
            assert error.mean() < 0.02 and error.max() < 0.25, (step, layer, error.max())


@pytest.mark.parametrize("kind", ["interleaved", "per_layer", "paged"])
def test_fp8_page_holds_twice_the_tokens_of_bf16(kind: str) -> None:
    """Derived from the element size: the same budget holds twice the tokens, and the books the
    scheduler and router read (pages_for, tokens_per_page, stats) say so. The vAttention page is
    ``page_size`` bytes: it holds twice the tokens, a request needs half the pages. The paged
    mode's page is a block of ``block_size`` tokens: half the bytes, twice the blocks."""
    bf16, fp8 = make_cache(kind, torch.bfloat16), make_cache(kind, FP8)
    assert fp8.token_capacity() == 2 * bf16.token_capacity()
    assert fp8.stats().tokens_per_page == fp8.tokens_per_page
    if kind == "paged":
        assert fp8.tokens_per_page == bf16.tokens_per_page == 16
        assert fp8.stats().page_size_bytes * 2 == bf16.stats().page_size_bytes
        assert fp8.budget_pages == 2 * bf16.budget_pages == 2 * bf16.stats().pages_total
    else:
        assert fp8.tokens_per_page == 2 * bf16.tokens_per_page
        assert fp8.stats().page_size_bytes == bf16.stats().page_size_bytes
        assert fp8.budget_pages == bf16.budget_pages
        assert fp8.pages_for(1024) * 2 == bf16.pages_for(1024)


def test_fp8_names_backends_and_prefill_kernel() -> None:
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) is FP8
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'int4'"):
        resolve_kv_cache_dtype("int4", torch.bfloat16)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        EngineConfig(kv_cache_dtype="fp16")
    cache = make_cache("interleaved", FP8)
    assert make_attention_backend(
        "auto", cache, Q_HEADS, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu")
    ).name == "sdpa"  # fmt: skip
    with pytest.raises(ValueError, match="torch-fa2 attention backend cannot read an fp8"):
        TorchFlashBackend(cache, Q_HEADS, KV_HEADS, HEAD_DIM)
    # Hopper's prefill does not build for bf16 q + e4m3 KV: fp8 prefills on fa2, however small.
    assert choose_prefill_kernel(1024, 256, 1024, fp8_kv=True, requested="fa3").backend == "fa2"
    assert choose_prefill_kernel(1024, 256, 1024, requested="fa3").backend == "auto"


def greedy(engine: LLMEngine, prompt: list[int], tokens: int) -> list[tuple[int, float, dict]]:
    """(token, logprob, {token: logprob} of the 5 likeliest) per generated token, greedily."""
    engine.add_request("r", prompt, SamplingParams(max_tokens=tokens, temperature=0, logprobs=5))
    out: list[tuple[int, float, dict]] = []
    while engine.has_work():
        for delta in engine.step():
            assert delta.error is None, delta.error
            top = delta.top_logprobs or ()
            out += [
                (t, lp, dict(alts))
                for t, lp, alts in zip(delta.token_ids, delta.logprobs or (), top)
            ]
    return out


@pytest.mark.parametrize("kv_mode", ["vattention", "paged"])
def test_engine_generates_with_fp8_cache(kv_mode: str, tmp_path: Path) -> None:
    """The engine generates with an fp8 cache (both modes) close to its float32 one: along the
    tokens both choose, the chosen tokens' logprobs agree, and where a greedy choice differs the
    float32 model's own top two were within a hair (fp8 only breaks near-ties). The routing stats
    count four times the tokens in the same budget (float32 -> one byte)."""
    make_hf_checkpoint("llama_gqa_tied", tmp_path)  # logits with some spread
    engines, capacity = {}, {}
    for kv_dtype in ("auto", "fp8"):
        engine = tiny_llm(tmp_path, kv_cache_dtype=kv_dtype, kv_mode=kv_mode).engine
        assert engine.runner.kv.k_cache(0).dtype == (FP8 if kv_dtype == "fp8" else torch.float32)
        engines[kv_dtype] = engine
        capacity[kv_dtype] = engine.routing_stats().tokens_per_page * engine.kv.budget_pages
    assert capacity["fp8"] == 4 * capacity["auto"]
    gen = torch.Generator().manual_seed(5)
    for prompt_len in (3, 17, 60):
        prompt = torch.randint(0, 131, (prompt_len,), generator=gen).tolist()
        ours, ref = greedy(engines["fp8"], prompt, 16), greedy(engines["auto"], prompt, 16)
        assert len(ours) == len(ref) == 16
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a[0] != b[0]), 16)
        for (_, logprob, _), (_, ref_logprob, _) in zip(ours[:same], ref[:same]):
            assert abs(logprob - ref_logprob) < 0.15  # measured: at most 0.066
        if same < 16:  # the float32 model, same inputs so far: fp8's choice was nearly its best
            best, alternatives = ref[same][1], ref[same][2]
            assert best - alternatives.get(ours[same][0], -math.inf) < 0.15
    for engine in engines.values():
        engine.kv.check_invariants()
