"""The host tier's offload and restore bandwidth (#25): both KV modes at equal bytes, against the
device's pinned host<->device bandwidth.

    python -m benchmarks.bench_offload            # Llama-3-8B and Qwen2.5-7B shapes, one GPU
    python -m benchmarks.bench_offload --smoke    # a tiny shape on the host backend, seconds

Per model shape (bf16 K/V) and history (``--tokens``: 1K, 4K, 16K), each cache (vAttention in the
interleaved and per_layer layouts, the paged mode) holds one conversation of that many tokens, with
a host tier exactly as large, and the real cache calls are timed:

  offload         ``release`` of the conversation: its blocks written through to the host
  restore         ``acquire`` + ``ensure`` of the restored tokens, for its next turn once its device
                  copy is gone (a filler request took the slot): the blocks copied back (the
                  vAttention cache copies at the slot's first waited ``ensure``: its restores are
                  deferred); vAttention's slot still maps its pages
  restore_e2e     the same again, end to end: no GPU sleep, from the call until its copies end
  restore_mapped  vAttention only: the same after ``shrink`` released the pages, so the restore
                  creates and maps them (the mapping worker), waits, then copies

and the reference: one copy of the same bytes between a pinned host tensor and the device, each
way. ``offload`` and ``restore`` are timed on CUDA by ``*_gpu_s``, the copies' own time: the call is
issued behind a GPU sleep that outlasts its host work, and CUDA events time from the sleep's end to
the fence recorded after the copies (the caches' ``make_fence`` seam; ``gpu_covered`` says whether
every call's host work ended inside its sleep); ``restore_e2e`` and ``restore_mapped`` (and every
phase on the host backend) by ``*_wall_s``, from the call until its copies are done
(``torch.cuda.synchronize``), bookkeeping and mapping included. Fractions are a path's bandwidth
over the reference's in its direction on the same clock; ``restore_over_paged`` and
``restore_mapped_over_paged`` are the paged mode's end-to-end restore time over vAttention's, with
its pages mapped and with mapping them (>= 1: vAttention is as fast). Medians of ``--repeats``
rounds after one warm-up round (which maps vAttention's pages and makes the paged mode's staging
buffers; the tier pins its host memory when made, ``host_tier_pin_seconds``); each call's copies
are counted (``replica.kv.host_copies.copy_pairs``), and vAttention's pages mapped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks.environment import describe_device, save, sleep_cycles_per_ms
from replica import KVCacheAllocator, KVCacheConfig, open_device
from replica.kv import host_copies, host_tier
from replica.kv.base import KVCache
from replica.kv.layout_choice import host_page_size
from replica.kv.paged import PagedKVCache
from replica.kv.paged_config import PagedKVConfig
from replica.model import ModelConfig
from replica.vmm import Device

SHAPES: dict[str, Callable[[], ModelConfig]] = {
    "llama3-8b": ModelConfig.llama3_8b,
    "qwen2.5-7b": ModelConfig.qwen2_5_7b,
    "tiny": ModelConfig.tiny,
}
CACHES = ("interleaved", "per_layer", "paged")
BLOCK = 16  # tokens a prefix block (both modes)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What one run measures: a model's K/V per token and the history's length."""

    shape: str
    tokens: int
    dtype: torch.dtype

    @property
    def model(self) -> ModelConfig:
        return SHAPES[self.shape]()

    @property
    def token_bytes(self) -> int:
        """All layers' K and V of one token."""
        model = self.model
        return 2 * model.num_layers * model.num_kv_heads * model.head_dim * self.dtype.itemsize

    @property
    def bytes(self) -> int:
        return self.tokens * self.token_bytes


class Timing(NamedTuple):
    wall_s: float | None  # from the call until its copies are done (None: behind a GPU sleep)
    gpu_s: float | None  # the copies' own time (CUDA), from the sleep's end to the last fence
    copies: int  # host tier copies the call issued (pairs given to ``copy_pairs``)
    pages_mapped: int = 0  # vAttention: pages the call mapped


