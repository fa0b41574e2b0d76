"""CUDA graphs of the decode step, and the fused kernels they replay, on the GPU.

A runner with graphs and one without (same synthetic weights) execute identical step plans: a
prefill (eager in both), then decode steps whose batch sizes need padding (5 -> graph of 8, then
3 -> graph of 4) and a step that samples only some rows. Their logits must agree within bf16
tolerance (the graph's matmuls run at the padded size), graphs must actually replay, and the
cache must hold the same K/V afterwards (padding rows write nothing different).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from replica import EngineConfig, LLMEngine
from replica.attention import available
from replica.kv import PagedKVCache
from replica.model import kernels
from replica.model_runner import StepPlan
from tests.gpu.test_engine_gpu import assert_logits_close, small_llama

pytestmark = pytest.mark.gpu


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), atol=2e-2, rtol=2e-2)


def test_fused_kernels_match_pytorch() -> None:
    if kernels.fused(torch.empty(1, device="cuda", dtype=torch.bfloat16)) is None:
        pytest.skip("flashinfer is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    residual = torch.randn_like(x)
    weight = torch.rand(4096, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5
    for res in (None, residual):
        got = kernels.add_rms_norm(x.clone(), None if res is None else res.clone(), weight, 1e-5)
        expected = kernels.add_rms_norm(
            x.cpu(), None if res is None else res.cpu(), weight.cpu(), 1e-5
        )
        close(got[0], expected[0])
        close(got[1], expected[1])
    gate_up = torch.randn(37, 2 * 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    close(kernels.silu_and_mul(gate_up), kernels.silu_and_mul(gate_up.cpu()))
    # q and k as the model passes them: strided views into one fused qkv output.
    qkv = torch.randn(37, (32 + 2 * 8) * 128, device="cuda", dtype=torch.bfloat16, generator=g)
    cos_sin = torch.randn(4096, 128, device="cuda", generator=g)
    positions = torch.randint(0, 4096, (37,), device="cuda", generator=g)
    expected = qkv.cpu()
    for tensor, table, pos in (
        (qkv, cos_sin, positions),
        (expected, cos_sin.cpu(), positions.cpu()),
    ):
        q, k, _ = tensor.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
        kernels.rotate_in_place(pos, q.view(37, 32, 128), k.view(37, 8, 128), table)
    close(qkv, expected)


def runner_logits(
    kv_mode: str, attention: str, cuda_graphs: bool, lengths: tuple[int, ...] = (5, 130, 37, 1, 300)
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    llm = LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=dataclasses.replace(small_llama(), vocab_size=32000),
            attention=attention,
            kv_mode=kv_mode,
            max_running=8,
            max_model_len=max(1024, 2 * max(lengths)),
            kv_cache_bytes=1 << 30,
            seed=7,
            cuda_graphs=cuda_graphs,
        )
    )
    runner, kv = llm.runner, llm.runner.kv
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32000, (n,), generator=generator).tolist() for n in lengths]
    slots = [kv.acquire() for _ in prompts]
    for slot, prompt in zip(slots, prompts):
        kv.ensure(slot, len(prompt) + 8)
    lengths = [len(p) for p in prompts]
    rows = tuple(sum(lengths[: i + 1]) - 1 for i in range(len(prompts)))
    logits = [
        runner.execute(
            StepPlan(
                tuple(slots), (0,) * 5, tuple(lengths), tuple(t for p in prompts for t in p), rows
            )
        ).clone()
    ]
    # Fixed next tokens: argmax of random-weight logits can flip between kernels on a near tie.
    for step in range(4):
        live = slots if step < 2 else slots[:3]  # 5 sequences (graph of 8), then 3 (graph of 4)
        sample = tuple(range(len(live))) if step != 3 else (0, 2)
        plan = StepPlan(
            tuple(live),
            tuple(lengths[: len(live)]),
            (1,) * len(live),
            tuple(1000 + 7 * step + i for i in range(len(live))),
            sample,
        )
        logits.append(runner.execute(plan).clone())
        lengths = [n + 1 for n in lengths[: len(live)]] + lengths[len(live) :]
    kv.synchronize()
    torch.cuda.synchronize()
    cache = cached_keys(kv, layer=3, slot=slots[2], length=lengths[2])
    replays = runner.graphs.replays if runner.graphs is not None else 0
    return logits, cache, replays


def cached_keys(kv: object, layer: int, slot: int, length: int) -> torch.Tensor:
    """One sequence's cached K of one layer, [length, heads, dim], from either cache."""
    k_cache = kv.k_cache(layer)  # type: ignore[attr-defined]
    if isinstance(kv, PagedKVCache):
        size = kv.config.block_size
        rows = [block * size + offset for block in kv.block_ids(slot) for offset in range(size)][
            :length
        ]
        return k_cache.reshape(-1, *k_cache.shape[2:])[rows].float().cpu()
    return k_cache[slot, :length].float().cpu()


@pytest.mark.parametrize(
    ("kv_mode", "attention"),
    [
        ("vattention", "flashinfer"),
        ("vattention", "torch-fa2"),
        ("paged", "paged-flashinfer"),
    ],
)
def test_graph_decode_matches_eager(kv_mode: str, attention: str) -> None:
    if not available(
        "flashinfer" if "flashinfer" in attention else attention, torch.device("cuda")
    ):
        pytest.skip(f"{attention} is not installed")
    graphed, graphed_cache, replays = runner_logits(kv_mode, attention, cuda_graphs=True)
    torch.cuda.empty_cache()
    eager, eager_cache, _ = runner_logits(kv_mode, attention, cuda_graphs=False)
    assert replays == 2  # steps 0 and 2 capture (sizes 8 and 4); steps 1 and 3 replay
    assert [t.shape for t in graphed] == [t.shape for t in eager]
    assert_logits_close(tuple(graphed), tuple(eager))
    close(graphed_cache, eager_cache)


def test_graph_decode_at_long_context_on_small_virtual_pages_matches_sdpa() -> None:
    """Few sequences at long context: FlashInfer sees 16-token virtual pages (split across SMs),
    in the prefill, in eager decode and in the graphs captured for that page size."""
    if not available("flashinfer", torch.device("cuda")):
        pytest.skip("flashinfer is not installed")
    lengths = (5, 2100, 37, 1, 3000)
    graphed, graphed_cache, replays = runner_logits("vattention", "flashinfer", True, lengths)
    torch.cuda.empty_cache()
    eager, eager_cache, _ = runner_logits("vattention", "flashinfer", False, lengths)
    torch.cuda.empty_cache()
    reference, _, _ = runner_logits("vattention", "sdpa", False, lengths)
    assert replays == 2
    assert_logits_close(tuple(graphed), tuple(eager))
    close(graphed_cache, eager_cache)  # the graphs write what eager steps write
    # Against sdpa only the logits: a later layer's K inherits bf16 differences of the layers below.
    assert_logits_close(tuple(graphed), tuple(reference))
