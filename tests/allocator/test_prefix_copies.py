"""A prefix hit served without mapping: copied into a released slot's own pages while free pages
cover the copies, aliased when pages are scarce, or taken over in the released slot that holds it;
and the ordering contract that keeps a copy's pages mapped until it has run (host backend; CUDA
under ``gpu``)."""

from __future__ import annotations

import random

import pytest

from replica import KVCacheAllocator, KVCacheOutOfMemory
from tests.allocator.conftest import TOKENS_PER_PAGE, MakeAllocator
from tests.allocator.test_prefix_sharing import fill, k_values, make, page_ids

T = TOKENS_PER_PAGE


def expected(prompt: list[int], tokens: int) -> list[float]:
    return [t * 1000.0 + p for p, t in enumerate(prompt[:tokens])]


def cached_conversation(allocator: KVCacheAllocator, prompt: list[int]) -> int:
    slot = allocator.acquire(len(prompt), prompt)
    fill(allocator, slot, prompt)
    allocator.release(slot, prompt)
    return slot


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_a_hit_landing_in_a_released_slot_is_copied_into_its_pages(
    make_allocator: MakeAllocator, layout: str
) -> None:
    """Two slots: one runs the prefix, the other holds an unrelated conversation; a new request
    over the prefix lands in the released slot, whose pages get the prefix's bytes by copy: no
    unmap, no alias, its own pages beyond the copy kept for the request's writes."""
    ranges = 4 if layout == "per_layer" else 1  # two layers
    allocator = make(make_allocator, layout=layout, max_slots=2, budget_pages=12 * ranges)
    prompt = list(range(3 * T + 5))
    holder = allocator.acquire(len(prompt), prompt)
    fill(allocator, holder, prompt)
    other = cached_conversation(allocator, [7] * (3 * T + 5))  # 4 groups, only it maps them
    own_pages = page_ids(allocator, other)[:4]
    allocator.synchronize()
    before = allocator.mapping_breakdown()
    request = [*prompt[: 2 * T + 3], 9, 9]
    slot = allocator.acquire(len(request), request)
    assert slot == other and allocator.length(slot) == 2 * T
    ranges = allocator.config.num_ranges
    assert allocator.stats().prefix_copied_bytes == 2 * ranges * allocator.config.page_size
    allocator.synchronize()
    after = allocator.mapping_breakdown()
    assert after.pages("map", "alias") == before.pages("map", "alias")  # nothing aliased
    assert after.pages("unmap") == before.pages("unmap")  # nothing unmapped
    assert page_ids(allocator, slot)[:4] == own_pages  # its own pages, now holding the prefix
    assert k_values(allocator, slot, 2 * T) == expected(prompt, 2 * T)
    assert allocator.stats().pages_shared == 0
    fill(allocator, slot, request)  # writes past the copy, in pages it kept
    assert k_values(allocator, holder, len(prompt)) == expected(prompt, len(prompt))
    allocator.check_invariants(deep=True)


def test_a_hit_is_aliased_when_free_pages_cannot_cover_a_copy(
    make_allocator: MakeAllocator,
) -> None:
    """Every page of the budget mapped: copying would keep a second copy of the prefix, so the
    released slot's pages are unmapped and the prefix's aliased (one copy in memory)."""
    allocator = make(make_allocator, layout="interleaved", max_slots=2, budget_pages=8)
    prompt = list(range(3 * T + 5))
    holder = allocator.acquire(len(prompt), prompt)
    fill(allocator, holder, prompt)  # 4 pages
    other = cached_conversation(allocator, [7] * (3 * T + 5))  # the other 4
    assert allocator.stats().pages_available - allocator.stats().pages_cached == 0
    request = [*prompt[: 2 * T + 3], 9, 9]
    slot = allocator.acquire(len(request), request)
    assert slot == other and allocator.length(slot) == 2 * T
    assert allocator.stats().prefix_copied_bytes == 0
    allocator.synchronize()
    assert page_ids(allocator, slot)[:2] == page_ids(allocator, holder)[:2]
    assert allocator.stats().pages_shared == 2
    assert k_values(allocator, slot, 2 * T) == expected(prompt, 2 * T)
    allocator.check_invariants(deep=True)


