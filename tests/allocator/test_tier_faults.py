"""A host-tier copy that raises (``replica.kv.tier_faults``), in both caches: a failed restore
(the vAttention cache's is deferred to the slot's first waited ensure, which raises
KVRestoreFailed) leaves the request its device hit only, the blocks are computed instead and
never indexed, and their keys leave the tier; a failed offload leaves its blocks out of the tier
and the release completes; one warning each, and the books hold (host backend; CUDA under
``gpu``). Faults are injected where the copy is made (``TierFaults.inject``, called just before
it)."""

from __future__ import annotations

import pytest
import torch

from replica import KVCacheAllocator
from replica.kv.base import KVRestoreFailed
from replica.kv.paged import PagedKVCache
from replica.kv.tier_faults import TierFaults
from replica.vmm import Device
from tests.allocator.conftest import TOKENS_PER_PAGE, MakeAllocator
from tests.allocator.test_host_tier import evict_everything, paged_tiered, tiered
from tests.allocator.test_prefix_copies import cached_conversation, expected
from tests.allocator.test_prefix_sharing import fill, k_values

T = TOKENS_PER_PAGE
LOGGER = "replica.kv.tier_faults"


def fail(direction: str, times: int = 1_000_000) -> tuple[list[str], object]:
    """An ``inject`` that raises in ``direction``'s first ``times`` copies, as torch reports a
    CUDA error; returns the copies it failed, too."""
    failed: list[str] = []

    def inject(copy: str) -> None:
        if copy == direction and len(failed) < times:
            failed.append(copy)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    return failed, inject


def faults_of(cache: KVCacheAllocator | PagedKVCache) -> TierFaults:
    assert cache.tier_faults is not None
    return cache.tier_faults


# ---- the vAttention cache ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_a_failed_restore_computes_the_blocks_and_drops_their_keys(
    make_allocator: MakeAllocator, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    ranges = 4 if layout == "per_layer" else 1
    allocator = tiered(make_allocator, layout=layout, budget_pages=8 * ranges)
    history = list(range(3 * T + 5))
    cached_conversation(allocator, history)  # three blocks written through
    evict_everything(allocator, filler=7)
    turn = [*history, 11, 12]
    failed, faults_of(allocator).inject = fail("restore")
    slot = allocator.acquire(len(turn), turn)
    assert not failed and allocator.length(slot) == 3 * T  # decided; copied at the first ensure
    with caplog.at_level("WARNING", logger=LOGGER):
        with pytest.raises(KVRestoreFailed) as raised:
            allocator.ensure(slot, len(turn))
    assert failed == ["restore"]  # the copy was made, and raised
    assert raised.value.kept_tokens == 0  # nothing restored: the request computes its prompt
    assert allocator.length(slot) == len(turn)  # the ensure itself completed
    stats = allocator.stats()
    assert stats.host_restored_bytes == stats.prefix_host_hits_tokens == 0
    assert stats.host_tier_used_bytes == 0  # the three keys whose copy raised left the tier
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "restore copy raised" in caplog.records[0].message
    allocator.check_invariants(deep=True)
    # No later acquire gets those blocks: neither indexed on the device nor in the tier.
    assert allocator.cached_tokens(turn) == 0
    faults_of(allocator).inject = lambda copy: None
    other = allocator.acquire(len(turn), turn)
    assert allocator.length(other) == 0
    allocator.release(other, [])
    fill(allocator, slot, turn, start=0)  # the prefill writes every token, the copy's included
    assert k_values(allocator, slot, len(turn)) == expected(turn, len(turn))
    allocator.check_invariants(deep=True)


def test_a_failed_restore_keeps_the_device_hit(make_allocator: MakeAllocator) -> None:
    """The device holds the prompt's first block, the tier its next two: a failed restore leaves
    the slot the device's block, and the request computes from there."""
    allocator = tiered(make_allocator)
    history = list(range(3 * T + 5))
    cached_conversation(allocator, history)
    evict_everything(allocator, filler=7)
    cached_conversation(allocator, [*history[:T], 99])  # block 0 back on the device
    assert allocator.cached_tokens([*history, 1]) == T
    failed, faults_of(allocator).inject = fail("restore")
    slot = allocator.acquire(len(history) + 1, [*history, 1])
    assert allocator.length(slot) == 3 * T
    with pytest.raises(KVRestoreFailed) as raised:
        allocator.ensure(slot, 3 * T)
    assert failed and raised.value.kept_tokens == T
    assert allocator.cached_tokens([*history, 1]) == T  # the failed blocks are not indexed
    assert k_values(allocator, slot, T) == expected(history, T)
    assert allocator.stats().host_tier_used_bytes == allocator.config.block_bytes  # block 0
    fill(allocator, slot, [*history, 1], start=T)
    assert k_values(allocator, slot, len(history)) == expected(history, len(history))
    allocator.check_invariants(deep=True)


