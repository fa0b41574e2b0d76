"""FlashInfer's paged kernels on the vAttention cache, zero copy: the cache is handed over as a
paged cache whose page is a whole slot (page_size = tokens_per_slot, one page per sequence,
kv_indices = slot ids, last_page_len = lengths). Measured on the H100 as fast as a 16-token paged
cache (shared/notes/h100-probe.md). Decode batches use the tensor-core decode kernel (faster for
GQA); batches with prefill chunks use the prefill kernel. For CUDA graphs, each graphed batch size
has its own decode wrapper in FlashInfer's cuda-graph mode (fixed index buffers, planned in place).
"""

from __future__ import annotations

import torch

from replica.attention.base import AttentionBackend, KVCacheViews
from replica.attention.batch import StepBatch

WORKSPACE_BYTES = 256 * 1024 * 1024


def graph_decode_wrapper(workspace: torch.Tensor, batch_size: int, max_pages: int) -> object:
    """FlashInfer's tensor-core decode wrapper in cuda-graph mode for exactly ``batch_size``
    sequences holding at most ``max_pages`` pages in all: its index buffers are fixed tensors that
    each ``plan`` refills in place, so a graph captured after one plan replays correctly after the
    next."""
    import flashinfer

    device = workspace.device
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
        paged_kv_indptr_buffer=torch.empty(batch_size + 1, dtype=torch.int32, device=device),
        paged_kv_indices_buffer=torch.empty(max_pages, dtype=torch.int32, device=device),
        paged_kv_last_page_len_buffer=torch.empty(batch_size, dtype=torch.int32, device=device),
    )


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_graphs = True

    def __init__(
        self, cache: KVCacheViews, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        import flashinfer  # optional dependency: the gpu extra

        super().__init__(cache, num_q_heads, num_kv_heads, head_dim)
        k0 = cache.k_cache(0)
        self.dtype, self.tokens_per_slot = dtype, k0.shape[1]
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=k0.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
        self.graph_decodes: dict[int, object] = {}  # batch size -> cuda-graph-mode decode wrapper
        # Host-side planning inputs: plan() reads them on the CPU, so device copies would sync.
        self.page_indptr = torch.arange(k0.shape[0] + 1, dtype=torch.int32).pin_memory()
        self.active: object = self.decode
        self.common = {
            "num_qo_heads": num_q_heads, "num_kv_heads": num_kv_heads, "page_size": self.tokens_per_slot,
            "q_data_type": dtype, "kv_data_type": dtype, "sm_scale": self.scale,
        }

    def _plan_decode(self, wrapper: object, batch: StepBatch) -> None:
        indptr = self.page_indptr[: batch.num_sequences + 1]  # one page (slot) per sequence
        wrapper.plan(indptr, batch.slots_t, batch.kv_lens_host, head_dim=self.head_dim, **self.common)  # type: ignore[attr-defined]
        self.active = wrapper

    def _plan_graph(self, batch: StepBatch) -> None:
        size = batch.num_sequences
        if size not in self.graph_decodes:
            self.graph_decodes[size] = graph_decode_wrapper(self.workspace, size, size)  # a page per sequence
        self._plan_decode(self.graph_decodes[size], batch)

    def plan(self, batch: StepBatch) -> None:
        super().plan(batch)
        if batch.is_decode:
            self._plan_decode(self.decode, batch)
        else:
            self.prefill.plan(
                batch.cu_query_host, self.page_indptr[: batch.num_sequences + 1], batch.slots_t, batch.kv_lens_host, head_dim_qk=self.head_dim,
                causal=True, **self.common,
            )
            self.active = self.prefill

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return self.active.run(q, (k_cache, v_cache))  # type: ignore[attr-defined]
