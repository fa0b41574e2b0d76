"""The host tier of the vAttention cache: a released slot's blocks are written through to host
memory, a prompt whose next blocks were evicted from the device gets them copied back instead of
computed, the tier evicts its least recently used blocks, and its copies pin their pages until
their fences (host backend; CUDA under ``gpu``)."""

from __future__ import annotations

import gc

import pytest
import torch

from replica import KVCacheAllocator
from replica.kv import host_copies, host_tier
from replica.kv.paged import PagedKVCache
from replica.kv.paged_config import PagedKVConfig
from replica.vmm import Device
from tests.allocator.conftest import TOKENS_PER_PAGE, MakeAllocator
from tests.allocator.test_prefix_copies import ManualFence, cached_conversation, expected
from tests.allocator.test_prefix_sharing import fill, k_values, make, page_ids

T = TOKENS_PER_PAGE
CHUNK = host_tier.CHUNK_BLOCKS


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
    # Deferred: nothing copied nor indexed until the slot's first waited ensure.
    assert allocator.restoring_tokens(slot) == 3 * T and allocator.cached_tokens(turn) == 0
    assert allocator.stats().host_restored_bytes == 0
    allocator.ensure(slot, 3 * T)
    assert allocator.restoring_tokens(slot) == 0 and allocator.cached_tokens(turn) == 3 * T
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
    allocator.ensure(slot, T)
    assert k_values(allocator, slot, T) == expected(old, T)
    allocator.release(slot, [])
    slot = allocator.acquire(len(newer) + 1, [*newer, 1])
    assert allocator.length(slot) == 3 * T
    allocator.check_invariants(deep=True)


def test_a_restore_under_pressure_rewrites_a_released_slots_pages_instead_of_mapping(
    make_allocator: MakeAllocator,
) -> None:
    """No free page is left and a free slot is: a conversation coming back from the host lands
    in the least recently released slot that maps pages and is copied into them (no map at
    all), rather than in the free slot, whose growth would unmap and map every page. What that
    slot cached was written through, so it comes back from the host in its turn."""
    allocator = tiered(make_allocator, max_slots=3)
    history = list(range(3 * T + 5))
    cached_conversation(allocator, history)
    filler = [7] * (8 * T - 1)  # every page, the history's reclaimed
    held = cached_conversation(allocator, filler)
    assert allocator.stats().pages_free == 0 and allocator.cached_tokens(history) == 0
    mapped = allocator.stats().pages_mapped_total
    turn = [*history, 11, 12]
    slot = allocator.acquire(len(turn), turn)
    assert slot == held  # not the free slot
    allocator.ensure(slot, len(turn))
    assert allocator.stats().pages_mapped_total == mapped  # nothing mapped
    assert k_values(allocator, slot, 3 * T) == expected(history, 3 * T)
    fill(allocator, slot, turn)
    allocator.release(slot, turn)
    again = allocator.acquire(len(filler) + 1, [*filler, 1])  # the filler, from the host
    assert allocator.length(again) == 7 * T
    allocator.ensure(again, 7 * T)
    assert k_values(allocator, again, 7 * T) == expected(filler, 7 * T)
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

    allocator = tiered(make_allocator, make_fence=make_fence, max_slots=3)
    every = allocator.config.budget_pages * T

    def running() -> int:  # a request that will grow while the others are released
        slot = allocator.acquire(T, [3] * T)
        allocator.ensure(slot, T)
        return slot

    grower = running()
    history = list(range(2 * T + 3))
    if copy == "offload":
        slot = cached_conversation(allocator, history)
    else:
        evicter = running()
        cached_conversation(allocator, history)
        fences[-1].complete = True
        allocator.ensure(evicter, every - T)  # reclaims the history's pages: host only
        allocator.release(evicter, [])
        fences[-1].complete = True
        slot = allocator.acquire(len(history) + 1, [*history, 1])  # the evicter's pages
        assert allocator.length(slot) == 2 * T
        allocator.ensure(slot, 2 * T)  # copies the restore
        allocator.release(slot, history[: 2 * T])
    pinned = fences[-1]
    assert not pinned.waited
    mapped = page_ids(allocator, slot)[:2]
    allocator.ensure(grower, every - T)  # a running request's growth reclaims the slot's pages
    assert pinned.waited, "the reclaim did not wait for the host copy"
    per_slot = allocator.config.pages_per_slot
    at_wait = seen[fences.index(pinned)][slot * per_slot : slot * per_slot + 2]
    assert at_wait == mapped, "the pinned pages were unmapped before the copy's fence"
    allocator.check_invariants(deep=True)


