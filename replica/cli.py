"""Offline commands: ``generate`` (one-off generation) and ``demo`` (the KV allocator at work).
``vattn`` (cluster/cli.py) adds ``serve`` on top of these."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from replica.engine_config import EngineConfig
from replica.kv.allocator import KVCacheAllocator
from replica.kv.config import KVCacheConfig
from replica.llm import LLM, apply_chat_template
from replica.options import add_option_arguments, option_values
from replica.sampling_params import SamplingParams, default_max_tokens
from replica.vmm import open_device


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's options from their flags (replica.options: one per EngineConfig option)."""
    return EngineConfig(**option_values(args, EngineConfig))


def generate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    llm = LLM(**vars(engine_config(args)))
    prompt = args.prompt
    if not args.raw and llm.tokenizer is not None:
        prompt = apply_chat_template(llm.tokenizer, [{"role": "user", "content": args.prompt}])
    max_tokens = args.max_tokens or rest_of_context(llm.engine, prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=args.temperature, seed=args.seed)
    [out] = llm.generate([prompt], params)
    print(out.text)
    stats = llm.engine.stats()
    print(
        f"[{len(out.token_ids)} tokens, finish: {out.finish_reason}, "
        f"{time.monotonic() - started:.1f} s with loading; "
        f"attention {llm.engine.runner.attention.name}, KV {stats.kv.summary()}]",
        file=sys.stderr,
    )
    return 0


def rest_of_context(engine: Any, prompt: str) -> int:
    """``generate``'s default max_tokens (replica.sampling_params.default_max_tokens), at least 1:
    a prompt that fills the context is then refused by the engine, with its length."""
    return max(1, default_max_tokens(engine.context_limit, len(engine.tokenize(prompt))))


def demo(args: argparse.Namespace) -> int:
    """Serves a few simulated requests through the KV allocator and shows its books."""
    device = open_device(args.vmm)
    config = KVCacheConfig(
        num_layers=30,
        num_kv_heads=3,
        head_dim=64,
        dtype=torch.float16,
        max_slots=8,
        max_tokens=2048,
        page_size=device.page_size,
        budget_bytes=64 * device.page_size,
        layout=args.kv_layout,
    )
    allocator = KVCacheAllocator(config, device)
    print(
        f"backend: {device.name}, page {device.page_size // 1024} KiB, "
        f"layout {config.layout.value}, {config.tokens_per_slot} tokens per slot, "
        f"budget {config.budget_pages} pages"
    )
    prompts = [300, 1200, 90, 700]
    slots = {}
    for prompt in prompts:
        slot = allocator.acquire(prompt)
        allocator.ensure(slot, prompt)
        allocator.k_cache(0)[slot, :prompt] = 1.0  # the prefill writes K/V in place
        slots[slot] = prompt
    print(f"after prefill of {prompts}: {allocator.stats().summary()}")
    for _ in range(100):  # decode: the worker maps the next step's pages while the "model" runs
        assert not allocator.wait(allocator.step_async(slots))
        slots = {slot: length + 1 for slot, length in slots.items()}
    print(f"after 100 decode steps: {allocator.stats().summary()}")
    for slot in list(slots):
        allocator.release(slot)
    print(f"after release (pages cached for reuse): {allocator.stats().summary()}")
    print(
        f"shrink released {allocator.shrink()} pages to the device: {allocator.stats().summary()}"
    )
    allocator.check_invariants(deep=True)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    gen = commands.add_parser("generate", help="generate once, offline (no server)")
    gen.add_argument("prompt")
    gen.add_argument(
        "--max-tokens", type=int, default=None, help="default: the rest of the context"
    )
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    add_option_arguments(gen, EngineConfig)
    gen.set_defaults(run=generate)
    demo_parser = commands.add_parser("demo", help="show the KV allocator at work")
    demo_parser.add_argument("--vmm", default="auto", choices=["auto", "cuda", "host"])
    demo_parser.add_argument(
        "--kv-layout", default="interleaved", choices=["interleaved", "per_layer"]
    )
    demo_parser.set_defaults(run=demo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replica", description="vattn offline")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.run(args))
