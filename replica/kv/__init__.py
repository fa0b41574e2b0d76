"""KV caches behind one interface (``replica.kv.base.KVCache``): the vAttention allocator, the
paged comparison mode's block manager, and tensor parallelism's recording cache. Names load on
first use (PEP 562): ``replica.kv.stats`` and ``replica.kv.base`` import without the extension."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replica.lazy import lazy_exports

_EXPORTS = {
    "KVCache": "base",
    "KVCacheOutOfMemory": "base",
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
    from replica.kv.base import KVCache, KVCacheOutOfMemory, StepTicket
    from replica.kv.config import KVCacheConfig, KVLayout
    from replica.kv.paged import PagedKVCache
    from replica.kv.paged_config import PagedKVConfig
    from replica.kv.recording import RecordingKVCache
    from replica.kv.stats import KVCacheStats
