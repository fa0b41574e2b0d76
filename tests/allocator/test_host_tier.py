"""The host tier of the vAttention cache: a released slot's blocks are written through to host
memory, a prompt whose next blocks were evicted from the device gets them copied back instead of
computed, the tier evicts its least recently used blocks, and its copies pin their pages until
their fences (host backend; CUDA under ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from replica import KVCacheAllocator
from replica.kv import host_tier
from replica.kv.paged import PagedKVCache
from replica.kv.paged_config import PagedKVConfig
from replica.vmm import Device
from tests.allocator.conftest import TOKENS_PER_PAGE, MakeAllocator
from tests.allocator.test_prefix_copies import ManualFence, cached_conversation, expected
from tests.allocator.test_prefix_sharing import fill, k_values, make, page_ids

T = TOKENS_PER_PAGE


def tiered(
    make_allocator: MakeAllocator, host_blocks: int = 16, **overrides: object
) -> KVCacheAllocator:
    settings: dict[str, object] = dict(max_slots=2, budget_pages=8, layout="interleaved")
    settings.update(overrides)
    probe = make(make_allocator, **settings)
    block = probe.config.block_bytes * probe.config.num_ranges
    return make(make_allocator, host_tier_bytes=host_blocks * block, **settings)


def evict_everything(allocator: KVCacheAllocator, filler: int) -> None:
    """A request that grows into every page, reclaiming every released slot's, then ends."""
    tokens = allocator.config.budget_pages // allocator.config.num_ranges * T
    prompt = [filler] * min(tokens, allocator.config.tokens_per_slot)
    slot = allocator.acquire(len(prompt), prompt)
    fill(allocator, slot, prompt, step=False)
    allocator.release(slot, [])


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_an_evicted_conversation_comes_back_from_the_host(
    make_allocator: MakeAllocator, layout: str
) -> None:
    ranges = 4 if layout == "per_layer" else 1
    allocator = tiered(make_allocator, layout=layout, budget_pages=8 * ranges)
    history = list(range(3 * T + 5))
    cached_conversation(allocator, history)  # three full blocks written through
    block = allocator.config.block_bytes * allocator.config.num_ranges
    assert allocator.stats().host_offloaded_bytes == 3 * block
    evict_everything(allocator, filler=7)
    turn = [*history, 11, 12]
    assert allocator.cached_tokens(turn) == 0  # nothing of it on the device
    slot = allocator.acquire(len(turn), turn)
    assert allocator.length(slot) == 3 * T  # restored, not computed
    stats = allocator.stats()
    assert stats.host_restored_bytes == 3 * block and stats.prefix_host_hits_tokens == 3 * T
    assert stats.prefix_hits_tokens == 3 * T
    assert k_values(allocator, slot, 3 * T) == expected(history, 3 * T)
    fill(allocator, slot, turn)
    assert k_values(allocator, slot, len(turn)) == expected(turn, len(turn))
    allocator.check_invariants(deep=True)


def test_a_next_turn_writes_through_only_its_new_blocks(make_allocator: MakeAllocator) -> None:
    allocator = tiered(make_allocator)
    history = list(range(2 * T + 3))
    cached_conversation(allocator, history)
    block = allocator.config.block_bytes * allocator.config.num_ranges
    assert allocator.stats().host_offloaded_bytes == 2 * block
    turn = [*history, *range(100, 100 + T)]
    slot = allocator.acquire(len(turn), turn)  # continues in place: two blocks cached
    fill(allocator, slot, turn)
    allocator.release(slot, turn)
    assert allocator.stats().host_offloaded_bytes == 3 * block  # one new full block


def test_a_full_tier_evicts_its_least_recently_used_blocks(make_allocator: MakeAllocator) -> None:
    allocator = tiered(make_allocator, host_blocks=4, max_slots=3, budget_pages=12)
    old = [5] * (2 * T + 1)
    cached_conversation(allocator, old)
    newer = [6] * (3 * T + 1)
    cached_conversation(allocator, newer)  # 2 + 3 blocks > 4: one of the old ones goes
    evict_everything(allocator, filler=9)
    assert allocator.stats().host_tier_used_bytes == 4 * allocator.config.block_bytes
    # The old conversation's first block is still there (a chain leaves from its end).
    slot = allocator.acquire(len(old) + 1, [*old, 1])
    assert allocator.length(slot) == T
    assert k_values(allocator, slot, T) == expected(old, T)
    allocator.release(slot, [])
    slot = allocator.acquire(len(newer) + 1, [*newer, 1])
    assert allocator.length(slot) == 3 * T
    allocator.check_invariants(deep=True)


@pytest.mark.parametrize("copy", ["offload", "restore"])
def test_a_host_copy_pins_its_pages_until_its_fence_completes(
    make_allocator: MakeAllocator, copy: str
) -> None:
    """A reclaim that would unmap the pages a host copy reads (offload) or writes (restore)
    first waits for the copy's fence, and the pages are still mapped when it does."""
    fences: list[ManualFence] = []
    seen: dict[int, list[int]] = {}  # fence -> the page ids mapped when it was waited on
    allocator: KVCacheAllocator

    def make_fence() -> ManualFence:
        number = len(fences)
        fences.append(ManualFence(lambda: seen.setdefault(number, mapped_now())))
        return fences[-1]

    def mapped_now() -> list[int]:
        return list(allocator.reservations[0].page_ids())

    allocator = tiered(make_allocator, make_fence=make_fence)
    history = list(range(2 * T + 3))
    slot = cached_conversation(allocator, history)
    if copy == "restore":
        fences[-1].complete = True
        evict_everything(allocator, filler=7)
        slot = allocator.acquire(len(history) + 1, [*history, 1])
        assert allocator.length(slot) == 2 * T
        allocator.release(slot, history[: 2 * T])
    pinned = fences[-1]
    assert not pinned.waited
    mapped = page_ids(allocator, slot)[:2]
    evict_everything(allocator, filler=8)  # reclaims the slot's pages
    assert pinned.waited, "the reclaim did not wait for the host copy"
    per_slot = allocator.config.pages_per_slot
    at_wait = seen[fences.index(pinned)][slot * per_slot : slot * per_slot + 2]
    assert at_wait == mapped, "the pinned pages were unmapped before the copy's fence"
    allocator.check_invariants(deep=True)


