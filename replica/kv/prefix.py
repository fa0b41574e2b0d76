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
from collections.abc import Sequence

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
