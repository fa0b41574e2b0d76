"""FlashInfer's paged kernels on the vAttention cache, zero copy: the cache is handed over as a
paged cache whose pages are *virtual*, their size chosen per step
(``replica.attention.kernel_pages``):
a whole slot (page_size = tokens_per_slot, kv_indices = slot ids, last_page_len = lengths) when the
batch fills the GPU or contexts are short, else 16-token pages over the same memory so that
FlashInfer can split a long sequence across thread blocks. No block table exists: indices are
slot * pages_per_slot + j. Decode batches use the tensor-core decode kernel (faster for GQA);
batches with prefill chunks use the prefill kernel. For CUDA graphs, each graphed batch size and
page size has its own decode wrapper in FlashInfer's cuda-graph mode (fixed index buffers, planned
in place). ``FlashInferKernels`` holds the wrappers; the paged mode's backend uses it too.

An fp8 (e4m3) cache is read by the same kernels, planned with ``kv_data_type`` e4m3 and run with
the layer's ``k_scale`` / ``v_scale``; its prefill runs on fa2 (``choose_prefill_kernel``).
"""

from __future__ import annotations

import torch

from replica.attention.base import AttentionBackend, KVCacheViews, token_rows
from replica.attention.batch import StepBatch
from replica.attention.flashinfer_limits import PrefillKernel, choose_prefill_kernel
from replica.attention.kernel_pages import (
    LONG_CONTEXT_TOKENS,
    kernel_page_tokens,
    page_table,
    small_page,
)

WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferKernels:
    """FlashInfer's paged prefill and tensor-core decode kernels over a cache described as pages,
    shared by the vAttention backend (a page is a whole slot) and the paged mode's backend (a page
    is a block). Planned once per step from (indptr, indices, last_page_len); ``graph_pages``
    plans instead the cuda-graph-mode decode wrapper of the batch's size, whose index buffers are
    fixed tensors (``graph_pages`` entries) that each plan refills in place, so a graph captured
    after one plan replays correctly after the next."""

    def __init__(
        self,
        device: torch.device,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        scale: float,
        prefill_kernel: PrefillKernel,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """``dtype`` is the queries', ``kv_dtype`` the cache's (None: the same)."""
        import flashinfer  # optional dependency: the gpu extra

        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        #: fa3 (FlashInfer's "auto" on Hopper) only where its 32-bit addressing reaches the cache.
        self.prefill_kernel = prefill_kernel
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=prefill_kernel.backend
        )
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=True
        )
        self.graph_decodes: dict[
            tuple[int, int], object
        ] = {}  # (batch size, page size) -> cuda-graph wrapper
        self.active: object = self.decode
        self.planned: torch.cuda.Event | None = None  # recorded behind the last plan's copies
        self.head_dim = head_dim
        self.common = {
            "num_qo_heads": num_q_heads,
            "num_kv_heads": num_kv_heads,
            "page_size": page_size,
            "q_data_type": dtype,
            "kv_data_type": kv_dtype or dtype,
            "sm_scale": scale,
        }

    def plan(
        self,
        batch: StepBatch,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        last_page_len: torch.Tensor,
        graph_pages: int | None = None,
        page_size: int | None = None,
    ) -> None:
        """``indptr`` and ``last_page_len`` on the host (FlashInfer plans there: device tensors
        would sync), ``indices`` on the device; ``page_size`` overrides the constructor's (the
        vAttention backend chooses it per step).

        A wrapper's plan fills its pinned host buffer and copies it to the device behind the work
        already queued; with asynchronous scheduling the previous step may still be queued, so
        this first waits until the previous plan's copies have left (at once, unless the device is
        still on the step before that), then overwrites the buffers."""
        if self.planned is not None:
            self.planned.synchronize()
        common = self.common if page_size is None else {**self.common, "page_size": page_size}
        if not batch.is_decode:
            self.prefill.plan(
                batch.cu_query_host,
                indptr,
                indices,
                last_page_len,
                head_dim_qk=self.head_dim,
                causal=True,
                **common,
            )
            self.active = self.prefill
        else:
            wrapper = (
                self.decode
                if graph_pages is None
                else self._graph_decode(batch.num_sequences, graph_pages, common["page_size"])
            )
            wrapper.plan(indptr, indices, last_page_len, head_dim=self.head_dim, **common)  # type: ignore[attr-defined]
            self.active = wrapper
        self.planned = torch.cuda.Event()
        self.planned.record()

    def _graph_decode(self, batch_size: int, max_pages: int, page_size: int) -> object:
        key = (batch_size, page_size)
        if key not in self.graph_decodes:
            import flashinfer

            device = self.workspace.device
            self.graph_decodes[key] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.empty(
                    batch_size + 1, dtype=torch.int32, device=device
                ),
                paged_kv_indices_buffer=torch.empty(max_pages, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.empty(
                    batch_size, dtype=torch.int32, device=device
                ),
            )
        return self.graph_decodes[key]

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        """``kv_scales``: an fp8 cache's (K, V) dequantization scales for this layer. A scale of 1.0
        is not passed: FlashInfer would multiply the output by it in a separate kernel."""
        k_scale, v_scale = (None if s == 1.0 else s for s in kv_scales)
        return self.active.run(q, (k_cache, v_cache), k_scale=k_scale, v_scale=v_scale)  # type: ignore[attr-defined]


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_graphs = True
    supports_fp8 = True

    def __init__(
        self,
        cache: KVCacheViews,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        prefill: str = "auto",
    ) -> None:
        """``prefill``: ``replica.attention.flashinfer_limits.PREFILL_KERNELS``."""
        super().__init__(cache, num_q_heads, num_kv_heads, head_dim)
        k0 = cache.k_cache(0)
        self.tokens_per_slot = k0.shape[1]
        rows = k0.shape[0] * self.tokens_per_slot  # every slot's every token
        prefill_kernel = choose_prefill_kernel(
            rows,
            k0.stride(1) * k0.element_size(),
            min(rows, cache.token_capacity()),
            self.fp8,
            prefill,
        )
        self.kernels = FlashInferKernels(
            k0.device,
            num_q_heads,
            num_kv_heads,
            head_dim,
            self.tokens_per_slot,
            dtype,
            self.scale,
            prefill_kernel,
            self.kv_dtype,
        )
        # Host-side planning inputs: plan() reads them on the CPU, so device copies would sync.
        self.page_indptr = torch.arange(k0.shape[0] + 1, dtype=torch.int32).pin_memory()
        self.page_tokens = self.tokens_per_slot  # what the kernel sees this step

    def _pages(
        self, batch: StepBatch, page_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr, indices, last_page_len) of the batch seen as ``page_tokens``-token pages. One
        page per slot: indices are the slots, last_page_len the lengths (no work). Smaller pages
        (small or uneven batches): computed on the host from the slots and lengths."""
        if page_tokens == self.tokens_per_slot:
            return self.page_indptr[: batch.num_sequences + 1], batch.slots_t, batch.kv_lens_host
        indptr, indices, last = page_table(
            batch.slots, batch.kv_lens, page_tokens, self.tokens_per_slot, batch.borrows
        )
        host = [
            torch.tensor(v, dtype=torch.int32, pin_memory=True) for v in (indptr, indices, last)
        ]
        return host[0], host[1].to(batch.slots_t.device, non_blocking=True), host[2]

    def graph_variant(self, batch: StepBatch) -> int:
        """The page size the kernel sees: a graph captured with one page size cannot replay
        another."""
        return kernel_page_tokens(
            batch.num_sequences,
            self.num_kv_heads,
            batch.max_kv_len,
            self.tokens_per_slot,
            sum(batch.kv_lens),
            borrowing=bool(batch.borrows),
        )

    @property
    def borrow_granularity(self) -> int:
        """Whole small pages: a page list names the holder's (none without small pages)."""
        return small_page(self.tokens_per_slot) or 0

    def warm_up_shapes(self, sizes: list[int], max_kv_len: int) -> list[tuple[int, int]]:
        """Short contexts for every size, and one long sequence among short ones where the kernel
        then sees small pages (few sequences, or uneven lengths below the blocks that fill the
        GPU several times over: ``kernel_pages``)."""
        if LONG_CONTEXT_TOKENS > max_kv_len or small_page(self.tokens_per_slot) is None:
            return [(size, 1) for size in sizes]
        short_keys = 4  # a warm-up request's 2-token prompt and first tokens
        long = [
            (size, LONG_CONTEXT_TOKENS)
            for size in sizes
            if kernel_page_tokens(
                size,
                self.num_kv_heads,
                LONG_CONTEXT_TOKENS,
                self.tokens_per_slot,
                LONG_CONTEXT_TOKENS + short_keys * (size - 1),
            )
            != self.tokens_per_slot
        ]
        return [(size, 1) for size in sizes] + long

    def plan(self, batch: StepBatch) -> None:
        super().plan(batch)
        self.page_tokens = self.graph_variant(batch)
        self.kernels.plan(batch, *self._pages(batch, self.page_tokens), page_size=self.page_tokens)

    def _plan_graph(self, batch: StepBatch) -> None:
        self.page_tokens = self.planned_variant  # plan_graph chose it
        max_pages = batch.num_sequences * (self.tokens_per_slot // self.page_tokens)
        self.kernels.plan(
            batch,
            *self._pages(batch, self.page_tokens),
            graph_pages=max_pages,
            page_size=self.page_tokens,
        )

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int = 0
    ) -> torch.Tensor:
        if self.page_tokens != self.tokens_per_slot:
            k_cache, v_cache = (
                virtual_pages(k_cache, self.page_tokens),
                virtual_pages(v_cache, self.page_tokens),
            )
        return self.kernels.run(q, k_cache, v_cache, self.layer_scales(layer))


def virtual_pages(cache: torch.Tensor, page_tokens: int) -> torch.Tensor:
    """[slots, tokens, heads, dim] -> [slots * tokens / page_tokens, page_tokens, heads, dim], the
    same memory (a slot's tokens are followed by the next slot's in every layout)."""
    rows = token_rows(cache)
    return rows.as_strided(
        (rows.shape[0] // page_tokens, page_tokens, *rows.shape[1:]),
        (page_tokens * rows.stride(0), *rows.stride()),
    )
