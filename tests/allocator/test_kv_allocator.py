"""The allocator's policy and its effect on real memory, on each backend."""

from __future__ import annotations

import time

import pytest
import torch

from replica import KVCacheOutOfMemory, KVLayout
from tests.allocator.conftest import TOKENS_PER_PAGE, Clock, MakeAllocator

T = TOKENS_PER_PAGE


def fill(allocator, slot: int, start: int, stop: int) -> None:
    """Writes a value unique to (slot, token, layer, K/V) into tokens [start, stop) of a slot."""
    tokens = torch.arange(start, stop, device=allocator.device.torch_device, dtype=torch.float32)
    for layer in range(allocator.config.num_layers):
        for kv, cache in enumerate((allocator.k_cache(layer), allocator.v_cache(layer))):
            value = slot * 1e6 + layer * 1e3 + kv * 0.5
            cache[slot, start:stop] = (value + tokens)[:, None, None]


def check(allocator, slot: int, stop: int) -> None:
    tokens = torch.arange(0, stop, device=allocator.device.torch_device, dtype=torch.float32)
    for layer in range(allocator.config.num_layers):
        for kv, cache in enumerate((allocator.k_cache(layer), allocator.v_cache(layer))):
            value = slot * 1e6 + layer * 1e3 + kv * 0.5
            expected = (value + tokens)[:, None, None].expand(-1, *cache.shape[2:])
            torch.testing.assert_close(cache[slot, :stop], expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_writes_land_at_their_offsets_and_survive_other_slots(
    make_allocator: MakeAllocator, layout: str
) -> None:
    allocator = make_allocator(layout=layout, budget_pages=256)
    config = allocator.config
    a, b = allocator.acquire(), allocator.acquire()
    allocator.ensure(a, 3 * T + 5)
    allocator.ensure(b, T)
    fill(allocator, a, 0, 3 * T + 5)
    fill(allocator, b, 0, T)
    # The bytes are where the layout says: slot, token, (layer, K/V,) head.
    layer = config.num_layers - 1
    k = allocator.k_cache(layer)
    assert k.shape == (
        config.max_slots,
        config.tokens_per_slot,
        config.num_kv_heads,
        config.head_dim,
    )
    element = config.element_size
    offset = (
        k[a, 7, 1].data_ptr()
        - allocator.reservations[0 if layout == "interleaved" else 2 * layer].base
    ) // element
    if layout == "interleaved":
        expected = (
            (((a * config.tokens_per_slot + 7) * config.num_layers + layer) * 2 + 0)
            * config.num_kv_heads
            + 1
        ) * config.head_dim
        v = allocator.v_cache(layer)[a, 7, 1].data_ptr() - allocator.reservations[0].base
        assert v // element == expected + config.num_kv_heads * config.head_dim  # V follows K
    else:
        expected = ((a * config.tokens_per_slot + 7) * config.num_kv_heads + 1) * config.head_dim
    assert offset == expected
    # Other slots grow, shrink and go; a's data stays.
    c = allocator.acquire()
    allocator.ensure(c, 4 * T)
    fill(allocator, c, 0, 4 * T)
    allocator.release(b)
    allocator.release(c)
    allocator.shrink()
    allocator.ensure(a, 5 * T)
    fill(allocator, a, 3 * T + 5, 5 * T)
    check(allocator, a, 5 * T)
    allocator.check_invariants(deep=True)


def test_unmapped_ranges_are_really_unmapped(make_allocator: MakeAllocator, kv_device) -> None:
    if kv_device.name != "host":
        pytest.skip("/proc/self/maps shows host mappings; the GPU test checks through the driver")
    allocator = make_allocator(layout="per_layer", eager_pages=0)
    slot = allocator.acquire()
    allocator.ensure(slot, 2 * T + 1)  # 3 pages per range
    allocator.synchronize()
    page = allocator.config.page_size
    for reservation in allocator.reservations:
        mapped = memfd_spans(reservation.base, reservation.base + reservation.nbytes)
        first = reservation.base + slot * allocator.config.pages_per_slot * page
        assert mapped == [(first, first + 3 * page)]
    allocator.release(slot)
    allocator.shrink()
    for reservation in allocator.reservations:
        assert memfd_spans(reservation.base, reservation.base + reservation.nbytes) == []


def memfd_spans(start: int, stop: int) -> list[tuple[int, int]]:
    """Address spans in [start, stop) backed by our memfd, merged, read from /proc/self/maps."""
    spans: list[tuple[int, int]] = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if high <= start or low >= stop or "vattn-kv" not in line:
                continue
            if spans and spans[-1][1] == low:
                spans[-1] = (spans[-1][0], high)
            else:
                spans.append((low, high))
    return spans


def test_best_fit_reuse_of_released_slots(make_allocator: MakeAllocator) -> None:
    allocator = make_allocator(eager_pages=0)
    slots = [allocator.acquire() for _ in range(3)]
    for slot, tokens in zip(slots, (T, 4 * T, 2 * T)):
        allocator.ensure(slot, tokens)
        allocator.release(slot)
    created = allocator.stats().pages_created
    # A request of 2 pages takes the slot with exactly 2 pages mapped; no new mapping happens.
    mapped_before = allocator.stats().pages_mapped_total
    chosen = allocator.acquire(tokens_hint=2 * T)
    assert chosen == slots[2]
    allocator.ensure(chosen, 2 * T)
    assert allocator.stats().pages_mapped_total == mapped_before
    assert allocator.stats().pages_created == created
    # Next, 3 pages: the 4-page slot covers it with least surplus.
    assert allocator.acquire(tokens_hint=3 * T) == slots[1]
    allocator.check_invariants(deep=True)


def test_deferred_reclamation_keeps_pages_until_needed(make_allocator: MakeAllocator) -> None:
    allocator = make_allocator(
        eager_pages=0, budget_pages=8, layout="per_layer", num_layers=1
    )  # 2 ranges -> 4 groups
    first, other = allocator.acquire(), allocator.acquire()
    allocator.ensure(first, 3 * T)
    allocator.release(first)
    stats = allocator.stats()
    assert (stats.pages_cached, stats.pages_in_use, stats.pages_free) == (6, 0, 0)
    # 3 groups for another slot: 1 is creatable, 2 come from the tail of the cached slot.
    allocator.ensure(other, 3 * T)
    stats = allocator.stats()
    assert (stats.pages_in_use, stats.pages_cached, stats.pages_created) == (6, 2, 8)
    allocator.check_invariants(deep=True)


def test_no_deferred_reclamation_unmaps_at_release(make_allocator: MakeAllocator) -> None:
    allocator = make_allocator(deferred_reclamation=False)
    slot = allocator.acquire()
    allocator.ensure(slot, 2 * T)
    allocator.release(slot)
    stats = allocator.stats()
    assert stats.pages_cached == 0 and stats.pages_free == stats.pages_created > 0
    allocator.check_invariants(deep=True)


def test_eager_pages_stay_ahead_of_a_growing_slot_and_are_reclaimed_first(
    make_allocator: MakeAllocator,
) -> None:
    allocator = make_allocator(
        eager_pages=2, budget_pages=16, layout="per_layer", num_layers=1
    )  # 8 groups, 8 per slot
    a = allocator.acquire()
    allocator.ensure(a, T)  # 1 group needed, 2 eager
    assert allocator.stats().pages_in_use == 6
    for length in range(T, 4 * T):  # the slot never grows into a group mapped in the same step
        allocator.wait(allocator.step_async({a: length}))
        assert allocator.stats().pages_in_use == 2 * (
            allocator.config.page_groups_for(length + 1) + 2
        )
    b = allocator.acquire()
    allocator.ensure(b, 3 * T)  # 2 free groups and 1 of a's eager ones
    c = allocator.acquire()
    with pytest.raises(KVCacheOutOfMemory):
        allocator.ensure(c, 2 * T)  # only 1 eager group left; a's 4 groups back its next step
    allocator.release(b)
    allocator.ensure(c, 2 * T)
    allocator.check_invariants(deep=True)


def test_eager_page_waits_for_the_lookahead(make_allocator: MakeAllocator) -> None:
    """With a lookahead of 3 tokens the next group is mapped only in a group's last 3 tokens."""
    allocator = make_allocator(eager_pages=1, eager_lookahead_tokens=3, budget_pages=16)  # 1 range
    a = allocator.acquire()
    allocator.ensure(a, 1)
    assert allocator.stats().pages_in_use == 1
    for length in range(1, 3 * T):
        allocator.wait(allocator.step_async({a: length}))  # the next step needs length + 1 tokens
        groups = allocator.config.page_groups_for(length + 1 + 3)
        assert allocator.stats().pages_in_use == groups, length
    allocator.check_invariants(deep=True)


def test_reclaims_eager_pages_of_running_slots_under_pressure(
    make_allocator: MakeAllocator,
) -> None:
    allocator = make_allocator(
        eager_pages=3, budget_pages=8, layout="per_layer", num_layers=1
    )  # 4 groups
    a = allocator.acquire()
    allocator.ensure(a, 1)  # 1 needed + 3 eager = the whole pool
    b = allocator.acquire()
    allocator.ensure(b, 2 * T)  # takes 2 of a's eager groups
    assert allocator.stats().pages_in_use == 8
    allocator.check_invariants(deep=True)


def test_out_of_memory_names_the_numbers_and_loses_nothing(make_allocator: MakeAllocator) -> None:
    allocator = make_allocator(
        budget_pages=6, layout="per_layer", num_layers=1, eager_pages=0
    )  # 3 groups
    slot = allocator.acquire()
    allocator.ensure(slot, T)
    fill(allocator, slot, 0, T)
    with pytest.raises(KVCacheOutOfMemory) as raised:
        allocator.ensure(slot, 5 * T)
    error = raised.value
    assert (error.tokens_asked, error.pages_needed, error.pages_available, error.pages_cached) == (
        5 * T,
        8,
        4,
        0,
    )
    assert "80 tokens asked need 8 more pages; 4 available" in str(error)
    assert allocator.length(slot) == T
    check(allocator, slot, T)
    allocator.ensure(slot, 3 * T)  # what fits still works
    allocator.check_invariants(deep=True)


def test_slot_limits_are_clear_errors(make_allocator: MakeAllocator) -> None:
    allocator = make_allocator(max_slots=1)
    slot = allocator.acquire()
    with pytest.raises(KVCacheOutOfMemory, match="all 1 slots are running"):
        allocator.acquire()
    with pytest.raises(ValueError, match="a slot holds 0..128"):
        allocator.ensure(slot, allocator.config.tokens_per_slot + 1)
    allocator.release(slot)
    with pytest.raises(ValueError, match="not running"):
        allocator.release(slot)


def test_elastic_pool_releases_idle_pages_and_shrink(make_allocator: MakeAllocator) -> None:
    clock = Clock()
    allocator = make_allocator(
        deferred_reclamation=False,
        eager_pages=0,
        max_idle_pages=2,
        idle_seconds=5.0,
        clock=clock,
        layout="per_layer",
        num_layers=1,
    )
    slot = allocator.acquire()
    allocator.ensure(slot, 4 * T)  # 8 pages
    allocator.release(slot)  # 8 free pages
    assert allocator.stats().pages_free == 8
    clock.now = 4.0
    allocator.wait(allocator.step_async({}))
    assert allocator.stats().pages_free == 8  # not idle long enough
    clock.now = 6.0
    allocator.wait(allocator.step_async({}))
    stats = allocator.stats()
    assert stats.pages_free == 2 and stats.pages_released_total == 6
    assert allocator.device_pages() == 2
    assert allocator.shrink() == 2
    assert allocator.device_pages() == 0 and allocator.stats().pages_created == 0
    allocator.check_invariants(deep=True)


def test_spare_pages_are_created_ahead_in_their_own_batch_and_growth_within_them_only_maps(
    make_allocator: MakeAllocator,
) -> None:
    """Once growth draws on the pool, ``step_async`` creates up to ``spare_pages`` free pages in a
    batch after the step's own (its ticket does not cover them); a later growth that fits in them
    creates nothing. A pool nobody draws on (idle, or just shrunk) creates none; the budget and
    ``max_idle_pages`` bound them."""
    allocator = make_allocator(
        layout="per_layer", num_layers=1, eager_pages=0, max_idle_pages=4, spare_pages=6
    )
    assert allocator._pool.spare_pages == 4  # more would be released as idle
    a = allocator.acquire()
    allocator.ensure(a, T)  # 2 pages (K and V), created on the admission's path
    ticket = allocator.step_async({a: T})  # the next token needs a second group: 2 more
    breakdown = allocator.mapping_breakdown
    assert allocator._maps.last_ticket == ticket.ticket + 1  # the spare pages' own batch
    allocator.synchronize()
    stats = allocator.stats()
    assert (stats.pages_created, stats.pages_free, allocator.device_pages()) == (8, 4, 8)
    assert breakdown().pages("create", "growth") == 4 and breakdown().pages("create", "spare") == 4
    b = allocator.acquire()
    allocator.ensure(b, 2 * T)  # 4 pages: the spare ones, mapped only
    fill(allocator, b, 0, 2 * T)
    assert breakdown().pages("create", "growth") == 4 and breakdown().pages("map", "growth") == 8
    allocator.wait(allocator.step_async({a: T, b: 2 * T - 1}))  # drawn on: topped up again
    assert allocator.stats().pages_free == 4 and breakdown().pages("create", "spare") == 8
    allocator.wait(allocator.step_async({a: T, b: 2 * T - 1}))  # nothing taken: nothing created
    assert allocator.stats().pages_created == 12
    allocator.release(a)
    allocator.release(b)
    allocator.shrink()
    allocator.wait(allocator.step_async({}))
    assert allocator.device_pages() == 0 and allocator.stats().pages_created == 0
    allocator.check_invariants(deep=True)

    small = make_allocator(budget_pages=3, eager_pages=0, max_idle_pages=8, spare_pages=8)
    slot = small.acquire()
    small.wait(small.step_async({slot: T - 1}))
    assert small.stats().pages_created == 3 and small.stats().pages_free == 2  # the budget
    small.check_invariants(deep=True)


def test_step_async_maps_in_the_background_while_the_caller_runs(
    make_allocator: MakeAllocator,
) -> None:
    allocator = make_allocator(
        max_slots=16, budget_pages=16 * 8 * 2, layout="per_layer", num_layers=1, eager_pages=0
    )
    slots = [allocator.acquire() for _ in range(16)]
    lengths = {slot: 8 * T - 1 for slot in slots}  # the next step needs every page: 256 pages
    ticket = allocator.step_async(lengths)
    deadline = time.monotonic() + 10
    while not allocator.done(ticket) and time.monotonic() < deadline:
        time.sleep(0.001)  # the "model" runs; the worker maps meanwhile
    assert allocator.done(ticket), "the worker did not map while the caller ran"
    waited = allocator.stats().wait_seconds
    assert allocator.wait(ticket) == ()
    stats = allocator.stats()
    assert stats.pages_mapped_total == 256 and stats.map_calls == 32
    assert stats.wait_seconds - waited < stats.map_seconds  # nothing left to wait for
    for slot in slots:
        fill(allocator, slot, 0, 8 * T)
    allocator.check_invariants(deep=True)


def test_step_async_reports_unbacked_slots(make_allocator: MakeAllocator) -> None:
    allocator = make_allocator(
        budget_pages=4, layout="per_layer", num_layers=1, eager_pages=0
    )  # 2 groups
    a, b = allocator.acquire(), allocator.acquire()
    allocator.ensure(a, T)
    allocator.ensure(b, T)
    assert allocator.wait(allocator.step_async({a: T, b: T})) == (a, b)
    allocator.release(b)  # its page is reclaimed for a
    assert allocator.wait(allocator.step_async({a: T})) == ()
    allocator.check_invariants(deep=True)


def test_stats_account_for_waste_exactly(make_allocator: MakeAllocator) -> None:
    allocator = make_allocator(layout="per_layer", eager_pages=1, num_layers=3)
    slot = allocator.acquire()
    allocator.ensure(slot, T + 3)  # 2 groups + 1 eager, 6 ranges
    stats = allocator.stats()
    page, ranges = allocator.config.page_size, allocator.config.num_ranges
    assert stats.pages_in_use == 3 * ranges
    assert stats.wasted_bytes == ranges * (3 * page - (T + 3) * allocator.config.bytes_per_token)
    assert (
        stats.tokens_per_page == T / ranges
    )  # a token occupies every range: T tokens take `ranges` pages
    assert allocator.config.layout is KVLayout.PER_LAYER


def test_the_interface_contracts_refuse_bad_calls_before_changing_anything(
    make_allocator: MakeAllocator,
) -> None:
    """The KVCache contracts (replica.kv.base): ValueError up front; a step that cannot be backed
    leaves books that claim no unbacked token."""
    allocator = make_allocator(budget_pages=4, layout="interleaved", eager_pages=0)
    slot = allocator.acquire()
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError):
            allocator.ensure(slot, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            allocator.step_async({slot: bad})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        allocator.acquire(-3)
    with pytest.raises(ValueError, match="not an int in"):
        allocator.release(10_000)
    assert allocator.stats().pages_created == 0  # nothing was mapped by the refused calls
    far = 6 * T  # beyond what the 4-page budget can back (a slot holds 8 pages)
    assert allocator.wait(allocator.step_async({slot: far})) == (slot,)
    assert allocator.length(slot) <= 4 * T and allocator.stats().wasted_bytes >= 0
    allocator.check_invariants(deep=True)


@pytest.mark.parametrize(
    "field, value",
    [
        ("idle_seconds", -1),
        ("idle_seconds", float("nan")),
        ("spare_pages", -1),
        ("budget_bytes", 1.5e9),
        ("eager_pages", 1.0),
        ("max_slots", True),
    ],
)
def test_config_refuses_values_of_the_wrong_kind(field: str, value: object) -> None:
    from replica.kv import KVCacheConfig

    good = dict(
        num_layers=2,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        max_slots=4,
        max_tokens=64,
        page_size=4096,
        budget_bytes=1 << 20,
    )
    KVCacheConfig(**good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        KVCacheConfig(**{**good, field: value})  # type: ignore[arg-type]