def test_a_slot_rewritten_behind_its_offload_waits_on_the_device_not_the_host(
    make_allocator: MakeAllocator,
) -> None:
    """The next request in a released slot rewrites the pages its offload may still read: the
    engine's stream is put behind the offload's fence and the host does not wait (a host wait
    drains the steps queued ahead of the copy); the slot keeps its pages, and the new request's
    values are its own."""
    fences: list[ManualFence] = []

    def make_fence() -> ManualFence:
        fences.append(ManualFence(lambda: None))
        return fences[-1]

    allocator = tiered(make_allocator, make_fence=make_fence, max_slots=1)
    history = list(range(2 * T + 3))
    slot = cached_conversation(allocator, history)
    offload = fences[-1]
    assert allocator.stats().host_offloaded_bytes > 0 and not offload.complete
    mapped = page_ids(allocator, slot)[:3]
    other = [7] * (2 * T + 3)
    again = allocator.acquire(len(other), other)
    assert again == slot and page_ids(allocator, slot)[:3] == mapped, "not rewritten in place"
    assert offload.ordered and not offload.waited, "the host waited to rewrite the slot"
    assert allocator.stats().copy_wait_seconds == 0.0
    fill(allocator, again, other)
    assert k_values(allocator, again, len(other)) == expected(other, len(other))
    allocator.check_invariants(deep=True)


def test_a_restore_puts_the_engines_stream_behind_its_copies(make_allocator: MakeAllocator) -> None:
    """A restore copies on the tier's restore stream: the engine's stream is put behind the last
    piece's fence (the step reading the blocks runs after them) and the host does not wait."""
    fences: list[ManualFence] = []

    def make_fence() -> ManualFence:
        fences.append(ManualFence(lambda: None))
        return fences[-1]

    allocator = tiered(make_allocator, make_fence=make_fence)
    history = list(range(2 * T + 3))
    cached_conversation(allocator, history)
    evict_everything(allocator, filler=7)
    made = len(fences)
    slot = allocator.acquire(len(history) + 1, [*history, 1])
    allocator.ensure(slot, allocator.length(slot))  # copies the restore
    restored = fences[made:]
    assert restored and restored[-1].ordered, "the step could read the blocks before their copy"
    assert not any(f.waited for f in restored), "the host waited for a restore's copy"
    assert k_values(allocator, slot, 2 * T) == expected(history, 2 * T)
    allocator.check_invariants(deep=True)


def test_blocks_straddling_pages_come_back_too(make_allocator: MakeAllocator) -> None:
    allocator = tiered(make_allocator, prefix_block_tokens=24, budget_pages=10, max_tokens=10 * T)
    history = list(range(5 * T + 3))  # three 24-token blocks over four pages
    cached_conversation(allocator, history)
    evict_everything(allocator, filler=7)
    slot = allocator.acquire(len(history) + 1, [*history, 1])
    assert allocator.length(slot) == 72
    allocator.ensure(slot, 72)
    assert k_values(allocator, slot, 72) == expected(history, 72)
    allocator.check_invariants(deep=True)


def count_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bytes of every host tier copy from now on (the ``copy_pairs`` seam), one entry each."""
    copied: list[int] = []
    real = host_copies.copy_pairs

    def counting(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        copied.extend(t.numel() * t.element_size() for t in targets)
        real(targets, sources)

    monkeypatch.setattr(host_copies, "copy_pairs", counting)
    return copied


def test_a_run_crossing_pinned_chunks_is_copied_in_pieces(
    make_allocator: MakeAllocator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host blocks are pinned in chunks; consecutive ids across a chunk's end are two copies."""
    monkeypatch.setattr(host_tier, "CHUNK_BLOCKS", 2)
    copied = count_copies(monkeypatch)
    allocator = tiered(make_allocator, host_blocks=6, budget_pages=10, max_tokens=10 * T)
    history = list(range(5 * T + 3))  # five blocks: host blocks 0-1, 2-3, 4
    cached_conversation(allocator, history)
    assert copied == [2 * allocator.config.block_bytes] * 2 + [allocator.config.block_bytes]
    evict_everything(allocator, filler=7)
    slot = allocator.acquire(len(history) + 1, [*history, 1])
    assert allocator.length(slot) == 5 * T
    allocator.ensure(slot, 5 * T)
    assert len(copied) == 6  # one copy a run (one range), each way
    assert k_values(allocator, slot, 5 * T) == expected(history, 5 * T)
    allocator.check_invariants(deep=True)


