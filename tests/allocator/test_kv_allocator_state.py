"""A hypothesis state machine drives random acquire/ensure/step/release/shrink sequences, and with
the prefix cache on, share (acquire with a prompt that starts like a running or released slot's
tokens: aliased or copied pages, or a released slot taken over), continue (the next turn of a
released conversation: in place) and evict
(growth under pressure reclaims cached prefixes) -- and checks the allocator against a model of
the token each position of each running slot stores (its bytes, read through the slot: an aliased
page must show the prefix's bytes), and against what the extension really mapped and counts.

Every example with the prefix cache starts with a conversation's first turn, released, and its
next turn, which with deferred reclamation finds the history cached: sharing by construction. The
rules alone left whole runs without a hit: hypothesis' swarm testing turns rules off per example
(share and continue, or release, which leaves the three slots full), and its mutations repeat an
example's initialize draws, so only 4-9 independent examples of a run shared.

With borrowed reads on (``replica.kv.borrows``), a hit aliased into a fresh slot maps late: the
model reads such a slot's leading tokens through its holder, as the attention backends do, and the
extension must not map the late run before it is sent; a rule ends the borrows whose run mapped.

On the host backend the copies' fences complete only when a rule says so (or a caller waits
for them), as a GPU's would later: ``check_invariants`` then sees that no page under a pending
copy was unmapped (the ordering contract of ``replica.kv.copies``), and the test that the host
waited for such copies before unmaps and put them ahead of rewrites.

The borrowed run (a quarter of the examples) has borrowed reads on in every example, with the
prefix cache and whole-page hits into fresh slots, so that every run borrows and ends borrows.

Size: VATTN_STATEFUL_SCALE (default 1) multiplies the examples; 1 runs >= 10,000 operations on the
host backend, >= 2,000 on CUDA (a fifth of the examples); the GPU soak (benchmarks/soak_gpu.py)
runs CUDA at scale 20.
"""

from __future__ import annotations

import os
import random

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
STEPS = 70
EXAMPLES = 240 * SCALE  # up to 240 x 70 operations; the test asserts >= 10,000 ran
VOCAB = 2  # few token ids, so prompts often share prefixes


class DeferredFence:
    """A copy's fence (host backend: the copy itself ran) that completes when the machine says or
    a caller waits for it, counting the waits and orders that found it pending."""

    def __init__(self, machine: type[AllocatorMachine]) -> None:
        self.complete = False
        self._machine = machine

    def done(self) -> bool:
        return self.complete

    def wait(self) -> None:
        self._machine.waited_fences += not self.complete
        self.complete = True

    def order(self) -> None:
        self._machine.ordered_fences += not self.complete


def value(token: int, position: int) -> float:
    """What the model stores for ``token`` at ``position`` (K; V stores its negative)."""
    return float(token * 10_000 + position + 1)


