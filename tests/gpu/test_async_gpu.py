"""Asynchronous scheduling on the GPU: step N+1 is launched (its in-flight input tokens patched in
on the device, into the CUDA graph's static inputs) before the host reads step N's tokens. With
the same requests and no early stops both engines run the same batches, so their tokens must be
identical; with stops they still agree on every token they return."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from replica import EngineConfig, LLMEngine, SamplingParams
from replica.attention import available
from tests.gpu.test_engine_gpu import small_llama

pytestmark = pytest.mark.gpu


def generate(
    async_scheduling: bool, kv_mode: str, attention: str, params: list[SamplingParams]
) -> tuple[dict[str, list[int]], LLMEngine]:
    engine = LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=dataclasses.replace(small_llama(), vocab_size=32000),
            attention=attention,
            kv_mode=kv_mode,
            max_running=16,
            max_model_len=1024,
            kv_cache_bytes=1 << 30,
            seed=7,
            async_scheduling=async_scheduling,
        )
    )
    engine.warm_up()
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", [3 + (7 * i + j) % 1000 for j in range(5 + 13 * i)], p)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(params))}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
    return tokens, engine


@pytest.mark.parametrize(
    ("kv_mode", "attention"),
    [("vattention", "flashinfer"), ("vattention", "torch-fa2"), ("paged", "paged-flashinfer")],
)
def test_async_scheduling_returns_the_synchronous_tokens(kv_mode: str, attention: str) -> None:
    if not available(
        "flashinfer" if attention == "paged-flashinfer" else attention, torch.device("cuda")
    ):
        pytest.skip(f"{attention} is not available")
    # 11 requests: graphs of 16 with padding; greedy and seeded sampling; different lengths.
    params = [
        SamplingParams(
            max_tokens=20 + 3 * i, ignore_eos=True, temperature=0 if i % 2 else 0.8, seed=i
        )
        for i in range(11)
    ]
    overlapped, engine = generate(True, kv_mode, attention, params)
    synchronous, _ = generate(False, kv_mode, attention, params)
    assert overlapped == synchronous
    assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
    assert engine.stats().kv.slots_running == 0 and engine.stats().kv.pages_in_use == 0
    # Stops: greedy requests that stop at their 4th token's first appearance, which they reach
    # while all 11 still run (the same batches as without stops); each stop is seen one step
    # after that request's next step was launched.
    greedy = [
        SamplingParams(max_tokens=20 + 3 * i, ignore_eos=True, temperature=0) for i in range(11)
    ]
    reference, _ = generate(False, kv_mode, attention, greedy)
    stops = [
        dataclasses.replace(p, stop_token_ids=[reference[f"r{i}"][3]]) for i, p in enumerate(greedy)
    ]
    stopped, engine = generate(True, kv_mode, attention, stops)
    for i in range(11):
        expected = reference[f"r{i}"]
        assert stopped[f"r{i}"] == expected[: expected.index(expected[3]) + 1]
    assert engine.stats().kv.slots_running == 0 and engine.stats().kv.pages_in_use == 0
    if kv_mode == "vattention":
        engine.kv.check_invariants(deep=True)
