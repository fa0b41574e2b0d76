"""Borrowed prefix reads (``replica.kv.borrows``): a hit aliased into a fresh slot is read from its
holder while its own aliases wait behind the growth; they map late, the borrow ends, and nothing
the holder does meanwhile pulls its pages from under the borrower (host backend; CUDA under
``gpu``)."""

from __future__ import annotations

import pytest

from replica import KVCacheAllocator
from tests.allocator.conftest import TOKENS_PER_PAGE, MakeAllocator
from tests.allocator.test_prefix_sharing import fill, k_values, page_ids

T = TOKENS_PER_PAGE


def make(make_allocator: MakeAllocator, **overrides: object) -> KVCacheAllocator:
    settings: dict[str, object] = dict(
        num_layers=2, max_slots=4, budget_pages=32, eager_pages=0, prefix_cache=True
    )
    settings.update(overrides)
    allocator = make_allocator(**settings)
    assert allocator.enable_borrowed_reads()
    return allocator


def borrower(allocator: KVCacheAllocator) -> tuple[int, int, list[int]]:
    """A holder that computed a 3.3-page prompt, and a request over its first two pages admitted
    and backed (a waited ensure, as the scheduler's admission makes): (holder, borrower, its
    prompt)."""
    prompt = list(range(3 * T + 5))
    holder = allocator.acquire(len(prompt), prompt)
    fill(allocator, holder, prompt)
    other = [*prompt[: 2 * T + 3], 7, 7, 7]
    slot = allocator.acquire(len(other), other)
    allocator.ensure(slot, len(other))
    return holder, slot, other


def sent(allocator: KVCacheAllocator) -> None:
    """Waits for everything sent to the mapping worker (the late runs a step sent included)."""
    allocator.wait(allocator.step_async({}))


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_a_hit_is_read_from_its_holder_until_its_late_aliases_map(
    make_allocator: MakeAllocator, layout: str
) -> None:
    allocator = make(make_allocator, layout=layout)
    holder, slot, other = borrower(allocator)
    assert allocator.borrowed_reads() == {slot: (holder, 2 * T)}
    assert allocator.stats().prefix_borrows == 1
    # Backed for its first step: the pages it writes are mapped, its aliases are not yet.
    assert page_ids(allocator, slot)[:3] == [-1, -1, page_ids(allocator, slot)[2]]
    assert page_ids(allocator, slot)[2] >= 0
    allocator.check_invariants(deep=True)
    # The step's growth goes first, the late run after it; then the borrow can end.
    allocator.wait(allocator.step_async({slot: len(other)}))
    assert allocator.borrowed_reads() == {slot: (holder, 2 * T)}  # until the schedule ends it
    sent(allocator)
    assert page_ids(allocator, slot)[:2] == page_ids(allocator, holder)[:2]
    assert allocator.end_borrows() == (slot,)
    assert allocator.borrowed_reads() == {}
    assert k_values(allocator, slot, 2 * T) == k_values(allocator, holder, 2 * T)
    assert allocator.stats().pages_shared == 2 * allocator.config.num_ranges
    allocator.check_invariants(deep=True)


def test_the_late_run_is_queued_behind_the_growth_of_later_admissions(
    make_allocator: MakeAllocator,
) -> None:
    """Admitting a second borrower does not put its growth behind the first one's aliases."""
    allocator = make(make_allocator, max_slots=5)
    holder, first, other = borrower(allocator)
    second = allocator.acquire(len(other), other)
    allocator.ensure(second, len(other))  # returns with the first one's aliases still unsent
    assert page_ids(allocator, first)[:2] == page_ids(allocator, second)[:2] == [-1, -1]
    assert set(allocator.borrowed_reads()) == {first, second}
    allocator.wait(allocator.step_async({first: len(other), second: len(other)}))
    sent(allocator)
    assert sorted(allocator.end_borrows()) == [first, second]
    for slot in (first, second):
        assert page_ids(allocator, slot)[:2] == page_ids(allocator, holder)[:2]
    allocator.check_invariants(deep=True)


def test_a_borrower_released_early_maps_its_aliases_and_keeps_its_history(
    make_allocator: MakeAllocator,
) -> None:
    allocator = make(make_allocator)
    holder, slot, other = borrower(allocator)
    allocator.release(slot, other[: 2 * T])
    assert allocator.borrowed_reads() == {}
    allocator.check_invariants(deep=True)
    allocator.synchronize()
    assert page_ids(allocator, slot)[:2] == page_ids(allocator, holder)[:2]
    assert allocator.cached_tokens(other) == 2 * T


def test_reclaiming_the_holder_ends_the_borrow_before_unmapping_it(
    make_allocator: MakeAllocator,
) -> None:
    """The holder's pinned pages are unmapped only after the borrow ended (its fence waited): the
    borrower's late run is sent first and then reads its own pages."""
    allocator = make(make_allocator, max_slots=2, budget_pages=12)
    holder, slot, other = borrower(allocator)
    allocator.release(holder, list(range(3 * T + 5)))
    assert allocator.borrowed_reads() == {slot: (holder, 2 * T)}
    # A new prompt needs the holder's slot (the only one not running): it is reclaimed whole.
    fresh = [9] * (5 * T)
    third = allocator.acquire(len(fresh), fresh)
    assert third == holder
    allocator.ensure(third, len(fresh))
    assert allocator.borrowed_reads() == {}
    assert allocator.stats().prefix_borrows_forced == 1
    allocator.check_invariants(deep=True)
    sent(allocator)
    assert page_ids(allocator, slot)[:2] != [-1, -1]
    assert k_values(allocator, slot, 2 * T) == [t * 1000.0 + t for t in range(2 * T)]


def test_without_borrowed_reads_a_hit_maps_its_aliases_at_once(
    make_allocator: MakeAllocator,
) -> None:
    allocator = make_allocator(num_layers=2, max_slots=4, eager_pages=0, prefix_cache=True)
    holder, slot, _ = borrower(allocator)
    assert allocator.borrowed_reads() == {}
    assert page_ids(allocator, slot)[:2] == page_ids(allocator, holder)[:2]
    assert allocator.stats().prefix_borrows == 0


def test_a_hit_the_kernel_cannot_page_is_aliased_at_once(make_allocator: MakeAllocator) -> None:
    """A borrow is a multiple of what the attention backend reads (FlashInfer: its 16-token
    pages): a 2-page hit of 16-token pages is not one of 64 tokens."""
    allocator = make_allocator(num_layers=2, max_slots=4, eager_pages=0, prefix_cache=True)
    assert allocator.enable_borrowed_reads(granularity=4 * T)
    holder, slot, _ = borrower(allocator)
    assert allocator.borrowed_reads() == {}
    assert page_ids(allocator, slot)[:2] == page_ids(allocator, holder)[:2]


def test_a_rank_replaying_ends_only_what_borrows(make_allocator: MakeAllocator) -> None:
    allocator = make(make_allocator)
    holder, slot, _ = borrower(allocator)
    with pytest.raises(ValueError, match="borrow nothing"):
        allocator.end_borrows([holder])
    assert allocator.end_borrows([slot]) == (slot,)
    assert allocator.borrowed_reads() == {}
    allocator.check_invariants(deep=True)