def test_blocks_straddling_pages_come_back_too(make_allocator: MakeAllocator) -> None:
    allocator = tiered(make_allocator, prefix_block_tokens=24, budget_pages=10, max_tokens=10 * T)
    history = list(range(5 * T + 3))  # three 24-token blocks over four pages
    cached_conversation(allocator, history)
    evict_everything(allocator, filler=7)
    slot = allocator.acquire(len(history) + 1, [*history, 1])
    assert allocator.length(slot) == 72
    assert k_values(allocator, slot, 72) == expected(history, 72)
    allocator.check_invariants(deep=True)


def test_a_run_crossing_pinned_chunks_is_copied_in_pieces(
    make_allocator: MakeAllocator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host blocks are pinned in chunks; consecutive ids across a chunk's end are two copies."""
    monkeypatch.setattr(host_tier, "CHUNK_BLOCKS", 2)
    allocator = tiered(make_allocator, host_blocks=6, budget_pages=10, max_tokens=10 * T)
    history = list(range(5 * T + 3))  # five blocks: host blocks 0-1, 2-3, 4
    cached_conversation(allocator, history)
    evict_everything(allocator, filler=7)
    slot = allocator.acquire(len(history) + 1, [*history, 1])
    assert allocator.length(slot) == 5 * T
    assert k_values(allocator, slot, 5 * T) == expected(history, 5 * T)
    allocator.check_invariants(deep=True)


def test_the_paged_mode_gathers_blocks_to_the_host_and_scatters_them_back(
    kv_device: Device,
) -> None:
    """The comparison mode's tier: the same write-through and restore at block granularity,
    one copy per block and layer's K and V; a restored prompt reads the values it stored."""
    fences: list[ManualFence] = []

    def make_fence() -> ManualFence:
        fences.append(ManualFence(lambda: None))
        return fences[-1]

    config = PagedKVConfig(
        num_layers=2,
        num_kv_heads=1,
        head_dim=8,
        dtype=torch.float32,
        max_slots=2,
        max_tokens=8 * T,
        budget_bytes=8 * 2 * 2 * T * 8 * 4,  # 8 blocks
        block_size=T,
        prefix_cache=True,
        host_tier_bytes=16 * 2 * 2 * T * 8 * 4,  # 16 blocks
    )
    cache = PagedKVCache(config, kv_device.torch_device, make_fence=make_fence)
    history = list(range(3 * T + 5))
    slot = cache.acquire(len(history), history)
    cache.ensure(slot, len(history))
    values = torch.tensor(expected(history, len(history)), device=kv_device.torch_device)
    for layer in range(2):
        blocks = cache.block_ids(slot)
        flat = cache.k_cache(layer)[list(blocks)].view(-1, 8)
        flat[: len(history), 0] = values + layer
        cache.k_cache(layer)[list(blocks)] = flat.view(len(blocks), T, 1, 8)
    cache.release(slot, history)
    assert cache.stats().host_offloaded_bytes == 3 * config.page_size
    pinned = fences[-1]
    other = cache.acquire(8 * T, [7] * (8 * T))
    cache.ensure(other, 8 * T)  # every block: the history's are taken after the fence
    assert pinned.waited
    cache.release(other, [])
    turn = [*history, 11]
    assert cache.cached_tokens(turn) == 0
    slot = cache.acquire(len(turn), turn)
    assert cache.length(slot) == 3 * T
    assert cache.stats().prefix_host_hits_tokens == 3 * T
    for layer in range(2):
        blocks = list(cache.block_ids(slot))
        got = cache.k_cache(layer)[blocks].reshape(-1, 8)[: 3 * T, 0]
        assert got.cpu().tolist() == (values[: 3 * T] + layer).cpu().tolist()
    cache.check_invariants(deep=True)


def test_pinned_memory_refused_stops_the_tier_growing_with_one_warning(
    make_allocator: MakeAllocator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The host refuses the tier's first chunk: the tier stays empty, says so once, and the
    cache serves on without it."""
    real_empty = torch.empty

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        if kwargs.get("dtype") is torch.uint8:
            raise RuntimeError("cudaHostAlloc: out of memory")
        return real_empty(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(host_tier.torch, "empty", refuse)
    allocator = tiered(make_allocator)
    history = list(range(2 * T + 3))
    with caplog.at_level("WARNING", logger="replica.kv.host_tier"):
        cached_conversation(allocator, history)
        cached_conversation(allocator, [5] * (2 * T + 3))
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "stays at 0 blocks" in caplog.records[0].message
    stats = allocator.stats()
    assert stats.host_tier_bytes == stats.host_offloaded_bytes == 0
    slot = allocator.acquire(len(history) + 1, [*history, 1])
    fill(allocator, slot, [*history, 1])
    allocator.check_invariants(deep=True)
