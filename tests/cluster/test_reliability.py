"""Reliability and security of the live app: load, KV exhaustion, bad input, access control.

Two apps serve a small random Llama with the embedded model's tokenizer (so text prompts and chat
work), two replicas each, on loopback:

* ``reliability`` at ``/``: an API key and a generous KV budget. 200 concurrent streams
  (``benchmarks.load_test`` at CI size), schemathesis fuzzing from ``/openapi.json``, hand-made bad
  input and 1,000 seeded random Unicode strings in four places, then the access checks (which scan
  Ray's logs for the key after all that traffic).
* ``kv-exhaustion`` at ``/kv``: 24 pages of 64 KiB per replica (384 tokens), far below the burst
  sent to it, which must queue and preempt yet give the texts of an unloaded run.

A replica's books are read through its deployment handle (``benchmarks.load_test.replica_stats``
calls until it has seen every running replica's id).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from ray import serve

from benchmarks.load_test import (
    LoadConfig,
    Outcome,
    at_rest,
    percentile,
    replica_stats,
    run_load,
    summarize,
    wait_at_rest,
)
from cluster.app import build_app
from replica import LLM, SamplingParams
from replica.model import embedded_model_dir
from tests.cluster.conftest import BASE_URL
from tests.models import save_random_llama

schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.integration
APP, KV_APP = "reliability", "kv-exhaustion"
API_KEY = f"vattn-test-{secrets.token_hex(12)}"  # unique: a log line holding it can only be a leak
WRONG_KEY = f"vattn-wrong-{secrets.token_hex(12)}"
AUTH = {"authorization": f"Bearer {API_KEY}"}
PAGE = (
    64 * 1024
)  # 4 layers x 2 KV heads x 64 dims x 4 bytes = 2 KiB a token and range: 32 tokens a page
KV_PAGES = 24  # K and V ranges: 12 page groups = 384 tokens per replica
VOCAB = 49152  # the embedded tokenizer's


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_random_llama(
        tmp_path_factory.mktemp("reliability-model"),
        0,
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(embedded_model_dir() / name, path / name)
    return path


@pytest.fixture(scope="module")
def served(ray_session: None, model_dir: Path) -> Iterator[httpx.Client]:
    serve.run(
        build_app(
            {
                "model": str(model_dir),
                "replicas": 2,
                # The fuzzer's requests without max_tokens generate to the end of the context:
                # 256 tokens hold every prompt sent here and keep each such request short.
                "max_model_len": 256,
                "max_running": 64,
                "api_key": API_KEY,
                "routing_stats_period_s": 0.2,
                "replica_cpus": 1,
                # Access logs on (they are off by default): the key-leak scan reads them.
                "log_level": "debug",
            }
        ),
        name=APP,
        route_prefix="/",
    )
    try:
        with httpx.Client(base_url=BASE_URL, headers=AUTH, timeout=120) as client:
            yield client
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def kv_app(ray_session: None, model_dir: Path) -> Iterator[str]:
    serve.run(
        build_app(
            {
                "model": str(model_dir),
                "replicas": 2,
                "max_model_len": 512,
                "max_running": 16,
                "kv_cache_bytes": KV_PAGES * PAGE,
                "page_size": PAGE,
                "routing_stats_period_s": 0.2,
                "replica_cpus": 1,
            }
        ),
        name=KV_APP,
        route_prefix="/kv",
    )
    try:
        yield f"{BASE_URL}/kv"
    finally:
        serve.delete(KV_APP)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= response.status_code < 500 and response.status_code == (
        status or response.status_code
    ), (response.status_code, response.text)
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


def assert_answers(client: httpx.Client) -> None:
    """A normal request still works."""
    reply = client.post(
        "/v1/completions", json={"prompt": "Hello", "max_tokens": 1, "temperature": 0}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 1


def token_totals(app: str) -> tuple[int, int]:
    stats = replica_stats(app).values()
    return sum(s["prompt_tokens_total"] for s in stats), sum(
        s["generation_tokens_total"] for s in stats
    )


# ---- 1. load -------------------------------------------------------------------------------------
def test_200_concurrent_streams_finish_without_errors_and_the_pages_come_back(
    served: httpx.Client,
) -> None:
    before = replica_stats(APP)
    assert all(at_rest(s) for s in before.values())
    config = LoadConfig(
        concurrency=200,
        max_requests=200,
        duration_s=60,
        prompt_words=(1, 48),
        max_tokens=(1, 8),
        seed=7,
        api_key=API_KEY,
        model=served.get("/v1/models").json()["data"][0]["id"],
    )
    summary = asyncio.run(run_load(BASE_URL, config))
    assert summary["errors"] == 0, summary["error_samples"]
    assert summary["ok"] + summary["shed"] == summary["requests"] == 200
    assert summary["peak_in_flight"] == 200  # all 200 streams were open at once
    after = wait_at_rest(APP)
    assert all(at_rest(s) for s in after.values()), after
    assert sorted(after) == sorted(before)  # the same replicas: none restarted
    served_tokens = sum(
        after[r]["generation_tokens_total"] - before[r]["generation_tokens_total"] for r in after
    )
    assert served_tokens == summary["completion_tokens"]
    # Not asserted: how the burst splits. It all lands on one replica today: it arrives within one
    # routing-stats period, both replicas report the same free pages, and ties break on replica id.


# ---- 2. KV exhaustion ----------------------------------------------------------------------------
def test_kv_exhaustion_queues_and_preempts_yet_gives_the_unloaded_texts(
    kv_app: str, model_dir: Path
) -> None:
    prompts = [[(17 * i + 31 * j) % 4000 + 100 for j in range(20 + 3 * i)] for i in range(16)]
    max_tokens = [48 + (i % 4) * 8 for i in range(16)]

    def send(i: int) -> tuple[str, int]:
        body = {
            "prompt": prompts[i],
            "max_tokens": max_tokens[i],
            "temperature": 0,
            "ignore_eos": True,
            "stream": i % 2 == 1,
        }
        response = httpx.post(f"{kv_app}/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        if not body["stream"]:
            return response.json()["choices"][0]["text"], response.json()["usage"][
                "completion_tokens"
            ]
        chunks = [
            json.loads(line[6:])
            for line in response.text.splitlines()
            if line.startswith("data: {")
        ]
        assert response.text.rstrip().endswith("data: [DONE]") and not any(
            "error" in c for c in chunks
        )
        return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["usage"][
            "completion_tokens"
        ]

    before = replica_stats(KV_APP)
    with ThreadPoolExecutor(16) as pool:  # all at once; a failed request's assertion is raised here
        results = list(pool.map(send, range(16)))
    after = wait_at_rest(KV_APP)
    assert all(at_rest(s) for s in after.values()), after
    assert sorted(after) == sorted(before)  # no replica died and came back
    assert sum(s["preemptions_total"] for s in after.values()) > sum(
        s["preemptions_total"] for s in before.values()
    )
    offline = LLM(
        str(model_dir), max_model_len=512, max_running=16
    )  # the CPU default budget: 1 GiB
    expected = offline.generate(
        prompts, [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
    )
    assert offline.engine.scheduler.preemptions_total == 0
    for i, completion in enumerate(expected):
        assert results[i] == (completion.text, max_tokens[i]), i


def test_a_request_the_whole_cache_cannot_hold_is_a_400_streaming_or_not(kv_app: str) -> None:
    body = {
        "prompt": [5] * 100,
        "max_tokens": 400,
    }  # 500 tokens fit max_model_len, not 384-token caches
    error = assert_openai_error(httpx.post(f"{kv_app}/v1/completions", json=body, timeout=60), 400)
    assert "KV pages" in error["message"] and "Traceback" not in error["message"]
    # Streamed, the replica's rejection arrives before the response starts: the same 400, no stream.
    streamed = httpx.post(f"{kv_app}/v1/completions", json={**body, "stream": True}, timeout=60)
    assert assert_openai_error(streamed, 400) == error
    assert all(at_rest(s) for s in wait_at_rest(KV_APP).values())


# ---- 3. bad input: fuzzing from the OpenAPI schema -----------------------------------------------
# Hypothesis is driven here rather than through schemathesis's pytest plugin, whose lazy loader sets
# ``Node._nodeid``, which pytest 9 no longer has.
OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def api_schema(served: httpx.Client) -> Any:
    return schemathesis.openapi.from_url(f"{BASE_URL}/openapi.json")


def test_the_fuzzed_operations_are_all_the_schema_has(api_schema: Any) -> None:
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [
        (m, p, mode)
        for m, p in OPERATIONS
        for mode in (("positive", "negative") if m == "POST" else ("positive",))
    ],
)
def test_fuzzed_requests_get_a_well_formed_2xx_or_4xx(
    api_schema: Any, method: str, path: str, mode: str
) -> None:
    strategy = api_schema[path][method].as_strategy(schemathesis.GenerationMode(mode))

    @settings(
        max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call(headers=AUTH, timeout=120)
        assert response.status_code < 500, (case.body, response.status_code, response.content[:300])
        assert response.status_code != 401, "the key was refused: is another server on this port?"
        content_type = (response.headers.get("content-type") or [""])[0]
        if response.status_code >= 400:
            error = json.loads(response.content)["error"]
            assert isinstance(error["message"], str) and isinstance(error["type"], str)
        elif "event-stream" in content_type:
            events = [
                line[6:]
                for line in response.content.decode().splitlines()
                if line.startswith("data: ")
            ]
            # schemathesis reads at most 20 events and then hangs up (``stream_cut_short``): a
            # stream without max_tokens runs to the end of the context, so only what it read so
            # far is checked then; a stream that ended must end with [DONE].
            done = events[-1] == "[DONE]"
            assert done or response.stream_cut_short, events[-1]
            assert all("error" not in json.loads(e) for e in events[: -1 if done else None])
        elif "json" in content_type:
            json.loads(response.content)
        assert API_KEY.encode() not in response.content

    check()


def test_the_service_answers_and_holds_no_pages_after_fuzzing(served: httpx.Client) -> None:
    assert_answers(served)
    assert served.get("/health").json() == {"status": "ok"}
    assert all(at_rest(s) for s in wait_at_rest(APP).values())


# ---- 3. bad input: hand-made cases ---------------------------------------------------------------
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
WEIRD = (
    "a\u0000b \u202eRTL\u202c \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 "
    "\U0001f600\U0001f469\u200d\U0001f4bb \ufeff\ud7ff"
)
# (path, body: raw text or JSON, expected status)
CASES: list[tuple[str, Any, int]] = [
    (CMPL, {"prompt": "word " * 3000, "max_tokens": 4}, 400),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 4}, 400),
    (CMPL, {"prompt": "hi", "max_tokens": 10**9}, 400),
    (CMPL, {"prompt": "hi", "max_tokens": 10**30}, 400),
    (CMPL, {"prompt": "hi", "max_completion_tokens": 10**9}, 400),
    (
        CMPL,
        {"prompt": WEIRD, "max_tokens": 4, "stop": [WEIRD, "\u0000", "\U0001f600", "\u202e"]},
        200,
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": WEIRD}], "max_tokens": 4, "stop": "\u05e9"},
        200,
    ),
    (CMPL, {"prompt": "\u0000" * 50, "max_tokens": 4, "stream": True}, 200),
    (
        CMPL,
        {
            "prompt": "hi",
            "max_tokens": 4,
            "stop": [f"stop {i} \u00e9\U0001f600" for i in range(100)],
        },
        200,
    ),
    (CMPL, '{"prompt": "hi", "max_tokens": ', 400),
    (CMPL, "\u0000\xff not json", 400),
    (CMPL, "", 400),
    (CMPL, "[1, 2, 3]", 400),
    (CMPL, "null", 400),
    (CMPL, '{"prompt": "hi", "temperature": NaN}', 400),
    (CMPL, '{"prompt": "hi", "temperature": Infinity}', 400),
    (CMPL, '{"prompt": "hi", "temperature": -Infinity}', 400),
    (CMPL, {"prompt": "hi", "temperature": -0.5}, 400),
    (CMPL, {"prompt": "hi", "top_p": 0}, 400),
    (CMPL, {"prompt": "hi", "top_p": 1.01}, 400),
    (CMPL, {"prompt": "hi", "top_k": -2}, 400),
    (CMPL, {"prompt": "hi", "top_k": 10**20, "max_tokens": 2}, 200),
    (CMPL, {"prompt": "hi", "seed": 2**70}, 400),
    (CMPL, {"prompt": "hi", "logprobs": 21}, 400),
    (CMPL, {"prompt": "hi", "logprobs": 20, "max_tokens": 2}, 200),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": -1}, 400),
    (CMPL, {"prompt": "hi", "n": 2, "max_tokens": 2}, 200),
    (CMPL, {"prompt": "hi", "n": 2, "best_of": 3}, 400),
    (CHAT, {"messages": USER, "n": 0}, 400),
    (CMPL, {"prompt": "hi", "model": "gpt-4o"}, 404),
    (CHAT, {"messages": USER, "model": "\u0000\U0001f600" * 100}, 404),
    (CHAT, {"messages": []}, 400),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    (CHAT, {"messages": [{"content": "hi"}]}, 400),
    (
        CHAT,
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
            "max_tokens": 2,
        },
        400,
    ),  # a part this text model would drop: refused, not ignored
    (CHAT, {"messages": "hi"}, 400),
    (CMPL, {"prompt": [], "max_tokens": 2}, 400),
    (CMPL, {"prompt": ""}, 400),
    (CMPL, {"prompt": [-1, 5]}, 400),
    (CMPL, {"prompt": [5, VOCAB]}, 400),
    (CMPL, {"prompt": [5, 2**64]}, 400),
    (CMPL, {"prompt": [[1, 2]]}, 400),
    (CMPL, {"prompt": ["a", "b"]}, 400),
    (CMPL, {"prompt": "hi", "stop": "", "max_tokens": 2}, 200),  # an empty stop is no stop
    (CMPL, {"prompt": "hi", "stop_token_ids": [-1]}, 400),
    (CMPL, {"prompt": "hi", "stop_token_ids": [2**80], "max_tokens": 2}, 200),
]
#: Every field set to values of every wrong type (some are coerced, e.g. "4" -> 4: then a 200).
WRONG = ["x", "", [], {}, 1.5, -1, True, None, [None], {"a": [1]}, 10**40]
FIELDS = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "n",
    "user",
    "logprobs",
    "echo",
    "prompt",
]


@pytest.mark.parametrize(("path", "body", "status"), CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_bad_input_is_an_openai_4xx_or_a_2xx_never_a_500(
    served: httpx.Client, path: str, body: Any, status: int
) -> None:
    if isinstance(body, str):
        response = served.post(
            path, content=body.encode(), headers={"content-type": "application/json"}
        )
    else:
        response = served.post(path, json={"max_tokens": 4, **body} if path == CHAT else body)
    if status == 200:
        assert response.status_code == 200, response.text
        assert (
            "choices" in response.json()
            if not body.get("stream")
            else response.text.endswith("data: [DONE]\n\n")
        )
    else:
        assert_openai_error(response, status)
    assert API_KEY not in response.text
    assert_answers(served)


def test_every_field_with_every_wrong_type_is_never_a_500(served: httpx.Client) -> None:
    cases = []
    for path, base in (
        (CMPL, {"prompt": "hi", "max_tokens": 2}),
        (CHAT, {"messages": USER, "max_tokens": 2}),
    ):
        for name in [*FIELDS, "messages", "top_logprobs"]:
            for value in WRONG:
                body = {**base, name: value}
                if (
                    name in ("max_tokens", "max_completion_tokens")
                    and isinstance(value, int)
                    and value > 0
                ):
                    body[name] = 2  # a valid count: these cases test types, not long generations
                cases.append((path, name, value, body))
    with ThreadPoolExecutor(8) as pool:  # concurrent: the replicas batch them (one at a time: ~3x)
        responses = list(pool.map(lambda case: served.post(case[0], json=case[3]), cases))
    for (path, name, value, _), response in zip(cases, responses):
        assert response.status_code < 500, (path, name, value, response.text)
        if response.status_code >= 400:
            assert_openai_error(response)
    assert_answers(served)
    assert all(at_rest(s) for s in wait_at_rest(APP).values())


#: Where the random strings' characters come from: every plane, lone surrogates, C0 and C1
#: controls, combining marks, right-to-left scripts and bidi controls, zero-width characters,
#: private use and noncharacters.
UNICODE_RANGES = [
    (0x20, 0x7E),
    (0x00, 0x1F),  # C0 controls
    (0x7F, 0x9F),  # DEL and C1 controls
    (0x0300, 0x036F),  # combining diacritical marks
    (0x1AB0, 0x1AFF),
    (0x20D0, 0x20FF),
    (0x0590, 0x05FF),  # Hebrew
    (0x0600, 0x06FF),  # Arabic
    (0x200B, 0x200F),  # zero-width characters, LRM, RLM
    (0x202A, 0x202E),  # bidi embeddings and overrides
    (0x2066, 0x2069),  # bidi isolates
    (0x00A0, 0xD7FF),  # the rest of the BMP below the surrogates
    (0xD800, 0xDFFF),  # lone surrogates (JSON escapes them; not valid Unicode text)
    (0xE000, 0xF8FF),  # private use
    (0xFFF0, 0xFFFF),  # specials and noncharacters
    (0x10000, 0x1FFFF),  # plane 1 (emoji, historic scripts)
    (0x20000, 0x3FFFF),  # planes 2-3 (CJK)
    (0x40000, 0xDFFFF),  # unassigned planes
    (0xE0000, 0xE01EF),  # tags and variation selectors
    (0xF0000, 0x10FFFF),  # private use planes
]


def random_unicode(count: int, seed: int) -> list[str]:
    """Seeded random strings of 0-16 characters, each drawn from a random ``UNICODE_RANGES``."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        ranges = [rng.choice(UNICODE_RANGES) for _ in range(rng.randint(0, 16))]
        texts.append("".join(chr(rng.randint(low, high)) for low, high in ranges))
    return texts


