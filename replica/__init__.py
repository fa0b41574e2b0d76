"""vattn's replica layer: the vAttention KV allocator, the model, and the engine of one TP group."""

from replica.kv_allocator import KVCacheAllocator, KVCacheOutOfMemory, StepTicket
from replica.kv_config import KVCacheConfig, KVLayout
from replica.kv_stats import KVCacheStats
from replica.vmm import CudaUnavailable, Device, VmmError, cuda_available, open_device

__all__ = [
    "CudaUnavailable",
    "Device",
    "KVCacheAllocator",
    "KVCacheConfig",
    "KVCacheOutOfMemory",
    "KVCacheStats",
    "KVLayout",
    "StepTicket",
    "VmmError",
    "cuda_available",
    "open_device",
]
