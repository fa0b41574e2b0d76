"""Prefix keys: a hash chain over page-aligned blocks of token ids (as vLLM hashes its blocks).

A prompt's tokens are cut into blocks of ``tokens_per_block`` (one page group of the vAttention
cache, one block of the paged mode); only full blocks get a key. Block ``j``'s key hashes block
``j - 1``'s key and block ``j``'s token ids, so equal keys mean equal tokens from position 0 to the
block's end: the same K/V, given the same model and cache layout, which the chain's root key
carries (``root_key``). Keys are 128-bit BLAKE2b digests as ints: the same in every process (the
ranks of a tensor-parallel replica and the router agree on them), collisions negligible.

A replica reports a bounded summary of its keys to the router (``is_summary_depth``: depths 1..8
and powers of two, 64 bits each); ``expected_hit_tokens`` estimates a prompt's hit from it. This
module imports no torch: the router uses it.

    tokens: | block 0 | block 1 | block 2 | partial |
    keys:     k0 = H(root, b0)   k1 = H(k0, b1)   k2 = H(k1, b2)      (no key: not full)
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

KEY_BYTES = 16


def root_key(*parts: object) -> int:
    """The chain's root: the model and cache layout (anything that changes the K/V of a token)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest(), "little")


def extend_keys(
    keys: list[int], root: int, token_ids: Sequence[int], tokens_per_block: int, blocks: int
) -> list[int]:
    """Appends to ``keys`` (the keys of the first ``len(keys)`` blocks of ``token_ids``) the keys
    of the following full blocks, up to ``blocks`` in all; returns ``keys``."""
    limit = min(blocks, len(token_ids) // tokens_per_block)
    parent = keys[-1] if keys else root
    for j in range(len(keys), limit):
        block = array("q", token_ids[j * tokens_per_block : (j + 1) * tokens_per_block])
        digest = hashlib.blake2b(
            parent.to_bytes(KEY_BYTES, "little") + block.tobytes(), digest_size=KEY_BYTES
        ).digest()
        parent = int.from_bytes(digest, "little")
        keys.append(parent)
    return keys


def block_keys(root: int, token_ids: Sequence[int], tokens_per_block: int) -> list[int]:
    """The keys of every full block of ``token_ids``."""
    return extend_keys([], root, token_ids, tokens_per_block, len(token_ids) // tokens_per_block)


def usable_blocks(prompt_tokens: int, tokens_per_block: int) -> int:
    """Full blocks of a prompt a request may take from the cache: its last token is always
    computed (its logits give the first output token), so at most ``prompt_tokens - 1`` tokens."""
    return max(prompt_tokens - 1, 0) // tokens_per_block


# ---- the router's summary ------------------------------------------------------------------------
#: Bits of a key a replica reports to the router (enough to tell a few thousand prefixes apart).
SUMMARY_KEY_BITS = 64


def is_summary_depth(blocks: int) -> bool:
    """The chain depths a replica reports: 1..8, then powers of two (a long prefix in log many
    keys; the router's estimate of a hit is then within a factor of two)."""
    return 0 < blocks <= 8 or blocks & (blocks - 1) == 0


def summary_key(key: int) -> int:
    return key & ((1 << SUMMARY_KEY_BITS) - 1)


def summary_chain(
    prompt: Sequence[int], root: int, tokens_per_block: int
) -> tuple[tuple[int, int], ...]:
    """(depth, summary key) of ``prompt``'s usable blocks at summary depths (never its last
    token): what to look up in a replica's summary."""
    if tokens_per_block <= 0:
        return ()
    chain = block_keys(root, prompt[: max(len(prompt) - 1, 0)], tokens_per_block)
    return tuple(
        (depth, summary_key(key))
        for depth, key in enumerate(chain, start=1)
        if is_summary_depth(depth)
    )


def hit_blocks(chain: Sequence[tuple[int, int]], keys: frozenset[int] | set[int]) -> int:
    """The deepest depth of ``chain`` whose key a replica reports: it likely holds every block up
    to it (keys chain), so this many blocks of the prompt are cached there."""
    return max((depth for depth, key in chain if key in keys), default=0)


def expected_hit_tokens(
    prompt: Sequence[int], root: int, tokens_per_block: int, keys: frozenset[int] | set[int]
) -> int:
    """Tokens of ``prompt`` a replica reporting ``keys`` likely holds (``hit_blocks``)."""
    if not keys:
        return 0
    return hit_blocks(summary_chain(prompt, root, tokens_per_block), keys) * tokens_per_block


@dataclass(frozen=True)
class PrefixSummary:
    """A bounded summary of a cache's prefix index (``expected_hit_tokens`` reads it)."""

    root: int
    tokens_per_block: int
    keys: tuple[int, ...]
    host_keys: tuple[int, ...] = ()  # the same, of the blocks a host tier holds


class PrefixQueries:
    """The prefix cache's lookups, in tokens: ``queries`` (prompt tokens ``acquire`` looked up)
    and ``hits`` (of which found cached). A lookup counts at ``acquire`` and stands once an
    ``ensure`` backs its slot; a slot released before that was an admission that failed (the
    scheduler releases it and retries later), so its lookup is taken back and a retried admission
    counts once."""

    def __init__(self) -> None:
        self.queries = 0
        self.hits = 0
        self._pending: dict[int, tuple[int, int]] = {}  # slot -> (queries, hits) not yet backed

    def acquired(self, slot: int, prompt_tokens: int, hit_tokens: int) -> None:
        self.queries += prompt_tokens
        self.hits += hit_tokens
        self._pending[slot] = (prompt_tokens, hit_tokens)

    def backed(self, slot: int) -> None:
        self._pending.pop(slot, None)

    def released(self, slot: int) -> None:
        queries, hits = self._pending.pop(slot, (0, 0))
        self.queries -= queries
        self.hits -= hits


# ---- the index -----------------------------------------------------------------------------------
#: Prompt tokens whose chain keys ``PrefixIndex.lookup`` keeps, least recently looked up dropped
#: first. A waiting request is looked up at every schedule (a burst's held requests, each step);
#: its keys cost ~6 us a block to hash on the 2-core host (a 1K-token prompt ~0.5 ms), the memo's
#: tuple hash and key gets ~20 us. 256K tokens keep 2 MiB of token references.
MEMO_TOKENS = 1 << 18
#: Keys a lookup computes at once when it needs one more: a call per block costs 4.3 us a block
#: there, one call for 65 blocks 3.0; a miss computes at most this many - 1 keys it did not need.
KEYS_AHEAD = 8

#: Where a prefix block's K/V lives: a page group (a tuple of page ids, vAttention) or a block id
#: (paged mode). Hashable; one location holds one block's tokens and is indexed under one key.
Location = TypeVar("Location", bound=Hashable)


class PrefixIndex(Generic[Location]):
    """Prefix key -> the location holding that prefix block's K/V, for both caches.

    The index only keeps the books of *what is cached where*: which locations stay alive, which
    go, and in which order (eviction policy) is each cache's (the paged mode drops blocks by LRU,
    the vAttention cache by slot release order), so a cache calls ``add`` when a block's tokens
    are written and ``remove`` when its location is reused or freed.

    Invariants (``check_invariants``):
        key -> location and location -> key are inverse bijections (one key per location)
        summary keys are indexed keys at summary depths (``is_summary_depth``), newest last
    """

    def __init__(self, root: int, tokens_per_block: int) -> None:
        self.root = root
        self.tokens_per_block = tokens_per_block
        self._location: dict[int, Location] = {}  # prefix key -> location
        self._key: dict[Location, int] = {}  # the inverse
        self._summary: dict[int, None] = {}  # indexed keys at summary depths, newest last
        # Prompt -> its chain's keys as far as computed (``MEMO_TOKENS``): a pure function of the
        # tokens and the root, so never stale; what the keys locate is looked up live.
        self._chains: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
        self._chain_tokens = 0

    def __len__(self) -> int:
        return len(self._location)

    def __contains__(self, location: object) -> bool:
        """Whether ``location`` holds an indexed block (it is then immutable)."""
        return location in self._key

    def lookup(self, prompt: Sequence[int]) -> tuple[list[Location], list[int]]:
        """The locations of the longest indexed usable prefix of ``prompt`` (never its last
        token), and the keys computed on the way (one more than the hit where the chain broke)."""
        if not prompt or not self._location or self.tokens_per_block <= 0:
            return [], []
        per_block = self.tokens_per_block
        chain = self._chain(prompt)
        hit: list[Location] = []
        usable = usable_blocks(len(prompt), per_block)
        for j in range(usable):
            if j == len(chain):  # computed as far as lookups need them (a few ahead), once
                extend_keys(chain, self.root, prompt, per_block, min(j + KEYS_AHEAD, usable))
            location = self._location.get(chain[j])
            if location is None:
                return hit, chain[: j + 1]
            hit.append(location)
        return hit, chain[: len(hit)]

    def _chain(self, prompt: Sequence[int]) -> list[int]:
        """The memo's keys of ``prompt`` (a new empty list the first time), most recent now."""
        tokens = prompt if isinstance(prompt, tuple) else tuple(prompt)
        chain = self._chains.get(tokens)
        if chain is not None:
            self._chains.move_to_end(tokens)
            return chain
        chain = self._chains[tokens] = []
        self._chain_tokens += len(tokens)
        while self._chain_tokens > MEMO_TOKENS and len(self._chains) > 1:
            dropped, _ = self._chains.popitem(last=False)
            self._chain_tokens -= len(dropped)
        return chain

    def register(
        self,
        keys: list[int],
        token_ids: Sequence[int],
        locations: Sequence[Location],
        start: int,
        limit: int,
    ) -> list[Location]:
        """Indexes blocks ``start .. limit`` of a sequence whose tokens are ``token_ids`` and whose
        block ``j`` lives at ``locations[j]``, extending ``keys`` (its blocks' keys as far as
        computed) to ``limit``. A key or a location already indexed keeps its entry (the first
        writer of a prefix is the one shared). Returns the locations it indexed."""
        if limit <= start:
            return []
        extend_keys(keys, self.root, token_ids, self.tokens_per_block, limit)
        added = []
        for j in range(start, limit):
            key, location = keys[j], locations[j]
            if key not in self._location and location not in self._key:
                self._location[key], self._key[location] = location, key
                added.append(location)
                if is_summary_depth(j + 1):
                    self._summary[key] = None
        return added

    def remove(self, location: Location) -> bool:
        """Drops ``location``'s entry (its memory is about to be reused); whether it had one."""
        key = self._key.pop(location, None)
        if key is None:
            return False
        del self._location[key]
        self._summary.pop(key, None)
        return True

    def summary(self, limit: int = 2048) -> PrefixSummary:
        """What the router learns: the root, the block size and up to ``limit`` summary keys
        (``SUMMARY_KEY_BITS`` of each), the newest last."""
        keys = list(self._summary)[-limit:] if limit > 0 else []
        return PrefixSummary(self.root, self.tokens_per_block, tuple(summary_key(k) for k in keys))

    def locations(self) -> set[Location]:
        return set(self._key)

    def check_invariants(self) -> None:
        assert len(self._location) == len(self._key), "the index and its inverse differ in size"
        assert all(self._key.get(loc) == key for key, loc in self._location.items()), (
            "the index and its inverse disagree"
        )
        assert self._summary.keys() <= self._location.keys(), "a summary key is not indexed"


def stored_prefix(
    slot_index: int,
    token_ids: Sequence[int],
    length: int,
    prompt: tuple[int, ...],
    frozen_tokens: int,
) -> tuple[int, ...]:
    """The tokens a released slot stores (``token_ids`` cut at its ``length``; without them, its
    immutable prefix of ``prompt``), checked against the ``frozen_tokens`` already indexed."""
    stored = tuple(token_ids)[:length] if token_ids else prompt[:frozen_tokens]
    common = min(len(stored), frozen_tokens)
    if stored[:common] != prompt[:common]:
        raise ValueError(
            f"slot {slot_index}: the released tokens differ from the {frozen_tokens} cached ones"
        )
    return stored


def unfreeze_unwritten(
    index: PrefixIndex[Location],
    locations: Sequence[Location],
    frozen: int,
    stored_blocks: int,
    private: Callable[[Location], bool],
) -> tuple[int, int]:
    """A slot released with fewer tokens stored than it froze (a step failed after its pages were
    booked): its frozen blocks from the end that only it holds (``private``) leave the index, as
    they may never have been written. Returns (the new frozen count, locations unindexed)."""
    removed = 0
    while frozen > stored_blocks and private(locations[frozen - 1]):
        frozen -= 1
        removed += index.remove(locations[frozen])
    return frozen, removed
