"""The page size FlashInfer sees, chosen per step, and the page table built from slot ids alone:
small virtual pages exactly where a one-page slot cannot be split (few sequences, long context)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from replica.attention.base import token_rows
from replica.attention.flashinfer_backend import virtual_pages
from replica.attention.kernel_pages import (
    EVEN_LENGTHS,
    LONG_CONTEXT_TOKENS,
    SMALL_PAGE_TOKENS,
    SPLIT_BELOW_BLOCKS,
    UNEVEN_SPLIT_BELOW_BLOCKS,
    kernel_page_tokens,
    page_table,
)

SLOT = 4704  # Llama-3-8B interleaved, max_model_len ~4,700: a multiple of 16


def test_small_batches_at_long_context_see_small_pages() -> None:
    assert kernel_page_tokens(1, 8, 8000, 8192) == SMALL_PAGE_TOKENS
    assert kernel_page_tokens(4, 8, 4096, SLOT) == SMALL_PAGE_TOKENS
    assert kernel_page_tokens(15, 8, LONG_CONTEXT_TOKENS, SLOT) == SMALL_PAGE_TOKENS
    assert kernel_page_tokens(16, 4, 32768, 32768) == SMALL_PAGE_TOKENS  # Qwen2.5-7B: 64 blocks


def test_full_batches_and_short_contexts_keep_one_page_per_slot() -> None:
    assert (
        kernel_page_tokens(SPLIT_BELOW_BLOCKS // 8, 8, 8000, 8192) == 8192
    )  # Llama-3-8B: 16 x 8 blocks
    assert kernel_page_tokens(32, 4, 8000, 8192) == 8192
    assert kernel_page_tokens(256, 8, 30000, 32768) == 32768
    assert kernel_page_tokens(1, 8, LONG_CONTEXT_TOKENS - 1, SLOT) == SLOT
    assert kernel_page_tokens(1, 8, 8000, 8200) == 8200  # 16 does not divide the slot: one page


def test_uneven_lengths_see_small_pages_until_the_batch_fills_the_gpu_several_times() -> None:
    """ShareGPT-like: one sequence of 4K keys among ones of ~500. At 32 x 8 blocks the long one's
    lone block is the step's tail (small pages); from 128 x 8 blocks one page is faster again."""
    for sequences, page in ((32, SMALL_PAGE_TOKENS), (63, SMALL_PAGE_TOKENS), (64, SLOT)):
        lengths = [4096] + [500] * (sequences - 1)
        assert kernel_page_tokens(sequences, 8, 4096, SLOT, sum(lengths)) == page
    assert UNEVEN_SPLIT_BELOW_BLOCKS == 64 * 8
    even = [3000] * 31 + [int(3000 * EVEN_LENGTHS)]
    assert kernel_page_tokens(32, 8, max(even), 8192, sum(even)) == 8192
    assert kernel_page_tokens(32, 8, 900, SLOT, 900 + 31 * 10) == SLOT  # short: one page


