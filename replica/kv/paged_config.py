"""What the paged KV cache (the PagedAttention comparison mode) holds, and its page arithmetic.

The cache is a fixed pool of ``num_blocks`` blocks of ``block_size`` tokens, preallocated at once:

    K: [num_layers, num_blocks, block_size, kv_heads, head_dim]   (V the same)

so layer ``l``'s K is the contiguous ``[num_blocks, block_size, kv_heads, head_dim]`` tensor that
FlashInfer reads as an NHD paged cache. A block id names the same rows in every layer of K and V.

Accounting, in the same units the scheduler and router use for vAttention pages: one *page* is one
block id, i.e. ``block_size`` tokens of every layer's K and V, so

    page_size      = block_size * bytes_per_token      (bytes, all layers, K + V)
    bytes_per_token = 2 * num_layers * kv_heads * head_dim * element_size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replica.kv.base import require_non_negative_ints, require_positive_ints


@dataclass(frozen=True)
class PagedKVConfig:
    """The paged cache of one tensor-parallel rank (``num_kv_heads`` is this rank's shard).

    ``max_tokens`` is rounded up to whole blocks (``tokens_per_slot``); ``budget_bytes`` is what the
    block pool takes, all of it at construction (``num_blocks`` = whole blocks that fit).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_slots: int
    max_tokens: int
    budget_bytes: int
    block_size: int = 16
    #: Prefix sharing: full blocks indexed by their tokens' hash chain, shared by reference count,
    #: kept after release until taken (least recently used first); see ``replica.kv.paged``.
    prefix_cache: bool = False
    #: What else the K/V of a token depends on (the model): part of the prefix keys' root.
    prefix_key: str = ""
    #: Host memory for the host tier (``replica.kv.host_tier``; with the prefix cache): released
    #: sequences' full blocks are gathered there through a device staging buffer, many blocks a
    #: copy, and scattered back (``replica.kv.host_copies``).
    host_tier_bytes: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(
            self,
            ("num_layers", "num_kv_heads", "head_dim", "max_slots", "max_tokens", "block_size"),
        )
        require_non_negative_ints(self, ("budget_bytes", "host_tier_bytes"))

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers, K and V."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def page_size(self) -> int:
        """Bytes of one block over all layers, K and V (the unit ``KVCacheStats`` counts)."""
        return self.block_size * self.bytes_per_token

    @property
    def num_blocks(self) -> int:
        return self.budget_bytes // self.page_size

    @property
    def budget_pages(self) -> int:
        return self.num_blocks

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_tokens // self.block_size)

    @property
    def tokens_per_slot(self) -> int:
        """``max_tokens`` rounded up to whole blocks: the most one request may hold."""
        return self.max_blocks_per_seq * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold tokens [0, tokens) of a sequence."""
        return -(-tokens // self.block_size)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One of K or V: [layers, blocks, block_size, kv_heads, head_dim]."""
        return (self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