def test_a_hit_takes_over_the_released_slot_that_holds_it(make_allocator: MakeAllocator) -> None:
    """No free slot; a released conversation holds the whole hit and more: the request continues
    in that slot (nothing mapped or copied) and the conversation's tail is evicted, counted."""
    allocator = make(make_allocator, layout="interleaved", max_slots=2)
    prompt = list(range(3 * T + 5))
    held = cached_conversation(allocator, prompt)  # 3 full groups indexed
    busy = allocator.acquire(1, [5])
    allocator.ensure(busy, 1)
    allocator.synchronize()
    before = allocator.mapping_breakdown()
    request = [*prompt[: 2 * T + 3], 9, 9]
    assert allocator.cached_tokens(request) == 2 * T
    slot = allocator.acquire(len(request), request)
    stats = allocator.stats()
    assert slot == held and allocator.length(slot) == 2 * T
    assert stats.prefix_takeovers == 1 and stats.prefix_copied_bytes == 0
    assert stats.prefix_evicted_pages == 1  # the conversation's third group
    allocator.synchronize()
    assert allocator.mapping_breakdown().pages("map") == before.pages("map")
    assert allocator.cached_tokens([*prompt, 0]) == 2 * T
    allocator.check_invariants(deep=True)


def test_a_conversation_whose_prefix_was_copied_continues_in_place(
    make_allocator: MakeAllocator,
) -> None:
    """Equal keys, not equal pages, say a slot holds a prefix: the next turn of a conversation
    that got its prefix by copy finds its slot and maps nothing."""
    allocator = make(make_allocator, layout="interleaved", max_slots=2, budget_pages=24)
    prompt = list(range(3 * T + 5))
    holder = allocator.acquire(len(prompt), prompt)
    fill(allocator, holder, prompt)
    cached_conversation(allocator, [7] * (3 * T + 5))
    turn1 = [*prompt[: 2 * T + 3], 9, 9]
    slot = allocator.acquire(len(turn1), turn1)
    assert allocator.stats().prefix_copied_bytes > 0
    fill(allocator, slot, turn1)
    history = [*turn1, *range(40, 40 + T)]
    allocator.ensure(slot, len(history))
    allocator.release(slot, history)
    allocator.synchronize()
    before = allocator.mapping_breakdown()
    turn2 = [*history, 1, 2]
    assert allocator.acquire(len(turn2), turn2) == slot
    assert allocator.length(slot) == len(history) // T * T
    allocator.synchronize()
    assert allocator.mapping_breakdown().pages("map") == before.pages("map")
    allocator.check_invariants(deep=True)


class ManualFence:
    """A copy's fence that completes when the test says so; ``wait`` records what it saw, ``order``
    that a stream was put behind it (the host not waiting)."""

    def __init__(self, on_wait) -> None:  # type: ignore[no-untyped-def]
        self.complete = False
        self.waited = False
        self.ordered = False
        self._on_wait = on_wait

    def done(self) -> bool:
        return self.complete

    def wait(self) -> None:
        self._on_wait()
        self.waited = self.complete = True

    def order(self) -> None:
        self.ordered = True


@pytest.mark.parametrize("side", ["source", "target"])
def test_a_copy_pins_its_pages_until_its_fence_completes(
    make_allocator: MakeAllocator, side: str
) -> None:
    """Ordering contract 3: a reclaim that would unmap a copy's source (or its target) first
    waits for the copy's fence, and the pages are still mapped when it does."""
    fences: list[ManualFence] = []
    seen: list[list[int]] = []
    allocator: KVCacheAllocator

    def make_fence() -> ManualFence:
        fence = ManualFence(lambda: seen.append(list(allocator.reservations[0].page_ids())))
        fences.append(fence)
        return fence

    allocator = make(
        make_allocator, layout="interleaved", max_slots=3, budget_pages=12, make_fence=make_fence
    )
    prompt = list(range(3 * T + 5))
    holder = allocator.acquire(len(prompt), prompt)
    fill(allocator, holder, prompt)  # 4 pages
    other = cached_conversation(allocator, [7] * (3 * T + 5))  # 4 pages
    busy = allocator.acquire(1, [5])
    allocator.ensure(busy, 1)  # 1 page; 3 free
    request = [*prompt[: 2 * T + 3], 9, 9]
    slot = allocator.acquire(len(request), request)
    assert slot == other and len(fences) == 1 and not fences[0].waited
    allocator.wait(allocator.step_async({}))  # the mapping worker is idle; the copy is not
    assert not fences[0].waited
    pinned = holder if side == "source" else slot
    mapped = page_ids(allocator, pinned)[:2]
    allocator.release(pinned, prompt if side == "source" else request[: 2 * T])
    # The running slot grows into every page: the pinned slot's pages must be reclaimed.
    allocator.ensure(busy, 8 * T)
    assert fences[0].waited, "the reclaim did not wait for the copy"
    per_slot = allocator.config.pages_per_slot
    at_wait = seen[0][pinned * per_slot : pinned * per_slot + 2]
    assert at_wait == mapped, "the pinned pages were unmapped before the copy's fence"
    allocator.synchronize()
    assert -1 in page_ids(allocator, pinned)[:2]  # reclaimed after the fence
    allocator.check_invariants(deep=True)


