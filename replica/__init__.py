"""vattn's replica layer: the KV caches, the model, and the engine of one tensor-parallel group.

Names load on first use (PEP 562), so a light consumer (the HTTP ingress imports
``replica.errors``, ``replica.sampling_params``, ``replica.request``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> the module that defines it
_EXPORTS = {
    "LLM": "replica.llm",
    "Completion": "replica.llm",
    "AsyncLLMEngine": "replica.async_engine",
    "LLMEngine": "replica.engine",
    "EngineConfig": "replica.engine_config",
    "RequestRejected": "replica.errors",
    "ReplicaBroken": "replica.errors",
    "KVCache": "replica.kv.base",
    "KVCacheAllocator": "replica.kv.allocator",
    "KVCacheOutOfMemory": "replica.kv.base",
    "StepTicket": "replica.kv.base",
    "KVCacheConfig": "replica.kv.config",
    "KVLayout": "replica.kv.config",
    "KVCacheStats": "replica.kv.stats",
    "RequestOutput": "replica.request",
    "SamplingParams": "replica.sampling_params",
    "CudaUnavailable": "replica.vmm",
    "Device": "replica.vmm",
    "VmmError": "replica.vmm",
    "cuda_available": "replica.vmm",
    "open_device": "replica.vmm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'replica' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
