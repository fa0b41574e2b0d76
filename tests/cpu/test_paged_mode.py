"""The PagedAttention comparison mode on CPU: the paged-sdpa backend against a naive float64
reference; the engine in paged mode against vAttention mode token for token (greedy), also under
preemption and chunked prefill; the device block table written only where blocks were appended."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from replica import EngineConfig, RequestRejected, SamplingParams
from replica.attention import StepBatch
from replica.attention.paged import make_paged_attention_backend
from replica.kv import PagedKVCache, PagedKVConfig
from tests.attention.test_attention_backends import (
    DECODE,
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    MIXED,
    Q_HEADS,
    naive_attention,
)
from tests.models import tiny_llm

PROMPTS = [[5, 17, 33], [9] * 21 + [40, 2 + 1], [60, 61, 62, 63, 64, 65, 66, 67, 68], [100]]
# The tiny model's block: 16 tokens x 2 layers x 2 heads x 16 dims x 4 bytes x 2 (K, V) = 8 KiB.
TINY_BLOCK_BYTES = 16 * 2 * 2 * 16 * 4 * 2


# ---- the backend on its own ------------------------------------------------------------------
def build_cache(block_size: int, dtype: torch.dtype, device: str = "cpu") -> PagedKVCache:
    config = PagedKVConfig(
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype,
        max_slots=8,
        max_tokens=256,
        budget_bytes=0,
        block_size=block_size,
    )
    budget = 8 * config.tokens_per_slot * config.bytes_per_token  # every slot can be full
    return PagedKVCache(dataclasses.replace(config, budget_bytes=budget), device)


def token_rows(cache: PagedKVCache, slot: int, tokens: int) -> torch.Tensor:
    """Flat cache rows of tokens [0, tokens) of a slot, from its host block list."""
    size, blocks = cache.config.block_size, cache.block_ids(slot)
    rows = [blocks[t // size] * size + t % size for t in range(tokens)]
    return torch.tensor(rows, dtype=torch.int64, device=cache.device)


def gather(
    cache: PagedKVCache, layer: int, slot: int, tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = token_rows(cache, slot, tokens)
    return cache.k_cache(layer).flatten(0, 1)[rows], cache.v_cache(layer).flatten(0, 1)[rows]


def paged_step(cache: PagedKVCache, shape: list[tuple[int, int]], seed: int = 0):
    """Acquires slots (after a scattering acquire/release, so blocks are not in order), fills each
    context with random K/V through the block table, returns the batch and new q/k/v."""
    generator = torch.Generator().manual_seed(seed)
    device, dtype = cache.device, cache.config.dtype
    slots = [cache.acquire() for _ in shape]
    scatter = cache.acquire()
    cache.ensure(scatter, 3 * cache.config.block_size)
    for i, (slot, (context, query)) in enumerate(zip(slots, shape)):
        cache.ensure(slot, context + query)
        if i == 0:
            cache.release(scatter)  # later sequences take its blocks: lower ids than the first's
        rows = token_rows(cache, slot, context)
        for layer in range(LAYERS):
            for layer_cache in (cache.k_cache(layer), cache.v_cache(layer)):
                values = torch.randn(context, KV_HEADS, HEAD_DIM, generator=generator).to(
                    device, dtype
                )
                layer_cache.flatten(0, 1)[rows] = values
    batch = StepBatch.build(slots, [c for c, _ in shape], [q for _, q in shape], device)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(batch.num_tokens, heads, HEAD_DIM, generator=generator).to(device, dtype)

    return batch, rand(Q_HEADS), rand(KV_HEADS), rand(KV_HEADS)


def naive(cache: PagedKVCache, batch: StepBatch, q: torch.Tensor, layer: int = 1) -> torch.Tensor:
    keys = [
        gather(cache, layer, s, c + n)
        for s, c, n in zip(batch.slots, batch.context_lens, batch.query_lens)
    ]
    return naive_attention(q, keys, batch)


def new_rows(cache: PagedKVCache, batch: StepBatch) -> torch.Tensor:
    """Flat rows of the step's new tokens, from the host block lists."""
    rows = [
        token_rows(cache, s, c + q)[c:]
        for s, c, q in zip(batch.slots, batch.context_lens, batch.query_lens)
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_paged_sdpa_matches_naive_attention_and_writes_the_blocks(block_size: int, shape) -> None:
    cache = build_cache(block_size, torch.float32)
    batch, q, k, v = paged_step(cache, shape)
    backend = make_paged_attention_backend(
        "auto", cache, Q_HEADS, KV_HEADS, HEAD_DIM, torch.float32, cache.device
    )
    assert backend.name == "paged-sdpa"
    backend.plan(batch)
    out = backend(1, q, k, v)
    rows = new_rows(cache, batch)
    torch.testing.assert_close(backend.token_rows, rows)
    torch.testing.assert_close(cache.k_cache(1).flatten(0, 1)[rows], k)
    torch.testing.assert_close(cache.v_cache(1).flatten(0, 1)[rows], v)
    torch.testing.assert_close(out.double(), naive(cache, batch, q), rtol=1e-5, atol=1e-5)


def test_backend_and_mode_names_are_checked() -> None:
    cache = build_cache(16, torch.float32)
    with pytest.raises(ValueError, match="unknown paged attention backend 'torch-fa2'"):
        make_paged_attention_backend(
            "torch-fa2", cache, 1, 1, 8, torch.float32, torch.device("cpu")
        )
    with pytest.raises(ValueError, match="unavailable on cpu"):
        make_paged_attention_backend(
            "flashinfer", cache, 1, 1, 8, torch.float32, torch.device("cpu")
        )
    with pytest.raises(ValueError, match="kv_mode must be 'vattention' or 'paged'"):
        EngineConfig(kv_mode="blocks")
    with pytest.raises(ValueError, match="block_size must be positive"):
        EngineConfig(kv_mode="paged", block_size=0)


# ---- the engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vattention_outputs(tiny_dir: Path) -> list[tuple[int, ...]]:
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    return [o.token_ids for o in tiny_llm(tiny_dir).generate(PROMPTS, params)]


@pytest.mark.parametrize("block_size", [16, 5])
def test_paged_mode_matches_vattention_token_for_token(
    tiny_dir: Path, vattention_outputs, block_size: int
) -> None:
    llm = tiny_llm(tiny_dir, kv_mode="paged", block_size=block_size)
    kv = llm.engine.kv
    assert isinstance(kv, PagedKVCache) and llm.engine.runner.attention.name == "paged-sdpa"
    assert (
        kv.config.num_blocks * kv.config.page_size
        <= 256 * 4096
        < (kv.config.num_blocks + 1) * kv.config.page_size
    )
    # What the router scrapes: tokens per physical page is the block size.
    assert kv.tokens_per_page == kv.stats().tokens_per_page == block_size
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outputs] == vattention_outputs
    stats = llm.engine.stats().kv
    assert (
        stats.slots_running == 0
        and stats.pages_in_use == 0
        and stats.pages_free + stats.pages_cached == kv.config.num_blocks  # cached: prefixes
    )
    kv.check_invariants(deep=True)


