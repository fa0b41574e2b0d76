"""The page size the attention kernel sees, chosen per step: a pure rule, testable anywhere.

The vAttention cache is contiguous, so the kernel may be shown each slot as one page or as
``ceil(len / P)`` *virtual* pages of P tokens over the same memory: page ``j`` of slot ``s`` is
page ``s * (tokens_per_slot / P) + j`` of the cache viewed as ``[rows / P, P, heads, dim]``. No
block table exists; the indices are arithmetic on the slot ids and lengths.

FlashInfer splits a long KV across thread blocks by pages, so a slot shown as one page runs on
one block per (sequence, KV head). Measured on an H200 with the kernel in a CUDA graph, as decode
steps run (``python -m benchmarks.bench_attention``,
``benchmarks/results/attention-nvidia-h200-2026-12-01.json``; tensor-core decode, head_dim 128,
bf16): a Llama-3-8B-shaped batch of 1 at 16K keys takes 228 µs as one page and 28 µs as 16-token
pages (the paged mode's 16-token blocks: 28 µs), a batch of 8 at 4K 67 vs 44 µs, a batch of 1 at
1K 21 µs against 11.5 µs on 16-token blocks; from 16 sequences x 8 KV heads = 128 blocks on (the
H200 has 132 SMs) the page size does not matter for even lengths (within 3%, 7% at 16 x 32K).

Uneven lengths (ShareGPT-like: mean ~600 keys, a tail to 4K) move the boundary, measured the
same way (``benchmarks/results/attention-uneven-nvidia-h200-2026-12-02.json``): one page per slot
leaves the longest sequence's lone block as the step's tail while the batch does not fill the GPU
several times over: 32 sequences (256 blocks) 41.5 µs as one page, 38.1 µs as 16-token pages
(paged 37.7); from 128 sequences (1,024 blocks) on, one page is the faster (123 vs 129 µs, 256:
204 vs 210; paged 128 and 210):

    P = tokens_per_slot   if max kv_len < LONG_CONTEXT_TOKENS
    P = 16                if sequences * kv_heads < SPLIT_BELOW_BLOCKS, or if the lengths are
                          uneven (max kv_len > EVEN_LENGTHS * mean) and
                          sequences * kv_heads < UNEVEN_SPLIT_BELOW_BLOCKS
    P = tokens_per_slot   otherwise (and whenever 16 does not divide tokens_per_slot)
    P = 16                whenever a sequence borrows its prefix (``replica.kv.borrows``): its
                          first pages are another slot's, which only a page list can say
"""

from __future__ import annotations

from collections.abc import Sequence

#: From this many (sequence, KV head) blocks on the batch fills the GPU without splitting a KV.
SPLIT_BELOW_BLOCKS = 128
#: From this many keys on a sequence gains from being split (measured down to 1K: 1.85x).
LONG_CONTEXT_TOKENS = 1024
#: Virtual pages of this many tokens (FlashInfer's split granularity is one page).
SMALL_PAGE_TOKENS = 16
#: Lengths are uneven when the longest KV exceeds this many times the mean.
EVEN_LENGTHS = 1.5
#: Uneven lengths gain from small pages below this many blocks (measured: at 256, not at 1,024).
UNEVEN_SPLIT_BELOW_BLOCKS = 512


def small_page(tokens_per_slot: int) -> int | None:
    """The small virtual page for slots of ``tokens_per_slot`` tokens: SMALL_PAGE_TOKENS when it
    divides them, else None (slots are then always one page)."""
    return (
        SMALL_PAGE_TOKENS
        if tokens_per_slot % SMALL_PAGE_TOKENS == 0 and tokens_per_slot > SMALL_PAGE_TOKENS
        else None
    )


def kernel_page_tokens(
    sequences: int,
    kv_heads: int,
    max_kv_len: int,
    tokens_per_slot: int,
    total_kv_len: int | None = None,
    borrowing: bool = False,
) -> int:
    """The page size (tokens) the kernel sees this step (the rule in the module docstring);
    ``kv_heads``: this rank's; ``total_kv_len``: the keys of all sequences (None: even lengths,
    ``sequences * max_kv_len``); ``borrowing``: a sequence reads its prefix from another slot."""
    small = small_page(tokens_per_slot)
    if borrowing:
        if small is None:
            raise ValueError(f"a {tokens_per_slot}-token slot has no small pages to borrow in")
        return small
    if small is None or max_kv_len < LONG_CONTEXT_TOKENS:
        return tokens_per_slot
    total = sequences * max_kv_len if total_kv_len is None else total_kv_len
    blocks = sequences * kv_heads
    uneven = max_kv_len * sequences > EVEN_LENGTHS * total
    if blocks < SPLIT_BELOW_BLOCKS or (uneven and blocks < UNEVEN_SPLIT_BELOW_BLOCKS):
        return small
    return tokens_per_slot


def page_table(
    slots: list[int] | tuple[int, ...],
    kv_lens: list[int] | tuple[int, ...],
    page_tokens: int,
    tokens_per_slot: int,
    borrows: Sequence[tuple[int, int]] = (),
) -> tuple[list[int], list[int], list[int]]:
    """(indptr, indices, last_page_len) of a batch shown as pages of ``page_tokens`` tokens:
    sequence i covers pages ``indices[indptr[i]:indptr[i + 1]]``, which are
    ``slot_i * (tokens_per_slot / page_tokens) + j`` for j < ceil(kv_len_i / page_tokens); where
    ``borrows[i]`` is (holder h, b keys), its first b / page_tokens pages are h's instead."""
    if tokens_per_slot % page_tokens:
        raise ValueError(
            f"a {page_tokens}-token page does not divide a {tokens_per_slot}-token slot"
        )
    per_slot = tokens_per_slot // page_tokens
    indptr, indices, last = [0], [], []
    for i, (slot, kv_len) in enumerate(zip(slots, kv_lens)):
        if not 0 < kv_len <= tokens_per_slot:
            raise ValueError(f"slot {slot}: {kv_len} keys; a slot holds 1..{tokens_per_slot}")
        pages = -(-kv_len // page_tokens)
        first = slot * per_slot
        holder, keys = borrows[i] if borrows else (slot, 0)
        if keys % page_tokens or keys > kv_len:
            raise ValueError(f"slot {slot}: {keys} borrowed keys in {page_tokens}-token pages")
        lent = keys // page_tokens
        indices.extend(range(holder * per_slot, holder * per_slot + lent))
        indices.extend(range(first + lent, first + pages))
        indptr.append(indptr[-1] + pages)
        last.append(kv_len - (pages - 1) * page_tokens)
    return indptr, indices, last
