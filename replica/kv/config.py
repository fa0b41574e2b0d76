"""What the KV cache holds and how it is laid out in virtual memory.

Two layouts, both first-class:

``per_layer`` (the vAttention paper's default): one K and one V range per layer, each
    [max_slots, max_tokens, kv_heads, head_dim]            -> 2 * num_layers ranges
``interleaved``: one range for K and V of all layers,
    [max_slots, max_tokens, num_layers, 2, kv_heads, head_dim] -> 1 range; layer l's K (V) is a
    strided
    view. A page holds whole tokens of every layer, so a slot's last, partly filled page is the
    only waste: half a page per request on average (Llama-3-8B: 16 tokens of a 2 MiB page)

Each range is cut into ``max_slots`` equal slot regions of ``pages_per_slot`` pages::

    range:  | slot 0: page 0 .. page P-1 | slot 1: page P .. 2P-1 | ...
    slot s holding n tokens needs pages [s*P, s*P + ceil(n * bytes_per_token / page_size))

Every range maps the same page indices at the same time, so a slot's page demand is one count
("page groups") times ``num_ranges`` physical pages. With 2 MiB pages the interleaved layout wastes
less than 1 page per request where per_layer wastes up to 2 * num_layers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from replica.kv.base import require_non_negative_ints, require_positive_ints
from replica.kv.choices import KV_CACHE_DTYPES, KVLayout


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for a ``kv_cache_dtype`` name; ValueError for an unknown one."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ValueError(f"unknown kv_cache_dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")


@dataclass(frozen=True)
class KVCacheConfig:
    """The KV cache of one tensor-parallel rank (``num_kv_heads`` is this rank's shard).

    ``max_tokens`` is rounded up so that every slot spans whole pages (see ``tokens_per_slot``);
    ``budget_bytes`` caps the physical memory the cache may create.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_slots: int
    max_tokens: int
    page_size: int
    budget_bytes: int
    layout: KVLayout = KVLayout.INTERLEAVED
    #: Page groups mapped ahead of need when a slot grows (batches growth into fewer runs) ...
    eager_pages: int = 1
    #: ... once the slot is within this many tokens of its mapped end (None: at once). A few
    #: steps' notice is all the background worker needs; an eager page mapped sooner is waste.
    eager_lookahead_tokens: int | None = None
    #: Released slots keep their pages until the pool needs them (deferred reclamation).
    deferred_reclamation: bool = True
    #: Free pages beyond this many are released to the device once idle for ``idle_seconds``.
    max_idle_pages: int = 64
    idle_seconds: float = 10.0
    #: Free pages created ahead of need while the pool is drawn on (at most ``max_idle_pages``),
    #: in a batch of their own behind each step's growth: a page taken from them only maps.
    spare_pages: int = 64
    #: Prefix sharing: released and running slots' full page groups are indexed by their tokens'
    #: hash chain and aliased under new slots whose prompt starts with them (needs deferred
    #: reclamation, which keeps the released ones; see ``replica.kv.allocator``).
    prefix_cache: bool = False
    #: What else the K/V of a token depends on (the model): part of the prefix keys' root.
    prefix_key: str = ""
    #: Tokens a prefix block holds: the granularity of prefix sharing in every layout (the paged
    #: mode's block). Pages wholly inside a hit are aliased or copied, the rest copied.
    prefix_block_tokens: int = 16
    #: Map the whole page budget under the empty slots at start, in the background, so that a
    #: request's first pages (a prompt, a prefix hit copied into them) need no driver call: the
    #: empty slots' pages are reclaimed like a released slot's, least recently used first.
    premap: bool = False
    #: Host memory for the host tier (``replica.kv.host_tier``; with the prefix cache): released
    #: slots' blocks are copied there and come back on a hit instead of being computed again.
    host_tier_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", KVLayout(self.layout))
        require_positive_ints(
            self,
            (
                "num_layers",
                "num_kv_heads",
                "head_dim",
                "max_slots",
                "max_tokens",
                "page_size",
                "prefix_block_tokens",
            ),
        )
        require_non_negative_ints(
            self,
            (
                "eager_pages",
                "max_idle_pages",
                "spare_pages",
                "budget_bytes",
                "eager_lookahead_tokens",
                "host_tier_bytes",
            ),
        )
        if (
            isinstance(self.idle_seconds, bool)
            or not isinstance(self.idle_seconds, (int, float))
            or not self.idle_seconds >= 0
        ):
            raise ValueError(
                f"KVCacheConfig.idle_seconds must be a number >= 0, got {self.idle_seconds!r}"
            )
        if self.page_size % self.element_size:
            raise ValueError(f"page size {self.page_size} is not a multiple of {self.dtype}'s size")

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def num_ranges(self) -> int:
        """Reserved virtual ranges: K and V per layer, or one for everything."""
        return 2 * self.num_layers if self.layout is KVLayout.PER_LAYER else 1

    @property
    def heads_per_range(self) -> int:
        """K or V head vectors one token stores in one range (all layers' K and V, or one)."""
        return self.num_kv_heads * (
            2 * self.num_layers if self.layout is KVLayout.INTERLEAVED else 1
        )

    @functools.cached_property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies in one range."""
        return self.heads_per_range * self.head_dim * self.element_size

    @functools.cached_property
    def tokens_per_slot(self) -> int:
        """``max_tokens`` rounded up to the least count whose bytes fill whole pages."""
        quantum = self.page_size // math.gcd(self.page_size, self.bytes_per_token)
        return -(-self.max_tokens // quantum) * quantum

    @functools.cached_property
    def pages_per_slot(self) -> int:
        return self.tokens_per_slot * self.bytes_per_token // self.page_size

    @property
    def budget_pages(self) -> int:
        return self.budget_bytes // self.page_size

    @functools.cached_property
    def tokens_per_group(self) -> int:
        """Tokens one page group holds whole; 0 when a token straddles two pages. Interleaved: a
        page holds every layer of a token (Llama-3-8B, 2 MiB: 16 tokens); per_layer: one layer's
        K or V (1,024 tokens). Prefix sharing is finer: ``prefix_block_tokens``."""
        if self.page_size % self.bytes_per_token:
            return 0
        return self.page_size // self.bytes_per_token

    @functools.cached_property
    def block_bytes(self) -> int:
        """Bytes one prefix block occupies in one range."""
        return self.prefix_block_tokens * self.bytes_per_token

    def block_pages(self, block: int) -> range:
        """The page indices (of a slot) that hold prefix block ``block``'s bytes: one, or several
        where a block straddles pages (a token that does not divide the page, or 16 tokens that
        outgrow it)."""
        start = block * self.block_bytes
        return range(start // self.page_size, (start + self.block_bytes - 1) // self.page_size + 1)

    def page_groups_for(self, tokens: int) -> int:
        """Page groups (pages per range) that back tokens [0, tokens) of a slot."""
        return -(-tokens * self.bytes_per_token // self.page_size)

    @property
    def range_shape(self) -> tuple[int, ...]:
        if self.layout is KVLayout.INTERLEAVED:
            return (
                self.max_slots,
                self.tokens_per_slot,
                self.num_layers,
                2,
                self.num_kv_heads,
                self.head_dim,
            )
        return (self.max_slots, self.tokens_per_slot, self.num_kv_heads, self.head_dim)