def fuzz_request(i: int, text: str) -> tuple[str, dict[str, Any]]:
    """The i-th random string as a completion prompt, a chat message, a stop string or a model
    name (in turn), generating a token, streamed every third time."""
    stream = {"stream": True} if i % 3 == 2 else {}
    where = i % 4
    if where == 0:
        return CMPL, {"prompt": text, "max_tokens": 1, **stream}
    if where == 1:
        return CHAT, {"messages": [{"role": "user", "content": text}], "max_tokens": 1, **stream}
    if where == 2:
        return CMPL, {"prompt": "hi", "stop": [text], "max_tokens": 1, **stream}
    return CHAT, {"messages": USER, "model": text, "max_tokens": 1, **stream}


def test_the_surrogate_and_1000_random_unicode_strings_never_give_a_500(
    served: httpx.Client,
) -> None:
    texts = ["\ud800", "a\udfffb", *random_unicode(1000, seed=18)]
    requests = [fuzz_request(i, text) for i, text in enumerate(texts)]
    headers = {"content-type": "application/json"}

    def send(request: tuple[str, dict[str, Any]]) -> httpx.Response:
        path, body = request  # json.dumps escapes a lone surrogate as \udXXX, as a client may
        return served.post(path, content=json.dumps(body).encode(), headers=headers)

    with ThreadPoolExecutor(16) as pool:  # ~20 s on two cores, where the server is the bound
        responses = list(pool.map(send, requests))
    for (path, body), response in zip(requests, responses):
        assert response.status_code < 500, (path, body, response.status_code, response.text)
        if response.status_code >= 400:
            assert_openai_error(response)
        elif body.get("stream"):
            events = [e[6:] for e in response.text.splitlines() if e.startswith("data: ")]
            assert events[-1] == "[DONE]", response.text
            assert all("error" not in json.loads(e) for e in events[:-1]), response.text
        else:
            assert response.json()["usage"]["completion_tokens"] <= 1, response.text
    statuses = [r.status_code for r in responses]
    # Lone surrogates are 400s, unknown models 404s; the rest is served.
    assert statuses[:2] == [400, 400] and statuses.count(404) > 100
    assert statuses.count(200) > 300 and statuses.count(400) > 100, sorted(set(statuses))
    assert_answers(served)
    assert all(at_rest(s) for s in wait_at_rest(APP).values())


