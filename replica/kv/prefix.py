"""Prefix keys: a hash chain over page-aligned blocks of token ids (as vLLM hashes its blocks).

A prompt's tokens are cut into blocks of ``tokens_per_block`` (one page group of the vAttention
cache, one block of the paged mode); only full blocks get a key. Block ``j``'s key hashes block
``j - 1``'s key and block ``j``'s token ids, so equal keys mean equal tokens from position 0 to the
block's end: the same K/V, given the same model and cache layout, which the chain's root key
carries (``root_key``). Keys are 128-bit BLAKE2b digests as ints: the same in every process (the
ranks of a tensor-parallel replica and the router agree on them), collisions negligible.

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
