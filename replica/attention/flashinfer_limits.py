"""Which FlashInfer prefill kernel can address a given KV cache: a pure rule, testable anywhere.

FlashInfer's Hopper (sm90, "fa3") paged prefill turns each page into per-token row numbers and
addresses K/V row ``r`` as ``uint32(r) * (row stride / 16 bytes)``: a 32-bit product, so it reaches
only the first 2**32 16-byte units (64 GiB) after the cache's base pointer, and wraps silently
beyond (an illegal memory access on the device). Its row numbers go into one preallocated int32
buffer of 16M entries per step. The Ampere-style kernel ("fa2") computes offsets in 64 bits.

The interleaved vAttention layout stores a token's K and V of every layer together, so one layer's
rows are ``layers * 2 * kv_heads * head_dim`` elements apart (128 KiB for Llama-3-8B): at 4,704
tokens per slot, slot 112 already starts beyond 64 GiB. Measured on an H200 (FlashInfer 0.5.3):
prefill over slots >= 112 of such a cache faults with fa3; per_layer and paged caches (rows 2 KiB
apart) never come near the limit.

    fa3 fits  <=>  rows * row_stride_bytes <= 2**32 * 16   and   step_kv_tokens <= 16 * 2**20

where ``rows`` is every row the kernel may be handed (slots * tokens_per_slot, or blocks *
block_size) and ``step_kv_tokens`` bounds the keys of one step (the cache's capacity in tokens).
When it does not fit, prefill runs on fa2 (decode always runs on FlashInfer's tensor-core decode,
which addresses in 64 bits).

An fp8 (e4m3) KV cache prefills on fa2 always: with bf16 queries and e4m3 K/V, FlashInfer 0.5.3's
Hopper prefill fails to compile ("No eligible GMMA operator"), fa2 builds and runs (measured on an
H200, ``../shared/notes/h200-probe.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: fa3 multiplies a row number by the row stride in 16-byte units, in 32 bits.
FA3_ADDRESS_UNIT_BYTES = 16
FA3_ADDRESSABLE_BYTES = (1 << 32) * FA3_ADDRESS_UNIT_BYTES
#: fa3's per-step buffer of int32 row numbers (FlashInfer allocates 16M entries).
FA3_MAX_STEP_KV_TOKENS = 16 * 1024 * 1024
#: Row numbers are int32 in every FlashInfer kernel.
MAX_ROWS = (1 << 31) - 1
#: Head sizes FlashInfer's prefill kernels compile for (its Hopper path static_asserts them).
HEAD_DIMS = (64, 128, 256)


def supports_head_dim(head_dim: int) -> bool:
    return head_dim in HEAD_DIMS


def require_head_dim(head_dim: int) -> None:
    """ValueError, up front, for a head size FlashInfer cannot compile (not a JIT failure at
    the first prefill)."""
    if not supports_head_dim(head_dim):
        raise ValueError(
            f"FlashInfer attention needs head_dim in {HEAD_DIMS}, the model has {head_dim}; "
            "use --backend sdpa (or torch-fa2 on CUDA)"
        )


@dataclass(frozen=True)
class PrefillKernel:
    """The FlashInfer prefill backend for a cache and why (a sentence with the numbers)."""

    backend: str  # FlashInfer's: "auto" (it picks fa3 on Hopper: prefill_kernel="fa3") or "fa2"
    reason: str


#: What users may ask for (``EngineConfig.prefill_kernel``): ``auto`` (fa2, below), ``fa2``, or
#: ``fa3`` (FlashInfer's Hopper kernel where it reaches the cache, else fa2).
PREFILL_KERNELS = ("auto", "fa2", "fa3")

#: Why ``auto`` is fa2: the engine's prefill-phase steps carry the running requests' decode rows
#: through the prefill kernel, and fa3 tiles queries 128 rows per request (a decode row fills one
#: of them; FlashInfer issue #1340, and SGLang's FlashInfer backend pins fa2). On one H100
#: (2026-12-07, gpu-proof/engine_kernels, ShareGPT-like chat at 256 slots, both run orders) the
#: paged mode ran 1.165x faster on fa2 than on fa3; fa3 wins on prefill attention alone
#: (1.09-1.71x on an H200), so ``fa3`` stays on request for prefill-only work.
AUTO_REASON = (
    "auto: fa2 (mixed prefill + decode steps run 1.165x faster on it than on fa3 on an H100)"
)


def choose_prefill_kernel(
    rows: int,
    row_stride_bytes: int,
    step_kv_tokens: int,
    fp8_kv: bool = False,
    requested: str = "auto",
) -> PrefillKernel:
    """``requested="fa3"``: FlashInfer's ``auto`` backend (fa3 on Hopper) when fa3's 32-bit
    addressing reaches every row and the cache is not fp8, else ``fa2``; ``auto`` and ``fa2``:
    fa2 (``AUTO_REASON``). Raises ValueError when no FlashInfer kernel can index the cache (more
    than 2**31 - 1 rows) or for an unknown ``requested``."""
    if requested not in PREFILL_KERNELS:
        raise ValueError(
            f"prefill kernel {requested!r}: choose one of {', '.join(PREFILL_KERNELS)}"
        )
    if rows > MAX_ROWS:
        raise ValueError(
            f"the KV cache has {rows:,} token rows; FlashInfer indexes at most {MAX_ROWS:,} "
            "(lower max_running or max_model_len)"
        )
    if requested == "fa2":
        return PrefillKernel("fa2", "fa2 requested (prefill_kernel)")
    if requested == "auto":
        return PrefillKernel("fa2", AUTO_REASON)
    if fp8_kv:
        return PrefillKernel(
            "fa2", "fp8 KV cache: FlashInfer's Hopper prefill does not build for bf16 q + e4m3 KV"
        )
    span = rows * row_stride_bytes
    if span > FA3_ADDRESSABLE_BYTES:
        return PrefillKernel(
            "fa2",
            (
                f"{rows:,} rows {row_stride_bytes:,} B apart span {span / 2**30:.1f} GiB; "
                "FlashInfer's "
                f"Hopper prefill addresses {FA3_ADDRESSABLE_BYTES / 2**30:.0f} GiB"
            ),
        )
    if step_kv_tokens > FA3_MAX_STEP_KV_TOKENS:
        return PrefillKernel(
            "fa2",
            (
                f"a step may attend over {step_kv_tokens:,} keys; FlashInfer's Hopper prefill "
                "indexes "
                f"{FA3_MAX_STEP_KV_TOKENS:,}"
            ),
        )
    return PrefillKernel("auto", f"{rows:,} rows span {span / 2**30:.1f} GiB: within fa3's reach")
