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
H200 has 132 SMs) the page size does not matter (within 3%, 7% at 16 x 32K):

A full batch of *uneven* lengths is the other case: one page per slot gives each (sequence, KV
head) one block, so the longest sequence's block runs alone long after the short ones are done
(ShareGPT-like lengths through 128 slots: decode phase 7.04 s vs the paged mode's 5.88 s on an
H200). Split into pages, FlashInfer's scheduler cuts the long KV into chunks that balance. So one
page per slot only when the batch fills the GPU *and* no sequence is much longer than the mean:

    P = tokens_per_slot   if max kv_len < LONG_CONTEXT_TOKENS, or
                          sequences * kv_heads >= SPLIT_BELOW_BLOCKS and
                          max kv_len * sequences <= EVEN_LENGTHS * total kv_len
    P = 16                otherwise (when 16 divides tokens_per_slot; else one page per slot)
"""

from __future__ import annotations

#: From this many (sequence, KV head) blocks on the batch fills the GPU without splitting a KV.
SPLIT_BELOW_BLOCKS = 128
#: From this many keys on a sequence gains from being split (measured down to 1K: 1.85x).
LONG_CONTEXT_TOKENS = 1024
#: Virtual pages of this many tokens (FlashInfer's split granularity is one page).
SMALL_PAGE_TOKENS = 16
#: A full batch keeps one page per slot only while its longest KV is at most this many times the
#: mean (beyond, the longest sequence's lone block is the step's tail).
EVEN_LENGTHS = 1.5


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
) -> int:
    """The page size (tokens) the kernel sees this step (the rule in the module docstring);
    ``kv_heads``: this rank's; ``total_kv_len``: the keys of all sequences (None: even lengths,
    ``sequences * max_kv_len``)."""
    small = small_page(tokens_per_slot)
    if small is None or max_kv_len < LONG_CONTEXT_TOKENS:
        return tokens_per_slot
    total = sequences * max_kv_len if total_kv_len is None else total_kv_len
    fills = sequences * kv_heads >= SPLIT_BELOW_BLOCKS
    even = max_kv_len * sequences <= EVEN_LENGTHS * total
    return tokens_per_slot if fills and even else small


def page_table(
    slots: list[int] | tuple[int, ...],
    kv_lens: list[int] | tuple[int, ...],
    page_tokens: int,
    tokens_per_slot: int,
) -> tuple[list[int], list[int], list[int]]:
    """(indptr, indices, last_page_len) of a batch shown as pages of ``page_tokens`` tokens:
    sequence i covers pages ``indices[indptr[i]:indptr[i + 1]]``, which are
    ``slot_i * (tokens_per_slot / page_tokens) + j`` for j < ceil(kv_len_i / page_tokens)."""
    if tokens_per_slot % page_tokens:
        raise ValueError(
            f"a {page_tokens}-token page does not divide a {tokens_per_slot}-token slot"
        )
    per_slot = tokens_per_slot // page_tokens
    indptr, indices, last = [0], [], []
    for slot, kv_len in zip(slots, kv_lens):
        if not 0 < kv_len <= tokens_per_slot:
            raise ValueError(f"slot {slot}: {kv_len} keys; a slot holds 1..{tokens_per_slot}")
        pages = -(-kv_len // page_tokens)
        first = slot * per_slot
        indices.extend(range(first, first + pages))
        indptr.append(indptr[-1] + pages)
        last.append(kv_len - (pages - 1) * page_tokens)
    return indptr, indices, last