def test_a_completed_copy_pins_nothing(make_allocator: MakeAllocator) -> None:
    fences: list[ManualFence] = []

    def make_fence() -> ManualFence:
        fences.append(ManualFence(lambda: None))
        return fences[-1]

    allocator = make(make_allocator, layout="interleaved", max_slots=2, make_fence=make_fence)
    prompt = list(range(3 * T + 5))
    holder = allocator.acquire(len(prompt), prompt)
    fill(allocator, holder, prompt)
    cached_conversation(allocator, [7] * (3 * T + 5))
    allocator.acquire(2 * T + 5, [*prompt[: 2 * T + 3], 9, 9])
    fences[0].complete = True
    allocator.release(holder, prompt)
    allocator.shrink()  # unmaps every cached slot: nothing left to wait for
    assert not fences[0].waited
    allocator.check_invariants(deep=True)


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
@pytest.mark.parametrize("block", [4, T, 24], ids=["inside-a-page", "a-page", "straddling"])
def test_a_seeded_walk_aliases_copies_and_takes_over_keeping_every_token(
    make_allocator: MakeAllocator, layout: str, block: int
) -> None:
    """Conversations over shared prompts in three slots under a small budget, with a fixed seed
    (the state machine explores the same rules at random; this walk proves each path ran): every
    running slot reads back the value of every token it stores, whether its prefix was aliased,
    copied whole or in part, or taken over, and the books hold after every call."""
    rng = random.Random(block)
    ranges = 4 if layout == "per_layer" else 1
    allocator = make(
        make_allocator,
        layout=layout,
        max_slots=3,
        max_tokens=6 * T,
        budget_pages=14 * ranges,
        eager_pages=1,
        prefix_block_tokens=block,
    )
    stems = [[rng.randrange(2) for _ in range(90)] for _ in range(2)]
    running: dict[int, list[int]] = {}
    histories: list[list[int]] = []
    hits = shared = 0
    for _ in range(400):
        choice = rng.random()
        if choice < 0.45:
            base = (
                rng.choice(histories + stems)
                if histories and rng.random() < 0.5
                else rng.choice(stems)
            )
            prompt = [*base[: rng.randrange(len(base) + 1)], rng.randrange(2)][: 6 * T]
            try:
                slot = allocator.acquire(len(prompt), prompt)
            except KVCacheOutOfMemory:
                continue
            hits += allocator.length(slot) > 0
            try:
                fill(allocator, slot, prompt)
            except KVCacheOutOfMemory:
                allocator.release(slot, prompt[: allocator.length(slot)])
                continue
            running[slot] = prompt
            shared = max(shared, allocator.stats().pages_shared)
        elif running:
            slot = rng.choice(sorted(running))
            prompt = running.pop(slot)
            allocator.release(slot, prompt)
            histories = [*histories[-5:], prompt]
        allocator.check_invariants()
        for slot, prompt in running.items():
            assert k_values(allocator, slot, len(prompt)) == expected(prompt, len(prompt)), slot
    stats = allocator.stats()
    assert hits > 20 and shared > 0, (hits, shared)
    assert stats.prefix_copied_bytes > 0, "no hit was copied"
    assert stats.prefix_takeovers > 0, "no hit took over a released slot"
    allocator.check_invariants(deep=True)
