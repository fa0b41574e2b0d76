"""The sampler's logit adjustments on the GPU (penalties, logit_bias, min-p, a grammar's bitmask):
under CUDA graphs and asynchronous scheduling the engine returns the tokens of the eager,
synchronous engine (penalties count the token in flight on the device), and the CUDA sampler
masks exactly as the CPU one does."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from replica import LLM, EngineConfig, LLMEngine, SamplingParams
from replica.sampling import TokenHistory, all_allowed_bitmask, make_generator, sample
from replica.sampling_params import GuidedDecoding
from tests.byte_tokenizer import save_llama_with_tokenizer
from tests.gpu.test_engine_gpu import small_llama

pytestmark = pytest.mark.gpu


def adjusted_params() -> list[SamplingParams]:
    kinds = [
        {"frequency_penalty": 1.5},
        {"presence_penalty": 1.0, "repetition_penalty": 1.3},
        {"logit_bias": {17: 100.0}},
        {"logit_bias": {i: -100.0 for i in range(40)}, "min_p": 0.05},
        {"repetition_penalty": 2.0, "min_p": 0.1, "top_k": 50},
    ]
    return [
        SamplingParams(
            max_tokens=24 + 2 * i,
            ignore_eos=True,
            temperature=0 if i % 2 else 0.8,
            seed=i,
            **kinds[i % len(kinds)],
        )
        for i in range(11)
    ]


def generate(graphs_and_async: bool, params: list[SamplingParams]) -> dict[str, list[int]]:
    engine = LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=dataclasses.replace(small_llama(), vocab_size=32000),
            max_running=16,
            max_model_len=1024,
            kv_cache_bytes=1 << 30,
            seed=7,
            cuda_graphs=graphs_and_async,
            async_scheduling=graphs_and_async,
            # The same steps in both runs: admissions never leave a step for a later one on
            # timing (batch composition changes bf16 numerics, hence tokens near ties).
            admission_map_wait_s=math.inf,
        )
    )
    engine.warm_up()
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", [3 + (7 * i + j) % 1000 for j in range(5 + 13 * i)], p)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(params))}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
    if graphs_and_async:
        assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
    engine.history.check_invariants()
    assert not engine.history.rows
    return tokens


def test_adjusted_sampling_under_graphs_and_async_matches_eager() -> None:
    params = adjusted_params()
    fast, eager = generate(True, params), generate(False, params)
    assert fast == eager
    assert all(t == 17 for t in fast["r2"])  # +100 forces
    assert not any(t < 40 for t in fast["r3"])  # -100 removes
    plain = generate(False, [dataclasses.replace(p, frequency_penalty=0) for p in params[:1]])
    assert plain["r0"] != fast["r0"]  # the penalty changed what was generated


def test_cuda_sampler_equals_cpu_sampler() -> None:
    vocab, batch = 1000, 6
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 3
    params = [
        SamplingParams(temperature=0, frequency_penalty=1.0, logit_bias={5: 3.0}),
        SamplingParams(temperature=0, repetition_penalty=1.7),
        SamplingParams(temperature=0.9, seed=3, min_p=0.1, presence_penalty=0.5),
        SamplingParams(temperature=0, logit_bias={int(logits[3].argmax()): -100.0}),
        SamplingParams(temperature=1.1, seed=4),
        SamplingParams(temperature=0),
    ]
    mask = all_allowed_bitmask(batch, vocab)
    mask[4], mask[5] = 0, 0
    mask[4, 3] = 0x00FF00FF  # row 4: tokens 96-103 and 112-119 only
    mask[5, 10] = 1 << 7  # row 5: token 327 only
    results = {}
    for device in ("cpu", "cuda"):
        history = TokenHistory(vocab, device)
        rows = [
            history.add(f"r{i}", [i, 7, 9]) if p.penalized else None for i, p in enumerate(params)
        ]
        gens = [make_generator(p.seed, device) if p.seed is not None else None for p in params]
        tokens = []
        for _ in range(12):
            ids = sample(logits.to(device), params, gens, history, rows, mask.to(device)).token_ids
            history.record(rows, ids)
            tokens.append(ids.tolist())
        results[device] = tokens
    greedy_rows = [0, 1, 3, 5]
    for step_cpu, step_cuda in zip(results["cpu"], results["cuda"]):
        assert [step_cpu[i] for i in greedy_rows] == [step_cuda[i] for i in greedy_rows]
        assert 96 <= step_cuda[4] < 104 or 112 <= step_cuda[4] < 120
        assert step_cuda[5] == 327


def test_guided_json_under_graphs_and_async_matches_eager(tmp_path: Path) -> None:
    # head_dim 64: FlashInfer (CUDA graphs) compiles it; TINY's 16 would fall back to sdpa, eager.
    model_dir = save_llama_with_tokenizer(
        tmp_path / "model", hidden_size=256, num_attention_heads=4, num_key_value_heads=2
    )
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
        "required": ["answer", "ok"],
        "additionalProperties": False,
    }
    guided = GuidedDecoding("json_schema", json.dumps(schema))
    params = [
        SamplingParams(max_tokens=40, seed=s, guided=guided if s % 3 else None) for s in range(9)
    ]
    texts = {}
    for fast in (True, False):
        llm = LLM(
            str(model_dir),
            max_model_len=256,
            kv_cache_bytes=1 << 28,
            cuda_graphs=fast,
            async_scheduling=fast,
        )
        texts[fast] = [c.text for c in llm.generate(["hello"] * 9, params)]
        del llm
    assert texts[True] == texts[False]
    for s, text in enumerate(texts[True]):
        if s % 3:
            assert json.loads(text)["answer"] in ("yes", "no")