# ---- 4. access -----------------------------------------------------------------------------------
def test_requests_without_the_right_key_get_a_401_and_do_no_work(served: httpx.Client) -> None:
    attempts = [
        ("POST", CMPL, {}, {"prompt": "hi", "max_tokens": 4}),
        ("POST", CMPL, {"authorization": f"Bearer {WRONG_KEY}"}, {"prompt": "hi", "max_tokens": 4}),
        (
            "POST",
            CHAT,
            {"authorization": f"Bearer {WRONG_KEY}"},
            {"messages": USER, "stream": True},
        ),
        ("POST", CMPL, {"authorization": f"Basic {API_KEY}"}, {"prompt": "hi"}),
        ("POST", CMPL, {"authorization": API_KEY}, {"prompt": "hi"}),
        ("POST", CMPL, {"x-api-key": API_KEY}, {"prompt": "hi"}),
        ("POST", CMPL, {"authorization": f"Bearer {API_KEY[:-1]}"}, {"prompt": "hi"}),
        ("POST", CMPL, {"authorization": f"Bearer {API_KEY}x"}, {"prompt": "hi"}),
        (
            "POST",
            CMPL,
            {"authorization": f"Bearer {WRONG_KEY}"},
            {"prompt": [2**70], "n": 5},
        ),  # bad body too
        ("GET", "/v1/models", {"authorization": f"Bearer {WRONG_KEY}"}, None),
    ]
    totals = token_totals(APP)
    bodies = []
    with httpx.Client(base_url=BASE_URL, timeout=60) as client:
        for method, path, headers, body in attempts:
            response = client.request(method, path, headers=headers, json=body)
            assert assert_openai_error(response, 401)["type"] == "authentication_error"
            bodies.append(response.text)
        response = client.post(f"{CMPL}?api_key={API_KEY}", json={"prompt": "hi"})
        assert_openai_error(response, 401)
        assert client.get("/health").json() == {"status": "ok"}  # open without a key
        bodies += [response.text, client.get("/metrics").text, client.get("/openapi.json").text]
    assert token_totals(APP) == totals  # no request reached a replica
    good = served.post(CMPL, json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3
    streamed = served.post(CHAT, json={"messages": USER, "max_tokens": 3, "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert token_totals(APP)[1] == totals[1] + 6
    for text in [*bodies, good.text, streamed.text, served.get("/v1/models").text]:
        assert API_KEY not in text and WRONG_KEY not in text


def ray_logs() -> Path:
    """This Ray's log directory: /tmp/ray/session_latest is whichever Ray started last on the host,
    maybe another test run's."""
    [node] = ray.nodes()
    return Path(node["ObjectStoreSocketName"]).parents[1] / "logs"


def test_the_key_never_reaches_the_logs() -> None:
    """Runs after every request of this module (load, fuzzing, right and wrong keys) was logged."""
    logs = ray_logs()
    files = [p for p in logs.rglob("*") if p.is_file()]
    rejected = [
        p
        for p in files
        if p.name.startswith(f"replica_{APP}_VattnIngress") and b" 401 " in p.read_bytes()
    ]
    assert rejected, (
        f"no access log of {APP}'s ingress with 401s under {logs}: the scan would prove nothing"
    )
    leaks = [
        p
        for p in files
        if API_KEY.encode() in p.read_bytes() or WRONG_KEY.encode() in p.read_bytes()
    ]
    assert not leaks, leaks


def test_load_figures_are_sane() -> None:
    """The load summary's statistics on known data (nearest-rank percentiles)."""
    assert percentile([], 50) is None
    assert (
        percentile([3.0, 1.0, 2.0], 50) == 2.0
        and percentile(list(map(float, range(1, 101))), 99) == 99.0
    )
    outcomes = [Outcome("ok", 200, 0.1 * i, 1.0 * i, 4) for i in range(1, 5)] + [
        Outcome("shed", 503, None, 0.1, 0)
    ]
    summary = summarize(outcomes, 2.0, 5, LoadConfig(api_key="secret"))
    assert (summary["ok"], summary["shed"], summary["errors"], summary["requests_per_s"]) == (
        4,
        1,
        0,
        2.0,
    )
    assert math.isclose(summary["ttft_s"]["p50"], 0.2) and summary["e2e_s"]["p99"] == 4.0
    assert summary["config"]["api_key"] == "<set>"
