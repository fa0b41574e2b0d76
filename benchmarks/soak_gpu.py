"""Allocator soak on the GPU (reliability issue, part 6): does the vAttention cache stay correct and
give its memory back after long, random, full-load use?

    python -m benchmarks.soak_gpu                      # H100: state machine at scale 20 + 5
    minutes of load
    python -m benchmarks.soak_gpu --smoke              # CPU / host backend, seconds (CI)

1. The hypothesis state machine of ``tests/allocator/test_kv_allocator_state.py`` on the CUDA
   backend (random acquire / ensure / step / release / shrink, every stored token checked, the
   books compared with what the driver mapped), at ``VATTN_STATEFUL_SCALE`` = ``--scale``.
2. The engine at full load for ``--minutes``: Llama-3-8B shapes (synthetic bf16), 64 slots, a KV
   budget well below what the offered requests want (so requests queue and are preempted), random
   prompt and output lengths, a few aborts; then drain, check the books, ``shrink()``, and compare
   ``torch.cuda.mem_get_info`` with its value before the load (after warm-up and a first shrink);
   ``--phases`` times, so that a one-time cost of the first phase (kernel code CUDA loads at a
   kernel's first launch) is told apart from memory that grows with use.

Nothing is asserted here; the JSON says what happened (``passed`` fields state each criterion).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.environment import describe_device, save
from replica import EngineConfig, LLMEngine, SamplingParams
from replica.model import ModelConfig

MIB = 1 << 20


def state_machine(scale: int, device: str) -> dict[str, Any]:
    """Runs the allocator state machine on ``device`` ("cuda" or "host") in a child pytest."""
    env = dict(os.environ, VATTN_STATEFUL_SCALE=str(scale))
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "tests/allocator/test_kv_allocator_state.py",
            "-k",
            device,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    counts = [int(n) for n in re.findall(r"(\d+) operations", proc.stdout)]
    return {
        "backend": device,
        "scale": scale,
        "operations": sum(counts),
        "seconds": time.perf_counter() - started,
        "passed": proc.returncode == 0 and bool(counts),
        "pytest_tail": proc.stdout.strip().splitlines()[-3:],
    }


def device_memory(engine: LLMEngine) -> tuple[int, int]:
    """(free bytes as the device sees them, bytes PyTorch's caching allocator holds) on CUDA; on
    the host backend (-bytes of pages the allocator holds, 0). The KV cache's pages are created
    with the driver, outside PyTorch's allocator, so free + PyTorch's reserve is what the KV cache
    must give back; PyTorch may keep a block for the engine's last step (e.g. its batch tensors)."""
    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(engine.device)[0]), int(
            torch.cuda.memory_reserved(engine.device)
        )
    return -engine.kv.stats().pages_created * engine.kv.stats().page_size_bytes, 0


def engine_soak(args: argparse.Namespace) -> dict[str, Any]:
    """``--phases`` load phases of ``--minutes`` each; after each: drain, check the books, shrink
    and measure the device's free memory. The first phase may cost memory once (CUDA loads a
    kernel's code at its first launch); a later phase must not cost any more (no leak with use)."""
    cuda = torch.cuda.is_available() and not args.smoke
    shapes = (
        ModelConfig.llama3_8b()
        if cuda
        else dataclasses.replace(ModelConfig.tiny(), max_position_embeddings=4096)
    )
    max_len = 3584 if cuda else 512
    engine = LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=shapes,
            device="cuda" if cuda else "cpu",
            max_running=args.slots,
            max_model_len=max_len,
            max_batch_tokens=8192 if cuda else 1024,
            kv_cache_bytes=args.kv_gib << 30 if cuda else 64 * MIB,
        )
    )
    kv = engine.kv
    graphs = engine.warm_up()
    kv.shrink()
    free_before, torch_before = device_memory(engine)
    load = Load(engine, random.Random(args.seed), max_len, args.slots)
    started = time.monotonic()
    phases: list[dict[str, Any]] = []
    books_ok = True
    outside_torch = free_before + torch_before
    for _ in range(args.phases):
        loaded_s = load.run(args.minutes * 60)
        kv.check_invariants(deep=True)
        at_rest = kv.stats()
        released = kv.shrink()
        free_after, torch_after = device_memory(engine)
        after_shrink = kv.stats()
        kv.check_invariants(deep=True)
        books_ok &= (
            at_rest.slots_running == 0
            and at_rest.pages_in_use == 0
            and after_shrink.pages_created == 0
        )
        phases.append(
            {
                "minutes_under_load": loaded_s / 60,
                "requests_added_so_far": load.next_id,
                "steps_so_far": load.steps,
                "at_rest": {
                    "slots_running": at_rest.slots_running,
                    "pages_in_use": at_rest.pages_in_use,
                    "pages_cached": at_rest.pages_cached,
                    "pages_free": at_rest.pages_free,
                    "pages_created": at_rest.pages_created,
                },
                "shrink_released_pages": released,
                "pages_created_after_shrink": after_shrink.pages_created,
                "free_bytes_after": free_after,
                "torch_reserved_after": torch_after,
                "free_outside_torch_difference_vs_previous": free_after
                + torch_after
                - outside_torch,
            }
        )
        outside_torch = free_after + torch_after
    first, last = phases[0], phases[-1]
    engine_stats = engine.stats()
    return {
        "model": "llama3-8b shapes, synthetic bf16" if cuda else "tiny, float32 (CPU smoke)",
        "slots": args.slots,
        "kv_budget_pages": kv.stats().pages_total,
        "page_size_bytes": kv.stats().page_size_bytes,
        "graphs_captured": graphs,
        "async_scheduling": engine.async_scheduling,
        "minutes_under_load": sum(p["minutes_under_load"] for p in phases),
        "steps": load.steps,
        "requests_added": load.next_id,
        "requests_finished": load.finished,
        "aborted": load.aborted,
        "errors": load.errors,
        "generated_tokens": load.tokens,
        "tokens_per_s_under_load": load.tokens / (time.monotonic() - started),
        "preemptions": engine_stats.preemptions_total,
        "mapping_wait_s": kv.stats().wait_seconds,
        "peak": load.peak,
        "phases": phases,
        "free_bytes_before": free_before,
        "torch_reserved_before": torch_before,
        "free_outside_torch_difference": first["free_bytes_after"]
        + first["torch_reserved_after"]
        - free_before
        - torch_before,
        "free_outside_torch_difference_later_phases": (
            last["free_bytes_after"]
            + last["torch_reserved_after"]
            - first["free_bytes_after"]
            - first["torch_reserved_after"]
        ),
        "passed": (
            load.errors == 0
            and books_ok
            and last["free_bytes_after"] + last["torch_reserved_after"]
            >= first["free_bytes_after"] + first["torch_reserved_after"]
        ),
    }


