"""Structured outputs in the engine (replica.grammar): guided requests follow their JSON schema
in a batch with free ones, under asynchronous scheduling as without; an invalid schema is
rejected before anything is queued; matchers live exactly as long as their requests."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from replica import LLM, SamplingParams
from replica.errors import RequestRejected
from replica.sampling_params import GuidedDecoding
from tests.byte_tokenizer import save_llama_with_tokenizer
from tests.models import SMALL_KV

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
    "required": ["answer", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama_with_tokenizer(tmp_path_factory.mktemp("byte-llama"))


@pytest.fixture(scope="module")
def engines(model_dir: Path) -> dict[bool, LLM]:
    return {mode: LLM(str(model_dir), **SMALL_KV, async_scheduling=mode) for mode in (True, False)}


def test_guided_requests_follow_their_schema_in_a_mixed_batch(engines: dict[bool, LLM]) -> None:
    guided = GuidedDecoding("json_schema", json.dumps(SCHEMA))
    params = [
        SamplingParams(max_tokens=40, seed=s, guided=guided if s % 2 else None, min_p=0.01)
        for s in range(12)
    ]
    texts = {
        mode: [c.text for c in llm.generate(["hi"] * 12, params)] for mode, llm in engines.items()
    }
    assert texts[True] == texts[False]  # async scheduling changes nothing
    for s, text in enumerate(texts[True]):
        if s % 2:
            jsonschema.validate(json.loads(text), SCHEMA)
    assert any(not text.startswith("{") for text in texts[True][::2])  # free rows stay free
    for llm in engines.values():
        assert not llm.engine.grammars.matchers and not llm.engine.history.rows


def test_json_object_starts_an_object(engines: dict[bool, LLM]) -> None:
    params = SamplingParams(max_tokens=8, temperature=0, guided=GuidedDecoding("json_object"))
    assert engines[True].generate(["hi"], params)[0].text.startswith("{")


def test_an_invalid_schema_is_rejected_before_queueing(engines: dict[bool, LLM]) -> None:
    engine = engines[True].engine
    bad = GuidedDecoding("json_schema", json.dumps({"type": "nope"}))
    with pytest.raises(RequestRejected) as rejected:
        engine.add_request("bad", "hi", SamplingParams(guided=bad))
    assert rejected.value.param == "response_format" and "nope" in str(rejected.value)
    assert "bad" not in engine.requests and not engine.grammars.matchers


def test_an_aborted_guided_request_frees_its_matcher_and_history(engines: dict[bool, LLM]) -> None:
    engine = engines[True].engine
    guided = GuidedDecoding("json_object")
    engine.add_request("a", "hi", SamplingParams(max_tokens=20, guided=guided, presence_penalty=1))
    engine.step()
    assert "a" in engine.grammars and engine.history.row("a") is not None
    engine.abort("a")
    while engine.has_work():
        engine.step()
    assert not engine.grammars.matchers and not engine.history.rows
    engine.history.check_invariants()


def test_a_grammar_nothing_satisfies_stops_at_once(engines: dict[bool, LLM]) -> None:
    empty = GuidedDecoding("json_schema", json.dumps({"anyOf": []}))
    [done] = engines[False].generate(["hi"], SamplingParams(max_tokens=10, guided=empty))
    assert done.finish_reason == "stop" and len(done.token_ids) == 1
