"""vattn's replica layer: the KV caches, the model, and the engine of one tensor-parallel group.

Names load on first use (PEP 562), so a light consumer (the HTTP ingress imports
``replica.errors``, ``replica.sampling_params``, ``replica.request``) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from replica.lazy import lazy_exports

#: name -> the module (in this package) that defines it
_EXPORTS = {
    "LLM": "llm",
    "Completion": "llm",
    "AsyncLLMEngine": "async_engine",
    "LLMEngine": "engine",
    "EngineConfig": "engine_config",
    "RequestRejected": "errors",
    "ReplicaBroken": "errors",
    "KVCache": "kv.base",
    "KVCacheAllocator": "kv.allocator",
    "KVCacheOutOfMemory": "kv.base",
    "StepTicket": "kv.base",
    "KVCacheConfig": "kv.config",
    "KVLayout": "kv.config",
    "KVCacheStats": "kv.stats",
    "RequestOutput": "request",
    "SamplingParams": "sampling_params",
    "CudaUnavailable": "vmm",
    "Device": "vmm",
    "VmmError": "vmm",
    "cuda_available": "vmm",
    "open_device": "vmm",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from replica.async_engine import AsyncLLMEngine
    from replica.engine import LLMEngine
    from replica.engine_config import EngineConfig
    from replica.errors import ReplicaBroken, RequestRejected
    from replica.kv.allocator import KVCacheAllocator
    from replica.kv.base import KVCache, KVCacheOutOfMemory, StepTicket
    from replica.kv.config import KVCacheConfig, KVLayout
    from replica.kv.stats import KVCacheStats
    from replica.llm import LLM, Completion
    from replica.request import RequestOutput
    from replica.sampling_params import SamplingParams
    from replica.vmm import CudaUnavailable, Device, VmmError, cuda_available, open_device
