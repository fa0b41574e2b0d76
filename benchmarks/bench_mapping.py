"""Page-mapping costs of the VMM mechanism, and how much of a decode step the worker hides.

    python -m benchmarks.bench_mapping            # full size, on the GPU when one is visible
    python -m benchmarks.bench_mapping --smoke    # seconds, any machine (CI keeps it working)

Measures (1) map latency of single pages (map + one access grant), (2) throughput of batched runs
of contiguous pages, (3) a simulated decode loop: every step submits the next step's pages with
``step_async``, then the "model" runs for ``--step-ms`` (a GPU sleep kernel on CUDA, a sleep on the
host), then the step waits for the mapping. Reports the caller's wait as a share of the step.
(4) The driver's floor under load: create, map-only (pages created first) in runs of 1 and 16,
and unmap, per page, while another thread keeps the device busy on a stream of its own with
device-to-device copies (``hbm``), bf16 matmuls (``compute``) or pinned host-to-device copies
(``pcie``), against the same with the device idle. The engine's mapping breakdown (its worker's
time per page, by cause) is judged against these (#24: within 1.5x of the floor under the same
load).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.environment import describe_device, save, sleep_cycles_per_ms
from replica import KVCacheAllocator, KVCacheConfig, open_device
from replica.vmm import Device, MapWorker, Op, PagePool, Reservation


def map_latency(device: Device, pages: int) -> dict[str, float]:
    """Single-page runs: create, map + set access, unmap, release, each timed per page (median,
    the device idle: ``driver_costs``)."""
    row = driver_costs(device, pages, (1,))
    return {
        f"{name}_us_median": row[key]
        for name, key in (
            ("create", "create_us"),
            ("map", "map_us_run1"),
            ("unmap", "unmap_us_run1"),
            ("release", "release_us"),
        )
    }


def batched_throughput(
    device: Device, pages: int, run_lengths: list[int]
) -> list[dict[str, float]]:
    """Maps `pages` pre-created pages in runs of k contiguous pages (one access grant per run)."""
    pool = PagePool(device.backend)
    reservation = Reservation(pool, pages)
    pool.create(list(range(pages)))
    worker = MapWorker(pool)
    results = []
    for run in run_lengths:
        ops = [
            Op.map(reservation, first, list(range(first, first + run)))
            for first in range(0, pages - run + 1, run)
        ]
        mapped = len(ops) * run
        start = time.perf_counter()
        worker.wait(worker.submit(ops))
        seconds = time.perf_counter() - start
        worker.wait(worker.submit([Op.unmap(reservation, 0, mapped)]))
        results.append(
            {
                "run_pages": run,
                "pages": mapped,
                "us_per_page": seconds / mapped * 1e6,
                "gb_per_s": mapped * device.page_size / seconds / 1e9,
            }
        )
    return results


def simulated_decode(
    device: Device, pages_per_step: int, steps: int, step_ms: float
) -> dict[str, Any]:
    """`pages_per_step` pages (over 2 ranges: K and V) are mapped each step behind a fake step."""
    slots = max(pages_per_step // 2, 1)
    # One token fills one page per range, so each slot needs one new page group every step.
    config = KVCacheConfig(
        num_layers=1,
        num_kv_heads=1,
        head_dim=device.page_size // 2,
        dtype=torch.bfloat16,
        max_slots=slots,
        max_tokens=steps + 2,
        page_size=device.page_size,
        budget_bytes=slots * 2 * (steps + 2) * device.page_size,
        layout="per_layer",
        eager_pages=0,
    )
    allocator = KVCacheAllocator(config, device)
    for _ in range(slots):
        allocator.acquire()
    lengths = dict.fromkeys(range(slots), 0)
    cycles = None
    if device.name == "cuda":
        cycles = int(step_ms * sleep_cycles_per_ms())
    waits, step_times, submits = [], [], []
    for _ in range(steps):
        step_start = time.perf_counter()
        ticket = allocator.step_async(lengths)
        submits.append(time.perf_counter() - step_start)
        if cycles is not None:
            torch.cuda._sleep(cycles)  # the model's kernels
            torch.cuda.synchronize()  # the engine reads sampled tokens back (GIL released)
        else:
            time.sleep(step_ms / 1000)
        wait_start = time.perf_counter()
        assert allocator.wait(ticket) == ()
        waits.append(time.perf_counter() - wait_start)
        step_times.append(time.perf_counter() - step_start)
        lengths = {slot: length + 1 for slot, length in lengths.items()}
    stats = allocator.stats()
    warm = waits[1:] or waits
    return {
        "pages_per_step": slots * 2,
        "steps": steps,
        "step_ms_target": step_ms,
        "step_ms_mean": statistics.mean(step_times) * 1e3,
        "wait_ms_mean": statistics.mean(warm) * 1e3,
        "wait_ms_max": max(warm) * 1e3,
        "wait_pct_of_step": 100 * statistics.mean(warm) / statistics.mean(step_times),
        "submit_ms_mean": statistics.mean(submits) * 1e3,  # the caller's cost of step_async
        "worker_busy_ms_per_step": stats.map_seconds / steps * 1e3,
        "worker_busy_pct_of_step": 100 * stats.map_seconds / sum(step_times),
    }


LOADS = ("idle", "hbm", "compute", "pcie")


def load_step(kind: str, cuda: bool, smoke: bool) -> Callable[[], object]:
    """One launch of the background load ``kind`` (``LOADS``, less idle); on a CPU every kind is
    a host memory copy (the plumbing, not the numbers)."""
    where = "cuda" if cuda else "cpu"
    if kind == "compute" and cuda:
        a = torch.randn(8192, 8192, device=where, dtype=torch.bfloat16)
        out = torch.empty_like(a)
        return lambda: torch.mm(a, a, out=out)
    size = (1 << 20 if smoke else 512 << 20) // 2
    dst = torch.empty(size, device=where, dtype=torch.bfloat16)
    if kind == "pcie" and cuda:
        src = torch.ones(size, dtype=torch.bfloat16, pin_memory=True)
    else:
        src = torch.ones_like(dst)
    return lambda: dst.copy_(src, non_blocking=True)


class BackgroundLoad:
    """Runs ``step`` on a CUDA stream of its own from a thread until the block ends, four launches
    ahead of the device at most, so the device stays busy while the caller times the driver."""

    def __init__(self, step: Callable[[], object] | None, cuda: bool) -> None:
        self.step, self.cuda, self.launches = step, cuda, 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackgroundLoad:
        if self.step is not None:
            self._thread.start()
            while self.launches < 4 and self._thread.is_alive():  # busy before the first timing
                time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.step is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError("the background load failed") from self.error

    def _run(self) -> None:
        try:
            self._launch()
        except BaseException as error:  # re-raised by __exit__ in the caller's thread
            self.error = error

    def _launch(self) -> None:
        assert self.step is not None
        stream = torch.cuda.Stream() if self.cuda else None
        while not self._stop.is_set():
            if stream is None:
                self.step()
                self.launches += 1
                continue
            with torch.cuda.stream(stream):
                for _ in range(4):
                    self.step()
                    self.launches += 1
            stream.synchronize()  # releases the GIL while the device works


def driver_costs(device: Device, pages: int, runs: tuple[int, ...]) -> dict[str, float]:
    """Per page, median: create and release one page at a time, map pages already created in
    runs of each length (one access grant a run), unmap them in the same runs."""
    pool = PagePool(device.backend)
    reservation = Reservation(pool, pages)
    ids = list(range(pages))
    row = {"create_us": _median_us(pool.create, [[page] for page in ids])}
    for run in runs:
        maps, unmaps = [], []
        firsts = range(0, pages - run + 1, run)
        for first in firsts:
            start = time.perf_counter()
            reservation.map_run(first, ids[first : first + run])
            maps.append((time.perf_counter() - start) / run)
        for first in firsts:
            start = time.perf_counter()
            reservation.unmap_run(first, run)
            unmaps.append((time.perf_counter() - start) / run)
        row[f"map_us_run{run}"] = statistics.median(maps) * 1e6
        row[f"unmap_us_run{run}"] = statistics.median(unmaps) * 1e6
    row["release_us"] = _median_us(pool.release, [[page] for page in ids])
    return row


def _median_us(call: Callable[[list[int]], object], arguments: list[list[int]]) -> float:
    """The median microseconds of ``call`` on each of ``arguments``, one after another."""
    seconds = []
    for argument in arguments:
        start = time.perf_counter()
        call(argument)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e6


def under_load(device: Device, pages: int, smoke: bool) -> list[dict[str, Any]]:
    """``driver_costs`` with the device idle and under each background load (``LOADS``)."""
    cuda = device.name == "cuda"
    rows = []
    for kind in LOADS if not smoke else ("idle", "hbm"):
        step = None if kind == "idle" else load_step(kind, cuda, smoke)
        with BackgroundLoad(step, cuda) as load:
            row = driver_costs(device, pages, (1, 16))
        rows.append({"load": kind, "pages": pages, "launches": load.launches, **row})
        del step
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "host"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    device = open_device(args.backend)
    pages = 32 if args.smoke else 2048
    steps = 3 if args.smoke else 50
    demands = [8, 32] if args.smoke else [8, 16, 32, 64, 128]
    payload = {
        "benchmark": "mapping",
        "environment": describe_device(device.name) | {"page_size": device.page_size},
        "map_latency": map_latency(device, pages),
        "batched": batched_throughput(device, pages, [1, 8, 64, 512] if not args.smoke else [1, 8]),
        "decode_overlap": [
            simulated_decode(device, demand, steps, args.step_ms) for demand in demands
        ],
        "under_load": under_load(device, 32 if args.smoke else 256, args.smoke),
    }
    path = save("mapping", payload, Path(args.out) if args.out else None)
    print(f"wrote {path}")
    print(f"map latency (us/page): {payload['map_latency']}")
    for row in payload["batched"]:
        print(
            f"runs of {row['run_pages']:4d}: {row['us_per_page']:7.1f} us/page  "
            f"{row['gb_per_s']:6.1f} GB/s"
        )
    for row in payload["decode_overlap"]:
        print(
            f"{row['pages_per_step']:4d} pages/step: wait {row['wait_ms_mean']:.3f} ms "
            f"({row['wait_pct_of_step']:.2f}% of {row['step_ms_mean']:.2f} ms), submit "
            f"{row['submit_ms_mean']:.3f} ms; worker busy "
            f"{row['worker_busy_pct_of_step']:.1f}%"
        )
    for row in payload["under_load"]:
        print(
            f"{row['load']:>8}: create {row['create_us']:.1f}, map {row['map_us_run1']:.1f} "
            f"(runs of 16: {row['map_us_run16']:.1f}), unmap {row['unmap_us_run1']:.1f} us/page"
        )


if __name__ == "__main__":
    main()
