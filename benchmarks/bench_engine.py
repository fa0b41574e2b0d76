"""Offline engine throughput: vattn in vAttention mode vs its paged mode vs Hugging Face
`generate`, on identical requests, plus the decode step against its roofline and practical floor.

    python -m benchmarks.bench_engine                 # Llama-3-8B shapes, synthetic bf16, one GPU
    python -m benchmarks.bench_engine --smoke         # tiny model on CPU, seconds (CI)

Workloads: decode-heavy (128-token prompts, 1024 outputs), prefill-heavy (4K prompts, 64 outputs),
mixed (long prompts drawn like a summarisation trace, a few hundred outputs), long (4 requests of
16K-token prompts, 256 outputs: small batch at long context), sharegpt (512 chat requests with
ShareGPT-like lognormal prompt and output lengths through ``--slots`` slots, so requests queue and
the batch churns), batch256 (256 requests of 128-token prompts, 512 outputs: the full batch),
kvbound (128 requests of 1K-token prompts, 2K outputs, for a fixed ``--kv-cache-gib``).
Modes suffixed ``-fp8`` store the KV cache in fp8 (e4m3, ``kv_cache_dtype="fp8"``); ``-fa2``
and ``-fa3`` prefill on that FlashInfer kernel (``prefill_kernel``; auto is fa2, fa3 falls back to
fa2 where it cannot address the cache; each row names the prefill kernel it ran and why).
``--shape qwen2.5-7b`` runs a second model shape (28 layers, 28 q / 4 kv heads, qkv bias).
``--floor`` measures the decode step against its practical floor (the linears in a CUDA graph plus
attention alone, same run) at batches 1, 8, 64, 256 and contexts 1K and 16K where the KV fits
(``--floor-cases``: others, e.g. ``1x1024,8x1024``), in the vAttention mode (``--floor-modes``);
``--floor-profile`` also profiles each case's decode steps: the device's busy time per step
(``device_busy_share`` of the step: the rest is the GPU waiting on the host), the top operators and
the host's stages per step.

Modes: ``vattention`` and ``paged`` (decode steps replayed as CUDA graphs, captured by the
engine's warm-up before the timed run; asynchronous scheduling), suffixed ``-eager`` (no graphs)
or ``-sync`` (synchronous scheduling: the host's work does not overlap the device's), both run on
the decode-heavy workload only, where they matter; ``hf`` (decode-heavy only). Every mode runs
with the engine's host KV tier (on a GPU on by default; ``--offload-gib``), each row recording the
bytes it pinned (``host_tier_bytes``); runs before 2026-12-07 had none. Each row also records
what the tier wrote (``host_offloaded_gib``) and the seconds the engine's thread waited on the host
for copies (``copy_wait_s``, ``host_tier_wait_s``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import roofline
from benchmarks.environment import describe_device, save
from replica import EngineConfig, LLMEngine, SamplingParams
from replica.attention import StepBatch
from replica.model import ModelConfig

Workload = list[tuple[list[int], int]]  # (prompt token ids, output tokens)
GIB = 1 << 30


def workloads(
    smoke: bool, batch: int, seed: int = 0, decode_tokens: int = 1024, shape: str = "llama3-8b"
) -> dict[str, Workload]:
    rng = random.Random(seed)
    vocab = model_shapes(smoke, shape).vocab_size

    def prompt(length: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(length)]

    if smoke:
        return {
            "decode": [(prompt(16), 24) for _ in range(batch)],
            "prefill": [(prompt(96), 4) for _ in range(batch)],
        }
    mixed = []
    for _ in range(
        batch
    ):  # summarisation-like: long inputs (lognormal around ~1.8K), short outputs
        mixed.append((prompt(min(int(rng.lognormvariate(7.5, 0.5)), 6000)), rng.randint(128, 384)))
    return {
        "decode": [(prompt(128), decode_tokens) for _ in range(batch)],
        "prefill": [(prompt(4096), 64) for _ in range(batch)],
        "mixed": mixed,
        # Few sequences at long context: FlashInfer must split each one's KV across SMs.
        "long": [(prompt(16000), 256) for _ in range(4)],
        # ShareGPT-like chat: prompt and output lengths lognormal (means ~300 and ~250 tokens,
        # long tails), more requests than slots.
        "sharegpt": [
            (
                prompt(max(4, min(int(rng.lognormvariate(5.3, 0.9)), 3000))),
                max(8, min(int(rng.lognormvariate(5.2, 0.8)), 1500)),
            )
            for _ in range(512)
        ],
        "batch256": [(prompt(128), 512) for _ in range(256)],
        # KV-bound: more concurrent long requests than a bf16 cache of --kv-cache-gib holds; run
        # with modes vattention,vattention-fp8,paged,paged-fp8 to see what fp8's capacity buys.
        # Decode-heavy (1K in, 2K out): with 3K-token prompts and 512 outputs (the first
        # version) prefill took 22.8 of 26.5 s on an H200, and fp8's larger batches hardly showed.
        "kvbound": [(prompt(1024), 2048) for _ in range(128)],
    }


SHAPES = {"llama3-8b": ModelConfig.llama3_8b, "qwen2.5-7b": ModelConfig.qwen2_5_7b}


def model_shapes(smoke: bool, shape: str = "llama3-8b") -> ModelConfig:
    return ModelConfig.tiny() if smoke else SHAPES[shape]()


def run_vattn(
    mode: str, workload: Workload, args: argparse.Namespace, profile: bool
) -> dict[str, Any]:
    kv_mode, *options = mode.split("-")
    max_len = max(len(p) + n for p, n in workload)
    engine = LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=model_shapes(args.smoke, args.shape),
            kv_mode=kv_mode,
            attention=args.attention,
            kv_layout=args.kv_layout,
            max_running=min(len(workload), args.slots),
            max_model_len=max_len + 16,
            max_batch_tokens=args.max_batch_tokens,
            page_size=args.page_size,
            cuda_graphs="eager" not in options,
            kv_cache_dtype="fp8" if "fp8" in options else "auto",
            kv_cache_bytes=args.kv_cache_gib << 30 if args.kv_cache_gib else None,
            kv_offload_bytes=None if args.offload_gib is None else int(args.offload_gib * GIB),
            async_scheduling="sync" not in options,
            prefill_kernel=next((k for k in ("fa2", "fa3") if k in options), "auto"),
        )
    )
    runner, kv = engine.runner, engine.kv
    # Warm-up outside the timed run: compiles and plans the kernels, captures the decode graphs.
    engine.add_request("warmup", workload[0][0][:32], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_work():
        engine.step()
    graphs_captured = engine.warm_up()
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in workload]
    for i, ((prompt, _), p) in enumerate(zip(workload, params)):
        engine.add_request(f"r{i}", prompt, p)
    before = kv.stats()
    bytes_per_token = (
        2
        * runner.model_config.num_layers
        * runner.model.num_local_kv_heads
        * runner.model_config.head_dim
        * runner.kv_dtype.itemsize  # 1 for an fp8 cache
    )
    decode_steps: list[tuple[float, int, int]] = []  # (seconds, batch, KV tokens read)
    waste: list[float] = []
    generated, started = 0, time.perf_counter()
    generated_untimed, untimed = 0, 0.0
    other_steps = 0.0  # prefill and mixed steps
    # Profiled steps, after this many timed decode steps, are kept out of the timed total: the
    # profiler's start-up (CUPTI) is paid by whichever mode runs first, so the modes compare fairly.
    profilers: dict[int, tuple[str, Any, int]] = {
        20: ("device", profile_steps, 5),
        40: ("host", profile_host, 10),
    }
    profiles: dict[str, Any] = {}
    while engine.has_work():
        running = list(engine.scheduler.running)
        decoding = (
            bool(running)
            and not engine.scheduler.waiting
            and all(r.pending_tokens == 1 for r in running)
        )
        context = sum(r.num_tokens for r in running)
        step_start = time.perf_counter()
        if profile and decoding and len(decode_steps) in profilers:
            name, run_profiler, steps = profilers.pop(len(decode_steps))
            profiles[name], outputs = run_profiler(engine, steps)
            generated_untimed += sum(len(o.token_ids) for o in outputs)
            untimed += time.perf_counter() - step_start
            continue
        outputs = engine.step()
        seconds = time.perf_counter() - step_start
        generated += sum(len(o.token_ids) for o in outputs)
        if not decoding:
            other_steps += seconds
        if decoding:
            decode_steps.append((seconds, len(running), context))
            stats = kv.stats()
            if stats.pages_in_use:
                waste.append(stats.wasted_bytes / (stats.pages_in_use * stats.page_size_bytes))
    elapsed = time.perf_counter() - started - untimed
    stats = kv.stats()
    kernels = getattr(runner.attention, "kernels", None)  # FlashInfer's, both modes
    result: dict[str, Any] = {
        "mode": mode,
        "attention": runner.attention.name,
        # FlashInfer's prefill kernel and why ("auto" is fa3 on Hopper): the modes may differ.
        "prefill_kernel": dataclasses.asdict(kernels.prefill_kernel) if kernels else None,
        "kv_layout": getattr(getattr(kv.config, "layout", None), "value", "paged blocks"),
        "cuda_graphs": runner.graphs is not None,
        "graphs_captured": graphs_captured,
        "graph_replays": runner.graphs.replays if runner.graphs else 0,
        "requests": len(workload),
        "generated_tokens": generated + generated_untimed,
        "seconds": elapsed,
        "tokens_per_s": generated / elapsed,
        "non_decode_steps_s": other_steps,  # the prefill phase: steps that carry prompt tokens
        "decode_phase_s": sum(s[0] for s in decode_steps),
        "mapping_wait_pct": 100 * (stats.wait_seconds - before.wait_seconds) / elapsed,
        "kv_waste_pct_mean": 100 * statistics.mean(waste) if waste else 0.0,
        "preemptions": engine.stats().preemptions_total,
        "host_tier_bytes": stats.host_tier_bytes,  # what the engine pinned (0: no tier)
        "host_offloaded_gib": (stats.host_offloaded_bytes - before.host_offloaded_bytes) / 2**30,
        # the engine's thread waiting on the host for copies (to and from the host tier)
        "copy_wait_s": stats.copy_wait_seconds - before.copy_wait_seconds,
        "host_tier_wait_s": stats.host_tier_wait_seconds - before.host_tier_wait_seconds,
    }
    if decode_steps:
        times = sorted(s[0] * 1e3 for s in decode_steps)
        result["decode_steps"] = {
            "count": len(times),
            "mean_ms": statistics.mean(times),
            "p50_ms": times[len(times) // 2],
            "p90_ms": times[int(0.9 * (len(times) - 1))],
            "p99_ms": times[int(0.99 * (len(times) - 1))],
            "max_ms": times[-1],
            "total_s": sum(times) / 1e3,
        }
    full = [s for s in decode_steps if s[1] == min(len(workload), args.slots)] or decode_steps
    if full:
        seconds, batch, context = sorted(full)[len(full) // 2]
        result["decode_step"] = decode_analysis(
            runner, seconds, batch, context, bytes_per_token, args
        )
    if "device" in profiles:
        result["profile_top_ops"], result["profiled_device_ms_per_step"] = profiles["device"]
    if "host" in profiles:
        result["host_profile"] = profiles["host"]
    del engine, runner, kv
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def decode_analysis(
    runner: Any,
    seconds: float,
    batch: int,
    context: int,
    bytes_per_token: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    model = runner.model
    kv_bytes = context * bytes_per_token
    ideal = roofline.roofline_seconds(
        roofline.weight_bytes(model), kv_bytes, roofline.linear_flops(model, batch)
    )
    out: dict[str, Any] = {
        "batch": batch,
        "kv_tokens": context,
        "step_ms": seconds * 1e3,
        "roofline_ms": ideal * 1e3,
        "roofline_share": ideal / seconds,
    }
    if runner.device.type == "cuda" and not args.smoke:
        graph, eager = roofline.linears_graph_seconds(model, batch)
        attention = attention_alone_seconds(runner, batch, context // batch)
        floor = graph + attention
        out.update(
            linears_graph_ms=graph * 1e3,
            linears_eager_ms=eager * 1e3,
            attention_alone_ms=attention * 1e3,
            practical_floor_ms=floor * 1e3,
            step_over_floor=seconds / floor,
        )
    return out


def attention_alone_seconds(runner: Any, batch: int, length: int) -> float:
    """The decode attention kernel for every layer over ``batch`` slots of ``length`` tokens."""
    kv, attention, config = runner.kv, runner.attention, runner.model_config
    slots = [kv.acquire() for _ in range(batch)]
    for slot in slots:
        kv.ensure(slot, length)
    step = StepBatch.build(sorted(slots), [length - 1] * batch, [1] * batch, runner.device)
    q = torch.randn(
        batch,
        runner.model.num_local_heads,
        config.head_dim,
        device=runner.device,
        dtype=runner.dtype,
    )
    attention.plan(step)

    def all_layers() -> None:
        for layer in range(config.num_layers):
            attention.attend(q, kv.k_cache(layer), kv.v_cache(layer), layer)

    seconds = roofline.time_cuda(all_layers, repeats=10)
    for slot in slots:
        kv.release(slot)
    return seconds


def profile_steps(
    engine: LLMEngine, steps: int
) -> tuple[tuple[list[dict[str, Any]], float], list[Any]]:
    """Where a decode step's time goes: the top operators over ``steps`` steps, and the device's
    busy time per step (all kernels; the rest of a step is host time the GPU waits for)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    outputs: list[Any] = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            outputs += engine.step()
    if torch.cuda.is_available():
        # With asynchronous scheduling a profiled step is still running: let it (and the
        # profiler's flush) finish here, outside the timed steps.
        torch.cuda.synchronize()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = prof.key_averages()
    device_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3 / steps
    rows = []
    for event in sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:12]:
        rows.append(
            {
                "op": event.key,
                "calls": event.count,
                "self_device_ms_per_step": getattr(event, "self_device_time_total", 0)
                / 1e3
                / steps,
                "self_cpu_ms_per_step": event.self_cpu_time_total / 1e3 / steps,
            }
        )
    return (rows, device_ms), outputs


