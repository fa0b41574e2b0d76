"""Prefix sharing: multi-turn chat and a shared system prompt with the prefix cache on and off, in
both KV modes (vAttention page aliasing vs the paged mode's block cache).

    python -m benchmarks.bench_prefix                 # Llama-3-8B shapes, synthetic bf16, one GPU
    python -m benchmarks.bench_prefix --cpu           # a small random model on CPU, about a minute
    python -m benchmarks.bench_prefix --smoke         # tiny model on CPU, seconds

Workloads (arrivals interleaved: conversation i starts ``i * --stagger-s`` after the first; each
next turn is sent when the previous answer is complete):
  chat    ``--conversations`` (64) conversations of ``--turns`` (5) turns; each turn a user message
          of 256 tokens and an answer of 256, after a per-conversation 256-token system prompt, so
          the history grows to ~2.8K tokens; every turn's prompt is the whole history
  system  ``--conversations`` x 4 one-turn requests: one 1,536-token system prompt shared by all,
          a 32-token question, a 64-token answer
  burst   ``--conversations`` x 2 one-turn requests arriving together over 4 shared 1,024-token
          system prompts (a 32-token question, a 64-token answer): the first turn of a crowd
  shared  ``--conversations`` x 2 conversations of 5 turns over 4 shared 1,024-token system
          prompts, 128-token messages and answers (the multi-turn chat of most deployments)
  think   ``--conversations`` x 3 conversations of 5 turns, each with its own 512-token context,
          ~100-token messages and 120-token answers, 3-9 s of think time before each next turn:
          with a small KV budget (``--kv-cache-gib 4``) the histories outgrow GPU memory, and
          ``--offload-gib 0,48`` runs each mode without and with the host tier (``auto``:
          the engine's default size; the default, 0, runs without it)

``--layouts auto,per_layer`` runs the vAttention mode in each KV layout (the paged mode has one);
``--borrow off,on`` runs it with the cache on without and with borrowed prefix reads (a hit read
from the slot holding it until its own aliases are mapped: ``replica.kv.borrows``).
Each vAttention row carries the mapping worker's time by operation and cause and the callers' waits
by cause (``KVCache.mapping_breakdown``), and the admissions that joined a later step because their
pages were still mapping (``mapping_deferrals``); every row has the mean TTFT of each turn and
the part of it spent queueing (arrival to the first step that ran the request), and the engine's
steps with the time inside them. On a GPU each timed run follows an untimed one-turn burst on an
engine of its own settings (``--warmup``): without it the first runs of a process were up to
0.1 s slower to first token (on the H100, 2026-12-08: the paged mode 0.34 s first, 0.25 s last).

Per mode and cache setting: mean/p50/p99 time to first token, throughput (generated and prompt
tokens per second of wall time), prompt tokens found cached over those looked up (the hit rate),
and that rate over the workload's theoretical maximum: every prompt token that an earlier request
had already computed (whole pages of it, never a prompt's last token), as if nothing were evicted
and nothing arrived together. Requests that arrive together over an uncached prefix are held by the
scheduler until the first one's prefill has indexed it (``replica.scheduler``, prefix holds):
``prefix_holds`` counts them, one per request and step.

``--cpu`` sizes (16 tokens a page, as Llama-3-8B's with 2 MiB pages): 16 conversations of 4 turns
(128-token system prompt, 64-token messages, 32-token answers) and 64 requests over one 512-token
system prompt, all arriving at once (a burst: many arrive in one step), in steps of 2,048 tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import heapq
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_engine import SHAPES  # the GPU model shapes (``--shape``)
from benchmarks.environment import describe_device, save
from replica import EngineConfig, LLMEngine, SamplingParams
from replica.kv.stats import MappingBreakdown
from replica.model import ModelConfig

MODES = ("vattention", "paged")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A workload's sizes in tokens."""

    system: int
    user: int
    answer: int
    turns: int
    shared_system: bool  # system prompts shared by the conversations (else one each)
    system_prompts: int = 1  # shared system prompts, conversation i takes i % system_prompts
    scale: int = 1  # conversations per ``--conversations``
    burst: bool = False  # every conversation arrives at once (no stagger)
    think_s: tuple[float, float] = (0.0, 0.0)  # the pause before each next turn, drawn uniformly


SIZES = ("smoke", "cpu", "gpu")


