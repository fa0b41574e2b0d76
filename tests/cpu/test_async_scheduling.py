"""Asynchronous scheduling (replica.engine): the engine launches step N+1 before it reads step
N's tokens. It must change nothing a client sees but when outputs arrive: the same tokens, stops,
logprobs and preemptions as the synchronous engine, and the same books at the end."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replica import LLM, SamplingParams
from replica.request import RequestOutput
from tests.models import tiny_llm

Workload = list[tuple[list[int], SamplingParams]]


#: The engines' cache sizes; "tight" preempts (8 tokens a page, 12 pages).
SIZES: dict[str, dict[str, int]] = {
    "roomy": {},
    "tight": {"kv_cache_bytes": 12 * 4096, "max_batch_tokens": 16, "eager_pages": 0},
}


def fresh_engines(tiny_dir: Path, size: str) -> tuple[LLM, LLM]:
    """A new (asynchronous, synchronous) pair: the test compares two engines from the same state.
    Shared across examples they drift apart, each keeping what its own earlier examples taught
    it: the growth reserve's ratio (lowered once per scheduled step, and the asynchronous engine
    schedules the extra steps of requests that stopped early), the prefix cache's blocks. That
    changes admissions, and with them the step counts (26 asynchronous against 31 once)."""
    overlapped = tiny_llm(tiny_dir, async_scheduling=True, **SIZES[size])
    return overlapped, tiny_llm(tiny_dir, async_scheduling=False, **SIZES[size])


def run(llm: LLM, workload: Workload) -> tuple[dict[str, list[RequestOutput]], int]:
    """Every output by request, and the steps that ran."""
    engine = llm.engine
    for i, (prompt, params) in enumerate(workload):
        engine.add_request(f"r{i}", prompt, params)
    outputs: dict[str, list[RequestOutput]] = {f"r{i}": [] for i in range(len(workload))}
    steps = 0
    while engine.has_work():
        for output in engine.step():
            assert not outputs[output.request_id] or not outputs[output.request_id][-1].finished
            outputs[output.request_id].append(output)
        steps += 1
    kv = engine.stats().kv
    assert kv.slots_running == 0 and kv.pages_in_use == 0
    assert not engine.scheduler.in_flight and not engine.requests
    engine.kv.check_invariants(deep=True)
    return outputs, steps


def summary(outputs: dict[str, list[RequestOutput]]) -> dict[str, tuple[object, ...]]:
    """Tokens, how each request ended, the top-logprob tokens and the chosen tokens' logprobs."""
    return {
        rid: (
            [t for o in outs for t in o.token_ids],
            outs[-1].finish_reason,
            outs[-1].completion_tokens,
            [[t for t, _ in tops] for o in outs for tops in (o.top_logprobs or ())],
            [lp for o in outs for lp in (o.logprobs or ())],
        )
        for rid, outs in outputs.items()
    }


def assert_same(a: dict[str, tuple[object, ...]], b: dict[str, tuple[object, ...]]) -> None:
    """Equal, logprobs to float32 rounding (a step's batch may differ between the engines, and
    with it the order of the float sums)."""
    assert {rid: v[:-1] for rid, v in a.items()} == {rid: v[:-1] for rid, v in b.items()}
    for rid in a:
        assert a[rid][-1] == pytest.approx(b[rid][-1], rel=1e-5, abs=1e-6), rid


params = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 24),
    temperature=st.sampled_from([0.0, 0.8]),
    top_p=st.sampled_from([1.0, 0.9]),
    seed=st.integers(0, 9),  # seeded: the same draws in both engines
    logprobs=st.none() | st.integers(0, 2),
    stop_token_ids=st.lists(st.integers(3, 127), max_size=8),  # stops mid-stream now and then
    # Penalties count tokens on the device, the one in flight included (replica.sampling).
    frequency_penalty=st.sampled_from([0.0, 1.5]),
    presence_penalty=st.sampled_from([0.0, -1.0]),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    min_p=st.sampled_from([0.0, 0.05]),
    logit_bias=st.dictionaries(st.integers(3, 127), st.sampled_from([-100.0, 5.0]), max_size=3),
)
workloads = st.lists(
    st.tuples(st.lists(st.integers(3, 127), min_size=1, max_size=40), params),
    min_size=1,
    max_size=7,
)


@settings(max_examples=25, deadline=None)
@given(workload=workloads, size=st.sampled_from(list(SIZES)))
def test_async_and_sync_engines_give_the_same_outputs(
    tiny_dir: Path, workload: Workload, size: str
) -> None:
    overlapped_llm, synchronous_llm = fresh_engines(tiny_dir, size)
    overlapped, steps = run(overlapped_llm, workload)
    synchronous, sync_steps = run(synchronous_llm, workload)
    assert_same(summary(overlapped), summary(synchronous))
    assert steps >= sync_steps  # a request stopping early may have launched one more step


def test_a_request_that_stops_while_its_next_step_runs_gets_no_extra_token(tiny_dir: Path) -> None:
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    reference = (
        tiny_llm(tiny_dir, async_scheduling=False).generate([[5, 17, 33]], greedy)[0].token_ids
    )
    stop = reference[5]
    first = reference.index(stop)  # the first time that token comes
    llm = tiny_llm(tiny_dir, async_scheduling=True)
    engine = llm.engine
    engine.add_request(
        "s",
        [5, 17, 33],
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop]),
    )
    engine.add_request("long", [9, 9, 9], greedy)
    seen: list[int] = []
    while engine.has_work():
        outputs = [o for o in engine.step() if o.request_id == "s"]
        seen += [t for o in outputs for t in o.token_ids]
        if outputs and outputs[-1].finished:
            assert outputs[-1].finish_reason == "stop"
            # Its next step was launched before the stop was seen: the slot waits for that step.
            assert engine.stats().kv.slots_running == 2
            engine.step()
            assert engine.stats().kv.slots_running == 1
    assert seen == list(reference[: first + 1])
    assert engine.generation_tokens_total == first + 1 + 20


def test_the_last_token_is_not_computed_past_max_tokens(tiny_dir: Path) -> None:
    """A request whose last token is in flight is not scheduled again: as many steps as tokens."""
    llm = tiny_llm(tiny_dir, async_scheduling=True)
    outputs, steps = run(
        llm, [([5, 17, 33], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
    )
    assert len(summary(outputs)["r0"][0]) == 6
    assert steps == 6 + 1  # the prefill samples the first token; the last call only reads one
    assert llm.engine.runner.kv.stats().pages_in_use == 0