def test_a_failed_offload_leaves_its_blocks_out_of_the_tier(
    make_allocator: MakeAllocator, caplog: pytest.LogCaptureFixture
) -> None:
    allocator = tiered(make_allocator)
    history = list(range(2 * T + 3))
    failed, faults_of(allocator).inject = fail("offload", times=1)
    with caplog.at_level("WARNING", logger=LOGGER):
        cached_conversation(allocator, history)  # the release completes
    assert failed == ["offload"] and len(caplog.records) == 1
    assert "offload copy raised" in caplog.records[0].message
    stats = allocator.stats()
    assert stats.slots_running == 0 and stats.host_tier_used_bytes == 0
    assert stats.host_offloaded_bytes == 0
    allocator.check_invariants(deep=True)
    evict_everything(allocator, filler=7)
    slot = allocator.acquire(len(history) + 1, [*history, 1])
    assert allocator.length(slot) == 0  # never claimed as stored: nothing comes back
    fill(allocator, slot, [*history, 1])
    allocator.release(slot, [*history, 1])  # the next offload works: the blocks are stored
    assert allocator.stats().host_tier_used_bytes == 2 * allocator.config.block_bytes
    allocator.check_invariants(deep=True)


def test_a_fault_outside_the_copy_errors_is_a_bug_and_propagates(
    make_allocator: MakeAllocator,
) -> None:
    allocator = tiered(make_allocator)

    def broken(copy: str) -> None:
        raise KeyError("a host block lost its key")

    faults_of(allocator).inject = broken
    with pytest.raises(KeyError):
        cached_conversation(allocator, list(range(2 * T + 3)))


# ---- the paged mode ------------------------------------------------------------------------------
def paged(device: torch.device) -> PagedKVCache:
    return PagedKVCache(paged_tiered(), device)


def paged_fill(cache: PagedKVCache, slot: int, prompt: list[int]) -> None:
    """Computes the prompt's uncached tokens into layer 0's K (t * 1000 + p) and books the step."""
    start = cache.length(slot)
    cache.ensure(slot, len(prompt))
    blocks = cache.block_ids(slot)
    for position in range(start, len(prompt)):
        block, row = divmod(position, T)
        cache.k_cache(0)[blocks[block], row] = prompt[position] * 1000.0 + position
    cache.wait(cache.step_async({slot: len(prompt)}))


def paged_k(cache: PagedKVCache, slot: int, tokens: int) -> list[float]:
    blocks = list(cache.block_ids(slot))
    return cache.k_cache(0)[blocks].reshape(-1, 8)[:tokens, 0].cpu().tolist()


def paged_conversation(cache: PagedKVCache, prompt: list[int]) -> None:
    slot = cache.acquire(len(prompt), prompt)
    paged_fill(cache, slot, prompt)
    cache.release(slot, prompt)


def paged_evict(cache: PagedKVCache) -> None:
    slot = cache.acquire(0, [])
    cache.ensure(slot, cache.config.tokens_per_slot)  # every block: the cached ones are taken
    cache.release(slot, [])


def test_the_paged_mode_gives_a_failed_restores_blocks_back(kv_device: Device) -> None:
    cache = paged(kv_device.torch_device)
    history = list(range(3 * T + 5))
    paged_conversation(cache, history)
    paged_evict(cache)
    available = cache.reclaimable_pages()
    turn = [*history, 11]
    failed, faults_of(cache).inject = fail("restore")
    slot = cache.acquire(len(turn), turn)
    assert failed and cache.length(slot) == 0 and cache.block_ids(slot) == ()
    assert cache.reclaimable_pages() == available  # the fresh blocks went back
    stats = cache.stats()
    assert stats.host_tier_used_bytes == stats.prefix_host_hits_tokens == 0
    cache.check_invariants(deep=True)
    assert cache.cached_tokens(turn) == 0
    paged_fill(cache, slot, turn)
    assert paged_k(cache, slot, len(turn)) == expected(turn, len(turn))
    cache.check_invariants(deep=True)


def test_the_paged_mode_leaves_a_failed_offloads_blocks_out(kv_device: Device) -> None:
    cache = paged(kv_device.torch_device)
    history = list(range(3 * T + 5))
    failed, faults_of(cache).inject = fail("offload", times=1)
    paged_conversation(cache, history)
    assert failed and cache.stats().host_tier_used_bytes == 0
    cache.check_invariants(deep=True)
    paged_evict(cache)
    slot = cache.acquire(len(history) + 1, [*history, 1])
    assert cache.length(slot) == 0
    cache.release(slot, [])
    cache.check_invariants(deep=True)
