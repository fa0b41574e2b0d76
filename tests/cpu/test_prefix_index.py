"""The one prefix index both caches use (``replica.kv.prefix.PrefixIndex``): lookup, register,
remove and the router's summary, on its own and under a hypothesis state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from replica.kv.prefix import (
    PrefixIndex,
    block_keys,
    expected_hit_tokens,
    root_key,
    stored_prefix,
    unfreeze_unwritten,
)

BLOCK = 4
ROOT = root_key("test")


def test_lookup_finds_the_longest_registered_prefix_and_never_the_last_token() -> None:
    index: PrefixIndex[str] = PrefixIndex(ROOT, BLOCK)
    prompt = tuple(range(13))  # three full blocks and one token
    keys: list[int] = []
    index.register(keys, prompt, ["a", "b", "c"], 0, 3)
    assert keys == block_keys(ROOT, prompt, BLOCK)
    assert index.lookup(prompt)[0] == ["a", "b", "c"]
    # 12 tokens: the last token is always computed, so only 11 are usable: two blocks.
    assert index.lookup(prompt[:12])[0] == ["a", "b"]
    # A different second block breaks the chain there.
    other = prompt[:4] + (99,) + prompt[5:]
    hit, computed = index.lookup(other)
    assert hit == ["a"] and len(computed) == 2


def test_the_first_writer_keeps_its_entry_and_remove_drops_it() -> None:
    index: PrefixIndex[int] = PrefixIndex(ROOT, BLOCK)
    prompt = tuple(range(9))
    index.register([], prompt, [7, 8], 0, 2)
    index.register([], prompt, [5, 6], 0, 2)  # the same tokens elsewhere: not indexed twice
    assert index.lookup(prompt)[0] == [7, 8] and 5 not in index and len(index) == 2
    assert index.remove(8) and not index.remove(8)
    assert index.lookup(prompt)[0] == [7]
    index.check_invariants()


def test_the_summary_holds_summary_depths_and_estimates_hits() -> None:
    index: PrefixIndex[int] = PrefixIndex(ROOT, BLOCK)
    prompt = tuple(range(BLOCK * 16 + 1))
    index.register([], prompt, list(range(16)), 0, 16)
    summary = index.summary()
    assert len(summary.keys) == 8 + 1  # depths 1..8 and 16
    assert expected_hit_tokens(prompt, ROOT, BLOCK, set(summary.keys)) == 16 * BLOCK
    assert (
        expected_hit_tokens(prompt[: BLOCK * 12 + 1], ROOT, BLOCK, set(summary.keys)) == 8 * BLOCK
    )
    assert index.summary(limit=2).keys == summary.keys[-2:]
    assert index.summary(limit=0).keys == ()


def test_a_release_with_fewer_tokens_than_frozen_unindexes_what_only_it_holds() -> None:
    index: PrefixIndex[int] = PrefixIndex(ROOT, BLOCK)
    prompt = tuple(range(13))
    index.register([], prompt, [0, 1, 2], 0, 3)
    stored = stored_prefix(0, prompt[:5], 5, prompt, 12)
    # Five tokens stored of 12 frozen: block 1 and 2 may be unwritten; block 1 is held elsewhere.
    frozen, removed = unfreeze_unwritten(
        index, [0, 1, 2], 3, len(stored) // BLOCK, lambda b: b != 1
    )
    assert (frozen, removed) == (2, 1) and index.locations() == {0, 1}
    with pytest.raises(ValueError, match="differ"):
        stored_prefix(0, (5, 5, 5, 5, 5), 5, prompt, 12)


class IndexMachine(RuleBasedStateMachine):
    """Registers and removes random sequences over a small alphabet; lookups agree with a model
    that keeps, per location, the tokens from position 0 to its block's end."""

    def __init__(self) -> None:
        super().__init__()
        self.index: PrefixIndex[int] = PrefixIndex(ROOT, BLOCK)
        self.model: dict[int, tuple[int, ...]] = {}  # location -> tokens up to its block's end
        self.next_location = 0

    @rule(tokens=st.lists(st.integers(0, 1), min_size=BLOCK, max_size=5 * BLOCK))
    def register(self, tokens: list[int]) -> None:
        blocks = len(tokens) // BLOCK
        locations = list(range(self.next_location, self.next_location + blocks))
        self.next_location += blocks
        before = set(self.model.values())
        self.index.register([], tokens, locations, 0, blocks)
        for j, location in enumerate(locations):
            prefix = tuple(tokens[: (j + 1) * BLOCK])
            if prefix not in before:
                self.model[location] = prefix
                before.add(prefix)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        if self.model:
            location = data.draw(st.sampled_from(sorted(self.model)))
            assert self.index.remove(location)
            del self.model[location]

    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=6 * BLOCK))
    def lookup(self, tokens: list[int]) -> None:
        """Prompts over two tokens repeat: the memo's keys serve them across register/remove."""
        hit, keys = self.index.lookup(tokens)
        if hit or keys:  # the keys computed: the hit's, and the one that broke the chain
            usable = (len(tokens) - 1) // BLOCK
            assert keys == block_keys(ROOT, tokens, BLOCK)[: min(len(hit) + 1, usable)]
        by_prefix = {prefix: loc for loc, prefix in self.model.items()}
        expected = []
        for j in range(1, (len(tokens) - 1) // BLOCK + 1):
            location = by_prefix.get(tuple(tokens[: j * BLOCK]))
            if location is None:
                break
            expected.append(location)
        assert hit == expected

    @invariant()
    def books(self) -> None:
        self.index.check_invariants()
        assert self.index.locations() == set(self.model)


IndexMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_index_machine = IndexMachine.TestCase


def test_a_prompt_looked_up_again_hashes_nothing_until_the_memo_drops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiting request is looked up at every schedule: its keys are hashed once (a few ahead of
    what a lookup needs), until ``MEMO_TOKENS`` of other prompts push it out."""
    import replica.kv.prefix as prefix

    hashed: list[int] = []
    extend = prefix.extend_keys

    def counting(keys, root, token_ids, per_block, blocks):  # type: ignore[no-untyped-def]
        hashed.append(blocks - len(keys))
        return extend(keys, root, token_ids, per_block, blocks)

    index: PrefixIndex[str] = PrefixIndex(ROOT, BLOCK)
    prompt = tuple(range(13))
    novel = (50, *prompt[1:])
    keys, novel_keys = block_keys(ROOT, prompt, BLOCK), block_keys(ROOT, novel, BLOCK)
    index.register([], prompt, ["a", "b", "c"], 0, 3)
    monkeypatch.setattr(prefix, "extend_keys", counting)
    monkeypatch.setattr(prefix, "MEMO_TOKENS", 100)
    assert index.lookup(prompt) == (["a", "b", "c"], keys)
    assert sum(hashed) == 3
    assert index.lookup(list(prompt)) == (["a", "b", "c"], keys)
    assert sum(hashed) == 3  # none hashed again
    index.remove("c")  # what the keys locate is read live
    assert index.lookup(prompt)[0] == ["a", "b"] and sum(hashed) == 3
    assert index.lookup(novel) == ([], novel_keys[:1])  # the key that broke the chain
    assert sum(hashed) == 3 + min(prefix.KEYS_AHEAD, 3)  # computed a few ahead, at most
    for first in range(100, 108):  # 8 x 13 tokens > 100: the oldest prompts go
        index.lookup((first, *prompt[1:]))
    before = sum(hashed)
    assert index.lookup(prompt)[0] == ["a", "b"] and sum(hashed) > before