def test_paged_mode_preempts_and_chunks_prefill_with_identical_outputs(
    tiny_dir: Path, vattention_outputs
) -> None:
    # 5 blocks back 80 tokens in all, far below 4 x ~60 tokens; 8 tokens a step chunk the prompts.
    small = tiny_llm(
        tiny_dir, kv_mode="paged", kv_cache_bytes=5 * TINY_BLOCK_BYTES, max_batch_tokens=8
    )
    assert small.engine.kv.config.num_blocks == 5
    outputs = small.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert small.engine.stats().preemptions_total > 0
    assert [o.token_ids for o in outputs] == vattention_outputs
    kv = small.engine.stats().kv
    assert kv.slots_running == 0 and kv.pages_in_use == 0 and kv.wasted_bytes == 0
    small.engine.kv.check_invariants(deep=True)


def test_paged_mode_rejects_what_the_whole_pool_cannot_hold(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir, kv_mode="paged", kv_cache_bytes=4 * TINY_BLOCK_BYTES)
    with pytest.raises(RequestRejected, match="70 tokens need 5 KV pages; the whole cache has 4"):
        llm.engine.add_request("big", [5] * 50, SamplingParams(max_tokens=20))


def test_block_table_is_written_incrementally(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir, kv_mode="paged", block_size=4)
    engine, kv = llm.engine, llm.engine.kv
    assert isinstance(kv, PagedKVCache)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:2]):  # 3 and 23 tokens: they cross blocks on the same steps
        engine.add_request(f"r{i}", prompt, params)
    steps = quiet_steps = 0
    while engine.has_work():
        before = kv.block_table().clone()
        held = {
            r.slot: len(kv.block_ids(r.slot))
            for r in engine.running_requests()
            if r.slot is not None
        }
        written, allocated = kv.table_entries_written, kv.blocks_allocated_total
        engine.step()
        after = kv.block_table().clone()
        appended = kv.blocks_allocated_total - allocated
        assert kv.table_entries_written - written == appended  # each appended block written once
        for slot, column in (after != before).nonzero().tolist():
            assert column >= held.get(slot, 0), (
                f"slot {slot}: column {column} rewritten, not appended"
            )
        steps += 1
        quiet_steps += appended == 0
    # 4-token blocks: the prefill step appends 1 + 6 blocks, then each request one block every
    # fourth decode step (8 of the 29); the other steps touch no table entry and copy nothing
    # (nor does, with asynchronous scheduling, the last call, which only reads the last tokens).
    extra = int(engine.async_scheduling)
    assert (
        steps == 30 + extra
        and quiet_steps == 21 + extra
        and kv.table_flushes == steps - quiet_steps
    )
    assert kv.table_entries_written == kv.blocks_allocated_total == 1 + 6 + 2 * 8