def shapes(size: str) -> dict[str, Shape]:
    if size == "smoke":
        return {
            "chat": Shape(system=24, user=12, answer=10, turns=3, shared_system=False),
            "system": Shape(system=64, user=4, answer=6, turns=1, shared_system=True, scale=4),
            "burst": Shape(64, 4, 6, 1, True, system_prompts=2, scale=2, burst=True),
            "shared": Shape(64, 8, 8, 3, True, system_prompts=2, scale=2),
            "think": Shape(24, 8, 8, 3, False, scale=3, think_s=(0.01, 0.03)),
        }
    if size == "cpu":
        return {
            "chat": Shape(system=128, user=64, answer=32, turns=4, shared_system=False),
            "system": Shape(system=512, user=16, answer=16, turns=1, shared_system=True, scale=4),
            "burst": Shape(256, 16, 16, 1, True, system_prompts=4, scale=2, burst=True),
            "shared": Shape(256, 32, 32, 4, True, system_prompts=4, scale=2),
            "think": Shape(128, 32, 32, 4, False, scale=3, think_s=(0.2, 0.6)),
        }
    return {
        "chat": Shape(system=256, user=256, answer=256, turns=5, shared_system=False),
        "system": Shape(system=1536, user=32, answer=64, turns=1, shared_system=True, scale=4),
        "burst": Shape(1024, 32, 64, 1, True, system_prompts=4, scale=2, burst=True),
        "shared": Shape(1024, 128, 128, 5, True, system_prompts=4, scale=2),
        "think": Shape(512, 100, 120, 5, False, scale=3, think_s=(3.0, 9.0)),
    }


def model_shape(size: str, shape: str = "llama3-8b") -> ModelConfig:
    if size == "smoke":
        return ModelConfig.tiny()
    if size == "cpu":  # 4 KiB a token in float32: 16 tokens a 64 KiB page
        return dataclasses.replace(
            ModelConfig.tiny(),
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=512,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            max_position_embeddings=2048,
        )
    return SHAPES[shape]()


#: The KV page of each size (None: the engine's 2 MiB).
PAGE_SIZE = {"smoke": 4096, "cpu": 64 * 1024, "gpu": None}


