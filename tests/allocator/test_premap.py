"""The page budget mapped under the empty slots at start (``KVCacheConfig.premap``): a burst's
prompts and prefix hits find their pages mapped and need no driver call, the hits copied into
them; the empty slots' pages are the first reclaimed (host backend; CUDA under ``gpu``)."""

from __future__ import annotations

from replica import KVCacheAllocator
from replica.kv.slots import SlotState
from tests.allocator.conftest import TOKENS_PER_PAGE, MakeAllocator
from tests.allocator.test_prefix_copies import cached_conversation, expected
from tests.allocator.test_prefix_sharing import fill, k_values, make, page_ids

T = TOKENS_PER_PAGE


def premapped(make_allocator: MakeAllocator, **overrides: object) -> KVCacheAllocator:
    settings: dict[str, object] = dict(premap=True, max_slots=4, budget_pages=22)
    settings.update(overrides)
    return make(make_allocator, **settings)


def test_the_budget_is_mapped_round_the_empty_slots_at_start(
    make_allocator: MakeAllocator,
) -> None:
    allocator = premapped(make_allocator)
    allocator.synchronize()
    stats = allocator.stats()
    assert stats.pages_created == stats.pages_cached == 22 and stats.pages_free == 0
    assert allocator.mapping_breakdown().pages("map", "premap") == 22
    assert list(allocator.slot_states()) == [SlotState.CACHED] * 4
    mapped = [sum(page >= 0 for page in page_ids(allocator, slot)) for slot in range(4)]
    assert mapped == [6, 6, 5, 5]
    assert stats.pages_available == 22  # all of it a request could get
    allocator.check_invariants(deep=True)


def test_a_burst_over_a_prefix_is_copied_into_premapped_pages_without_a_driver_call(
    make_allocator: MakeAllocator,
) -> None:
    # Five slots of six pages: the holder, three hits, and an empty slot whose pages (nothing
    # would miss them) let the third hit keep its copy too.
    allocator = premapped(make_allocator, max_slots=5, budget_pages=30)
    prompt = list(range(3 * T + 5))
    holder = allocator.acquire(len(prompt), prompt)
    fill(allocator, holder, prompt)
    allocator.synchronize()
    before = allocator.mapping_breakdown()
    slots = []
    for i in range(3):
        request = [*prompt[: 3 * T], 50 + i, 60 + i]
        slot = allocator.acquire(len(request), request)
        assert allocator.length(slot) == 3 * T
        fill(allocator, slot, request)
        slots.append(slot)
    allocator.synchronize()
    after = allocator.mapping_breakdown()
    assert after.pages("map") == before.pages("map") and after.pages("unmap") == 0
    assert after.pages("create") == before.pages("create")
    config = allocator.config
    assert allocator.stats().prefix_copied_bytes == 3 * 3 * config.page_size * config.num_ranges
    for slot, i in zip(slots, range(3)):
        request = [*prompt[: 3 * T], 50 + i, 60 + i]
        assert k_values(allocator, slot, len(request)) == expected(request, len(request))
    assert allocator.stats().pages_shared == 0
    allocator.check_invariants(deep=True)


def test_a_hit_aliases_once_no_empty_slot_is_left(make_allocator: MakeAllocator) -> None:
    allocator = premapped(make_allocator, max_slots=2, budget_pages=12)
    prompt = list(range(3 * T + 5))
    holder = allocator.acquire(len(prompt), prompt)
    fill(allocator, holder, prompt)
    request = [*prompt[: 3 * T], 50, 60]
    slot = allocator.acquire(len(request), request)  # the last empty slot: memory is short
    allocator.synchronize()
    assert allocator.stats().prefix_copied_bytes == 0
    assert allocator.mapping_breakdown().pages("map", "alias") == 3
    fill(allocator, slot, request)
    assert k_values(allocator, slot, len(request)) == expected(request, len(request))
    allocator.check_invariants(deep=True)


def test_growth_reclaims_the_empty_slots_pages_before_a_cached_conversation(
    make_allocator: MakeAllocator,
) -> None:
    allocator = premapped(make_allocator, budget_pages=16, max_tokens=12 * T)
    kept = [5] * (2 * T + 3)
    cached = cached_conversation(allocator, kept)
    prompt = list(range(9 * T))
    slot = allocator.acquire(len(prompt), prompt)
    fill(allocator, slot, prompt)  # 9 pages: its own 4, then the empty slots' pages
    assert allocator.cached_tokens([*kept, 1]) == 2 * T  # the conversation is still cached
    assert k_values(allocator, cached, 2 * T) == expected(kept, 2 * T)
    assert k_values(allocator, slot, len(prompt)) == expected(prompt, len(prompt))
    assert allocator.mapping_breakdown().pages("unmap", "reclaim") > 0
    allocator.check_invariants(deep=True)
