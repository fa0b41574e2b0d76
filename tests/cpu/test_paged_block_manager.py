"""A hypothesis state machine drives random acquire/ensure/step/release/shrink sequences through
the paged KV cache and checks it against a model of what each running slot stores: the block
books, the device block table, the data in the blocks, and the waste reported.

Size: VATTN_STATEFUL_SCALE (default 1) multiplies the examples; 1 runs >= 2,000 operations.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from replica.kv import KVCacheOutOfMemory, PagedKVCache, PagedKVConfig

SCALE = int(os.environ.get("VATTN_STATEFUL_SCALE", "1"))
STEPS = 50
EXAMPLES = 100 * SCALE  # up to 100 x 50 operations; the test asserts >= 2,000 ran
LAYERS, HEADS, DIM = 2, 2, 4


def make_cache(
    block_size: int, num_blocks: int, max_tokens: int, max_slots: int = 5
) -> PagedKVCache:
    config = PagedKVConfig(
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=DIM,
        dtype=torch.float32,
        max_slots=max_slots,
        max_tokens=max_tokens,
        budget_bytes=0,
        block_size=block_size,
    )
    budget = num_blocks * config.page_size + config.page_size // 2  # a partial block is not a block
    return PagedKVCache(dataclasses.replace(config, budget_bytes=budget))


class PagedMachine(RuleBasedStateMachine):
    """Model: for each running slot, the tokens it stores (each a known value), the length the
    cache was last told (a step reports the length before its new token) and the tokens reserved."""

    operations = 0  # counted over every example of a run

    def __init__(self) -> None:
        super().__init__()
        self.lengths: dict[int, int] = {}
        self.told: dict[int, int] = {}
        self.reserved: dict[int, int] = {}

    @initialize(
        block_size=st.sampled_from([1, 3, 4, 16]),
        num_blocks=st.integers(0, 30),
        blocks_per_seq=st.integers(1, 8),
    )
    def build(self, block_size: int, num_blocks: int, blocks_per_seq: int) -> None:
        max_tokens = blocks_per_seq * block_size - (block_size // 2)  # rounded up to whole blocks
        self.cache = make_cache(block_size, num_blocks, max_tokens)
        assert self.cache.config.num_blocks == num_blocks
        assert self.cache.config.tokens_per_slot == blocks_per_seq * block_size

    def stamp(self, slot: int, start: int, stop: int) -> None:
        """Writes token t's value (slot * 1000 + t) where the block table says it lives."""
        size, blocks = self.cache.config.block_size, self.cache.block_ids(slot)
        for t in range(start, stop):
            value = float(slot * 1000 + t)
            self.cache.k_cache(1)[blocks[t // size], t % size] = value
            self.cache.v_cache(0)[blocks[t // size], t % size] = -value

    @rule(hint=st.integers(0, 200))
    def acquire(self, hint: int) -> None:
        try:
            slot = self.cache.acquire(hint)
        except KVCacheOutOfMemory:
            assert len(self.lengths) == self.cache.config.max_slots
            return
        assert slot not in self.lengths
        self.lengths[slot] = self.told[slot] = self.reserved[slot] = 0

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def ensure(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        old, blocks = self.lengths[slot], self.cache.block_ids(slot)
        tokens = data.draw(st.integers(0, self.cache.config.tokens_per_slot))  # shrinking too
        try:
            self.cache.ensure(slot, tokens)
        except KVCacheOutOfMemory as error:
            assert error.pages_needed > 0 and error.pages_cached == 0
            assert error.pages_needed > error.pages_available == self.cache.reclaimable_pages()
            assert (
                self.cache.length(slot) == self.told[slot] and self.cache.block_ids(slot) == blocks
            )
            return
        self.stamp(slot, old, tokens)
        self.lengths[slot] = self.told[slot] = self.reserved[slot] = tokens

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        limit = self.cache.config.tokens_per_slot
        growing = {s: n for s, n in self.lengths.items() if n < limit and data.draw(st.booleans())}
        unbacked = self.cache.wait(self.cache.step_async(growing))
        assert set(unbacked) <= set(growing)
        for slot, length in growing.items():
            self.told[slot] = length
            if slot in unbacked:
                self.reserved[slot] = length
            else:  # the step writes its one new token
                self.reserved[slot] = length + 1
                self.stamp(slot, length, length + 1)
                self.lengths[slot] += 1
        for slot in unbacked:  # what a scheduler does: preempt it
            self.cache.release(slot)
            del self.lengths[slot], self.told[slot], self.reserved[slot]

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        self.cache.release(slot)
        del self.lengths[slot], self.told[slot], self.reserved[slot]

    @rule()
    def shrink(self) -> None:
        assert self.cache.shrink() == 0  # a preallocated pool gives nothing back

    @rule()
    def flush(self) -> None:
        self.cache.synchronize()

    @invariant()
    def books_match_table_data_and_model(self) -> None:
        if not hasattr(self, "cache"):
            return
        type(self).operations += 1
        cache, config = self.cache, self.cache.config
        cache.check_invariants(deep=True)  # no block twice, free + in use == total, table == books
        stats = cache.stats()
        assert (
            stats.pages_free + stats.pages_in_use
            == stats.pages_created
            == stats.pages_total
            == config.num_blocks
        )
        assert stats.pages_cached == 0 and stats.pages_available == stats.pages_free
        assert stats.slots_running == len(self.lengths)
        waste = 0
        table = cache.block_table().cpu()
        for slot, length in self.lengths.items():
            assert cache.length(slot) == self.told[slot]
            blocks = cache.block_ids(slot)
            assert len(blocks) == config.blocks_for(self.reserved[slot]), (
                "not exactly the blocks reserved"
            )
            assert table[slot, : len(blocks)].tolist() == list(blocks)
            waste += (len(blocks) * config.block_size - self.told[slot]) * config.bytes_per_token
            if length:
                rows = torch.tensor(
                    [
                        blocks[t // config.block_size] * config.block_size + t % config.block_size
                        for t in range(length)
                    ]
                )
                values = torch.arange(length, dtype=torch.float32) + slot * 1000
                k = cache.k_cache(1).view(-1, HEADS, DIM)[rows, 0, 0]
                v = cache.v_cache(0).view(-1, HEADS, DIM)[rows, 1, -1]
                assert torch.equal(k, values) and torch.equal(v, -values), f"slot {slot} lost data"
        assert stats.wasted_bytes == waste


def test_paged_cache_state_machine() -> None:
    run_state_machine_as_test(
        PagedMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        ),
    )
    print(f"{PagedMachine.operations} operations")
    assert PagedMachine.operations >= 2000 * SCALE, f"only {PagedMachine.operations} operations ran"


def test_out_of_memory_and_slot_errors_carry_the_numbers() -> None:
    cache = make_cache(block_size=4, num_blocks=3, max_tokens=32, max_slots=2)
    a = cache.acquire()
    cache.ensure(a, 9)  # 3 blocks
    with pytest.raises(KVCacheOutOfMemory, match="13 tokens asked need 1 more pages; 0 available"):
        cache.ensure(a, 13)
    assert cache.wait(cache.step_async({a: 9})) == ()  # 10 tokens still fit 3 blocks
    assert cache.wait(cache.step_async({a: 12})) == (a,)  # 13 do not
    b = cache.acquire()
    with pytest.raises(KVCacheOutOfMemory, match="all 2 slots are running"):
        cache.acquire()
    with pytest.raises(ValueError, match="holds 0..32"):
        cache.ensure(b, 33)
    # A length the slot cannot back comes back unbacked; its books keep what it backs (nothing).
    assert cache.wait(cache.step_async({b: 5})) == (b,) and cache.length(b) == 0
    cache.check_invariants(deep=True)
    for bad in (-1, 2.5, True, 32):  # 32: a step after 32 tokens passes the 32-token slot
        with pytest.raises(ValueError):
            cache.step_async({b: bad})
    with pytest.raises(ValueError, match="20.5 tokens asked"):
        cache.ensure(b, 20.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not an int in"):
        cache.length(7)
    cache.release(a)
    with pytest.raises(ValueError, match="is free, not running"):
        cache.length(a)
    assert cache.can_allocate(12) and not cache.can_allocate(13)


# ---- the block-level prefix cache ----------------------------------------------------------------
def prefix_cache(num_blocks: int, max_slots: int = 4) -> PagedKVCache:
    cache = make_cache(block_size=4, num_blocks=num_blocks, max_tokens=32, max_slots=max_slots)
    return PagedKVCache(dataclasses.replace(cache.config, prefix_cache=True))


def computed(cache: PagedKVCache, prompt: list[int]) -> int:
    """Acquires with ``prompt``, computes the rest of it and books the step (which indexes it)."""
    slot = cache.acquire(0, prompt)
    cache.ensure(slot, len(prompt))
    cache.wait(cache.step_async({slot: len(prompt)}))
    return slot


def test_full_blocks_are_shared_by_reference_and_immutable() -> None:
    cache = prefix_cache(num_blocks=12)
    prompt = list(range(10))  # 2 full blocks and a partial one
    first = computed(cache, prompt)
    second = cache.acquire(0, [*prompt[:9], 99])
    assert cache.length(second) == 8
    assert cache.block_ids(second) == cache.block_ids(first)[:2]
    assert cache.stats().pages_shared == 2
    with pytest.raises(ValueError, match="immutable"):
        cache.ensure(second, 7)
    cache.ensure(second, 10)
    assert cache.block_ids(second)[2] != cache.block_ids(first)[2]  # its own block from there
    cache.release(second)  # its own references go; the first slot keeps the shared blocks
    assert cache.stats().pages_shared == 0 and cache.length(first) == 10
    cache.check_invariants(deep=True)


def test_an_admission_undone_before_its_blocks_are_backed_counts_no_prefix_query() -> None:
    cache = prefix_cache(num_blocks=12)
    prompt = list(range(10))
    computed(cache, prompt)
    queries, hits = cache.stats().prefix_queries_tokens, cache.stats().prefix_hits_tokens
    other = [*prompt[:9], 99]
    cache.release(cache.acquire(0, other))  # the scheduler's failed admission: undone
    stats = cache.stats()
    assert (stats.prefix_queries_tokens, stats.prefix_hits_tokens) == (queries, hits)
    slot = cache.acquire(0, other)
    cache.ensure(slot, len(other))
    stats = cache.stats()
    assert (stats.prefix_queries_tokens, stats.prefix_hits_tokens) == (queries + 10, hits + 8)
    cache.check_invariants(deep=True)


def test_released_blocks_stay_cached_until_taken_least_recently_used_first() -> None:
    cache = prefix_cache(num_blocks=6)
    old, new = [1] * 8, [2] * 8
    for prompt in (old, new):
        slot = computed(cache, prompt)  # 2 blocks + 1 for the next step's token
        cache.release(slot, prompt)
    stats = cache.stats()
    assert (stats.pages_cached, stats.pages_free, stats.pages_available) == (4, 2, 6)
    assert cache.cached_tokens([*old, 0]) == cache.cached_tokens([*new, 0]) == 8
    grower = cache.acquire(0, [3])
    cache.ensure(grower, 12)  # 3 blocks: the 2 free ones, then the oldest cached: old's last
    assert cache.cached_tokens([*old, 0]) == 4 and cache.cached_tokens([*new, 0]) == 8
    assert cache.stats().prefix_evicted_pages == 1
    again = cache.acquire(0, [*new, 5])  # held again: off the LRU list
    assert cache.length(again) == 8 and cache.stats().pages_cached == 1
    cache.check_invariants(deep=True)
