"""Prefix sharing on the GPU: an aliased page is one physical allocation mapped at two addresses
(asked of the driver through cuda-python, not our extension) and shows the same bytes through both
slots; the engine gives the same tokens with the prefix cache on and off; the allocator's state
machine with share/continue/evict runs on the CUDA backend in tests/allocator (``-m gpu``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from replica import LLM, KVCacheAllocator, KVCacheConfig, SamplingParams, open_device
from replica.model import ModelConfig

pytestmark = pytest.mark.gpu

MIB = 1024 * 1024


def allocator(layout: str) -> KVCacheAllocator:
    config = KVCacheConfig(
        num_layers=4,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        max_slots=8,
        max_tokens=4096,
        page_size=2 * MIB,
        budget_bytes=512 * MIB,
        layout=layout,
        eager_pages=0,
        prefix_cache=True,
    )
    return KVCacheAllocator(config, open_device("cuda"))


def allocation_of(address: int) -> int:
    """The driver's handle of the physical allocation mapped at ``address`` (retained and
    released again, so the count is unchanged)."""
    driver = pytest.importorskip("cuda.bindings.driver", reason="cuda-python is not installed")
    result, handle = driver.cuMemRetainAllocationHandle(address)
    assert result == driver.CUresult.CUDA_SUCCESS, result
    (released,) = driver.cuMemRelease(handle)
    assert released == driver.CUresult.CUDA_SUCCESS
    return int(handle)


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_an_aliased_page_is_one_allocation_at_two_addresses(layout: str) -> None:
    cache = allocator(layout)
    per_group = cache.config.tokens_per_group  # interleaved: 128 tokens a 2 MiB page here
    prompt = [int(t) for t in torch.randint(0, 1000, (2 * per_group + 5,))]
    first = cache.acquire(0, prompt)
    cache.ensure(first, len(prompt))
    k = cache.k_cache(1)
    k[first, : len(prompt)].normal_()
    cache.wait(cache.step_async({first: len(prompt)}))  # the step that wrote the prompt
    second = cache.acquire(0, [*prompt[: 2 * per_group + 1], 7])
    assert cache.length(second) == 2 * per_group
    cache.synchronize()
    torch.cuda.synchronize()
    assert torch.equal(k[second, : 2 * per_group], k[first, : 2 * per_group])
    page = cache.config.page_size
    per_slot = cache.config.pages_per_slot
    for reservation in cache.reservations:
        ids = reservation.page_ids()
        for j in range(2):
            a = reservation.base + (first * per_slot + j) * page
            b = reservation.base + (second * per_slot + j) * page
            assert ids[first * per_slot + j] == ids[second * per_slot + j]
            assert allocation_of(a) == allocation_of(b)  # the same physical memory
    cache.ensure(second, 2 * per_group + 2)  # its own page from the third on
    reservation = cache.reservations[0]
    third = reservation.base + (second * per_slot + 2) * page
    assert allocation_of(third) != allocation_of(reservation.base + (first * per_slot + 2) * page)
    k[second, 2 * per_group : 2 * per_group + 2].fill_(3.0)
    torch.cuda.synchronize()
    assert not bool((k[first, 2 * per_group : 2 * per_group + 2] == 3.0).all())
    cache.check_invariants(deep=True)


def chat(llm: LLM, system: list[int], turns: int = 3) -> tuple[list[list[int]], int]:
    """Four conversations over one system prompt, each turn's prompt the whole history."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    histories = [[*system, 100 + i, 200 + i] for i in range(4)]
    answers, cached = [], 0
    for turn in range(turns):
        for history, completion in zip(histories, llm.generate(histories, params)):
            answers.append(list(completion.token_ids))
            cached += completion.cached_tokens
            history += [*completion.token_ids, 300 + turn]
    return answers, cached


@pytest.mark.parametrize(
    "config",
    [
        {"attention": "sdpa", "dtype": "float32"},
        {"attention": "sdpa", "dtype": "float32", "kv_mode": "paged"},
        {"attention": "auto"},
        {"attention": "auto", "kv_mode": "paged"},
    ],
    ids=["sdpa-fp32", "paged-sdpa-fp32", "auto-bf16", "paged-auto-bf16"],
)
def test_engine_tokens_are_identical_with_the_prefix_cache_on_and_off(
    config: dict[str, object],
) -> None:
    """A Llama-3-8B-shaped model of 4 layers (random weights; interleaved pages of whole tokens:
    64 in fp32, 128 in bf16). NOTE: a cached prefix's K/V were computed in another batch shape
    than when recomputed; a mismatch in the bf16 cases only would be numerics (near-ties of a
    random model), in the fp32 ones a bug."""
    shape = dataclasses.replace(ModelConfig.llama3_8b(), num_layers=4)
    system = [int(t) for t in torch.randint(10, 1000, (600,), generator=torch.Generator())]
    common = dict(
        model="synthetic",
        synthetic=shape,
        seed=3,
        kv_layout="interleaved",
        max_model_len=2048,
        max_running=8,
        kv_cache_bytes=4 << 30,
        **config,
    )
    off, _ = chat(LLM(prefix_cache=False, **common), system)
    on_llm = LLM(prefix_cache=True, **common)
    on, cached = chat(on_llm, system)
    assert cached > 0 and on_llm.engine.stats().kv.prefix_hits_tokens >= cached
    assert on == off
    on_llm.engine.kv.check_invariants(deep=True)
