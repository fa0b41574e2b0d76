"""Callers of the async engine (new requests, aborts, stats) take turns with its loop: between two
steps the loop lets waiting callers in first, so a caller waits for the step that is running and
no more, however busy the engine (a plain lock that the loop re-takes at once would keep callers
out for many steps)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import pytest

from replica import AsyncLLMEngine, EngineConfig, SamplingParams
from replica.engine_stats import EngineSnapshot, EngineStats, RoutingStats
from tests.helpers import wait_until, wait_until_async
from tests.models import tiny_llm

from .test_engine import PROMPTS


def test_a_caller_waits_at_most_for_the_step_in_flight(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir)
    steps = 0
    step = llm.engine.step

    def counted_step():  # type: ignore[no-untyped-def]
        nonlocal steps
        outputs = step()
        steps += 1
        time.sleep(0.002)  # a step that holds the engine a while, as a GPU step does
        return outputs

    llm.engine.step = counted_step  # type: ignore[method-assign]
    engine = AsyncLLMEngine(EngineConfig(), engine=llm.engine)
    busy = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)  # ~200 steps
    waited: list[int] = []

    async def load() -> None:
        streams = [engine.generate(p, busy) for p in PROMPTS]
        await asyncio.gather(*(consume(s) for s in streams))

    async def consume(stream) -> None:  # type: ignore[no-untyped-def]
        async for _ in stream:
            pass

    def caller() -> None:
        wait_until(lambda: steps >= 5, 60, "five engine steps", interval=0.001)
        for _ in range(20):
            before = steps
            with engine._engine():  # as a caller (stats, an abort) takes its turn
                seen = steps
            waited.append(seen - before)
            time.sleep(0.001)

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        asyncio.run(load())
    finally:
        thread.join()
        engine.shutdown()
    assert len(waited) == 20
    # The step running when the caller asked, and one more that may begin between its two reads.
    assert max(waited) <= 2, waited


def test_a_caller_that_leaves_while_its_request_is_added_leaves_nothing_behind(
    tiny_dir: Path,
) -> None:
    engine = AsyncLLMEngine(EngineConfig(), engine=tiny_llm(tiny_dir).engine)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)

    added = threading.Event()
    add_request = engine.engine.add_request

    def recorded_add(*args, **kwargs):  # type: ignore[no-untyped-def]
        request = add_request(*args, **kwargs)
        added.set()
        return request

    engine.engine.add_request = recorded_add  # type: ignore[method-assign]

    def forgotten() -> bool:
        with engine._engine() as e:
            return "gone" not in e.requests and not e.has_work()

    async def leave_early() -> None:
        async def first_token() -> None:
            async for _ in engine.generate(PROMPTS[0], params, request_id="gone"):
                break

        with engine._engine():  # a long step: the request waits to be added
            task = asyncio.create_task(first_token())
            # The add has asked for the engine (this test holds it): it waits, as behind a step.
            await wait_until_async(
                lambda: engine._callers == 2, 10, "the add to wait for the engine"
            )
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        # The add still runs (in its worker thread); then the request is forgotten.
        await wait_until_async(added.is_set, 10, "the request to be added")
        await wait_until_async(
            forgotten,
            10,
            "the request to be forgotten",
            interval=0.01,
        )

    try:
        asyncio.run(leave_early())
        assert forgotten()
        assert engine.stats().kv.slots_running == 0
    finally:
        engine.shutdown()


def test_the_serving_layer_reads_named_frozen_snapshots(tiny_dir: Path) -> None:
    """The async engine hands out what the replica deployment reports by name, each a frozen
    snapshot taken between two steps; nothing hands a caller the live engine."""
    engine = AsyncLLMEngine(EngineConfig(), engine=tiny_llm(tiny_dir).engine)
    try:
        before = time.time()
        routing = engine.routing_stats()
        assert isinstance(routing, RoutingStats) and before <= routing.timestamp <= time.time()
        assert isinstance(routing.prefix_keys, frozenset) and routing.tokens_per_page > 0
        snapshot = engine.snapshot()
        assert isinstance(snapshot, EngineSnapshot) and snapshot.broken is None
        assert isinstance(engine.stats(), EngineStats)
        assert engine.context_limit == engine.engine.context_limit
        for frozen in (routing, snapshot):
            with pytest.raises(dataclasses.FrozenInstanceError):
                frozen.timestamp = 0.0  # type: ignore[misc]
        assert not hasattr(engine, "call") and not hasattr(engine, "call_async")
        assert engine.release_kv_memory() >= 0
    finally:
        engine.shutdown()
