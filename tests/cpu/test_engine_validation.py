"""Bad input through the public API loses nothing: a batch is checked whole before any of it is
queued, token ids outside the vocabulary are refused, and a request that fails inside a step is
failed and removed (the engine goes on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from replica import RequestRejected, SamplingParams
from tests.models import TINY, tiny_llm

GREEDY = SamplingParams(max_tokens=4, temperature=0)


def test_a_batch_with_one_bad_prompt_queues_nothing(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir)
    for bad in ([], [5, TINY["vocab_size"]], [5, -1]):
        with pytest.raises(RequestRejected, match="empty|outside the vocabulary"):
            llm.generate([[5, 6, 7], bad], GREEDY)
        assert not llm.engine.has_work() and not llm.engine.requests
    [out] = llm.generate([[5, 6, 7]], GREEDY)  # the engine serves on, ids free
    assert len(out.token_ids) == 4


def test_a_request_that_fails_inside_a_step_is_failed_and_removed(
    tiny_dir: Path, monkeypatch
) -> None:
    llm = tiny_llm(tiny_dir, async_scheduling=False)
    engine = llm.engine
    real = engine.runner.execute
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected kernel failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    engine.add_request("doomed", [5, 6, 7], GREEDY)
    outputs = engine.step()
    assert calls["n"] == 1  # the fault happened
    [failed] = outputs
    assert (
        failed.request_id == "doomed"
        and failed.finished
        and "injected kernel failure" in (failed.error or "")
    )
    assert not engine.has_work() and "doomed" not in engine.requests
    engine.kv.check_invariants(deep=True)
    engine.add_request("after", [5, 6, 7], GREEDY)
    done = []
    while engine.has_work():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["after"] and done[0].error is None
