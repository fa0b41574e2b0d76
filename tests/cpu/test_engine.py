"""The engine end to end on CPU, against Hugging Face transformers on the same weights."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from replica import LLM, AsyncLLMEngine, EngineConfig, RequestRejected, SamplingParams
from replica.model import embedded_model_dir
from tests.models import tiny_llm

GREEDY = SamplingParams(max_tokens=12, temperature=0)
# Prompts of different lengths (token ids of the tiny model's vocabulary).
PROMPTS = [[5, 17, 33], [9] * 21 + [40, 2 + 1], [60, 61, 62, 63, 64, 65, 66, 67, 68], [100]]


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=0,
            )
        outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_greedy_matches_transformers_on_a_batch(tiny_dir: Path, layout: str) -> None:
    expected = hf_greedy(tiny_dir, PROMPTS, GREEDY.max_tokens)
    outputs = tiny_llm(tiny_dir, kv_layout=layout).generate(PROMPTS, GREEDY)
    assert [list(o.token_ids) for o in outputs] == expected


def test_chunked_prefill_and_preemption_keep_outputs_identical(tiny_dir: Path) -> None:
    expected = tiny_llm(tiny_dir).generate(
        PROMPTS, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    )
    # 8 tokens a page (interleaved): 10 pages back 80 tokens in all, far below 4 x ~60 tokens.
    small = tiny_llm(tiny_dir, kv_cache_bytes=10 * 4096, max_batch_tokens=8, eager_pages=0)
    outputs = small.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert small.engine.stats().preemptions_total > 0
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    kv = small.engine.stats().kv
    assert kv.slots_running == 0 and kv.pages_in_use == 0
    small.engine.kv.check_invariants(deep=True)


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], seeded)[0].token_ids
    mixed = llm.generate(PROMPTS, [seeded, *[SamplingParams(max_tokens=9, temperature=1.0)] * 3])[
        0
    ].token_ids
    other_seed = llm.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=16, temperature=0.9, seed=99, ignore_eos=True)
    )
    assert alone == mixed
    assert other_seed[0].token_ids != alone


def test_impossible_requests_are_rejected_up_front(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir, max_model_len=64, kv_cache_bytes=4 * 4096)
    with pytest.raises(RequestRejected, match="exceeds the context limit of 64 tokens"):
        llm.engine.add_request("long", [5] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="need 8 KV pages; the whole cache has 4"):
        llm.engine.add_request("big", [5] * 40, SamplingParams(max_tokens=20))
    with pytest.raises(RequestRejected, match="empty"):
        llm.engine.add_request("empty", [], SamplingParams(max_tokens=1))
    with pytest.raises(RequestRejected, match="no tokenizer"):
        llm.engine.add_request("text", "hello", SamplingParams(max_tokens=1))
    assert not llm.engine.has_work()


def test_abort_frees_the_slot_at_once(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir)
    engine = llm.engine
    engine.add_request(
        "keep", PROMPTS[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    )
    engine.add_request(
        "drop", PROMPTS[1], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    )
    tokens = []
    for _ in range(3):
        tokens += [t for o in engine.step() if o.request_id == "keep" for t in o.token_ids]
    assert engine.stats().kv.slots_running == 2
    aborted = engine.abort("drop")
    assert aborted is not None and aborted.finish_reason == "abort"
    assert engine.stats().running == 1
    # Its slot is released as soon as the device is done with it: at once, or (asynchronous
    # scheduling) when the step in flight completes, the next step() call.
    assert engine.stats().kv.slots_running == (2 if engine.async_scheduling else 1)
    outputs = engine.step()
    assert engine.stats().kv.slots_running == 1
    while True:
        assert all(o.request_id == "keep" for o in outputs)
        tokens += [t for o in outputs for t in o.token_ids]
        if not engine.has_work():
            break
        outputs = engine.step()
    assert len(tokens) == 20


def test_streaming_deltas_add_up_and_leaving_early_aborts(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir)
    offline = llm.generate([PROMPTS[2]], GREEDY)[0]
    engine = AsyncLLMEngine(EngineConfig(), engine=llm.engine)

    async def main() -> tuple[list[int], int]:
        streamed = [t async for o in engine.generate(PROMPTS[2], GREEDY) for t in o.token_ids]
        partial = engine.generate(
            PROMPTS[1], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        )
        async for _ in partial:
            break  # the client goes away after the first token
        await partial.aclose()
        # Released at once, or once the step in flight is done (asynchronous scheduling).
        deadline = time.monotonic() + 10
        while engine.stats().kv.slots_running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return streamed, engine.stats().kv.slots_running

    try:
        streamed, running_after_leave = asyncio.run(main())
    finally:
        engine.shutdown()
    assert streamed == list(offline.token_ids)
    assert running_after_leave == 0


@pytest.fixture(scope="module")
def smollm() -> LLM:
    return LLM("embedded", max_running=4)


def test_embedded_model_answers_and_matches_transformers(smollm: LLM) -> None:
    questions = [
        "What is the capital of France? Answer in one sentence.",
        "Name three primary colors.",
    ]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    outputs = smollm.chat(conversations, SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in outputs[0].text
    prompts = [
        smollm.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations
    ]
    prompts = [
        list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p)
        for p in prompts
    ]
    expected = hf_greedy(embedded_model_dir(), prompts, 24)
    eos = smollm.engine.eos_token_ids
    trimmed = [e[: next((i + 1 for i, t in enumerate(e) if t in eos), len(e))] for e in expected]
    assert [list(o.token_ids) for o in outputs] == trimmed


def test_a_full_step_admits_the_next_requests_ahead(tiny_dir: Path) -> None:
    """With the step's token budget spent, the next requests get their slot and pages now (mapped
    in the background) and run from the next step, in arrival order, with unchanged outputs."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    expected = tiny_llm(tiny_dir).generate(PROMPTS, params)
    llm = tiny_llm(tiny_dir, max_batch_tokens=21)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    first = (
        engine.step()
    )  # r0 (3 tokens) and 18 of r1's 23: full; r2 (9) is admitted ahead, r3 too (1)
    assert [r.request_id for r in engine.scheduler.running] == ["r0", "r1", "r2", "r3"]
    assert [r.computed for r in engine.scheduler.running] == [3, 18, 0, 0]
    assert engine.stats().kv.slots_running == 4 and not engine.scheduler.waiting
    outputs: dict[str, list[int]] = {o.request_id: list(o.token_ids) for o in first}
    while engine.has_work():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
    assert [outputs[f"r{i}"] for i in range(4)] == [list(o.token_ids) for o in expected]
    engine.kv.check_invariants(deep=True)