class AllocatorMachine(RuleBasedStateMachine):
    """Model: for each running slot, the tokens it stores (``tokens[slot]``, its length) and what
    the allocator was last told; the conversations released slots hold (``histories``); the
    tokens of each slot's length whose deferred host-tier restore is not copied yet
    (``restoring``: no valid K/V until the slot's next waited ensure, or dropped by a release)."""

    make: MakeAllocator
    operations = 0  # counted over every example of a run
    shared_acquires = 0  # acquires that found a cached prefix (the test asserts some did)
    copied_bytes = 0  # hit bytes copied instead of aliased, and take-overs (asserted too)
    takeovers = 0
    borrowing = False  # borrowed reads on in every example (set by the test)
    borrows = 0  # hits read from their holder until aliased
    borrows_ended = 0  # by the end_borrows rule (their aliases mapped)
    restored_tokens = 0  # prompt tokens copied back from the host tier
    dropped_restores = 0  # slots released while their restore was pending
    page_size = 0  # the backend's, set by the test
    deferred_fences = False  # host backend: fences complete when a rule says (set by the test)
    waited_fences = 0  # pending copies the host waited for (before an unmap)
    ordered_fences = 0  # pending copies put ahead of a rewrite on the device

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[int, list[int]] = {}
        # What the allocator was last told (a step reports the length before its new token).
        self.reported: dict[int, int] = {}
        self.histories: list[tuple[int, ...]] = []
        self.restoring: dict[int, int] = {}
        # A slot left restoring: its prompt, whose tokens its next ones are (the slot's books
        # hold the prompt's tokens, as a request's do).
        self.prompts: dict[int, list[int]] = {}
        self.clock = Clock()
        self.fences: list[DeferredFence] = []  # made, not yet seen complete

    @initialize(
        layout=st.sampled_from(["per_layer", "interleaved"]),
        budget_pages=st.integers(8, 48),
        eager=st.integers(0, 2),
        lookahead=st.none() | st.integers(0, 2 * TOKENS_PER_PAGE),
        deferred=st.booleans(),
        prefix=st.booleans(),
        # Prefix blocks inside a page (4), a page each (16), straddling pages (24).
        block=st.sampled_from([4, TOKENS_PER_PAGE, 24]),
        premap=st.booleans(),
        host_pages=st.sampled_from([0, 0, 3, 12]),  # the host tier (with the prefix cache)
        seed=st.integers(0, 2**16),
    )
    def build(
        self,
        layout: str,
        budget_pages: int,
        eager: int,
        lookahead: int | None,
        deferred: bool,
        prefix: bool,
        block: int,
        premap: bool,
        host_pages: int,
        seed: int,
    ) -> None:
        borrow = type(self).borrowing
        if borrow:  # hits of whole pages into fresh slots: premapped slots are never fresh
            prefix, premap, block = True, False, max(block, TOKENS_PER_PAGE)
        self.allocator: KVCacheAllocator = self.make(
            layout=layout,
            num_layers=2,
            max_slots=3,  # few slots: hits land in released slots (copies, take-overs)
            max_tokens=6 * TOKENS_PER_PAGE,
            budget_pages=budget_pages,
            eager_pages=eager,
            eager_lookahead_tokens=lookahead,
            deferred_reclamation=deferred,
            max_idle_pages=2,
            idle_seconds=1.0,
            clock=self.clock,
            prefix_cache=prefix,
            prefix_block_tokens=block,
            premap=premap,
            host_tier_bytes=host_pages * self.page_size,
            make_fence=self.make_fence if self.deferred_fences else None,
        )
        self.prefix = prefix
        self.borrowing = borrow and self.allocator.enable_borrowed_reads()
        self.random = random.Random(seed)
        if prefix:
            self.first_turns()

    def first_turns(self) -> None:
        """A conversation's first turn (one full block, and the token computed for its logits),
        released, then its next turn: in place, a hit, with deferred reclamation. Both turns fit
        two page groups, the smallest budget's."""
        first = self.new_tokens(self.allocator.config.prefix_block_tokens + 1)
        self.start(len(first), first)
        (slot,) = self.tokens
        self.drop(slot)
        shared = type(self).shared_acquires
        message = self.new_tokens(self.random.randint(1, 2 * TOKENS_PER_PAGE - len(first)))
        self.start(len(first) + len(message), [*first, *message])
        if self.allocator.config.deferred_reclamation:
            assert type(self).shared_acquires == shared + 1, "a next turn missed its history"
        if self.borrowing:
            self.borrow_once(first)

    def borrow_once(self, first: list[int]) -> None:
        """Another conversation over the first turn's block, admitted into a free slot: its hit,
        where aliased, is read from the running turn until a step sends its aliases; the next
        schedule ends the borrow."""
        borrowed, running = type(self).borrows, set(self.tokens)
        block = self.allocator.config.prefix_block_tokens
        self.start(block + 1, [*first[:block], *self.new_tokens(1)])
        if type(self).borrows > borrowed:
            for _ in range(2):  # the second waits for the late run the first sent
                self.allocator.wait(self.allocator.step_async({}))
            self.end_borrows()
            assert not self.allocator.borrowed_reads()
        for slot in set(self.tokens) - running:  # its slot free for the rules again
            self.drop(slot)

    def new_tokens(self, count: int) -> list[int]:
        return [self.random.randrange(VOCAB) for _ in range(count)]

    def next_tokens(self, slot: int, start: int, count: int) -> list[int]:
        """The slot's tokens [start, start + count): its prompt's where it has one, then new."""
        rest = self.prompts.get(slot, [])[start : start + count]
        return [*rest, *self.new_tokens(count - len(rest))]

    def stamp(self, slot: int, start: int) -> None:
        """Writes the model's values of tokens[slot][start:] (what a step's K/V write does)."""
        stop = len(self.tokens[slot])
        if stop > start:
            device = self.allocator.device.torch_device
            values = torch.tensor(
                [value(t, p) for p, t in enumerate(self.tokens[slot][start:stop], start)],
                dtype=torch.float32,
                device=device,
            )
            self.allocator.k_cache(1)[slot, start:stop] = values[:, None, None]
            self.allocator.v_cache(0)[slot, start:stop] = -values[:, None, None]

    def drop(self, slot: int) -> None:
        """Releases a slot as the scheduler does, with the tokens it stores."""
        stored = tuple(self.tokens.pop(slot))  # restored tokens not copied: the allocator cuts
        type(self).dropped_restores += self.restoring.pop(slot, 0) > 0
        self.prompts.pop(slot, None)
        self.allocator.release(slot, stored)
        del self.reported[slot]
        if stored:
            self.histories = [*self.histories[-7:], stored]

    def start(self, hint: int, prompt: list[int]) -> None:
        """Acquire with a prompt, then compute what was not cached (or give the slot back)."""
        cached = self.allocator.cached_tokens(prompt)
        before = self.allocator.stats()
        try:
            slot = self.allocator.acquire(hint, prompt)
        except KVCacheOutOfMemory:
            assert len(self.tokens) == self.allocator.config.max_slots
            return
        after = self.allocator.stats()
        type(self).copied_bytes += after.prefix_copied_bytes - before.prefix_copied_bytes
        type(self).takeovers += after.prefix_takeovers - before.prefix_takeovers
        type(self).borrows += after.prefix_borrows - before.prefix_borrows
        assert slot not in self.tokens
        length = self.allocator.length(slot)
        # The whole cached prefix, or less where no free page was left to copy a partial page;
        # more with blocks restored from the host tier (deferred: copied at a waited ensure).
        restoring = self.allocator.restoring_tokens(slot)
        assert after.prefix_host_hits_tokens == before.prefix_host_hits_tokens  # nothing copied
        assert length - restoring <= cached and length < max(len(prompt), 1)
        assert length % self.allocator.config.prefix_block_tokens == 0
        assert self.prefix or length == 0
        type(self).shared_acquires += length > 0
        self.tokens[slot], self.reported[slot] = list(prompt[:length]), length
        if restoring:
            self.restoring[slot] = restoring
            if self.random.random() < 0.5:
                self.prompts[slot] = prompt
                return  # left pending: the ensure rule copies it, or a release drops it
        try:
            self.backed(slot, len(prompt))
        except KVCacheOutOfMemory:
            self.drop(slot)  # the scheduler's answer: the request waits
            return
        self.tokens[slot] = list(prompt)
        self.reported[slot] = len(prompt)
        self.stamp(slot, length)

    def backed(self, slot: int, tokens: int) -> None:
        """A waited ensure; a pending restore is copied by it (host copies never fail here)."""
        before = self.allocator.stats().prefix_host_hits_tokens
        self.allocator.ensure(slot, tokens)
        restored = self.allocator.stats().prefix_host_hits_tokens - before
        assert restored == self.restoring.pop(slot, 0)
        assert self.allocator.restoring_tokens(slot) == 0
        type(self).restored_tokens += restored

    @rule(hint=st.integers(0, 6 * TOKENS_PER_PAGE))
    def acquire(self, hint: int) -> None:
        self.start(hint, [])

    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        """A prompt that starts like a running slot's or a released conversation's tokens."""
        sources = [tuple(t) for t in self.tokens.values() if t] + self.histories
        base = data.draw(st.sampled_from(sources)) if sources else ()
        # Half the time the whole source (a hit wherever it is indexed), else any cut.
        keep = len(base) if data.draw(st.booleans()) else data.draw(st.integers(0, len(base)))
        limit = self.allocator.config.tokens_per_slot
        extra = data.draw(st.integers(1, 2 * TOKENS_PER_PAGE))
        prompt = [*base[:keep], *self.new_tokens(extra)][:limit]
        self.start(len(prompt), prompt)

    @precondition(lambda self: self.histories)
    @rule(data=st.data())
    def continue_conversation(self, data: st.DataObject) -> None:
        """The next turn: a released conversation's whole history and a new message."""
        history = data.draw(st.sampled_from(self.histories))
        extra = data.draw(st.integers(1, TOKENS_PER_PAGE))
        prompt = [*history, *self.new_tokens(extra)][: self.allocator.config.tokens_per_slot]
        self.start(len(prompt), prompt)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def ensure(self, data: st.DataObject) -> None:
        """Growth; near the slot's end it presses the pool into evicting cached prefixes."""
        slot = data.draw(st.sampled_from(sorted(self.tokens)))
        old = len(self.tokens[slot])
        tokens = data.draw(st.integers(old, self.allocator.config.tokens_per_slot))
        try:
            self.backed(slot, tokens)
        except KVCacheOutOfMemory as error:
            assert error.pages_needed > 0
            assert self.allocator.length(slot) == self.reported[slot]  # nothing changed
            return
        self.tokens[slot] += self.next_tokens(slot, old, tokens - old)
        self.reported[slot] = tokens
        self.stamp(slot, old)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        self.end_borrows()  # as a schedule starts
        limit = self.allocator.config.tokens_per_slot
        growing = {  # a slot restoring is in no step before a waited ensure (step_async refuses)
            s: len(t)
            for s, t in self.tokens.items()
            if len(t) < limit and s not in self.restoring and data.draw(st.booleans())
        }
        unbacked = self.allocator.wait(self.allocator.step_async(growing))
        for slot, length in growing.items():
            self.reported[slot] = length
            if slot not in unbacked:  # the step writes its one new token
                self.tokens[slot] += self.next_tokens(slot, length, 1)
                self.stamp(slot, length)
        for slot in unbacked:  # what a scheduler does: preempt it
            self.drop(slot)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.drop(data.draw(st.sampled_from(sorted(self.tokens))))

    def make_fence(self) -> DeferredFence:
        self.fences.append(DeferredFence(type(self)))
        return self.fences[-1]

    @precondition(lambda self: self.fences)
    @rule(count=st.integers(1, 4))
    def copies_complete(self, count: int) -> None:
        """The oldest pending copies complete (a stream's fences complete in order)."""
        self.fences = [f for f in self.fences if not f.complete]
        for fence in self.fences[:count]:
            fence.complete = True

    @rule()
    def end_borrows(self) -> None:
        """What each schedule does first: the borrows whose aliases are mapped end."""
        ended = self.allocator.end_borrows()
        assert not set(ended) & set(self.allocator.borrowed_reads())
        type(self).borrows_ended += len(ended)

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
        # No page mapped wrongly, mapping counts == books, aliases indexed and immutable.
        allocator.check_invariants(deep=True)
        stats = allocator.stats()
        assert (
            stats.pages_free + stats.pages_in_use + stats.pages_cached
            == stats.pages_created
            <= stats.pages_total
        )
        assert self.prefix or stats.pages_shared == 0
        config, per_slot = allocator.config, allocator.config.pages_per_slot
        mapped = allocator.reservations[0].page_ids()
        borrows = allocator.borrowed_reads()
        assert set(borrows) <= set(self.tokens), "a slot not running borrows"
        waste = 0
        for slot, tokens in self.tokens.items():
            length = len(tokens)
            assert allocator.length(slot) == self.reported[slot]
            assert allocator.restoring_tokens(slot) == self.restoring.get(slot, 0)
            # A borrower's late run may not be mapped yet: its tokens are read from the holder.
            holder, lent = borrows.get(slot, (slot, 0))
            late = lent // config.tokens_per_group if lent else 0
            first = slot * per_slot + late
            groups = late + sum(page >= 0 for page in mapped[first : (slot + 1) * per_slot])
            assert groups >= config.page_groups_for(length), "a stored token is not backed"
            stored = self.reported[slot]
            waste += (
                groups * config.page_size - stored * config.bytes_per_token
            ) * config.num_ranges
            length -= self.restoring.get(slot, 0)  # not copied yet: no K/V to compare
            if length:
                values = torch.tensor([value(t, p) for p, t in enumerate(tokens[:length])])
                lent = min(lent, length)
                k, v = (
                    torch.cat((cache[holder, :lent, h, d], cache[slot, lent:length, h, d])).cpu()
                    for cache, h, d in ((allocator.k_cache(1), 0, 0), (allocator.v_cache(0), 1, -1))
                )
                assert torch.equal(k, values) and torch.equal(v, -values), f"slot {slot} lost data"
        assert stats.wasted_bytes == waste


