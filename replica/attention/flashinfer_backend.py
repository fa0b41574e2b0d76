"""FlashInfer's paged kernels on the vAttention cache, zero copy: the cache is handed over as a
paged cache whose page is a whole slot (page_size = tokens_per_slot, one page per sequence,
kv_indices = slot ids, last_page_len = lengths). Measured on the H100 as fast as a 16-token paged
cache (shared/notes/h100-probe.md). Decode batches use the tensor-core decode kernel (faster for
GQA); batches with prefill chunks use the prefill kernel.
"""

from __future__ import annotations

import torch

from replica.attention.base import AttentionBackend, KVCacheViews
from replica.attention.batch import StepBatch

WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"

    def __init__(
        self, cache: KVCacheViews, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        import flashinfer  # optional dependency: the gpu extra

        super().__init__(cache, num_q_heads, num_kv_heads, head_dim)
        k0 = cache.k_cache(0)
        self.dtype, self.tokens_per_slot = dtype, k0.shape[1]
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=k0.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
        # Host-side planning inputs: plan() reads them on the CPU, so device copies would sync.
        self.page_indptr = torch.arange(k0.shape[0] + 1, dtype=torch.int32).pin_memory()
        self.active: object = self.decode

    def plan(self, batch: StepBatch) -> None:
        super().plan(batch)
        indptr = self.page_indptr[: batch.num_sequences + 1]  # one page (slot) per sequence
        common = {
            "num_qo_heads": self.num_q_heads, "num_kv_heads": self.num_kv_heads, "page_size": self.tokens_per_slot,
            "q_data_type": self.dtype, "kv_data_type": self.dtype, "sm_scale": self.scale,
        }
        if batch.is_decode:
            self.decode.plan(indptr, batch.slots_t, batch.kv_lens_host, head_dim=self.head_dim, **common)
            self.active = self.decode
        else:
            self.prefill.plan(
                batch.cu_query_host, indptr, batch.slots_t, batch.kv_lens_host, head_dim_qk=self.head_dim,
                causal=True, **common,
            )
            self.active = self.prefill

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return self.active.run(q, (k_cache, v_cache))  # type: ignore[attr-defined]
