"""The ``vattn`` command line."""

from __future__ import annotations

import argparse
import sys

import torch

from replica import KVCacheAllocator, KVCacheConfig, open_device


def demo(args: argparse.Namespace) -> int:
    """Serves a few simulated requests through the KV allocator and shows its books."""
    device = open_device(args.backend)
    config = KVCacheConfig(
        num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float16, max_slots=8,
        max_tokens=2048, page_size=device.page_size, budget_bytes=64 * device.page_size,
        layout=args.layout,
    )
    allocator = KVCacheAllocator(config, device)
    print(f"backend: {device.name}, page {device.page_size // 1024} KiB, layout {config.layout.value}, "
          f"{config.tokens_per_slot} tokens per slot, budget {config.budget_pages} pages")
    prompts = [300, 1200, 90, 700]
    slots = {}
    for prompt in prompts:
        slot = allocator.acquire(prompt)
        allocator.ensure(slot, prompt)
        allocator.k_cache(0)[slot, :prompt] = 1.0  # the prefill writes K/V in place
        slots[slot] = prompt
    print(f"after prefill of {prompts}: {allocator.stats().summary()}")
    for _ in range(100):  # decode: the worker maps the next step's pages while the "model" runs
        ticket = allocator.step_async(slots)
        unbacked = allocator.wait(ticket)
        assert not unbacked
        slots = {slot: length + 1 for slot, length in slots.items()}
    print(f"after 100 decode steps: {allocator.stats().summary()}")
    for slot in list(slots):
        allocator.release(slot)
    print(f"after release (pages cached for reuse): {allocator.stats().summary()}")
    print(f"shrink released {allocator.shrink()} pages to the device: {allocator.stats().summary()}")
    allocator.check_invariants(deep=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vattn", description="vAttention LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="show the KV allocator at work")
    demo_parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "host"])
    demo_parser.add_argument("--layout", default="interleaved", choices=["interleaved", "per_layer"])
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
