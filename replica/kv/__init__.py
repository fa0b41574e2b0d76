"""KV caches behind one interface (``replica.kv.base.KVCache``): the vAttention allocator, the
paged comparison mode's block manager, and tensor parallelism's recording cache. Names load on
first use (PEP 562): ``replica.kv.stats`` and ``replica.kv.base`` import without the extension.

Glossary (every name in code, metrics and docs in this one meaning):

slot
    A request's place in the cache: a fixed region of every range (vAttention) or a row of the
    block table (paged). Running while its request runs; *cached* once released with its pages
    still mapped (their prefix stays findable); free when it holds nothing.
range
    One reserved virtual address range (vAttention): all layers' K and V interleaved in one range
    (``interleaved`` layout) or one range per layer's K and per layer's V (``per_layer``).
page
    One physical allocation mapped into one range: ``page_size`` bytes (2 MiB on a GPU). The unit
    of ``pages_*`` counts and of the budget. In the paged mode a page is a block.
page group
    The pages every range maps at the same page index of a slot: ``num_ranges`` pages that hold
    ``tokens_per_group`` tokens. A slot grows, shrinks and is aliased one group at a time.
block
    The paged mode's unit: ``block_size`` (16) tokens of every layer's K and V, one block-table
    entry.
prefix block
    The unit the prefix index keys (``replica.kv.prefix``): ``prefix_block_tokens`` (16)
    consecutive tokens from a block-aligned position, in both caches and every layout (a block in
    the paged mode; in the vAttention cache a part of a page group, or several groups where a
    token does not divide the page). Its key hashes every token from position 0 to its end.
free / available pages
    *free*: created, mapped nowhere. *available*: what ``take`` can hand out now, free plus still
    creatable under the budget; ``reclaimable_pages`` adds cached pages and eager surplus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from replica.lazy import lazy_exports

_EXPORTS = {
    "KVCache": "base",
    "KVCacheOutOfMemory": "base",
    "KVRestoreFailed": "base",
    "StepTicket": "base",
    "KVCacheAllocator": "allocator",
    "KVCacheConfig": "config",
    "KVLayout": "config",
    "PagedKVCache": "paged",
    "PagedKVConfig": "paged_config",
    "RecordingKVCache": "recording",
    "KVCacheStats": "stats",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from replica.kv.allocator import KVCacheAllocator
    from replica.kv.base import KVCache, KVCacheOutOfMemory, KVRestoreFailed, StepTicket
    from replica.kv.config import KVCacheConfig, KVLayout
    from replica.kv.paged import PagedKVCache
    from replica.kv.paged_config import PagedKVConfig
    from replica.kv.recording import RecordingKVCache
    from replica.kv.stats import KVCacheStats
