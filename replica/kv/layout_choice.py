"""Which vAttention layout a cache gets when the configuration says ``kv_layout="auto"``.

The two layouts trade attention speed against memory granularity (measured on one H200,
``benchmarks/results/layout-nvidia-h200-2026-12-01.json`` and ``layout-probe-...``):

- per-layer: one layer's K (or V) rows are ``kv_heads * head_dim * element`` bytes apart (2 KiB
  for Llama-3-8B), so a decode step's attention reads few pages per layer: 0.98-1.01x the paged
  mode's step attention. But a slot grows by one page in each of the ``2 * layers`` ranges at
  once, a *page group* of ``2 * layers * page_size`` bytes (128 MiB, 1,024 tokens for Llama-3-8B):
  a slot strands up to one group minus one token, and prefix sharing works in whole groups.
- interleaved: all layers' K and V of a token side by side (rows of 128 KiB), so a slot grows by
  one page (16 tokens) and shares in 16-token pages; but one layer's consecutive tokens are a row
  apart, and attention touches every page of the cache each layer: 0.99-1.07x paged. The cost
  follows the row's size, not its alignment (a 128 KiB + 256 B row costs the same): page spread,
  which no padding removes.

Rule: per-layer where its rounding cannot strand more than ``MAX_STRANDED_SHARE`` of the KV
budget, interleaved otherwise:

    per_layer  iff  max_slots * (group_bytes - page_size) <= MAX_STRANDED_SHARE * budget_bytes

with ``group_bytes = 2 * num_layers * page_size``. The attention gain of per-layer is at most a few
percent of a step, so it is not worth more than that share of the memory that bounds the batch. On
an H200 with Llama-3-8B (about 100 GiB of KV) this picks per-layer up to ~40 slots and interleaved
at the 256-slot default; on a CPU (1 GiB budget, 64 slots) interleaved.
"""

from __future__ import annotations

import math
import mmap

from replica.kv.config import KVLayout

#: The most of the KV budget the per-layer layout's page-group rounding may strand.
MAX_STRANDED_SHARE = 0.05


def choose_layout(
    requested: str | KVLayout, num_layers: int, max_slots: int, page_size: int, budget_bytes: int
) -> KVLayout:
    """The layout ``requested`` names, or for "auto" the module docstring's rule."""
    if requested != "auto":
        return KVLayout(requested)
    stranded = max_slots * (2 * num_layers - 1) * page_size
    if stranded <= MAX_STRANDED_SHARE * budget_bytes:
        return KVLayout.PER_LAYER
    return KVLayout.INTERLEAVED


def host_page_size(token_bytes: int, preferred: int, os_page: int = mmap.PAGESIZE) -> int:
    """The host backend's page when none is configured: ``preferred`` (2 MiB) if it holds whole
    tokens of ``token_bytes``, else the largest multiple of ``lcm(token_bytes, os_page)`` not above
    it (at least one). A page must end on a token boundary for prefix sharing (a token straddling
    two pages would be written through a shared one): SmolLM2-135M's float32 tokens take 46,080
    bytes in the interleaved layout, which no 2 MiB page divides, so ``vattn serve`` on a CPU shared
    nothing; its page becomes 2,027,520 bytes (44 tokens). The host backend takes any multiple of
    the OS page; CUDA's pages are multiples of its 2 MiB granularity, so this is the host's alone.
    ``token_bytes`` is the interleaved layout's token (all layers' K and V), which the per-layer
    layout's divides, unless the configuration asks for per-layer."""
    if preferred % token_bytes == 0:
        return preferred
    unit = math.lcm(token_bytes, os_page)
    return unit * max(preferred // unit, 1)
