"""A hypothesis state machine drives random acquire/ensure/step/release/shrink sequences and
checks the allocator against a model of what each running slot stores, and against what the
extension really mapped.

Size: VATTN_STATEFUL_SCALE (default 1) multiplies the examples; 1 runs >= 2,000 operations on the
host backend, >= 500 on CUDA (a third of the examples); the GPU soak (benchmarks/soak_gpu.py) runs
CUDA at scale 20.
"""

from __future__ import annotations

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

from replica import KVCacheAllocator, KVCacheOutOfMemory
from tests.allocator.conftest import TOKENS_PER_PAGE, Clock, MakeAllocator

SCALE = int(os.environ.get("VATTN_STATEFUL_SCALE", "1"))
STEPS = 50
EXAMPLES = 60 * SCALE  # up to 60 x 50 operations; the test asserts >= 2,000 ran


class AllocatorMachine(RuleBasedStateMachine):
    """Model: for each running slot, its length; every token below it holds a known value."""

    make: MakeAllocator
    operations = 0  # counted over every example of a run

    def __init__(self) -> None:
        super().__init__()
        self.lengths: dict[int, int] = {}
        # What the allocator was last told (a step reports the length before its new token).
        self.reported: dict[int, int] = {}
        self.clock = Clock()

    @initialize(
        layout=st.sampled_from(["per_layer", "interleaved"]),
        budget_pages=st.integers(8, 48),
        eager=st.integers(0, 2),
        lookahead=st.none() | st.integers(0, 2 * TOKENS_PER_PAGE),
        deferred=st.booleans(),
    )
    def build(
        self, layout: str, budget_pages: int, eager: int, lookahead: int | None, deferred: bool
    ) -> None:
        self.allocator: KVCacheAllocator = self.make(
            layout=layout,
            num_layers=2,
            max_slots=5,
            max_tokens=6 * TOKENS_PER_PAGE,
            budget_pages=budget_pages,
            eager_pages=eager,
            eager_lookahead_tokens=lookahead,
            deferred_reclamation=deferred,
            max_idle_pages=2,
            idle_seconds=1.0,
            clock=self.clock,
        )

    def stamp(self, slot: int, start: int, stop: int) -> None:
        if stop > start:
            values = torch.arange(
                start, stop, dtype=torch.float32, device=self.allocator.device.torch_device
            )
            self.allocator.k_cache(1)[slot, start:stop] = (values + slot * 1000)[:, None, None]
            self.allocator.v_cache(0)[slot, start:stop] = (-values - slot * 1000)[:, None, None]

    @rule(hint=st.integers(0, 6 * TOKENS_PER_PAGE))
    def acquire(self, hint: int) -> None:
        try:
            slot = self.allocator.acquire(hint)
        except KVCacheOutOfMemory:
            assert len(self.lengths) == self.allocator.config.max_slots
            return
        assert slot not in self.lengths
        self.lengths[slot] = self.reported[slot] = 0

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def ensure(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        old = self.lengths[slot]
        tokens = data.draw(st.integers(old, self.allocator.config.tokens_per_slot))
        try:
            self.allocator.ensure(slot, tokens)
        except KVCacheOutOfMemory as error:
            assert error.pages_needed > 0
            assert self.allocator.length(slot) == self.reported[slot]  # nothing changed
            return
        self.stamp(slot, old, tokens)
        self.lengths[slot] = self.reported[slot] = tokens

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        limit = self.allocator.config.tokens_per_slot
        growing = {s: n for s, n in self.lengths.items() if n < limit and data.draw(st.booleans())}
        unbacked = self.allocator.wait(self.allocator.step_async(growing))
        for slot, length in growing.items():
            self.reported[slot] = length
            if slot not in unbacked:  # the step writes its one new token
                self.stamp(slot, length, length + 1)
                self.lengths[slot] += 1
        for slot in unbacked:  # what a scheduler does: preempt it
            self.allocator.release(slot)
            del self.lengths[slot], self.reported[slot]

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        self.allocator.release(slot)
        del self.lengths[slot], self.reported[slot]

    @rule(seconds=st.floats(0.0, 2.0))
    def idle(self, seconds: float) -> None:
        self.clock.now += seconds
        self.allocator.wait(self.allocator.step_async({}))

    @rule()
    def shrink(self) -> None:
        self.allocator.shrink()
        assert self.allocator.stats().pages_free == 0
        assert self.allocator.stats().pages_cached == 0

    @invariant()
    def books_match_memory_and_model(self) -> None:
        if not hasattr(self, "allocator"):
            return
        type(self).operations += 1
        allocator = self.allocator
        allocator.check_invariants(deep=True)  # no page mapped twice, books == extension
        stats = allocator.stats()
        assert (
            stats.pages_free + stats.pages_in_use + stats.pages_cached
            == stats.pages_created
            <= stats.pages_total
        )
        config, per_slot = allocator.config, allocator.config.pages_per_slot
        mapped = allocator.reservations[0].page_ids()
        waste = 0
        for slot, length in self.lengths.items():
            assert allocator.length(slot) == self.reported[slot]
            groups = sum(page >= 0 for page in mapped[slot * per_slot : (slot + 1) * per_slot])
            assert groups >= config.page_groups_for(length), "a stored token is not backed"
            stored = self.reported[slot]
            waste += (
                groups * config.page_size - stored * config.bytes_per_token
            ) * config.num_ranges
            if length:
                values = torch.arange(length, dtype=torch.float32) + slot * 1000
                k = allocator.k_cache(1)[slot, :length, 0, 0].cpu()
                v = allocator.v_cache(0)[slot, :length, 1, -1].cpu()
                assert torch.equal(k, values) and torch.equal(v, -values), f"slot {slot} lost data"
        assert stats.wasted_bytes == waste


@pytest.mark.parametrize("scale", [1])
def test_allocator_state_machine(make_allocator: MakeAllocator, kv_device, scale: int) -> None:
    machine = type("Machine", (AllocatorMachine,), {"make": staticmethod(make_allocator)})
    examples = EXAMPLES if kv_device.name == "host" else max(EXAMPLES // 3, 10)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples * scale,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            database=None,
        ),
    )
    minimum = (2000 if kv_device.name == "host" else 500) * scale * SCALE
    print(f"{machine.operations} operations")
    assert machine.operations >= minimum, f"only {machine.operations} operations ran"
