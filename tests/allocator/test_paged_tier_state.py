"""A hypothesis state machine drives the paged mode's prefix cache with a host tier: acquires with
prompts that share prefixes (a running slot's or a released conversation's tokens), next turns of
released conversations, growth, steps, releases, under a block budget small enough that cached
blocks are evicted and come back from the tier; and tier copies that raise
(``replica.kv.tier_faults``). After every operation the cache's books hold
(``check_invariants(deep=True)``, the tier's included) and every token of every running slot reads
back, in every layer's K and V, the value written for it, whether computed, shared or restored.

Every example starts with a conversation's turns that share its first block on the device, fail
an offload, fail a restore and restore it: each outcome the test asserts, by construction. The
rules alone left whole runs without a fault: hypothesis' swarm testing turns rules off per example
(``fail_a_copy``, or what evicts and copies) and its mutations repeat an example's draws, so at
``--hypothesis-seed=90`` no copy failed in 40 examples, and at 10 (CUDA's) 4 seeds of 300 lacked
a fault or a restore.

Size: VATTN_STATEFUL_SCALE (default 1) multiplies the examples; 1 runs >= 2,000 operations in a
few seconds on the host backend (a fifth of the examples on CUDA).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter

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
from replica.vmm import Device

SCALE = int(os.environ.get("VATTN_STATEFUL_SCALE", "1"))
STEPS = 100
EXAMPLES = 40 * SCALE  # up to 40 x 100 operations; the test asserts >= 2,000 ran
LAYERS, HEADS, DIM = 2, 2, 4
MAX_SLOTS, BLOCKS_PER_SLOT = 3, 8
VOCAB = 2  # few token ids, so prompts often share prefixes


def value(token: int, position: int, layer: int) -> float:
    """What the model stores for ``token`` at ``position`` in ``layer``'s K (V: its negative);
    exact in float32."""
    return float(token * 10_000 + position + 1) + layer / 4


class PagedTierMachine(RuleBasedStateMachine):
    """Model: for each running slot, the tokens whose K/V it stores (``tokens[slot]``) and the
    length the cache was last told; the conversations released slots stored (``histories``)."""

    device: torch.device  # the backend's, set by the test
    operations = 0  # counted over every example of a run
    shared_tokens = 0  # prompt tokens acquires found on the device
    restored_tokens = 0  # prompt tokens acquires got back from the host tier
    faults: Counter[str]  # tier copies that raised (injected), by direction; set by the test

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[int, list[int]] = {}
        self.told: dict[int, int] = {}
        self.histories: list[tuple[int, ...]] = []

    @initialize(
        block_size=st.sampled_from([2, 4]),
        num_blocks=st.integers(3, BLOCKS_PER_SLOT),  # one slot can evict every cached block
        host_blocks=st.sampled_from([2, 6, 16, 32]),  # a small tier evicts too
        seed=st.integers(0, 2**16),
    )
    def build(self, block_size: int, num_blocks: int, host_blocks: int, seed: int) -> None:
        config = PagedKVConfig(
            num_layers=LAYERS,
            num_kv_heads=HEADS,
            head_dim=DIM,
            dtype=torch.float32,
            max_slots=MAX_SLOTS,
            max_tokens=BLOCKS_PER_SLOT * block_size,
            budget_bytes=0,
            block_size=block_size,
            prefix_cache=True,
        )
        page = config.page_size  # a block over every layer's K and V, as the tier counts it
        config = dataclasses.replace(
            config, budget_bytes=num_blocks * page, host_tier_bytes=host_blocks * page
        )
        self.cache = PagedKVCache(config, self.device)
        assert self.cache.tier_faults is not None
        self.cache.tier_faults.inject = self.inject
        self.armed: Counter[str] = Counter()  # the next copy fails (1) or not, by direction
        self.random = random.Random(seed)
        self.first_turns()

    def first_turns(self) -> None:
        """A conversation's first turn (one full block and a token), released: its block is
        written to the tier. Its next turn shares that block on the device, and the offload of
        its new blocks fails. Once every block is taken, a next turn's restore of the first block
        fails (it computes it, and its release writes it again), and then another's succeeds.
        Each turn fits three blocks, the smallest budget. The rules then start as without these
        turns, with no running slot and no history (to continue from the first step made a run
        a fifth slower), but with the blocks they left cached and in the tier."""
        size, faults = self.cache.config.block_size, type(self).faults
        first = self.new_tokens(size + 1)
        self.start(first)
        self.drop(*self.tokens)
        shared = type(self).shared_tokens
        self.start([*first, *self.new_tokens(self.random.randint(size, 2 * size - 1))])
        assert type(self).shared_tokens == shared + size, "a next turn missed its history"
        self.armed["offload"], failed = 1, faults["offload"]
        self.drop(*self.tokens)
        assert faults["offload"] == failed + 1, "no offload was tried"
        self.evict()
        self.armed["restore"], failed = 1, faults["restore"]
        self.start([*first, *self.new_tokens(self.random.randint(1, size - 1))])
        assert faults["restore"] == failed + 1, "no restore was tried"
        self.drop(*self.tokens)
        self.evict()
        restored = type(self).restored_tokens
        self.start([*first, *self.new_tokens(self.random.randint(1, size - 1))])
        assert type(self).restored_tokens == restored + size, "the tier did not give a block back"
        self.drop(*self.tokens)
        self.histories = []

    def new_tokens(self, count: int) -> list[int]:
        return [self.random.randrange(VOCAB) for _ in range(count)]

    def stamp(self, slot: int, start: int) -> None:
        """Writes the values of tokens[slot][start:] where the block table puts them (what a
        step's K/V write does), in every layer."""
        size, blocks = self.cache.config.block_size, self.cache.block_ids(slot)
        for position in range(start, len(self.tokens[slot])):
            token = self.tokens[slot][position]
            block, row = blocks[position // size], position % size
            for layer in range(LAYERS):
                self.cache.k_cache(layer)[block, row] = value(token, position, layer)
                self.cache.v_cache(layer)[block, row] = -value(token, position, layer)

    def drop(self, slot: int) -> None:
        """Releases a slot as the scheduler does, with the tokens whose K/V it stores."""
        stored = tuple(self.tokens.pop(slot))
        del self.told[slot]
        self.cache.release(slot, stored)
        if stored:
            self.histories = [*self.histories[-7:], stored]

    def start(self, prompt: list[int]) -> None:
        """Acquire with a prompt, then compute what it did not find (or give the slot back)."""
        cached = self.cache.cached_tokens(prompt)
        before = self.cache.stats().prefix_host_hits_tokens
        try:
            slot = self.cache.acquire(len(prompt), prompt)
        except KVCacheOutOfMemory:
            assert len(self.tokens) == MAX_SLOTS
            return
        restored = self.cache.stats().prefix_host_hits_tokens - before
        length = self.cache.length(slot)
        # The device hit, then what the tier gave back (nothing where its copy raised).
        assert length == cached + restored and length < max(len(prompt), 1)
        assert length % self.cache.config.block_size == 0
        type(self).shared_tokens += cached
        type(self).restored_tokens += restored
        self.tokens[slot], self.told[slot] = list(prompt[:length]), length
        try:
            self.cache.ensure(slot, len(prompt))
        except KVCacheOutOfMemory:
            self.drop(slot)  # the scheduler's answer: the request waits
            return
        self.tokens[slot], self.told[slot] = list(prompt), len(prompt)
        self.stamp(slot, length)

    @rule()
    def acquire(self) -> None:
        self.start([])

    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        """A prompt that starts like a running slot's or a released conversation's tokens (one
        request ends first if every slot runs)."""
        if len(self.tokens) == MAX_SLOTS:
            self.drop(data.draw(st.sampled_from(sorted(self.tokens))))
        sources = [tuple(t) for t in self.tokens.values() if t] + self.histories
        base = data.draw(st.sampled_from(sources)) if sources else ()
        keep = len(base) if data.draw(st.booleans()) else data.draw(st.integers(0, len(base)))
        extra = data.draw(st.integers(1, 2 * self.cache.config.block_size))
        self.start([*base[:keep], *self.new_tokens(extra)][: self.cache.tokens_per_slot])

    @precondition(lambda self: self.histories)
    @rule(data=st.data(), away=st.booleans())
    def continue_conversation(self, data: st.DataObject, away: bool) -> None:
        """The next turn: a released conversation's whole history and a new message; ``away``:
        a recent one's once every request has ended and one took every block, so that its blocks
        come back from the host tier."""
        if away:
            for slot in sorted(self.tokens):
                self.drop(slot)
            self.evict()
        history = data.draw(st.sampled_from(self.histories[-2:] if away else self.histories))
        extra = data.draw(st.integers(1, self.cache.config.block_size))
        self.start([*history, *self.new_tokens(extra)][: self.cache.tokens_per_slot])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def ensure(self, data: st.DataObject) -> None:
        """Growth; under the small budget it evicts cached blocks (written through before)."""
        slot = data.draw(st.sampled_from(sorted(self.tokens)))
        old = len(self.tokens[slot])
        tokens = data.draw(st.integers(old, self.cache.tokens_per_slot))
        try:
            self.cache.ensure(slot, tokens)
        except KVCacheOutOfMemory:
            assert self.cache.length(slot) == self.told[slot]  # nothing changed
            return
        self.tokens[slot] += self.new_tokens(tokens - old)
        self.told[slot] = tokens
        self.stamp(slot, old)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        limit = self.cache.tokens_per_slot
        growing = {
            s: len(t) for s, t in self.tokens.items() if len(t) < limit and data.draw(st.booleans())
        }
        unbacked = self.cache.wait(self.cache.step_async(growing))
        for slot, length in growing.items():
            self.told[slot] = length
            if slot not in unbacked:  # the step writes its one new token
                self.tokens[slot] += self.new_tokens(1)
                self.stamp(slot, length)
        for slot in unbacked:  # what a scheduler does: preempt it
            self.drop(slot)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.drop(data.draw(st.sampled_from(sorted(self.tokens))))

    @precondition(lambda self: len(self.tokens) < MAX_SLOTS)
    @rule()
    def evict(self) -> None:
        """A request that takes every block it can get, evicting cached ones (a released
        conversation's, written through), and ends storing nothing."""
        slot = self.cache.acquire(0, [])
        blocks = min(self.cache.reclaimable_pages(), BLOCKS_PER_SLOT)
        self.cache.ensure(slot, blocks * self.cache.config.block_size)
        self.cache.release(slot, [])

    @rule(direction=st.sampled_from(["offload", "restore"]))
    def fail_a_copy(self, direction: str) -> None:
        """The tier's next copy in ``direction`` raises, as torch does on a CUDA error."""
        self.armed[direction] = 1

    def inject(self, direction: str) -> None:
        """The tier's seam: called just before each of its copies."""
        if self.armed[direction]:
            self.armed[direction] -= 1
            type(self).faults[direction] += 1
            raise RuntimeError(f"injected {direction} fault")

    @rule()
    def flush(self) -> None:
        self.cache.synchronize()

    @invariant()
    def books_and_every_stored_token_hold(self) -> None:
        if not hasattr(self, "cache"):
            return
        type(self).operations += 1
        cache, size = self.cache, self.cache.config.block_size
        cache.check_invariants(deep=True)
        stats = cache.stats()
        assert stats.pages_free + stats.pages_in_use + stats.pages_cached == stats.pages_total
        assert stats.slots_running == len(self.tokens)
        for slot, tokens in self.tokens.items():
            assert cache.length(slot) == self.told[slot]
            if not tokens:
                continue
            blocks = cache.block_ids(slot)
            rows = torch.tensor([blocks[p // size] * size + p % size for p in range(len(tokens))])
            for layer in range(LAYERS):
                values = torch.tensor([value(t, p, layer) for p, t in enumerate(tokens)])
                k = cache.k_cache(layer).view(-1, HEADS, DIM)[rows.to(self.device), 0, 0].cpu()
                v = cache.v_cache(layer).view(-1, HEADS, DIM)[rows.to(self.device), 1, -1].cpu()
                assert torch.equal(k, values) and torch.equal(v, -values), (
                    f"slot {slot} layer {layer} lost data"
                )


def test_paged_tier_state_machine(kv_device: Device) -> None:
    machine = type(
        "Machine", (PagedTierMachine,), {"device": kv_device.torch_device, "faults": Counter()}
    )
    examples = EXAMPLES if kv_device.name == "host" else max(EXAMPLES // 5, 10)
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
    print(
        f"{machine.operations} operations, {machine.shared_tokens} tokens shared, "
        f"{machine.restored_tokens} restored from the host tier, copies failed: {machine.faults}"
    )
    minimum = (2_000 if kv_device.name == "host" else 400) * SCALE
    assert machine.operations >= minimum, f"only {machine.operations} operations ran"
    assert machine.shared_tokens > 0 and machine.restored_tokens > 0
    assert machine.faults["offload"] > 0 and machine.faults["restore"] > 0
