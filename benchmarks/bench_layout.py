"""What the KV layout costs attention by itself: one decode step's attention (KV write + the
tensor-core decode kernel) over every layer of a 32-layer, Llama-3-8B-shaped cache, in the
vAttention mode's two layouts and the paged mode, captured in one CUDA graph as the engine's
decode steps run it.

    python -m benchmarks.bench_layout            # one GPU, FlashInfer installed

The interleaved layout keeps all of a token's layers side by side (one row per token, 128 KiB for
these shapes), so one layer's K for consecutive tokens lies 128 KiB apart and a step touches one
2 MiB page per 16 tokens per layer; the per-layer layout keeps each layer's K (and V) contiguous
(rows 2 KiB apart); the paged mode keeps 16-token blocks. Same slots, lengths and queries in all
three. Writes ``benchmarks/results/layout-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_attention import graph_seconds
from benchmarks.environment import describe_device, save
from replica.attention import StepBatch
from replica.attention.flashinfer_backend import FlashInferBackend
from replica.attention.paged import PagedFlashInferBackend
from replica.kv import KVCacheAllocator, KVCacheConfig, PagedKVCache, PagedKVConfig
from replica.vmm import open_device

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128
CASES = ((1, 1024), (1, 16384), (8, 1024), (8, 16384), (64, 1152), (64, 4096), (256, 1024))
BUDGET = 60 << 30


def _time(backend: Any, cache: Any, step: StepBatch, batch: int) -> dict[str, float]:
    backend.plan_graph(step)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    caches = [(cache.k_cache(layer), cache.v_cache(layer)) for layer in range(LAYERS)]

    def attend_all() -> None:
        for kc, vc in caches:
            backend.attend(q, kc, vc)

    def write_all() -> None:
        for layer in range(LAYERS):
            backend.write_kv(layer, k, k)

    def step_all() -> None:
        for layer in range(LAYERS):
            backend(layer, q, k, k)

    return {
        "attend_us": graph_seconds(attend_all) * 1e6,
        "write_us": graph_seconds(write_all) * 1e6,
        "step_us": graph_seconds(step_all) * 1e6,
    }


def one_case(batch: int, context: int) -> dict[str, Any]:
    device = open_device("cuda")
    row: dict[str, Any] = {"batch": batch, "context": context}
    for layout in ("interleaved", "per_layer"):
        config = KVCacheConfig(
            num_layers=LAYERS,
            num_kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            dtype=torch.bfloat16,
            max_slots=batch,
            max_tokens=context,
            page_size=device.page_size,
            budget_bytes=BUDGET,
            layout=layout,
        )
        kv = KVCacheAllocator(config, device)
        slots = [kv.acquire() for _ in range(batch)]
        for slot in slots:
            kv.ensure(slot, context)
        step = StepBatch.build_padded(slots, [context - 1] * batch, batch, torch.device("cuda"))
        backend = FlashInferBackend(kv, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16)
        times = _time(backend, kv, step, batch)
        row[layout] = times | {"page_tokens": backend.page_tokens}
        del backend, kv
        gc.collect()
        torch.cuda.empty_cache()
    paged = PagedKVCache(
        PagedKVConfig(
            num_layers=LAYERS,
            num_kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            dtype=torch.bfloat16,
            max_slots=batch,
            max_tokens=context,
            budget_bytes=batch * (context + 16) * 2 * LAYERS * KV_HEADS * HEAD_DIM * 2,
        ),
        torch.device("cuda"),
    )
    slots = [paged.acquire() for _ in range(batch)]
    for slot in slots:
        paged.ensure(slot, context)
    step = StepBatch.build_padded(slots, [context - 1] * batch, batch, torch.device("cuda"))
    backend = PagedFlashInferBackend(paged, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16)
    row["paged"] = _time(backend, paged, step, batch)
    del backend, paged
    gc.collect()
    torch.cuda.empty_cache()
    for layout in ("interleaved", "per_layer"):
        row[f"{layout}_attend_over_paged"] = row[layout]["attend_us"] / row["paged"]["attend_us"]
        row[f"{layout}_step_over_paged"] = row[layout]["step_us"] / row["paged"]["step_us"]
    return row


PROBE_ROWS = {  # token row bytes: what one layer's consecutive tokens are apart
    "2KiB (per-layer)": 2 << 10,
    "128KiB (interleaved)": 128 << 10,
    "128KiB+256B": (128 << 10) + 256,
    "132KiB": 132 << 10,
    "192KiB": 192 << 10,
}


def stride_probe(batch: int, context: int) -> dict[str, Any]:
    """The decode kernel alone over one layer's K and V laid out with each token row size of
    PROBE_ROWS in one ordinary allocation (16-token pages, the same indices): whether the
    interleaved layout's cost follows the row stride's size (pages touched: TLB reach) or its
    power-of-two alignment (DRAM channel hashing)."""
    from replica.attention.flashinfer_backend import FlashInferKernels
    from replica.attention.flashinfer_limits import choose_prefill_kernel

    page = 16
    pages = batch * context // page
    indptr = torch.arange(0, pages + 1, context // page, dtype=torch.int32)
    indices = torch.arange(pages, dtype=torch.int32, device="cuda")
    last = torch.full((batch,), page, dtype=torch.int32)
    step = StepBatch.build_padded(
        list(range(batch)), [context - 1] * batch, batch, torch.device("cuda")
    )
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    kernel = choose_prefill_kernel(1 << 20, 1 << 12, 1 << 12, requested="fa3")
    out: dict[str, Any] = {"batch": batch, "context": context}
    for name, row_bytes in PROBE_ROWS.items():
        row = row_bytes // 2  # bf16 elements
        head_row = KV_HEADS * HEAD_DIM
        # K and V of a token side by side in its row; rows too small for both: V in a second half.
        apart = row >= 2 * head_row
        size = batch * context * row * (1 if apart else 2) + 2 * head_row
        buf = torch.zeros(size, dtype=torch.bfloat16, device="cuda")
        shape, strides = (pages, page, KV_HEADS, HEAD_DIM), (page * row, row, HEAD_DIM, 1)
        k = buf.as_strided(shape, strides)
        v_offset = head_row if apart else batch * context * row
        v = buf.as_strided(shape, strides, storage_offset=v_offset)
        kernels = FlashInferKernels(
            torch.device("cuda"), Q_HEADS, KV_HEADS, HEAD_DIM, page, torch.bfloat16, 0.088, kernel
        )
        kernels.plan(step, indptr, indices, last, graph_pages=pages, page_size=page)
        out[name] = graph_seconds(lambda kernels=kernels: kernels.run(q, k, v)) * 1e6
        del buf, kernels
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--probe-only", action="store_true", help="only the row-stride probe")
    args = parser.parse_args()
    rows = []
    for batch, context in () if args.probe_only else CASES:
        rows.append(one_case(batch, context))
        print(rows[-1], flush=True)
    probe = []
    for batch, context in ((1, 16384), (8, 1024), (8, 4096), (64, 1152)):
        probe.append(stride_probe(batch, context))
        print("probe", probe[-1], flush=True)
    payload = {
        "benchmark": "layout",
        "environment": describe_device("cuda"),
        "settings": {
            "layers": LAYERS,
            "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "bfloat16",
            "kernel": "FlashInfer tensor-core decode, KV write by index_copy_",
        },
        "results": rows,
        "row_stride_probe_us": probe,
    }
    print(f"wrote {save('layout', payload, Path(args.out) if args.out else None)}")


if __name__ == "__main__":
    main()
