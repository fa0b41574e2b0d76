"""Attention backends on the vAttention cache: sdpa against a naive float64 reference on CPU;
every GPU backend against sdpa within bf16 tolerance, on both layouts (marked gpu)."""

from __future__ import annotations

import math

import pytest
import torch

from replica import KVCacheAllocator, KVCacheConfig, open_device
from replica.attention import StepBatch, make_attention_backend
from replica.attention.base import AttentionBackend
from replica.vmm import cuda_available

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 8, 2, 128, 2
# (context already cached, new tokens): decodes, prefill chunks on a context, a fresh prompt
MIXED = [(0, 7), (5, 1), (33, 1), (20, 12), (70, 1)]
DECODE = [(9, 1), (40, 1), (1, 1), (100, 1)]


def build(device_name: str, layout: str, dtype: torch.dtype) -> KVCacheAllocator:
    device = open_device(device_name, 64 * 1024 if device_name == "host" else None)
    config = KVCacheConfig(
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype,
        max_slots=8,
        max_tokens=256,
        page_size=device.page_size,
        budget_bytes=256 * device.page_size,
        layout=layout,
    )
    return KVCacheAllocator(config, device)


def step(allocator: KVCacheAllocator, shape: list[tuple[int, int]], seed: int = 0):
    """Acquires slots, fills each context with random K/V, returns the batch and new q/k/v."""
    generator = torch.Generator().manual_seed(seed)
    device, dtype = allocator.device.torch_device, allocator.config.dtype
    slots = []
    for context, query in shape:
        slot = allocator.acquire()
        allocator.ensure(slot, context + query)
        for layer in range(LAYERS):
            for cache in (allocator.k_cache(layer), allocator.v_cache(layer)):
                cache[slot, :context] = torch.randn(
                    context, KV_HEADS, HEAD_DIM, generator=generator
                ).to(device, dtype)
        slots.append(slot)
    batch = StepBatch.build(slots, [c for c, _ in shape], [q for _, q in shape], device)
    tokens = batch.num_tokens

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(tokens, heads, HEAD_DIM, generator=generator).to(device, dtype)

    return batch, rand(Q_HEADS), rand(KV_HEADS), rand(KV_HEADS)


def run(backend: AttentionBackend, batch: StepBatch, q, k, v, layer: int = 1) -> torch.Tensor:
    backend.plan(batch)
    return backend(layer, q, k, v)


def naive_attention(
    q: torch.Tensor, keys: list[tuple[torch.Tensor, torch.Tensor]], batch: StepBatch
) -> torch.Tensor:
    """Float64 causal GQA attention, one query and head at a time; ``keys[i]`` holds sequence
    i's K and V ([tokens, kv_heads, dim], at least context + query tokens)."""
    out = []
    start = 0
    for (k_seq, v_seq), context, query in zip(keys, batch.context_lens, batch.query_lens):
        # Only the stored tokens: the rest of a slot may be unmapped (never touch it).
        k_seq, v_seq = k_seq[: context + query].double(), v_seq[: context + query].double()
        for j in range(query):
            visible = context + j + 1
            for head in range(Q_HEADS):
                kv_head = head // (Q_HEADS // KV_HEADS)
                scores = (
                    k_seq[:visible, kv_head] @ q[start + j, head].double() / math.sqrt(HEAD_DIM)
                )
                out.append(torch.softmax(scores, 0) @ v_seq[:visible, kv_head])
        start += query
    return torch.stack(out).view(-1, Q_HEADS, HEAD_DIM)


def naive(
    allocator: KVCacheAllocator, batch: StepBatch, q: torch.Tensor, layer: int = 1
) -> torch.Tensor:
    keys = [
        (allocator.k_cache(layer)[slot], allocator.v_cache(layer)[slot]) for slot in batch.slots
    ]
    return naive_attention(q, keys, batch)


def sdpa_step(layout: str, shape: list[tuple[int, int]]):
    """A host-backend cache in ``layout`` with a step of ``shape`` (``step``), and sdpa over it."""
    allocator = build("host", layout, torch.float32)
    backend = make_attention_backend(
        "sdpa", allocator, Q_HEADS, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu")
    )
    return allocator, backend, *step(allocator, shape)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_sdpa_matches_naive_attention_and_writes_the_cache(layout: str, shape) -> None:
    allocator, backend, batch, q, k, v = sdpa_step(layout, shape)
    out = run(backend, batch, q, k, v)
    rows = torch.arange(batch.num_tokens)
    written = allocator.k_cache(1)[batch.token_slots_t, batch.token_positions_t]
    torch.testing.assert_close(written, k[rows])
    torch.testing.assert_close(out.double(), naive(allocator, batch, q), rtol=1e-5, atol=1e-5)