def paged_tiered(blocks: int = 8, host_blocks: int = 16, **overrides: object) -> PagedKVConfig:
    """A paged cache of 2 layers, one 8-wide float32 head, ``blocks`` blocks of ``T`` tokens, a
    host tier of ``host_blocks``."""
    block = 2 * 2 * T * 8 * 4  # K and V of both layers
    settings: dict[str, object] = dict(
        num_layers=2,
        num_kv_heads=1,
        head_dim=8,
        dtype=torch.float32,
        max_slots=2,
        max_tokens=8 * T,
        budget_bytes=blocks * block,
        block_size=T,
        prefix_cache=True,
        host_tier_bytes=host_blocks * block,
    )
    settings.update(overrides)
    return PagedKVConfig(**settings)  # type: ignore[arg-type]


def test_the_paged_mode_gathers_blocks_to_the_host_and_scatters_them_back(
    kv_device: Device,
) -> None:
    """The comparison mode's tier: the same write-through and restore at block granularity; a
    restored prompt reads the values it stored."""
    fences: list[ManualFence] = []

    def make_fence() -> ManualFence:
        fences.append(ManualFence(lambda: None))
        return fences[-1]

    config = paged_tiered()
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
    cache.ensure(other, 8 * T)  # every block: the history's are taken behind the fence
    assert pinned.ordered and not pinned.waited, "the host waited to rewrite offloaded blocks"
    cache.release(other, [])
    turn = [*history, 11]
    assert cache.cached_tokens(turn) == 0
    made = len(fences)
    slot = cache.acquire(len(turn), turn)
    assert cache.length(slot) == 3 * T
    assert cache.stats().prefix_host_hits_tokens == 3 * T
    assert fences[-1].ordered and len(fences) > made  # the steps run behind the restore's copy
    for layer in range(2):
        blocks = list(cache.block_ids(slot))
        got = cache.k_cache(layer)[blocks].reshape(-1, 8)[: 3 * T, 0]
        assert got.cpu().tolist() == (values[: 3 * T] + layer).cpu().tolist()
    cache.check_invariants(deep=True)


def write_pattern(cache: PagedKVCache, slot: int, tokens: int, seed: int) -> None:
    """Gives every token's K and V of every layer values of its own (``pattern``)."""
    blocks = list(cache.block_ids(slot))
    for layer in range(cache.config.num_layers):
        for kv, tensor in enumerate((cache.k_cache(layer), cache.v_cache(layer))):
            rows = pattern(tokens, layer, kv, seed).to(tensor.device)
            flat = tensor[blocks].view(-1, 8)  # [blocks * T, 8]
            flat[:tokens] = rows
            tensor[blocks] = flat.view(len(blocks), T, 1, 8)


def pattern(tokens: int, layer: int, kv: int, seed: int) -> torch.Tensor:
    """[tokens, 8]: distinct for each token, layer, K or V, element and ``seed``."""
    token = torch.arange(tokens, dtype=torch.float32)[:, None]
    return seed * 1e5 + token * 100 + layer * 10 + kv * 5 + torch.arange(8) / 8


def read_back(cache: PagedKVCache, slot: int, tokens: int) -> list[torch.Tensor]:
    """Every layer's K and V rows of a slot's first ``tokens`` tokens, on the host."""
    blocks = list(cache.block_ids(slot))
    return [
        tensor[blocks].reshape(-1, 8)[:tokens].cpu()
        for layer in range(cache.config.num_layers)
        for tensor in (cache.k_cache(layer), cache.v_cache(layer))
    ]


