"""The page size the attention kernel sees, chosen per step: a pure rule, testable anywhere.

The vAttention cache is contiguous, so the kernel may be shown each slot as one page or as
``ceil(len / P)`` *virtual* pages of P tokens over the same memory: page ``j`` of slot ``s`` is
page ``s * (tokens_per_slot / P) + j`` of the cache viewed as ``[rows / P, P, heads, dim]``. No
block table exists; the indices are arithmetic on the slot ids and lengths.

FlashInfer splits a long KV across thread blocks by pages, so a slot shown as one page runs on
one block per (sequence, KV head): measured on an H200 (tensor-core decode, 32 q / 8 kv heads,
d 128, bf16; ``shared/notes/h200-probe.md``), a batch of 1 at 8K tokens takes 77.5 µs as one page
and 30.8 µs as 16-token pages, a batch of 4 at 4K 49.8 vs 30.3 µs; from a batch of 16 on, or below
~2K tokens, the page size does not matter or one page is slightly faster (fewer indices):

    P = tokens_per_slot   if sequences >= SPLIT_BELOW_SEQUENCES or max kv_len < LONG_CONTEXT_TOKENS
    P = 16                otherwise (when 16 divides tokens_per_slot; else one page per slot)
"""

from __future__ import annotations

#: From this many sequences on the batch fills the GPU without splitting a sequence's KV.
SPLIT_BELOW_SEQUENCES = 16
#: Below this many keys a sequence gains nothing from being split.
LONG_CONTEXT_TOKENS = 2048
#: Virtual pages of this many tokens (FlashInfer's split granularity is one page).
SMALL_PAGE_TOKENS = 16


def small_page(tokens_per_slot: int) -> int | None:
    """The small virtual page for slots of ``tokens_per_slot`` tokens: SMALL_PAGE_TOKENS when it
    divides them, else None (slots are then always one page)."""
    return SMALL_PAGE_TOKENS if tokens_per_slot % SMALL_PAGE_TOKENS == 0 and tokens_per_slot > SMALL_PAGE_TOKENS else None


def kernel_page_tokens(sequences: int, max_kv_len: int, tokens_per_slot: int) -> int:
    """The page size (tokens) the kernel sees this step (the rule in the module docstring)."""
    small = small_page(tokens_per_slot)
    if small is None or sequences >= SPLIT_BELOW_SEQUENCES or max_kv_len < LONG_CONTEXT_TOKENS:
        return tokens_per_slot
    return small


def page_table(slots: list[int] | tuple[int, ...], kv_lens: list[int] | tuple[int, ...], page_tokens: int,
               tokens_per_slot: int) -> tuple[list[int], list[int], list[int]]:
    """(indptr, indices, last_page_len) of a batch shown as pages of ``page_tokens`` tokens:
    sequence i covers pages ``indices[indptr[i]:indptr[i + 1]]``, which are
    ``slot_i * (tokens_per_slot / page_tokens) + j`` for j < ceil(kv_len_i / page_tokens)."""
    if tokens_per_slot % page_tokens:
        raise ValueError(f"a {page_tokens}-token page does not divide a {tokens_per_slot}-token slot")
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
