"""The vAttention cache's deferred host-tier restores (``replica.kv.slot_restores``): ``acquire``
decides and maps, the slot's first waited ``ensure`` copies and indexes; nothing is indexed or read
before the copy, a release before it indexes only the device hit, the tier never evicts a pending
restore's blocks, and only a waited ensure starts the copy (host backend; CUDA under ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from replica import KVCacheAllocator
from replica.kv import host_copies
from replica.kv.growth import pipelined_batches
from replica.kv.slots import SlotMaps
from replica.kv.stats import WaitCause
from replica.vmm import MapWorker, VmmError
from tests.allocator.conftest import TOKENS_PER_PAGE, MakeAllocator
from tests.allocator.test_host_tier import evict_everything, tiered
from tests.allocator.test_prefix_copies import cached_conversation, expected
from tests.allocator.test_prefix_sharing import fill, k_values

T = TOKENS_PER_PAGE


def evicted_history(
    make_allocator: MakeAllocator, blocks: int = 3, **overrides: object
) -> tuple[KVCacheAllocator, list[int]]:
    """A cache whose conversation of ``blocks`` full blocks lives in the host tier only."""
    allocator = tiered(make_allocator, **overrides)
    history = list(range(blocks * T + 5))
    cached_conversation(allocator, history)
    evict_everything(allocator, filler=7)
    return allocator, history


def test_only_a_waited_ensure_copies_and_indexes_the_restore(make_allocator: MakeAllocator) -> None:
    allocator, history = evicted_history(make_allocator)
    turn = [*history, 1]
    slot = allocator.acquire(len(turn), turn)
    assert allocator.length(slot) == 3 * T and allocator.restoring_tokens(slot) == 3 * T
    allocator.ensure(slot, len(turn), wait=False)  # maps in the background: no copy yet
    assert allocator.restoring_tokens(slot) == 3 * T and allocator.cached_tokens(turn) == 0
    assert allocator.stats().host_restored_bytes == 0
    with pytest.raises(ValueError, match="restores"):
        allocator.step_async({slot: len(turn)})  # no step reads it before its copy
    with pytest.raises(ValueError, match="restored"):
        allocator.ensure(slot, 2 * T)  # below the restore
    allocator.check_invariants(deep=True)
    allocator.ensure(slot, len(turn))
    assert allocator.restoring_tokens(slot) == 0 and allocator.cached_tokens(turn) == 3 * T
    assert k_values(allocator, slot, 3 * T) == expected(history, 3 * T)
    assert allocator.stats().prefix_host_hits_tokens == 3 * T
    allocator.check_invariants(deep=True)


def test_a_release_before_the_copy_indexes_only_the_device_hit(
    make_allocator: MakeAllocator,
) -> None:
    allocator, history = evicted_history(make_allocator)
    cached_conversation(allocator, [*history[:T], 99])  # block 0 back on the device
    turn, restored = [*history, 1], allocator.stats().host_restored_bytes  # block 0's
    slot = allocator.acquire(len(turn), turn)
    assert allocator.length(slot) == 3 * T and allocator.restoring_tokens(slot) == 2 * T
    allocator.release(slot, turn[: 3 * T])  # the scheduler's tokens: its computed, restore too
    assert allocator.cached_tokens(turn) == T  # the blocks never copied are not indexed
    assert allocator.stats().host_restored_bytes == restored
    allocator.check_invariants(deep=True)
    # Unreserved, still in the tier: the next acquire restores them.
    slot = allocator.acquire(len(turn), turn)
    assert allocator.restoring_tokens(slot) == 2 * T
    fill(allocator, slot, turn)
    assert k_values(allocator, slot, len(turn)) == expected(turn, len(turn))
    allocator.check_invariants(deep=True)


def test_the_tier_keeps_a_pending_restores_blocks(make_allocator: MakeAllocator) -> None:
    """A full tier evicts its least recently used blocks, never those a restore will read."""
    allocator, history = evicted_history(make_allocator, blocks=2, host_blocks=3)
    turn = [*history, 1]
    slot = allocator.acquire(len(turn), turn)
    assert allocator.restoring_tokens(slot) == 2 * T
    cached_conversation(allocator, [5] * (3 * T + 1))  # three blocks: only one host block free
    block = allocator.config.block_bytes * allocator.config.num_ranges
    assert allocator.stats().host_offloaded_bytes == 3 * block  # the history's two, one of these
    allocator.check_invariants(deep=True)
    fill(allocator, slot, turn)
    assert k_values(allocator, slot, len(turn)) == expected(turn, len(turn))
    assert allocator.stats().prefix_host_hits_tokens == 2 * T
    allocator.check_invariants(deep=True)


def test_two_slots_restoring_the_same_blocks_both_read_them(make_allocator: MakeAllocator) -> None:
    allocator, history = evicted_history(make_allocator)
    turn = [*history, 1]
    first = allocator.acquire(len(turn), turn)
    second = allocator.acquire(len(turn), turn)  # nothing indexed yet: restored again
    assert allocator.restoring_tokens(first) == allocator.restoring_tokens(second) == 3 * T
    allocator.release(first, turn[: 3 * T])  # drops one reservation, the other holds
    allocator.check_invariants(deep=True)
    fill(allocator, second, turn)
    assert k_values(allocator, second, len(turn)) == expected(turn, len(turn))
    allocator.check_invariants(deep=True)


def test_pipelined_batches_start_small_and_double() -> None:
    assert pipelined_batches(12, ranges=1) == [2, 4, 6]  # pages 2, 4, then the rest
    assert pipelined_batches(60, ranges=1) == [2, 4, 8, 16, 16, 14]
    assert pipelined_batches(3, ranges=64) == [1, 1, 1]  # a group is bigger than any batch
    assert pipelined_batches(10, ranges=4) == [1, 1, 2, 4, 2]  # whole groups of 4 pages
    assert pipelined_batches(1, ranges=1) == [1]


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_a_restore_copies_each_mapping_batch_once_it_is_mapped(
    make_allocator: MakeAllocator, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """A restore into pages it maps submits them in growing batches, and the slot's waited ensure
    copies each batch's blocks right after waiting for that batch, before waiting for the next:
    the copies run while the worker maps (``replica.kv.slot_restores``)."""
    ranges = 2 * 2 if layout == "per_layer" else 1  # the host model: 2 layers' K and V
    blocks = 12
    allocator, history = evicted_history(
        make_allocator,
        blocks=blocks,
        layout=layout,
        budget_pages=16 * ranges,
        host_blocks=16,
        max_tokens=16 * T,
    )
    assert allocator.config.num_ranges == ranges
    allocator.shrink()  # no page stays mapped: the restore maps (and creates) all of its own
    turn = [*history, 1]
    events: list[tuple[str, int]] = []
    wait, copy = SlotMaps.wait, host_copies.copy_pairs

    def logged_wait(maps: SlotMaps, ticket: int, cause: WaitCause) -> None:
        events.append(("wait", ticket))
        wait(maps, ticket, cause)

    def logged_copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        events.append(("copy", sum(t.numel() for t in targets)))
        copy(targets, sources)

    monkeypatch.setattr(SlotMaps, "wait", logged_wait)
    monkeypatch.setattr(host_copies, "copy_pairs", logged_copy)
    slot = allocator.acquire(len(turn), turn)
    assert allocator.restoring_tokens(slot) == blocks * T
    allocator.ensure(slot, len(turn))
    groups = allocator.config.page_groups_for(len(turn))
    batches = pipelined_batches(groups, ranges)
    assert len(batches) > 1
    kinds = [kind for kind, _ in events]
    pieces = kinds.count("copy")  # one a batch holding restored blocks (a last may hold none)
    assert len(batches) - 1 <= pieces <= len(batches) and pieces > 1
    assert kinds[: 2 * pieces] == ["wait", "copy"] * pieces
    assert set(kinds[2 * pieces :]) <= {"wait"}
    tickets = [ticket for kind, ticket in events if kind == "wait"][:pieces]
    assert tickets == sorted(set(tickets))  # one batch each, in order
    block = allocator.config.block_bytes * ranges
    copied = [size for kind, size in events if kind == "copy"]
    assert sum(copied) == blocks * block
    assert allocator.cached_tokens(turn) == blocks * T
    assert k_values(allocator, slot, blocks * T) == expected(history, blocks * T)
    allocator.check_invariants(deep=True)


class FailingWaits:
    """The mapping worker, but the first wait for ``ticket`` raises a VmmError after the batch ran
    (as a map the driver refused would)."""

    def __init__(self, worker: MapWorker, ticket: int) -> None:
        self._worker, self._ticket = worker, ticket

    def __getattr__(self, name: str) -> object:
        return getattr(self._worker, name)

    def wait(self, ticket: int) -> None:
        self._worker.wait(ticket)
        if ticket == self._ticket:
            self._ticket = -1
            raise VmmError("injected: cuMemMap failed")


def test_a_map_failing_under_a_restore_leaves_it_pending_and_indexes_nothing_of_it(
    make_allocator: MakeAllocator,
) -> None:
    """A restore's wait for its second mapping batch raises: the error reaches the caller, the
    pieces copied before stay unindexed (the restore is still pending), and releasing the slot
    indexes only its device hit, so no later prompt reads blocks that were never copied."""
    allocator, history = evicted_history(
        make_allocator, blocks=12, budget_pages=16, host_blocks=16, max_tokens=16 * T
    )
    allocator.shrink()
    turn = [*history, 1]
    slot = allocator.acquire(len(turn), turn)
    assert allocator.restoring_tokens(slot) == 12 * T
    maps = allocator._maps  # the books under the allocator, whose worker this test wraps
    second = sorted(set(maps.slots[slot].tickets))[1]
    maps.worker = FailingWaits(maps.worker, second)
    with pytest.raises(VmmError, match="injected"):
        allocator.ensure(slot, len(turn))
    assert allocator.restoring_tokens(slot) == 12 * T and allocator.cached_tokens(turn) == 0
    allocator.check_invariants()
    allocator.release(slot, turn)
    assert allocator.cached_tokens(turn) == 0
    allocator.check_invariants(deep=True)