@pytest.mark.parametrize("borrow", [False, True], ids=["aliases", "borrowed"])
def test_allocator_state_machine(make_allocator: MakeAllocator, kv_device, borrow: bool) -> None:
    """``borrowed``: a quarter of the examples, every one with borrowed reads on."""
    machine = type(
        "Machine",
        (AllocatorMachine,),
        {
            "make": staticmethod(make_allocator),
            "page_size": kv_device.page_size,
            "deferred_fences": kv_device.name == "host",  # CUDA's are the real events
            "borrowing": borrow,
        },
    )
    scale = 4 if borrow else 1  # examples divided by
    examples = (EXAMPLES if kv_device.name == "host" else max(EXAMPLES // 5, 10)) // scale
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            database=None,
        ),
    )
    minimum = (10_000 if kv_device.name == "host" else 2_000) * SCALE // scale
    print(
        f"{machine.operations} operations, {machine.shared_acquires} acquires found a prefix, "
        f"{machine.copied_bytes} bytes copied, {machine.takeovers} take-overs, "
        f"{machine.borrows} hits borrowed ({machine.borrows_ended} ended mapped), "
        f"{machine.restored_tokens} tokens restored from the host tier, "
        f"{machine.dropped_restores} restores dropped by a release, "
        f"{machine.waited_fences} pending copies waited for, {machine.ordered_fences} ordered"
    )
    assert machine.operations >= minimum, f"only {machine.operations} operations ran"
    assert machine.shared_acquires > 0, "no acquire found a cached prefix: sharing untested"
    if borrow:
        assert machine.borrows > 0 and machine.borrows_ended > 0, "borrowed reads untested"
    if machine.deferred_fences and not borrow:  # the borrowed run's quarter: checked, not counted
        assert machine.waited_fences > 0, "no unmap met a pending copy: the contract untested"
        assert machine.ordered_fences > 0, "no rewrite met a pending copy: the contract untested"
