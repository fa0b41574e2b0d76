"""FlashInfer's paged kernels on the vAttention cache, zero copy: the cache is handed over as a
paged cache whose page is a whole slot (page_size = tokens_per_slot, one page per sequence,
kv_indices = slot ids, last_page_len = lengths). Measured on the H100 as fast as a 16-token paged
cache (shared/notes/h100-probe.md). Decode batches use the tensor-core decode kernel (faster for
GQA); batches with prefill chunks use the prefill kernel. For CUDA graphs, each graphed batch size
has its own decode wrapper in FlashInfer's cuda-graph mode (fixed index buffers, planned in place).
``FlashInferKernels`` holds the wrappers; the paged mode's backend uses it too.
"""

from __future__ import annotations

import torch

from replica.attention.base import AttentionBackend, KVCacheViews
from replica.attention.batch import StepBatch
from replica.attention.flashinfer_limits import PrefillKernel, choose_prefill_kernel

WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferKernels:
    """FlashInfer's paged prefill and tensor-core decode kernels over a cache described as pages,
    shared by the vAttention backend (a page is a whole slot) and the paged mode's backend (a page
    is a block). Planned once per step from (indptr, indices, last_page_len); ``graph_pages``
    plans instead the cuda-graph-mode decode wrapper of the batch's size, whose index buffers are
    fixed tensors (``graph_pages`` entries) that each plan refills in place, so a graph captured
    after one plan replays correctly after the next."""

    def __init__(self, device: torch.device, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 page_size: int, dtype: torch.dtype, scale: float, prefill_kernel: PrefillKernel) -> None:
        import flashinfer  # optional dependency: the gpu extra

        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        #: fa3 (FlashInfer's "auto" on Hopper) only where its 32-bit addressing reaches the cache.
        self.prefill_kernel = prefill_kernel
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                      backend=prefill_kernel.backend)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
        self.graph_decodes: dict[int, object] = {}  # batch size -> cuda-graph-mode decode wrapper
        self.active: object = self.decode
        self.planned: torch.cuda.Event | None = None  # recorded behind the last plan's copies
        self.head_dim = head_dim
        self.common = {
            "num_qo_heads": num_q_heads, "num_kv_heads": num_kv_heads, "page_size": page_size,
            "q_data_type": dtype, "kv_data_type": dtype, "sm_scale": scale,
        }

    def plan(self, batch: StepBatch, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor,
             graph_pages: int | None = None) -> None:
        """``indptr`` and ``last_page_len`` on the host (FlashInfer plans there: device tensors
        would sync), ``indices`` on the device.

        A wrapper's plan fills its pinned host buffer and copies it to the device behind the work
        already queued; with asynchronous scheduling the previous step may still be queued, so
        this first waits until the previous plan's copies have left (at once, unless the device is
        still on the step before that), then overwrites the buffers."""
        if self.planned is not None:
            self.planned.synchronize()
        if not batch.is_decode:
            self.prefill.plan(batch.cu_query_host, indptr, indices, last_page_len, head_dim_qk=self.head_dim,
                              causal=True, **self.common)
            self.active = self.prefill
        else:
            wrapper = self.decode if graph_pages is None else self._graph_decode(batch.num_sequences, graph_pages)
            wrapper.plan(indptr, indices, last_page_len, head_dim=self.head_dim, **self.common)  # type: ignore[attr-defined]
            self.active = wrapper
        self.planned = torch.cuda.Event()
        self.planned.record()

    def _graph_decode(self, batch_size: int, max_pages: int) -> object:
        if batch_size not in self.graph_decodes:
            import flashinfer

            device = self.workspace.device
            self.graph_decodes[batch_size] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.empty(batch_size + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buffer=torch.empty(max_pages, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.empty(batch_size, dtype=torch.int32, device=device),
            )
        return self.graph_decodes[batch_size]

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return self.active.run(q, (k_cache, v_cache))  # type: ignore[attr-defined]


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_graphs = True

    def __init__(
        self, cache: KVCacheViews, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        super().__init__(cache, num_q_heads, num_kv_heads, head_dim)
        k0 = cache.k_cache(0)
        rows = k0.shape[0] * k0.shape[1]  # every slot's every token
        prefill_kernel = choose_prefill_kernel(rows, k0.stride(1) * k0.element_size(), min(rows, cache.token_capacity()))
        self.kernels = FlashInferKernels(k0.device, num_q_heads, num_kv_heads, head_dim, k0.shape[1], dtype, self.scale,
                                         prefill_kernel)
        # Host-side planning inputs: plan() reads them on the CPU, so device copies would sync.
        self.page_indptr = torch.arange(k0.shape[0] + 1, dtype=torch.int32).pin_memory()

    def _pages(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One page (the slot) per sequence: indices are the slots, last_page_len the lengths."""
        return self.page_indptr[: batch.num_sequences + 1], batch.slots_t, batch.kv_lens_host

    def plan(self, batch: StepBatch) -> None:
        super().plan(batch)
        self.kernels.plan(batch, *self._pages(batch))

    def _plan_graph(self, batch: StepBatch) -> None:
        self.kernels.plan(batch, *self._pages(batch), graph_pages=batch.num_sequences)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return self.kernels.run(q, k_cache, v_cache)