def theoretical_hits(
    prompts: list[list[int]], stored: list[list[int]], tokens_per_page: int
) -> int:
    """Prompt tokens an ideal cache would hold: for each prompt in order, its longest prefix that
    an earlier request stored (whole pages, never its last token)."""
    seen: set[tuple[int, ...]] = set()
    hits = 0
    for prompt, tokens in zip(prompts, stored):
        usable = (len(prompt) - 1) // tokens_per_page
        best = 0
        for pages in range(1, usable + 1):
            if tuple(prompt[: pages * tokens_per_page]) not in seen:
                break
            best = pages
        hits += best * tokens_per_page
        for pages in range(1, len(tokens) // tokens_per_page + 1):
            seen.add(tuple(tokens[: pages * tokens_per_page]))
    return hits


def run(
    mode: str,
    layout: str,
    prefix_cache: bool,
    shape: Shape,
    args: argparse.Namespace,
    offload_gib: float | None = 0.0,
    borrow: bool = False,
) -> dict[str, Any]:
    size = args.size
    config = EngineConfig(
        model="synthetic",
        synthetic=model_shape(size, args.shape),
        kv_mode=mode,
        kv_layout=layout,
        device="auto" if size == "gpu" else "cpu",
        max_model_len=args.max_model_len,
        max_running=args.slots,
        kv_slots=args.kv_slots if mode == "vattention" else None,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
        page_size=PAGE_SIZE[size],
        prefix_cache=prefix_cache,
        prefix_borrow=borrow,
        max_batch_tokens=args.max_batch_tokens,
        kv_offload_bytes=None if offload_gib is None else int(offload_gib * (1 << 30)),
        seed=1,
    )
    engine = LLMEngine(config)
    engine.warm_up()
    tokens_per_page = int(engine.kv.tokens_per_page) if mode == "paged" else 0
    if mode != "paged":
        tokens_per_page = int(getattr(engine.kv, "config").tokens_per_group)
    vocab = engine.model_config.vocab_size
    rng = random.Random(args.seed)
    stats_before = engine.kv.stats()
    breakdown_before = engine.kv.mapping_breakdown()

    def message(length: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(length)]

    conversations = args.conversations * shape.scale
    shared = [message(shape.system) for _ in range(shape.system_prompts)]
    histories = [
        [
            *(shared[i % shape.system_prompts] if shape.shared_system else message(shape.system)),
            *message(shape.user),
        ]
        for i in range(conversations)
    ]
    params = SamplingParams(max_tokens=shape.answer, temperature=0, ignore_eos=True)
    stagger = 0.0 if shape.burst else args.stagger_s
    arrivals = [(i * stagger, i, 0) for i in range(conversations)]  # (time, conv, turn)
    heapq.heapify(arrivals)
    # The run's length were every request served instantly: a conversation's start plus its
    # think times (closed loop: no schedule finishes sooner, however fast the engine).
    floor = [i * stagger for i in range(conversations)]
    submitted: dict[str, tuple[float, int, int]] = {}
    first_token: dict[str, float] = {}
    # Arrival to the first step that ran it: the part of TTFT spent waiting for a batch's room.
    queued: dict[str, float] = {}
    answers: dict[str, list[int]] = {}
    prompts: list[list[int]] = []
    stored: list[list[int]] = []
    cached_tokens = 0
    steps, step_s = 0, 0.0  # the engine's steps and the time inside them (the rest: idle)
    started = time.perf_counter()
    while arrivals or engine.has_work():
        now = time.perf_counter() - started
        while arrivals and arrivals[0][0] <= now:
            _, conv, turn = heapq.heappop(arrivals)
            request_id = f"c{conv}-t{turn}"
            engine.add_request(request_id, histories[conv], params)
            submitted[request_id] = (now, conv, turn)
            answers[request_id] = []
        if not engine.has_work():
            time.sleep(min(0.001, max(arrivals[0][0] - now, 0.0)) if arrivals else 0.0)
            continue
        step_start = time.perf_counter()
        outputs = engine.step()
        steps += 1
        step_s += time.perf_counter() - step_start
        for output in outputs:
            at = time.perf_counter() - started
            if output.request_id not in first_token:
                first_token[output.request_id] = at
                request = engine.requests.get(output.request_id)
                if request is not None and request.first_scheduled_time is not None:
                    queued[output.request_id] = request.first_scheduled_time - request.arrival_time
            answers[output.request_id] += output.token_ids
            if not output.finished:
                continue
            if output.error:
                raise RuntimeError(f"{output.request_id} failed: {output.error}")
            _, conv, turn = submitted[output.request_id]
            cached_tokens += output.cached_tokens
            prompts.append(list(histories[conv]))
            stored.append([*histories[conv], *answers[output.request_id][:-1]])
            if turn + 1 < shape.turns:
                histories[conv] = [*histories[conv], *answers[output.request_id]]
                histories[conv] += message(shape.user)
                think = rng.uniform(*shape.think_s) if shape.think_s[1] else 0.0
                floor[conv] += think
                heapq.heappush(arrivals, (at + think, conv, turn + 1))
    seconds = time.perf_counter() - started
    ttft = [first_token[r] - submitted[r][0] for r in submitted]
    stats = engine.kv.stats()
    queried = stats.prefix_queries_tokens - stats_before.prefix_queries_tokens
    hits = stats.prefix_hits_tokens - stats_before.prefix_hits_tokens
    prompt_tokens = sum(len(p) for p in prompts)
    ideal = theoretical_hits(prompts, stored, tokens_per_page) if tokens_per_page else 0
    generated = sum(len(a) for a in answers.values())
    by_turn: dict[int, list[float]] = {}
    queued_by_turn: dict[int, list[float]] = {}
    for r, (sent, _, turn) in submitted.items():
        by_turn.setdefault(turn, []).append(first_token[r] - sent)
        if r in queued:
            queued_by_turn.setdefault(turn, []).append(queued[r])
    breakdown = engine.kv.mapping_breakdown()
    engine.release_kv_memory()  # the next run's engine gets the device's memory back
    return {
        "mode": mode,
        "kv_layout": getattr(engine.kv, "config").layout.value if mode != "paged" else "blocks",
        "prefix_cache": prefix_cache,
        "prefix_borrow": borrow,  # hits read from their holder until aliased (kv.borrows)
        "kv_slots": engine.kv.max_slots,
        "prefix_borrows": stats.prefix_borrows - stats_before.prefix_borrows,
        "prefix_borrows_forced": stats.prefix_borrows_forced - stats_before.prefix_borrows_forced,
        "requests": len(submitted),
        "seconds": seconds,
        "schedule_floor_s": max(floor),
        "steps": steps,
        "step_s": step_s,
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": sorted(ttft)[max(int(len(ttft) * 0.99) - 1, 0)],
        "generated_tokens_per_s": generated / seconds,
        "prompt_tokens_per_s": prompt_tokens / seconds,
        "prompt_tokens": prompt_tokens,
        "cached_tokens_reported": cached_tokens,
        "prefix_queries_tokens": queried,
        "prefix_hits_tokens": hits,
        "hit_rate": hits / queried if queried else 0.0,
        "theoretical_hit_rate": ideal / prompt_tokens if prompt_tokens else 0.0,
        "hit_rate_of_theoretical": hits / ideal if ideal else 0.0,
        "tokens_per_page": tokens_per_page,
        "pages_shared_at_end": stats.pages_shared,
        "prefix_evicted_pages": stats.prefix_evicted_pages - stats_before.prefix_evicted_pages,
        # Hits copied into a released slot's pages (private: decode reads each copy) rather than
        # aliased, and hits taken over in the slot holding them.
        "prefix_copied_bytes": stats.prefix_copied_bytes - stats_before.prefix_copied_bytes,
        "prefix_takeovers": stats.prefix_takeovers - stats_before.prefix_takeovers,
        "preemptions": engine.scheduler.preemptions_total,
        "prefix_holds": engine.scheduler.prefix_holds_total,
        "mapping_deferrals": engine.scheduler.mapping_deferrals_total,
        "ttft_mean_s_by_turn": [statistics.mean(by_turn[t]) for t in sorted(by_turn)],
        # TTFT's queueing share: where it grows with the turn, the batch's KV room bounds it.
        "queue_mean_s_by_turn": [
            statistics.mean(queued_by_turn[t]) if queued_by_turn.get(t) else None
            for t in sorted(by_turn)
        ],
        "map_wait_s": stats.wait_seconds - stats_before.wait_seconds,
        "map_wait_pct": 100 * (stats.wait_seconds - stats_before.wait_seconds) / seconds,
        "mapping": mapping_delta(breakdown_before, breakdown),
        # The tier's size as resolved (the engine's default where --offload-gib said auto) and
        # the bytes it pinned (whole blocks; less where pinning was refused).
        "host_tier_gib": (engine.config.kv_offload_bytes or 0) / (1 << 30),
        "host_tier_auto": offload_gib is None,
        "host_tier_bytes": stats.host_tier_bytes,
        "host_offloaded_bytes": stats.host_offloaded_bytes - stats_before.host_offloaded_bytes,
        "host_restored_bytes": stats.host_restored_bytes - stats_before.host_restored_bytes,
        "prefix_host_hits_tokens": stats.prefix_host_hits_tokens
        - stats_before.prefix_host_hits_tokens,
        "host_tier_skipped_tokens": stats.host_tier_skipped_tokens
        - stats_before.host_tier_skipped_tokens,
        "host_tier_pin_s": stats.host_tier_pin_seconds,  # at the engine's start
        "host_tier_wait_s": stats.host_tier_wait_seconds - stats_before.host_tier_wait_seconds,
        "copy_wait_s": stats.copy_wait_seconds - stats_before.copy_wait_seconds,
    }


def mapping_delta(before: MappingBreakdown | None, after: MappingBreakdown | None) -> Any:
    """The worker's time by (kind, cause) and the waits by cause during the run (None: paged)."""
    if before is None or after is None:
        return None
    ops = {(k, c): (n, p, sec) for k, c, n, p, sec in before.ops}
    waits = {c: (n, sec) for c, n, sec in before.waits}
    return MappingBreakdown(
        tuple(
            (
                k,
                c,
                n - ops.get((k, c), (0, 0, 0.0))[0],
                p - ops.get((k, c), (0, 0, 0.0))[1],
                sec - ops.get((k, c), (0, 0, 0.0))[2],
            )
            for k, c, n, p, sec in after.ops
        ),
        tuple(
            (c, n - waits.get(c, (0, 0.0))[0], sec - waits.get(c, (0, 0.0))[1])
            for c, n, sec in after.waits
        ),
    ).as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds")
    size.add_argument("--cpu", action="store_true", help="a small model on CPU, about a minute")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--workloads", default="chat,system")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--layouts",
        default="auto",
        help="vAttention KV layouts to run (auto, interleaved, per_layer)",
    )
    parser.add_argument(
        "--cache", default="off,on", help="prefix cache settings to run (off, on, or both)"
    )
    parser.add_argument("--conversations", type=int, help="default 64 (cpu: 16, smoke: 4)")
    parser.add_argument("--turns", type=int, default=None, help="chat turns (default 5)")
    parser.add_argument("--stagger-s", type=float, help="default 0.05 (cpu, smoke: 0: a burst)")
    parser.add_argument("--slots", type=int, help="requests running at once (max_running)")
    parser.add_argument(
        "--kv-slots",
        type=int,
        help="the vAttention cache's slots, running and released (default: the engine's rule, "
        "replica.kv.slot_count)",
    )
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--kv-cache-gib", type=float)
    parser.add_argument(
        "--max-batch-tokens", type=int, help="a step's tokens (default: the engine's; cpu: 2048)"
    )
    parser.add_argument(
        "--offload-gib",
        default="0",
        help="host tier sizes to run each mode with, in GiB (0: off; auto: the engine's "
        "default, on a GPU a share of the host memory; e.g. 0,48 or 0,auto)",
    )
    parser.add_argument(
        "--warmup",
        choices=("on", "off"),
        help="before each timed run, an untimed one-turn burst of an eighth of the conversations "
        "on an engine of the same settings, thrown away (default: on on a GPU, where a process's "
        "first runs of a mode were up to 0.1 s slower to first token: kernel loading)",
    )
    parser.add_argument(
        "--borrow",
        default="off",
        choices=("off", "on", "off,on"),
        help="run the vAttention mode with the cache on without and/or with borrowed prefix "
        "reads (EngineConfig.prefix_borrow)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.size = "smoke" if args.smoke else "cpu" if args.cpu else "gpu"
    defaults = {  # conversations, stagger, slots, max_model_len, KV GiB, step tokens
        "smoke": (4, 0.0, 8, 256, 256 * 4096 / (1 << 30), None),
        "cpu": (16, 0.0, 32, 1024, 1024 * 64 * 1024 / (1 << 30), 2048),  # 16K tokens of KV
        "gpu": (64, 0.05, 128, 4096, 40.0, None),
    }[args.size]
    names = ("conversations", "stagger_s", "slots", "max_model_len", "kv_cache_gib")
    for name, default in zip((*names, "max_batch_tokens"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    warmup = (args.warmup or ("on" if args.size == "gpu" else "off")) == "on"
    loads = shapes(args.size)
    if args.turns is not None:
        loads["chat"] = dataclasses.replace(loads["chat"], turns=args.turns)
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.workloads.split(","):
        rows = results.setdefault(name, [])
        for mode, layout, prefix_cache, offload, borrow in settings(args):
            if warmup:
                warm_up(mode, layout, prefix_cache, loads[name], args, borrow)
            rows.append(run(mode, layout, prefix_cache, loads[name], args, offload, borrow))
            print(name, rows[-1], flush=True)
            save_partial(args, loads, results)  # a cut-off run keeps its rows
            free_device()
    print(f"wrote {save_partial(args, loads, results)}")


def settings(args: argparse.Namespace) -> Iterator[tuple[str, str, bool, float | None, bool]]:
    """Each timed run's (mode, layout, cache on, host tier GiB or None for auto, borrowed
    reads), in the order run."""
    tiers = [None if g == "auto" else float(g) for g in args.offload_gib.split(",")]
    borrows = [b == "on" for b in args.borrow.split(",")]
    for mode in args.modes.split(","):
        for layout in args.layouts.split(",") if mode == "vattention" else ["auto"]:
            for prefix_cache in (c == "on" for c in args.cache.split(",")):
                for offload in tiers if prefix_cache else [0.0]:
                    for borrow in borrows if prefix_cache and mode != "paged" else [False]:
                        yield mode, layout, prefix_cache, offload, borrow


def warm_up(
    mode: str,
    layout: str,
    prefix_cache: bool,
    shape: Shape,
    args: argparse.Namespace,
    borrow: bool = False,
) -> None:
    """An untimed run before a timed one, on its own engine (the timed run starts with a cold
    page pool and an empty cache, as before): one turn of ``shape``, all arriving at once, an
    eighth of the conversations, no host tier (one turn restores nothing). It loads the kernels
    the timed run's first steps would."""
    small = argparse.Namespace(**vars(args))
    small.conversations = max(args.conversations // 8, 2)
    burst = dataclasses.replace(shape, turns=1, think_s=(0.0, 0.0), burst=True)
    run(mode, layout, prefix_cache, burst, small, 0.0, borrow)
    free_device()


def free_device() -> None:
    """Gives a finished run's engine memory back: its cycles with their tensors, torch's cache."""
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def save_partial(
    args: argparse.Namespace, loads: dict[str, Shape], results: dict[str, list[dict[str, Any]]]
) -> Path:
    """Saves what was measured so far."""
    device = "cuda" if torch.cuda.is_available() and args.size == "gpu" else "host"
    payload = {
        "benchmark": "prefix",
        "environment": describe_device(device),
        "model": dataclasses.asdict(model_shape(args.size, args.shape))
        | {"weights": "synthetic", "shape": args.shape},
        "workloads": {name: dataclasses.asdict(shape) for name, shape in loads.items()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    return save(
        "prefix" + ("-smoke" if args.smoke else ""), payload, Path(args.out) if args.out else None
    )


if __name__ == "__main__":
    main()