def profile_host(engine: LLMEngine, steps: int) -> tuple[dict[str, Any], list[Any]]:
    """Where a decode step's host (Python) time goes: cProfile over ``steps`` steps, ms per step,
    for the engine's own stages (cumulative) and the top functions by their own time."""
    import cProfile
    import pstats

    outputs: list[Any] = []
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        outputs += engine.step()
    profiler.disable()
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    stages = (
        "schedule",
        "_launch",
        "_plan",
        "execute",
        "run",
        "plan_graph",
        "step_async",
        "sample",
        "_complete",
        "build",
        "build_padded",
    )
    cumulative: dict[str, float] = {}
    own = []
    for (path, line, name), (_, calls, tottime, cumtime, _) in stats.items():
        where = f"{Path(path).name}:{line}({name})"
        if name in stages and ("replica" in path):
            cumulative[where] = cumtime * 1e3 / steps
        own.append((tottime * 1e3 / steps, calls // steps, where))
    top = [
        {"function": w, "calls_per_step": c, "own_ms_per_step": t}
        for t, c, w in sorted(own, reverse=True)[:15]
    ]
    return {
        "wall_ms_per_step_profiled": wall_ms,
        "stages_cumulative_ms": cumulative,
        "top_own_time": top,
    }, outputs


def run_hf(workload: Workload, args: argparse.Namespace, new_tokens: int) -> dict[str, Any]:
    """What a user would reach for without a server: transformers' generate, same shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = model_shapes(args.smoke)
    config = LlamaConfig(
        vocab_size=shapes.vocab_size,
        hidden_size=shapes.hidden_size,
        intermediate_size=shapes.intermediate_size,
        num_hidden_layers=shapes.num_layers,
        num_attention_heads=shapes.num_heads,
        num_key_value_heads=shapes.num_kv_heads,
        max_position_embeddings=8192,
        rope_theta=shapes.rope_theta,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    length = len(workload[0][0])
    ids = torch.tensor([p[:length] for p, _ in workload], device=device) % shapes.vocab_size
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        if device == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    generated = (out.shape[1] - length) * out.shape[0]
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "mode": "hf-transformers-generate",
        "requests": len(workload),
        "new_tokens_each": new_tokens,
        "generated_tokens": generated,
        "seconds": elapsed,
        "tokens_per_s": generated / elapsed,
    }


FLOOR_CASES = tuple((b, c) for b in (1, 8, 64, 256) for c in (1024, 16384))
FLOOR_KV_BYTES = 96 << 30  # what the H200 holds beside an 8B model's weights and activations


#: Decode steps a profiled floor case adds: ``run_vattn`` profiles the device after 20 timed
#: decode steps (5 steps) and the host after 40 (10 steps).
PROFILED_STEPS = 64


def floor_cases(spec: str | None) -> tuple[tuple[int, int], ...]:
    """``--floor-cases``: "BATCHxCONTEXT,..." (None: FLOOR_CASES)."""
    if not spec:
        return FLOOR_CASES
    cases = []
    for case in spec.split(","):
        batch, _, context = case.partition("x")
        if not (batch.isdigit() and context.isdigit() and int(batch) and int(context)):
            raise SystemExit(f"--floor-cases: {case!r} is not BATCHxCONTEXT (e.g. 8x1024)")
        cases.append((int(batch), int(context)))
    return tuple(cases)


def floor_table(
    args: argparse.Namespace, rows: list[dict[str, Any]], saved: Callable[[], Any]
) -> list[dict[str, Any]]:
    """Each ``--floor-modes`` mode's decode step at each (batch, context) of ``--floor-cases``
    against its practical floor: the linears replayed in a CUDA graph plus attention alone, in the
    same run. Cases whose KV does not fit FLOOR_KV_BYTES are listed as such. With
    ``--floor-profile`` each case's decode steps are profiled too. Each row is appended to
    ``rows`` and ``saved()`` called after it."""
    shapes = model_shapes(args.smoke, args.shape)
    per_token = 2 * shapes.num_layers * shapes.num_kv_heads * shapes.head_dim * 2
    cases = ((1, 64), (4, 64)) if args.smoke else floor_cases(args.floor_cases)
    for mode in args.floor_modes.split(","):
        rng = random.Random(1)  # the same prompts in every mode
        for batch, context in cases:
            if batch * (context + 32) * per_token > FLOOR_KV_BYTES:
                rows.append({"mode": mode, "batch": batch, "context": context, "fits": False})
                continue
            # The step is the median of those at the full batch, which begin once the last
            # prompt is prefilled: outputs outlast the prefill chunks by 32 steps, so the first
            # requests are still decoding then (with 32 outputs, batch 256 at 1K had one full
            # step, 2026-12-02).
            outputs = 32 + math.ceil(batch * context / args.max_batch_tokens)
            outputs += PROFILED_STEPS if args.floor_profile else 0
            prompt = max(context - outputs, 16)
            load = [
                ([rng.randrange(3, shapes.vocab_size) for _ in range(prompt)], outputs)
                for _ in range(batch)
            ]
            slots, args.slots = args.slots, batch
            result = run_vattn(mode, load, args, profile=args.floor_profile)
            args.slots = slots
            step = result.get("decode_step", {})
            row = {"mode": mode, "batch": batch, "context": context, "fits": True} | step
            if "profiled_device_ms_per_step" in result and step.get("step_ms"):
                device_ms = result["profiled_device_ms_per_step"]
                row |= {
                    "profiled_device_ms_per_step": device_ms,
                    "device_busy_share": device_ms / step["step_ms"],
                    "profile_top_ops": result["profile_top_ops"],
                }
            if "host_profile" in result:
                row["host_profile"] = result["host_profile"]
            rows.append(row)
            print("floor", {k: v for k, v in row.items() if "profile" not in k}, flush=True)
            saved()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workloads", default="decode,prefill,mixed,long")
    parser.add_argument(
        "--modes",
        default="vattention,paged,vattention-sync,paged-sync,vattention-eager,paged-eager,hf",
    )
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--kv-layout", default="auto")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--page-size", type=int, default=None)
    parser.add_argument("--hf-new-tokens", type=int, default=128)
    parser.add_argument(
        "--decode-tokens", type=int, default=1024, help="outputs per request, decode-heavy"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--slots", type=int, default=128, help="max_running (at most the requests)")
    parser.add_argument("--floor", action="store_true", help="the decode step vs its floor table")
    parser.add_argument(
        "--floor-cases", default=None, help="BATCHxCONTEXT,... (default: FLOOR_CASES)"
    )
    parser.add_argument("--floor-modes", default="vattention", help="modes of the floor table")
    parser.add_argument(
        "--floor-profile", action="store_true", help="profile each floor case's decode steps"
    )
    parser.add_argument(
        "--kv-cache-gib", type=int, default=None, help="KV budget (default: a share of free memory)"
    )
    parser.add_argument(
        "--offload-gib",
        type=float,
        default=None,
        help="host KV tier per engine (default: the engine's, on a GPU a share of the host "
        "memory; 0: off; each row records the bytes it pinned)",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--name", default="engine", help="result file prefix: <name>-<device>-<date>.json"
    )
    args = parser.parse_args()
    if args.smoke:
        args.batch = min(args.batch, 4)
    loads = workloads(args.smoke, args.batch, decode_tokens=args.decode_tokens, shape=args.shape)
    modes = args.modes.split(",")
    results: dict[str, list[dict[str, Any]]] = {}
    device = "cuda" if torch.cuda.is_available() else "host"
    payload = {
        "benchmark": "engine",
        "environment": describe_device(device),
        "model": dataclasses.asdict(model_shapes(args.smoke, args.shape))
        | {"shape": args.shape, "weights": "synthetic"},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
        "complete": False,
    }
    name = args.name + ("-smoke" if args.smoke else "")
    out = Path(args.out) if args.out else None
    for workload in args.workloads.split(","):
        if workload not in loads:
            continue
        rows = results.setdefault(workload, [])
        for mode in modes:
            if mode == "hf":
                if workload == "decode":
                    rows.append(
                        run_hf(
                            loads[workload], args, min(args.hf_new_tokens, loads[workload][0][1])
                        )
                    )
                continue
            if ("-sync" in mode or "-eager" in mode) and workload != "decode":
                continue
            rows.append(run_vattn(mode, loads[workload], args, profile=(workload == "decode")))
            print(
                workload, {k: v for k, v in rows[-1].items() if k != "profile_top_ops"}, flush=True
            )
            save(name, payload, out)  # after every run: a run cut off keeps what it measured
    if args.floor:
        floor_table(args, results.setdefault("floor", []), lambda: save(name, payload, out))
    payload["complete"] = True
    path = save(name, payload, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