class Clock:
    """Wall and GPU timing of calls that enqueue copies; ``make_fence`` is the caches' fence
    (``replica.kv.copies.CopyFence``) with a timing event, so the last copies' end is known."""

    def __init__(self, device: torch.device, sleep_ms: float) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.last_fence: _TimedFence | None = None
        self.covered = True  # every timed call's host work ended inside its GPU sleep
        self._sleep_ms = sleep_ms
        self._cycles_per_ms = sleep_cycles_per_ms() if self.cuda else 0.0

    def make_fence(self) -> _TimedFence:
        self.last_fence = _TimedFence(self.device)
        return self.last_fence

    def time(self, call: Callable[[], object], gpu: bool = True) -> Timing:
        """``call`` and the copies it enqueues, up to the last fence made during it (with
        ``gpu``, on CUDA, where it made one: its GPU time too)."""
        self.sync()
        self.last_fence = None
        start = None
        if self.cuda and gpu:
            torch.cuda._sleep(int(self._sleep_ms * self._cycles_per_ms))  # the host runs ahead
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        with counted_copies() as copies:
            began = time.perf_counter()
            call()
            issued = time.perf_counter()
            self.sync()
            wall = time.perf_counter() - began
        if start is None:
            return Timing(wall, None, sum(copies))
        # NOTE: the wall time of a call behind a sleep is the sleep's: only its GPU time counts.
        if self.last_fence is None or self.last_fence.event is None:
            return Timing(None, None, sum(copies))
        self.covered &= (issued - began) * 1e3 < self._sleep_ms
        return Timing(None, start.elapsed_time(self.last_fence.event) / 1e3, sum(copies))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class _TimedFence:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if self.event is not None:
            self.event.record(torch.cuda.current_stream(device))

    def done(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def order(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)


@contextlib.contextmanager
def counted_copies() -> Iterator[list[int]]:
    """The pairs of each host tier copy (``host_copies.copy_pairs``) made inside the block."""
    counts: list[int] = []
    real = host_copies.copy_pairs

    def counting(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        counts.append(len(targets))
        real(targets, sources)

    host_copies.copy_pairs = counting
    try:
        yield counts
    finally:
        host_copies.copy_pairs = real


def make_cache(name: str, geometry: Geometry, vmm: Device, clock: Clock) -> KVCache:
    """One slot holding ``geometry.tokens`` (and a next turn's token), every page or block it
    needs and no more, a host tier of exactly the history."""
    model = geometry.model
    sizes: dict[str, Any] = dict(
        num_layers=model.num_layers,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        dtype=geometry.dtype,
        max_slots=1,
        max_tokens=geometry.tokens + BLOCK,
        prefix_cache=True,
        host_tier_bytes=geometry.bytes,
    )
    if name == "paged":
        blocks = geometry.tokens // BLOCK + 1
        config = PagedKVConfig(**sizes, budget_bytes=blocks * BLOCK * geometry.token_bytes)
        return PagedKVCache(config, vmm.torch_device, make_fence=clock.make_fence)
    probe = KVCacheConfig(
        **sizes, page_size=vmm.page_size, budget_bytes=0, layout=name, eager_pages=0
    )
    budget = probe.page_groups_for(probe.tokens_per_slot) * probe.num_ranges * vmm.page_size
    config = dataclasses.replace(probe, budget_bytes=budget)
    return KVCacheAllocator(config, vmm, make_fence=clock.make_fence)


def one_round(cache: KVCache, history: list[int], clock: Clock) -> dict[str, Timing]:
    """Offload and restore(s) of one conversation, each timed."""
    slot = cache.acquire(len(history), history)
    cache.ensure(slot, len(history))
    timings = {"offload": clock.time(lambda: cache.release(slot, history))}
    turn = [*history, 1]
    evict(cache, history)
    timings["restore"] = restore(cache, turn, len(history), clock)
    evict(cache, history)
    # End to end, no sleep: what a request's admission waits, bookkeeping and copies.
    timings["restore_e2e"] = restore(cache, turn, len(history), clock, gpu=False)
    if isinstance(cache, KVCacheAllocator):
        cache.shrink()  # the device copy and its pages go back to the device
        # Wall time only: its host work waits for the mapping, which no sleep need outlast.
        timings["restore_mapped"] = restore(cache, turn, len(history), clock, gpu=False)
    return timings


def evict(cache: KVCache, history: list[int]) -> None:
    """Drops the history's device copy: a filler request takes the one slot (vAttention: keeps
    its pages, unindexed) or every block (paged)."""
    filler = [0] * (BLOCK if isinstance(cache, KVCacheAllocator) else len(history) + BLOCK)
    slot = cache.acquire(len(filler), filler)
    cache.ensure(slot, len(filler))
    cache.release(slot, [])
    assert cache.cached_tokens([*history, 1]) == 0, "the history is still on the device"


def restore(
    cache: KVCache, turn: list[int], expected: int, clock: Clock, gpu: bool = True
) -> Timing:
    """The next turn's admission timed, ``acquire`` and the ``ensure`` of the restored tokens
    (which copies a deferred restore), which restores ``expected`` tokens (and the pages it
    mapped); then its end, untimed."""
    slots: list[int] = []
    mapped = cache.stats().pages_mapped_total

    def admit() -> None:
        slots.append(cache.acquire(len(turn), turn))
        cache.ensure(slots[0], cache.length(slots[0]))

    timing = clock.time(admit, gpu)
    timing = timing._replace(pages_mapped=cache.stats().pages_mapped_total - mapped)
    assert cache.length(slots[0]) == expected, f"restored {cache.length(slots[0])} tokens"
    cache.release(slots[0], turn[:expected])  # stored already: no copy
    return timing


def measure_cache(
    name: str, geometry: Geometry, vmm: Device, clock: Clock, repeats: int
) -> dict[str, Any]:
    """Per phase, the medians of ``repeats`` rounds (each its own conversation) after a warm-up
    round, and the copies a call issued."""
    cache = make_cache(name, geometry, vmm, clock)
    # Each round its own conversation (its own prefix keys): the tier writes it anew.
    rounds = [one_round(cache, [2 + i] * geometry.tokens, clock) for i in range(repeats + 1)]
    row: dict[str, Any] = {"cache": name, "mode": "paged" if name == "paged" else "vattention"}
    for phase in rounds[0]:
        timings = [r[phase] for r in rounds[1:]]
        wall = [t.wall_s for t in timings if t.wall_s is not None]
        row[f"{phase}_wall_s"] = statistics.median(wall) if wall else None
        gpu = [t.gpu_s for t in timings if t.gpu_s is not None]
        row[f"{phase}_gpu_s"] = statistics.median(gpu) if gpu else None
        row[f"{phase}_copies"] = timings[-1].copies
        row[f"{phase}_pages_mapped"] = timings[-1].pages_mapped
    row["host_tier_pin_seconds"] = cache.stats().host_tier_pin_seconds
    # What the paged mode would issue copying block by block: one copy a block and view.
    row["copies_one_per_block_and_view"] = geometry.tokens // BLOCK * 2 * geometry.model.num_layers
    # NOTE: the cache and its host tier refer to each other (the tier pins through the cache):
    # collected now, so that its device memory and pinned chunks go before the next cache's.
    del cache
    gc.collect()
    return row


def reference(geometry: Geometry, device: torch.device, clock: Clock, repeats: int) -> dict:
    """One copy of the history's bytes each way between pinned host memory and the device."""
    size = geometry.bytes
    host = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
    on_device = torch.empty(size, dtype=torch.uint8, device=device)
    result: dict[str, float | None] = {}
    for direction, target, source in (("d2h", host, on_device), ("h2d", on_device, host)):

        def copy_once(target: torch.Tensor = target, source: torch.Tensor = source) -> None:
            target.copy_(source, non_blocking=True)
            clock.make_fence()

        timings = [clock.time(copy_once) for _ in range(repeats + 1)][1:]
        walls = [clock.time(copy_once, gpu=False) for _ in range(repeats + 1)][1:]
        result[f"{direction}_wall_s"] = statistics.median(t.wall_s or 0.0 for t in walls)
        gpu = [t.gpu_s for t in timings if t.gpu_s is not None]
        result[f"{direction}_gpu_s"] = statistics.median(gpu) if gpu else None
    return result


#: (phase, the reference's direction) of the fractions.
PHASES = (
    ("offload", "d2h"),
    ("restore", "h2d"),
    ("restore_e2e", "h2d"),
    ("restore_mapped", "h2d"),
)


def with_fractions(row: dict[str, Any], ref: dict[str, Any], size: int) -> dict[str, Any]:
    """Adds each phase's bandwidth and fraction of the reference's (GPU times where both have
    them, else wall times) and its wall-time fraction."""
    for phase, direction in PHASES:
        if f"{phase}_wall_s" not in row:
            continue
        clock = "gpu" if None not in (row[f"{phase}_gpu_s"], ref[f"{direction}_gpu_s"]) else "wall"
        seconds = row[f"{phase}_{clock}_s"]
        if seconds is None:  # behind a sleep, and no fence timed
            continue
        row[f"{phase}_gb_per_s"] = round(size / seconds / 1e9, 2)
        row[f"{phase}_fraction"] = round(ref[f"{direction}_{clock}_s"] / seconds, 3)
        row[f"{phase}_fraction_of"] = clock
    return row


@functools.cache
def opened(backend: str, page_size: int | None) -> Device:
    """One VMM backend per page size for the whole run (CUDA: one, at 2 MiB)."""
    return open_device(backend, page_size)


def measure(geometry: Geometry, caches: list[str], backend: str, args: argparse.Namespace) -> dict:
    """The reference and every cache's row for one shape and history."""
    page_size = None if backend == "cuda" else host_page_size(geometry.token_bytes, 64 * 1024)
    vmm = opened(backend, page_size)
    clock = Clock(vmm.torch_device, args.sleep_ms)
    ref = reference(geometry, vmm.torch_device, clock, args.repeats)
    rows = [
        with_fractions(measure_cache(name, geometry, vmm, clock, args.repeats), ref, geometry.bytes)
        for name in caches
    ]
    paged = next((r for r in rows if r["cache"] == "paged"), None)
    for row in rows:  # the paged mode's restore, end to end, over vAttention's (>= 1: as fast)
        for phase, name in (("restore_e2e", "restore"), ("restore_mapped", "restore_mapped")):
            if paged is not None and row is not paged and row.get(f"{phase}_wall_s"):
                ratio = paged["restore_e2e_wall_s"] / row[f"{phase}_wall_s"]
                row[f"{name}_over_paged"] = round(ratio, 3)
    ref |= {
        f"{d}_gb_per_s": round(geometry.bytes / ref[f"{d}_wall_s"] / 1e9, 2) for d in ("d2h", "h2d")
    }
    for direction in ("d2h", "h2d"):
        if ref[f"{direction}_gpu_s"] is not None:
            ref[f"{direction}_gpu_gb_per_s"] = round(
                geometry.bytes / ref[f"{direction}_gpu_s"] / 1e9, 2
            )
    return {
        "shape": geometry.shape,
        "tokens": geometry.tokens,
        "bytes": geometry.bytes,
        "reference": ref,
        "caches": rows,
        "gpu_covered": clock.covered,
        "page_size": vmm.page_size,
    }


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per cache and phase, the least fraction over shapes and histories; and per vAttention
    layout the least ratio of the paged mode's restore time over its own, without and with
    mapping."""
    keys = [f"{phase}_fraction" for phase, _ in PHASES]
    keys += ["restore_over_paged", "restore_mapped_over_paged"]
    least: dict[str, float] = {}
    for result in results:
        for row in result["caches"]:
            for key in keys:
                if key in row:
                    name = f"{row['cache']}_{key}_min"
                    least[name] = min(least.get(name, row[key]), row[key])
    return least | {"gpu_covered": all(r["gpu_covered"] for r in results)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the host, seconds")
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "host"])
    parser.add_argument("--shapes", default="llama3-8b,qwen2.5-7b", help=f"of {sorted(SHAPES)}")
    parser.add_argument("--tokens", default="1024,4096,16384", help="history lengths")
    parser.add_argument("--caches", default=",".join(CACHES), help=f"of {CACHES}")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, after one warm-up")
    parser.add_argument(
        "--sleep-ms", type=float, default=50.0, help="GPU sleep before a timed call (CUDA)"
    )
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.tokens, args.repeats = "tiny", "64,256", 2
    backend = open_device(args.backend).name  # auto: CUDA where the driver sees a device
    caches = args.caches.split(",")
    results = [
        measure(Geometry(shape, int(tokens), torch.bfloat16), caches, backend, args)
        for shape in args.shapes.split(",")
        for tokens in args.tokens.split(",")
    ]
    payload = {
        "benchmark": "offload",
        "environment": describe_device(backend),
        "settings": {
            "shapes": args.shapes.split(","),
            "tokens": [int(t) for t in args.tokens.split(",")],
            "caches": caches,
            "repeats": args.repeats,
            "sleep_ms": args.sleep_ms,
            "dtype": "bfloat16",
            "block_tokens": BLOCK,
            "staging_bytes_per_direction": host_copies.STAGING_BYTES,
            "chunk_blocks": host_tier.CHUNK_BLOCKS,
        },
        "results": results,
        "summary": summary(results),
    }
    name = "offload" + ("-smoke" if args.smoke else "")
    path = save(name, payload, Path(args.out) if args.out else None)
    print(f"wrote {path}")
    print_table(results)
    return path


def print_table(results: list[dict[str, Any]]) -> None:
    for result in results:
        ref = result["reference"]
        print(
            f"{result['shape']} {result['tokens']} tokens ({result['bytes'] / 2**20:.0f} MiB): "
            f"pinned d2h {ref['d2h_gb_per_s']} GB/s, h2d {ref['h2d_gb_per_s']} GB/s (wall)"
        )
        for row in result["caches"]:
            parts = [
                f"{phase} {row[f'{phase}_gb_per_s']} GB/s ({row[f'{phase}_fraction']:.0%}, "
                f"{row[f'{phase}_copies']} copies)"
                for phase, _ in PHASES
                if f"{phase}_gb_per_s" in row
            ]
            print(f"  {row['cache']:12s} " + "; ".join(parts))


if __name__ == "__main__":
    main()
