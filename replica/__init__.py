"""vattn's replica layer: the vAttention KV allocator, the model, and the engine of one TP group."""

from replica.async_engine import AsyncLLMEngine
from replica.engine import LLMEngine, RequestRejected
from replica.engine_config import EngineConfig
from replica.kv_allocator import KVCacheAllocator, KVCacheOutOfMemory, StepTicket
from replica.kv_config import KVCacheConfig, KVLayout
from replica.kv_stats import KVCacheStats
from replica.llm import LLM, Completion
from replica.request import RequestOutput
from replica.sampling import SamplingParams
from replica.vmm import CudaUnavailable, Device, VmmError, cuda_available, open_device

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "Completion",
    "CudaUnavailable",
    "Device",
    "EngineConfig",
    "KVCacheAllocator",
    "KVCacheConfig",
    "KVCacheOutOfMemory",
    "KVCacheStats",
    "KVLayout",
    "LLMEngine",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "StepTicket",
    "VmmError",
    "cuda_available",
    "open_device",
]