def test_waiting_pages_count_what_admission_needs(tiny_dir: Path) -> None:
    """The router's ``queued_pages``: prompt plus generated tokens of every waiting request, in
    physical pages (page groups times ranges), and nothing once they run."""
    llm = tiny_llm(tiny_dir, max_running=1)
    engine, config = llm.engine, llm.engine.kv.config
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    pages = [config.page_groups_for(len(p)) * config.num_ranges for p in PROMPTS]
    assert engine.scheduler.waiting_pages() == sum(pages) > 0
    engine.step()  # one slot: r0 runs, the rest wait
    assert [r.request_id for r in engine.scheduler.running] == ["r0"]
    assert engine.scheduler.waiting_pages() == sum(pages[1:])
    while engine.has_work():
        engine.step()
    assert engine.scheduler.waiting_pages() == 0


def test_committed_pages_count_every_request_at_its_max_tokens(tiny_dir: Path) -> None:
    """The router's ``committed_pages``: prompt + max_tokens of every running and waiting request,
    in physical pages, whatever it holds now."""
    llm = tiny_llm(tiny_dir, max_running=2)
    engine, config = llm.engine, llm.engine.kv.config
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (4, 30, 17, 9)]
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(f"r{i}", prompt, p)
    pages = [
        config.page_groups_for(len(prompt) + p.max_tokens) * config.num_ranges
        for prompt, p in zip(PROMPTS, params)
    ]
    assert engine.scheduler.committed_pages() == sum(pages)
    engine.step()  # two run, two wait: the same promises
    assert engine.scheduler.committed_pages() == sum(pages)
    while engine.has_work():
        engine.step()
    assert engine.scheduler.committed_pages() == 0


def test_an_output_ended_by_its_stop_token_says_so(tiny_dir: Path, smollm: LLM) -> None:
    """The last output of a request a stop token ended marks that token (its text is not in the
    output, so the serving layer leaves it out of logprobs); other outputs do not."""

    def outputs(engine: Any, prompt: list[int], params: SamplingParams) -> list[Any]:
        engine.add_request("r", prompt, params)
        seen = []
        while engine.has_work():
            seen += engine.step()
        return seen

    tiny = tiny_llm(tiny_dir).engine
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    free = outputs(tiny, PROMPTS[0], params)
    assert free[-1].finish_reason == "length" and not any(o.stop_token for o in free)
    tokens = [o.token_ids[0] for o in free]
    ends = tokens.index(tokens[2]) + 1  # the stop token's first occurrence
    stopped = outputs(tiny, PROMPTS[0], dataclasses.replace(params, stop_token_ids=(tokens[2],)))
    assert [o.token_ids[0] for o in stopped] == tokens[:ends]
    assert [o.stop_token for o in stopped] == [False] * (ends - 1) + [True]
    # With a tokenizer (the text goes through the detokenizer): EOS ends the chat.
    prompt = smollm.tokenizer.encode(
        smollm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    )
    chat = outputs(smollm.engine, prompt, SamplingParams(max_tokens=64, temperature=0))
    assert chat[-1].finish_reason == "stop" and chat[-1].stop_token
    assert chat[-1].token_ids[0] in smollm.engine.eos_token_ids and chat[-1].text == ""
    assert not any(o.stop_token for o in chat[:-1])