class Load:
    """Offered load above capacity: random prompt and output lengths, greedy and sampled
    requests, now and then a client that goes away; counts what came back."""

    def __init__(self, engine: LLMEngine, rng: random.Random, max_len: int, slots: int) -> None:
        self.engine, self.rng, self.max_len, self.slots = engine, rng, max_len, slots
        self.finished = self.aborted = self.tokens = self.steps = self.errors = self.next_id = 0
        self.peak = {"pages_created": 0, "pages_in_use": 0, "requests_waiting": 0}

    def run(self, seconds: float) -> float:
        """Loads the engine for ``seconds``, then drains it; returns the seconds under load."""
        engine, rng = self.engine, self.rng
        started = time.monotonic()
        while time.monotonic() < started + seconds:
            while (
                len(engine.requests) < 2 * self.slots
            ):  # keep the queue full: offered load > capacity
                prompt_len = min(int(rng.lognormvariate(6.3, 1.0)) + 4, self.max_len // 2)
                params = SamplingParams(
                    max_tokens=rng.randint(8, self.max_len // 4),
                    temperature=rng.choice((0.0, 0.8)),
                    seed=rng.randrange(1 << 30),
                    ignore_eos=True,
                )
                vocab = engine.model_config.vocab_size
                engine.add_request(
                    f"s{self.next_id}", [rng.randrange(3, vocab) for _ in range(prompt_len)], params
                )
                self.next_id += 1
            if rng.random() < 0.01 and engine.scheduler.running:  # clients that go away
                engine.abort(rng.choice(engine.scheduler.running).request_id)
                self.aborted += 1
            self._step()
            stats = engine.kv.stats()
            self.peak["pages_created"] = max(self.peak["pages_created"], stats.pages_created)
            self.peak["pages_in_use"] = max(self.peak["pages_in_use"], stats.pages_in_use)
            self.peak["requests_waiting"] = max(
                self.peak["requests_waiting"], len(engine.scheduler.waiting)
            )
        loaded = time.monotonic() - started
        while engine.has_work():  # drain: no new requests
            self._step()
        return loaded

    def _step(self) -> None:
        for output in self.engine.step():
            self.tokens += len(output.token_ids)
            self.finished += output.finished
            self.errors += output.error is not None
        self.steps += 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, host backend, seconds")
    parser.add_argument(
        "--scale", type=int, default=20, help="state machine scale (VATTN_STATEFUL_SCALE)"
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="per load phase")
    parser.add_argument(
        "--phases", type=int, default=2, help="load phases (memory measured after each)"
    )
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--kv-gib", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma list: state-machine, engine")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.scale, args.minutes, args.slots = 1, min(args.minutes, 0.1), min(args.slots, 8)
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {}
    if "state-machine" not in skip:
        results["state_machine"] = state_machine(args.scale, "cuda" if cuda else "host")
        print("state machine", results["state_machine"], flush=True)
    if "engine" not in skip:
        results["engine"] = engine_soak(args)
        print("engine", results["engine"], flush=True)
    payload = {
        "benchmark": "soak",
        "environment": describe_device("cuda" if cuda else "host"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    path = save(
        "soak" + ("-smoke" if args.smoke else ""), payload, Path(args.out) if args.out else None
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