@given(
    st.lists(
        st.tuples(st.integers(0, 7), st.integers(1, 64 * 16)),
        min_size=1,
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    st.sampled_from([16, 64, 1024]),
)
def test_the_page_table_covers_each_sequence_token_for_token(batch, page: int) -> None:
    slots, lens = [s for s, _ in batch], [n for _, n in batch]
    indptr, indices, last = page_table(slots, lens, page, 1024)
    per_slot = 1024 // page
    for i, (slot, n) in enumerate(zip(slots, lens)):
        pages = indices[indptr[i] : indptr[i + 1]]
        rows = [p * page + r for p in pages[:-1] for r in range(page)] + [
            pages[-1] * page + r for r in range(last[i])
        ]
        assert rows == [slot * per_slot * page + t for t in range(n)]  # slot's tokens, in order
        assert 1 <= last[i] <= page


@given(
    st.lists(st.integers(1, 64 * 16), min_size=1, max_size=6),
    st.data(),
)
def test_a_borrowed_prefix_is_read_from_its_holder_then_the_slot(lens, data) -> None:
    """Sequence i borrowing b keys from holder h reads rows of h for [0, b), its own after."""
    slots = list(range(1, len(lens) + 1))
    borrows = [
        (0, data.draw(st.integers(0, n // 16)) * 16) if data.draw(st.booleans()) else (s, 0)
        for s, n in zip(slots, lens)
    ]
    indptr, indices, last = page_table(slots, lens, 16, 1024, borrows)
    for i, (slot, n) in enumerate(zip(slots, lens)):
        pages = indices[indptr[i] : indptr[i + 1]]
        rows = [p * 16 + r for p in pages[:-1] for r in range(16)] + [
            pages[-1] * 16 + r for r in range(last[i])
        ]
        holder, keys = borrows[i]
        assert rows == [(holder if t < keys else slot) * 1024 + t for t in range(n)]


def test_a_borrowing_batch_sees_small_pages_whatever_its_size() -> None:
    assert kernel_page_tokens(256, 8, 100, SLOT, borrowing=True) == SMALL_PAGE_TOKENS
    with pytest.raises(ValueError, match="no small pages"):
        kernel_page_tokens(1, 8, 100, 8200, borrowing=True)
    with pytest.raises(ValueError, match="borrowed keys"):
        page_table([1], [40], 16, 1024, [(0, 24)])  # not whole pages


def test_a_page_that_does_not_divide_the_slot_is_refused() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        page_table([0], [5], 48, 1024)
    with pytest.raises(ValueError, match="holds 1..1024"):
        page_table([0], [0], 16, 1024)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_virtual_pages_view_the_same_memory(layout: str) -> None:
    slots, tokens, layers, heads, dim = 3, 64, 2, 2, 4
    if layout == "interleaved":
        whole = torch.arange(slots * tokens * layers * 2 * heads * dim, dtype=torch.float32)
        k = whole.view(slots, tokens, layers, 2, heads, dim)[:, :, 1, 0]
    else:
        k = torch.arange(slots * tokens * heads * dim, dtype=torch.float32).view(
            slots, tokens, heads, dim
        )
    paged = virtual_pages(k, 16)
    assert paged.shape == (slots * tokens // 16, 16, heads, dim)
    assert paged.data_ptr() == k.data_ptr()
    torch.testing.assert_close(paged.reshape(-1, heads, dim), token_rows(k).reshape(-1, heads, dim))
    assert torch.equal(paged[5, 3], k[1, 5 * 16 - tokens + 3])  # page 5 = slot 1's second page


def test_warm_up_reaches_every_page_size_a_batch_size_can_see() -> None:
    """The engine's warm-up (one long sequence among short ones per shape) captures, for each
    batch size, the small-page graph exactly where some step of that size can see small pages."""
    from types import SimpleNamespace

    from replica.attention.flashinfer_backend import FlashInferBackend

    backend = SimpleNamespace(num_kv_heads=8, tokens_per_slot=SLOT)
    sizes = [1, 2, 8, 15, 16, 32, 63, 64, 128, 256]
    shapes = FlashInferBackend.warm_up_shapes(backend, sizes, 4000)  # type: ignore[arg-type]
    assert {(size, 1) for size in sizes} <= set(shapes)
    warmed_small = {size for size, keys in shapes if keys >= LONG_CONTEXT_TOKENS}
    can_see_small = {size for size in sizes if size * 8 < UNEVEN_SPLIT_BELOW_BLOCKS}
    assert warmed_small == can_see_small
    for size in warmed_small:  # the warm-up batch itself: one long sequence, the others short
        lengths = [LONG_CONTEXT_TOKENS] + [4] * (size - 1)
        assert kernel_page_tokens(size, 8, max(lengths), SLOT, sum(lengths)) == SMALL_PAGE_TOKENS
    assert FlashInferBackend.warm_up_shapes(backend, sizes, 1000) == [(s, 1) for s in sizes]  # type: ignore[arg-type]
