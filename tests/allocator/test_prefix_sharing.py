"""Prefix sharing in the vAttention allocator: aliased pages, continuation in place, eviction,
immutability, and what a request's end leaves to the others (host backend; CUDA under ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from replica import KVCacheAllocator, KVCacheOutOfMemory
from replica.kv.base import KVRestoreFailed
from replica.kv.stats import OpCause, WaitCause
from replica.vmm import Op
from tests.allocator.conftest import TOKENS_PER_PAGE, MakeAllocator

T = TOKENS_PER_PAGE


def make(make_allocator: MakeAllocator, **overrides: object) -> KVCacheAllocator:
    settings: dict[str, object] = dict(
        num_layers=2, max_slots=4, budget_pages=24, eager_pages=0, prefix_cache=True
    )
    settings.update(overrides)
    return make_allocator(**settings)


def fill(
    allocator: KVCacheAllocator,
    slot: int,
    prompt: list[int],
    step: bool = True,
    start: int | None = None,
) -> None:
    """Computes the prompt's uncached tokens (from ``start``, else the slot's length; from what
    the slot kept where its deferred restore fails, as the scheduler does): K of token t at
    position p is t * 1000 + p; with ``step``, books the step that wrote them (which indexes the
    prompt's full pages)."""
    start = allocator.length(slot) if start is None else start
    try:
        allocator.ensure(slot, len(prompt))
    except KVRestoreFailed as failed:
        start = min(start, failed.kept_tokens)
    values = torch.tensor([t * 1000.0 + p for p, t in enumerate(prompt)])[start:]
    allocator.k_cache(0)[slot, start : len(prompt)] = values.to(allocator.k_cache(0).device)[
        :, None, None
    ]
    if step:
        allocator.wait(allocator.step_async({slot: len(prompt)}))


def k_values(allocator: KVCacheAllocator, slot: int, tokens: int) -> list[float]:
    return allocator.k_cache(0)[slot, :tokens, 0, 0].cpu().tolist()


def page_ids(allocator: KVCacheAllocator, slot: int) -> list[int]:
    per_slot = allocator.config.pages_per_slot
    return allocator.reservations[0].page_ids()[slot * per_slot : (slot + 1) * per_slot]


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_a_running_prompt_is_aliased_into_a_new_slot(
    make_allocator: MakeAllocator, layout: str
) -> None:
    allocator = make(make_allocator, layout=layout)
    prompt = list(range(3 * T + 5))
    first = allocator.acquire(len(prompt), prompt)
    assert allocator.length(first) == 0
    fill(allocator, first, prompt)
    other = [*prompt[: 2 * T + 3], 7, 7, 7]
    assert allocator.cached_tokens(other) == 2 * T  # whole pages only
    second = allocator.acquire(len(other), other)
    assert allocator.length(second) == 2 * T
    allocator.synchronize()
    # The same physical pages at the same page indices, so the same bytes through both slots.
    assert page_ids(allocator, second)[:2] == page_ids(allocator, first)[:2]
    assert k_values(allocator, second, 2 * T) == k_values(allocator, first, 2 * T)
    stats = allocator.stats()
    assert stats.pages_shared == 2 * allocator.config.num_ranges
    assert (stats.prefix_queries_tokens, stats.prefix_hits_tokens) == (
        len(prompt) + len(other),
        2 * T,
    )
    with pytest.raises(ValueError, match="immutable"):
        allocator.ensure(second, 2 * T - 1)
    fill(allocator, second, other)  # writes only past the shared pages
    assert k_values(allocator, first, len(prompt)) == [t * 1000.0 + p for p, t in enumerate(prompt)]
    allocator.check_invariants(deep=True)


def test_the_last_prompt_token_is_never_cached(make_allocator: MakeAllocator) -> None:
    allocator = make(make_allocator)
    prompt = list(range(2 * T))
    fill(allocator, allocator.acquire(0, prompt), prompt)
    assert allocator.cached_tokens(prompt) == T  # 2T would leave nothing to compute
    assert allocator.cached_tokens([*prompt, 1]) == 2 * T


def test_an_admission_undone_before_its_slot_is_backed_counts_no_prefix_query(
    make_allocator: MakeAllocator,
) -> None:
    """The scheduler acquires, fails to back the first chunk (KVCacheOutOfMemory) and releases;
    the retry acquires again. Only the admission that went through counts as a query and hit."""
    allocator = make(make_allocator)
    prompt = list(range(2 * T + 3))
    fill(allocator, allocator.acquire(0, prompt), prompt)
    before = allocator.stats()
    other = [*prompt[: 2 * T], 5, 6]
    undone = allocator.acquire(len(other), other)  # finds 2T cached
    allocator.release(undone, other[: 2 * T])  # nothing backed past its prefix: undone
    after = allocator.stats()
    assert (after.prefix_queries_tokens, after.prefix_hits_tokens) == (
        before.prefix_queries_tokens,
        before.prefix_hits_tokens,
    )
    admitted = allocator.acquire(len(other), other)
    allocator.ensure(admitted, len(other))
    allocator.release(admitted, other)  # finished: the query stands
    final = allocator.stats()
    assert final.prefix_queries_tokens == before.prefix_queries_tokens + len(other)
    assert final.prefix_hits_tokens == before.prefix_hits_tokens + 2 * T
    allocator.check_invariants(deep=True)


def test_the_next_turn_continues_the_released_slot_in_place(make_allocator: MakeAllocator) -> None:
    allocator = make(make_allocator)
    turn1 = list(range(2 * T + 3))
    slot = allocator.acquire(0, turn1)
    fill(allocator, slot, turn1)
    allocator.ensure(slot, len(turn1) + 4)  # the reply
    history = [*turn1, 90, 91, 92, 93]
    allocator.release(slot, history)
    assert allocator.stats().slots_cached == 1
    turn2 = [*history, 50, 51]
    assert allocator.cached_tokens(turn2) == 2 * T  # history has 2 full pages, + 7 tokens
    pages_before = page_ids(allocator, slot)
    again = allocator.acquire(len(turn2), turn2)
    assert again == slot and allocator.length(slot) == 2 * T
    assert page_ids(allocator, slot) == pages_before  # in place: nothing unmapped, nothing new
    assert allocator.stats().pages_shared == 0
    allocator.check_invariants(deep=True)


def test_ending_a_request_leaves_shared_pages_to_their_other_owner(
    make_allocator: MakeAllocator,
) -> None:
    allocator = make(make_allocator, deferred_reclamation=False)
    prompt = list(range(3 * T))
    first = allocator.acquire(0, prompt)
    fill(allocator, first, prompt)
    second = allocator.acquire(0, [*prompt[: 2 * T], 5])
    allocator.release(second)  # preempted or aborted: its own mappings go
    assert allocator.stats().pages_shared == 0
    assert k_values(allocator, first, 3 * T) == [t * 1000.0 + p for p, t in enumerate(prompt)]
    allocator.release(first, prompt)  # no deferred reclamation: everything goes
    stats = allocator.stats()
    assert stats.pages_in_use == stats.pages_cached == 0
    assert allocator.cached_tokens([*prompt, 1]) == 0
    allocator.check_invariants(deep=True)


def test_pressure_evicts_least_recently_released_prefixes_first(
    make_allocator: MakeAllocator,
) -> None:
    allocator = make(make_allocator, budget_pages=8, layout="interleaved", max_tokens=8 * T)
    old, new = [1] * (3 * T), [2] * (3 * T)
    for prompt in (old, new):
        slot = allocator.acquire(0, prompt)
        fill(allocator, slot, prompt, step=False)
        allocator.release(slot, prompt)
    assert allocator.stats().pages_cached == 6
    grower = allocator.acquire(0, [3])
    allocator.ensure(grower, 4 * T)  # 2 free pages + 2 reclaimed from the older conversation
    assert allocator.cached_tokens([*old, 0]) == T  # its tail went, its first page stays
    assert allocator.cached_tokens([*new, 0]) == 3 * T
    assert allocator.stats().prefix_evicted_pages == 2
    allocator.ensure(grower, 8 * T)  # the whole budget: every cached prefix goes
    assert allocator.cached_tokens([*old, 0]) == allocator.cached_tokens([*new, 0]) == 0
    assert allocator.stats().prefix_evicted_pages == 6
    allocator.check_invariants(deep=True)


def test_a_page_a_running_slot_aliases_survives_reclamation(make_allocator: MakeAllocator) -> None:
    allocator = make(make_allocator, budget_pages=6, layout="interleaved")
    prompt = [4] * (3 * T)
    owner = allocator.acquire(0, prompt)
    fill(allocator, owner, prompt)
    reader = allocator.acquire(0, [*prompt[: 2 * T], 1])  # aliases the first two pages
    assert allocator.length(reader) == 2 * T
    allocator.release(owner, prompt)
    grower = allocator.acquire(0, [9])
    allocator.ensure(grower, 3 * T)  # free pages + what the released slot alone holds
    with pytest.raises(KVCacheOutOfMemory):
        allocator.ensure(grower, 4 * T + 1)  # the aliased pages are not the pool's to take
    assert k_values(allocator, reader, 2 * T) == [4000.0 + p for p in range(2 * T)]
    assert allocator.stats().pages_shared == 0  # the released slot gave up its mappings
    allocator.check_invariants(deep=True)


def test_a_release_with_fewer_tokens_than_indexed_unindexes_what_only_it_held(
    make_allocator: MakeAllocator,
) -> None:
    """A step that failed after booking its pages: the slot is released with the tokens it did
    store, and the pages past them leave the index (they may never have been written)."""
    allocator = make(make_allocator)
    prompt = list(range(3 * T))
    slot = allocator.acquire(0, [*prompt, 1])
    fill(allocator, slot, [*prompt, 1])  # books all three full pages
    assert allocator.cached_tokens([*prompt, 2]) == 3 * T
    allocator.release(slot, prompt[: T + 2])
    assert allocator.cached_tokens([*prompt, 2]) == T
    with pytest.raises(ValueError, match="differ"):
        other = allocator.acquire(0, [*prompt[:T], 5, 5])
        allocator.release(other, [9] * T)
    allocator.check_invariants(deep=True)


def test_a_wait_for_a_batch_that_has_run_raises_its_error_and_is_no_wait(
    make_allocator: MakeAllocator,
) -> None:
    """``SlotMaps.wait`` on a batch the worker has already run returns at once without counting a
    wait, but still raises that batch's error (a failed map is never skipped unnoticed)."""
    allocator = make(make_allocator)
    maps = allocator._maps  # the books under the allocator: the one place waits are made
    maps.ops.append(Op.map(maps.ranges[0], 0, [10**6], cause=OpCause.GROWTH))  # no such page
    ticket = maps.flush()
    assert maps.worker.wait_for(ticket, 10.0)  # it has run, and failed
    waits = allocator.mapping_breakdown().waits
    with pytest.raises(ValueError, match="unknown page id"):
        maps.wait(ticket, WaitCause.STEP)
    assert allocator.mapping_breakdown().waits == waits


def test_the_mapping_breakdown_counts_each_page_by_operation_and_cause(
    make_allocator: MakeAllocator,
) -> None:
    """Growth, aliases, reuse of a released slot and reclaim each show up under their own cause,
    with the pages the books moved; the callers' waits are split by cause, and a wait for a batch
    that had run is no wait."""
    allocator = make(make_allocator, layout="interleaved", budget_pages=6)
    prompt = list(range(3 * T + 1))
    first = allocator.acquire(len(prompt), prompt)
    fill(allocator, first, prompt)  # 4 pages grown (3 full + 1 partial)
    second = allocator.acquire(len(prompt), prompt)  # aliases the 3 full pages
    allocator.ensure(second, len(prompt))  # waits for its aliases: an admission
    allocator.release(first, prompt)
    allocator.release(second, prompt)
    # A new prompt needing every page: the released slots' private pages are reclaimed.
    other = [9] * (6 * T)
    third = allocator.acquire(len(other), other)
    allocator.ensure(third, len(other))
    allocator.synchronize()
    breakdown = allocator.mapping_breakdown()
    assert breakdown.pages("map", "alias") == 3
    alias_runs = [n for kind, cause, n, _, _ in breakdown.ops if (kind, cause) == ("map", "alias")]
    assert alias_runs == [1]  # the hit's 3 consecutive pages in one run (one access grant)
    assert breakdown.pages("map", "growth") == 4 + 1 + 6  # first, second's last page, third
    # The budget, created once: the rest of it as spare pages once ``fill``'s steps drew on it.
    assert breakdown.pages("create") == 6 and breakdown.pages("create", "spare") > 0
    assert breakdown.pages("unmap") == breakdown.pages("unmap", "reclaim") + breakdown.pages(
        "unmap", "reuse"
    )
    assert breakdown.pages("unmap") >= 5  # the released slots' pages went for the third
    assert breakdown.seconds() > 0 and breakdown.seconds("map") <= breakdown.seconds()
    assert {cause for cause, _, _ in breakdown.waits} <= {"admission", "step", "sync"}
    assert all(n > 0 and seconds >= 0 for _, n, seconds in breakdown.waits)
    allocator.synchronize()  # every batch has run: nothing is waited for, nothing counted
    assert allocator.mapping_breakdown().waits == breakdown.waits
    assert all(
        row["us_per_page"] is None or row["us_per_page"] > 0 for row in breakdown.as_dict()["ops"]
    )  # type: ignore[index,union-attr]
    allocator.check_invariants(deep=True)
