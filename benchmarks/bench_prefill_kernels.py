"""Prefill attention alone on the vAttention cache: FlashInfer's Hopper kernel (fa3, its "auto"
on an H100/H200) vs its Ampere-style kernel (fa2), which the engine falls back to where fa3's
32-bit row addressing cannot reach the cache (replica.attention.flashinfer_limits).

    python -m benchmarks.bench_prefill_kernels      # one GPU, FlashInfer installed

Llama-3-8B shapes (32 q / 8 kv heads, head_dim 128, bf16), 64 slots of 4,704 tokens (within fa3's
reach, so both kernels run), both layouts, whole-slot pages; prints one JSON line per case (mean of
20 launches after 3 warm-ups).
"""

from __future__ import annotations

import json

import torch

from replica.attention import StepBatch
from replica.attention.flashinfer_backend import FlashInferBackend
from replica.kv.allocator import KVCacheAllocator
from replica.kv.config import KVCacheConfig
from replica.vmm import open_device

#: (sequences, context already cached, new tokens each)
CASES = ((1, 0, 4096), (4, 0, 2048), (16, 0, 512), (8, 2048, 1024), (32, 3000, 256))


def main() -> None:
    import flashinfer

    device = open_device("cuda")
    for layout in ("interleaved", "per_layer"):
        config = KVCacheConfig(
            num_layers=32,
            num_kv_heads=8,
            head_dim=128,
            dtype=torch.bfloat16,
            max_slots=64,
            max_tokens=4700,
            page_size=device.page_size,
            budget_bytes=40 << 30,
            layout=layout,
        )
        kv = KVCacheAllocator(config, device)
        slots = [kv.acquire() for _ in range(64)]
        for slot in slots:
            kv.ensure(slot, 4600)
        backend = FlashInferBackend(kv, 32, 8, 128, torch.bfloat16)
        for kernel in ("auto", "fa2"):
            backend.kernels.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                backend.kernels.workspace, "NHD", backend=kernel
            )
            for n, context, query in CASES:
                batch = StepBatch.build(
                    slots[-n:], [context] * n, [query] * n, torch.device("cuda")
                )
                q = torch.randn(batch.num_tokens, 32, 128, dtype=torch.bfloat16, device="cuda")
                backend.plan(batch)
                k0, v0 = kv.k_cache(0), kv.v_cache(0)
                for _ in range(3):
                    backend.attend(q, k0, v0)
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                for _ in range(20):
                    backend.attend(q, k0, v0)
                end.record()
                torch.cuda.synchronize()
                print(
                    json.dumps(
                        {
                            "layout": layout,
                            "backend": kernel,
                            "seqs": n,
                            "context": context,
                            "query": query,
                            "us": round(start.elapsed_time(end) / 20 * 1000, 1),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