def test_batches_must_be_ordered_by_slot() -> None:
    with pytest.raises(ValueError, match="distinct and ascending"):
        StepBatch.build([3, 1], [0, 0], [1, 1], torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_attention_backend("paged", None, 1, 1, 8, torch.float32, torch.device("cpu"))  # type: ignore[arg-type]
    if not cuda_available()[0]:
        with pytest.raises(ValueError, match="unavailable on cpu"):
            make_attention_backend("torch-fa2", None, 1, 1, 8, torch.float32, torch.device("cpu"))  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flashinfer", "torch-fa2", "flash-attn"])
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_gpu_backends_match_sdpa(name: str, layout: str, shape) -> None:
    device = torch.device("cuda")
    from replica.attention import available

    if not available(name, device):
        pytest.skip(f"{name} is not installed")
    allocator = build("cuda", layout, torch.bfloat16)
    batch, q, k, v = step(allocator, shape)
    reference = make_attention_backend(
        "sdpa", allocator, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device
    )
    expected = run(reference, batch, q, k, v)
    backend = make_attention_backend(
        name, allocator, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device
    )
    out = run(backend, batch, q, k, v)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def borrow_prefixes(
    allocator: KVCacheAllocator, batch: StepBatch, keys: int = 32
) -> dict[int, tuple[int, int]]:
    """Moves the first ``keys`` keys of each sequence with a longer context into a holder slot of
    its own and scribbles over them where they were: a batch reading them from the holders
    (``StepBatch.borrows``) sees what the batch saw before; one reading its own slot would not."""
    borrows = {}
    for slot, context in zip(batch.slots, batch.context_lens):
        if context < keys:
            continue
        holder = allocator.acquire()
        allocator.ensure(holder, keys)
        for layer in range(LAYERS):
            for cache in (allocator.k_cache(layer), allocator.v_cache(layer)):
                cache[holder, :keys] = cache[slot, :keys]
                cache[slot, :keys] = 3.0
        borrows[slot] = (holder, keys)
    assert borrows, "no sequence long enough to borrow"
    return borrows


def borrowing(batch: StepBatch, borrows: dict[int, tuple[int, int]]) -> StepBatch:
    device = batch.slots_t.device
    return StepBatch.build(batch.slots, batch.context_lens, batch.query_lens, device, borrows)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_sdpa_reads_a_borrowed_prefix_from_its_holder(layout: str, shape) -> None:
    allocator, backend, batch, q, k, v = sdpa_step(layout, shape)
    expected = run(backend, batch, q, k, v)
    borrowed = borrowing(batch, borrow_prefixes(allocator, batch))
    torch.testing.assert_close(run(backend, borrowed, q, k, v), expected)
    assert not torch.allclose(run(backend, batch, q, k, v), expected)  # its own slot: scribbled


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_flashinfer_reads_a_borrowed_prefix_from_its_holder(layout: str, shape) -> None:
    """On 16-token pages whatever the batch (``kernel_pages``), eagerly and in a graph's plan."""
    device = torch.device("cuda")
    from replica.attention import available

    if not available("flashinfer", device):
        pytest.skip("flashinfer is not installed")
    allocator = build("cuda", layout, torch.bfloat16)
    batch, q, k, v = step(allocator, shape)
    backend = make_attention_backend(
        "flashinfer", allocator, Q_HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device
    )
    assert backend.borrow_granularity == 16
    expected = run(backend, batch, q, k, v)
    borrowed = borrowing(batch, borrow_prefixes(allocator, batch))
    torch.testing.assert_close(run(backend, borrowed, q, k, v), expected, rtol=2e-2, atol=2e-2)
    if borrowed.is_decode:
        padded = borrowed.padded(8, device)
        assert padded.borrows[-1] == borrowed.borrows[-1]
        backend.plan_graph(padded)
        assert backend.planned_variant == 16
        out = backend(1, torch.cat([q, q[-1:].expand(8 - len(q), -1, -1)]), *_pad(k, v, 8))
        torch.testing.assert_close(out[: len(q)], expected, rtol=2e-2, atol=2e-2)


def _pad(k: torch.Tensor, v: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded decode batch's new K/V: the last sequence's repeated."""
    return tuple(torch.cat([t, t[-1:].expand(size - len(t), -1, -1)]) for t in (k, v))  # type: ignore[return-value]
