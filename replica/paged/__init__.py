"""The PagedAttention comparison mode: a conventional block-table KV cache with the same interface
as the vAttention allocator, and attention backends that read it (``EngineConfig(kv_mode="paged")``).
"""

from replica.paged.attention import PAGED_BACKENDS, make_paged_attention_backend
from replica.paged.block_manager import PagedKVCache
from replica.paged.paged_config import PagedKVConfig

__all__ = ["PAGED_BACKENDS", "PagedKVCache", "PagedKVConfig", "make_paged_attention_backend"]