def interleaved_slots(cache: PagedKVCache, prompts: list[list[int]]) -> list[int]:
    """Slots for ``prompts`` grown a block at a time in turn, so their device blocks alternate."""
    slots = [cache.acquire(len(prompt), prompt) for prompt in prompts]
    for blocks in range(1, max(len(p) for p in prompts) // T + 2):
        for slot, prompt in zip(slots, prompts):
            cache.ensure(slot, min(blocks * T, len(prompt)))
    return slots


def test_the_paged_mode_moves_runs_of_host_blocks_in_few_copies(
    kv_device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks scattered over the pool (every other one) go to consecutive host blocks in pieces
    of consecutive host blocks, one copy each (at most the staging buffer's blocks, never across
    a pinned chunk's end), not one per block and layer's K and V; restored into scattered fresh
    blocks, every layer's K and V reads back as written."""
    monkeypatch.setattr(host_tier, "CHUNK_BLOCKS", 4)
    monkeypatch.setattr(host_copies, "STAGING_BYTES", 3 * 2 * 2 * T * 8 * 4)  # 3 blocks
    copied = count_copies(monkeypatch)
    cache = PagedKVCache(paged_tiered(blocks=16, max_tokens=16 * T), kv_device.torch_device)
    block, views = cache.config.page_size, 2 * cache.config.num_layers
    first, second = [1] * (6 * T + 3), [2] * (6 * T + 3)
    slots = interleaved_slots(cache, [first, second])
    assert cache.block_ids(slots[0]) == (0, 2, 4, 6, 8, 10, 12)
    for seed, (slot, prompt) in enumerate(zip(slots, (first, second))):
        write_pattern(cache, slot, len(prompt), seed)
        cache.release(slot, prompt)
    # Host blocks 0-2, 3 | 4-5 (chunk end), then 6-7 | 8-10, 11: six copies, not 12 * 4.
    assert copied == [n * block for n in (3, 1, 2, 2, 3, 1)]
    assert sum(copied) == cache.stats().host_offloaded_bytes == 12 * block
    assert len(copied) < 12 * views
    # Every block taken by two fillers grown in turn; one ends, the other keeps every other
    # block, so the restores scatter into blocks apart.
    fillers = interleaved_slots(cache, [[7] * (8 * T), [8] * (8 * T)])
    cache.release(fillers[0], [])
    for seed, prompt in enumerate((first, second)):
        del copied[:]
        slot = cache.acquire(len(prompt) + 1, [*prompt, 1])
        assert cache.length(slot) == 6 * T
        restored = cache.block_ids(slot)
        assert any(b != a + 1 for a, b in zip(restored, restored[1:])), restored
        assert copied == [n * block for n in ((3, 1, 2), (2, 3, 1))[seed]]
        for index, got in enumerate(read_back(cache, slot, 6 * T)):
            assert torch.equal(got, pattern(6 * T, index // 2, index % 2, seed))
        cache.release(slot, prompt)  # stored already: nothing to copy
        assert len(copied) == 3
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


def test_the_tier_is_pinned_at_start_and_unpinned_when_it_goes(
    make_allocator: MakeAllocator, kv_device: Device
) -> None:
    """On a GPU the tier's chunks are registered pinned memory (async copies at full bandwidth)
    when the cache is made, and dropping the cache unregisters them (nothing stays pinned)."""
    if kv_device.name != "cuda":
        pytest.skip("pinning is the CUDA backend's")
    allocator = tiered(make_allocator, host_blocks=CHUNK + 3)
    chunks = list(allocator._tier._chunks)  # noqa: SLF001 (the memory itself is the claim)
    assert len(chunks) == 2 and all(chunk.is_pinned() for chunk in chunks)
    assert allocator.stats().host_tier_pin_seconds > 0
    history = list(range(2 * T + 3))
    cached_conversation(allocator, history)  # the copies from and to registered memory work
    evict_everything(allocator, filler=7)
    slot = allocator.acquire(len(history) + 1, [*history, 1])
    allocator.ensure(slot, 2 * T)
    assert k_values(allocator, slot, 2 * T) == expected(history, 2 * T)
    del allocator
    gc.collect()
    assert not any(chunk.is_pinned() for chunk in chunks)
