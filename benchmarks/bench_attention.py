"""Decode attention alone, per shape: the vAttention cache shown to FlashInfer as one page per slot,
as the page size the engine chooses (``replica.attention.kernel_pages``), and the paged mode's
16-token blocks; each also as 16-token virtual pages (``small_pages``).

    python -m benchmarks.bench_attention            # one GPU, FlashInfer installed

Two model shapes (Llama-3-8B: 32 q / 8 kv heads; Qwen2.5-7B: 28 q / 4 kv heads; head_dim 128,
bf16, tensor-core decode), batches 1-256, contexts 1K-32K where the KV fits 20 GiB; one layer's
kernel captured in a CUDA graph as the engine's decode steps run it (no host time between
launches), median of 5 timings of 20 replays. The vAttention cache is one layer's interleaved range
(K and V of a token side by side). The chosen page size also runs over an fp8 (e4m3) cache of the
same tokens with bf16 queries (``fp8_*``).
Writes ``benchmarks/results/attention-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import roofline
from benchmarks.environment import describe_device, save
from replica.attention import StepBatch
from replica.attention.flashinfer_backend import FlashInferBackend
from replica.attention.kernel_pages import SMALL_PAGE_TOKENS
from replica.attention.paged import PagedFlashInferBackend
from replica.kv import KVCacheAllocator, KVCacheConfig, PagedKVCache, PagedKVConfig
from replica.vmm import open_device

SHAPES = {"llama3-8b": (32, 8), "qwen2.5-7b": (28, 4)}
BATCHES = (1, 4, 8, 16, 64, 256)
CONTEXTS = (1024, 4096, 16384, 32768)
#: Batches also run with ShareGPT-like uneven lengths (``sharegpt_lengths``).
UNEVEN_BATCHES = (32, 128, 256)
BUDGET = 40 << 30


def graph_seconds(run: Callable[[], object], replays: int = 20) -> float:
    """Seconds per launch of ``run`` captured in a CUDA graph (as the engine's decode steps run:
    no host time between kernels), median of 5 timings of ``replays`` back-to-back replays."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    def replay_all() -> None:
        for _ in range(replays):
            graph.replay()

    return roofline.time_cuda(replay_all, repeats=5) / replays


def sharegpt_lengths(batch: int, seed: int = 0) -> list[int]:
    """Keys per sequence of a decode batch in ShareGPT-like traffic: log-normal (median ~450,
    a long tail), 16..4,096, seeded."""
    rng = random.Random(seed)
    return [min(4096, max(16, int(rng.lognormvariate(6.1, 0.9)))) for _ in range(batch)]


