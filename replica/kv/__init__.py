"""KV caches behind one interface (``replica.kv.base.KVCache``): the vAttention allocator, the
paged comparison mode's block manager, and tensor parallelism's recording cache. Names load on
first use (PEP 562): ``replica.kv.stats`` and ``replica.kv.base`` import without the extension."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "KVCache": "base", "KVCacheOutOfMemory": "base", "StepTicket": "base",
    "KVCacheAllocator": "allocator",
    "KVCacheConfig": "config", "KVLayout": "config",
    "PagedKVCache": "paged", "PagedKVConfig": "paged_config",
    "RecordingKVCache": "recording",
    "KVCacheStats": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'replica.kv' has no attribute {name!r}")
    return getattr(importlib.import_module(f"replica.kv.{module}"), name)


if TYPE_CHECKING:
    from replica.kv.allocator import KVCacheAllocator
    from replica.kv.base import KVCache, KVCacheOutOfMemory, StepTicket
    from replica.kv.config import KVCacheConfig, KVLayout
    from replica.kv.paged import PagedKVCache
    from replica.kv.paged_config import PagedKVConfig
    from replica.kv.recording import RecordingKVCache
    from replica.kv.stats import KVCacheStats