def one_case(
    q_heads: int, kv_heads: int, batch: int, context: int, lengths: list[int] | None = None
) -> dict[str, Any]:
    """One decode batch: ``batch`` sequences of ``context`` keys, or of ``lengths`` (uneven)."""
    lengths = lengths or [context] * batch
    context = max(lengths)
    device = open_device("cuda")
    dtype, head_dim = torch.bfloat16, 128
    config = KVCacheConfig(
        num_layers=1,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        max_slots=batch,
        max_tokens=context,
        page_size=device.page_size,
        budget_bytes=BUDGET,
    )
    kv = KVCacheAllocator(config, device)
    slots = [kv.acquire() for _ in range(batch)]
    for slot, length in zip(slots, lengths):
        kv.ensure(slot, length)
    step = StepBatch.build_padded(
        slots, [length - 1 for length in lengths], batch, torch.device("cuda")
    )
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=dtype)
    backend = FlashInferBackend(kv, q_heads, kv_heads, head_dim, dtype)
    k0, v0 = kv.k_cache(0), kv.v_cache(0)
    backend.plan_graph(step)  # the page size the engine chooses
    chosen_page = backend.page_tokens
    chosen = graph_seconds(lambda: backend.attend(q, k0, v0))
    whole = backend.tokens_per_slot
    backend.kernels.plan(step, *backend._pages(step, whole), graph_pages=batch, page_size=whole)
    backend.page_tokens = whole
    one_page = graph_seconds(lambda: backend.attend(q, k0, v0))
    small = SMALL_PAGE_TOKENS
    backend.kernels.plan(
        step, *backend._pages(step, small), graph_pages=batch * whole // small, page_size=small
    )
    backend.page_tokens = small
    small_pages = graph_seconds(lambda: backend.attend(q, k0, v0))
    fp8_config = dataclasses.replace(config, dtype=torch.float8_e4m3fn)
    kv8 = KVCacheAllocator(fp8_config, device)
    for slot, length in zip([kv8.acquire() for _ in range(batch)], lengths):
        kv8.ensure(slot, length)
    fp8_backend = FlashInferBackend(kv8, q_heads, kv_heads, head_dim, dtype)
    fp8_backend.plan_graph(step)
    k8, v8 = kv8.k_cache(0), kv8.v_cache(0)
    fp8 = graph_seconds(lambda: fp8_backend.attend(q, k8, v8))
    fp8_backend = kv8 = None  # their memory back before the paged cache is made
    paged = PagedKVCache(
        PagedKVConfig(
            num_layers=1,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            max_slots=batch,
            max_tokens=context,
            budget_bytes=batch * context * 2 * kv_heads * head_dim * 2,
        ),
        torch.device("cuda"),
    )
    for slot, length in zip([paged.acquire() for _ in range(batch)], lengths):
        paged.ensure(slot, length)
    paged_backend = PagedFlashInferBackend(paged, q_heads, kv_heads, head_dim, dtype)
    paged_backend.plan_graph(step)
    pk, pv = paged.k_cache(0), paged.v_cache(0)
    paged16 = graph_seconds(lambda: paged_backend.attend(q, pk, pv))
    kv_bytes = sum(lengths) * 2 * kv_heads * head_dim * 2
    return {
        "batch": batch,
        "context": context,
        "mean_context": sum(lengths) / batch,
        "chosen_page_tokens": chosen_page,
        "one_page_us": one_page * 1e6,
        "small_pages_us": small_pages * 1e6,
        "chosen_us": chosen * 1e6,
        "paged16_us": paged16 * 1e6,
        "chosen_over_paged16": chosen / paged16,
        "one_page_over_paged16": one_page / paged16,
        "small_pages_over_paged16": small_pages / paged16,
        "chosen_hbm_tb_s": kv_bytes / chosen / 1e12,
        "fp8_chosen_us": fp8 * 1e6,
        "fp8_over_bf16_chosen": fp8 / chosen,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument(
        "--uneven",
        default=",".join(map(str, UNEVEN_BATCHES)),
        help="batch sizes also run with ShareGPT-like uneven lengths ('' for none)",
    )
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    uneven = [int(b) for b in args.uneven.split(",") if b]
    for shape in args.shapes.split(","):
        q_heads, kv_heads = SHAPES[shape]
        rows = []
        for batch in uneven:
            rows.append(one_case(q_heads, kv_heads, batch, 0, sharegpt_lengths(batch)))
            torch.cuda.empty_cache()
            print(shape, "uneven", rows[-1], flush=True)
        for batch in batches:
            for context in contexts:
                if batch * context * 2 * kv_heads * 128 * 2 > BUDGET // 2:
                    continue
                rows.append(one_case(q_heads, kv_heads, batch, context))
                torch.cuda.empty_cache()  # the case's caches are gone: give their memory back
                print(shape, rows[-1], flush=True)
        results[shape] = rows
    payload = {
        "benchmark": "attention",
        "environment": describe_device("cuda"),
        "settings": {
            "shapes": SHAPES,
            "head_dim": 128,
            "dtype": "bfloat16",
            "kernel": "FlashInfer tensor-core decode",
        },
        "results": results,
    }
    print(f"wrote {save('attention', payload, Path(args.out) if args.out else None)}")


if __name__ == "__main__":
    main()
