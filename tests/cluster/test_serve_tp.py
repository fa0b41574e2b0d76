"""Tensor-parallel replicas on a live cluster: 2 Serve replicas x tp 2 (gloo), each rank > 0 a
Ray actor in its replica's placement group; answers equal the offline engine's; killing a rank
actor fails its replica's in-flight requests cleanly (a stream ends with an OpenAI-style error event
and ``data: [DONE]``, a whole reply is an OpenAI-style error body; never a hang or a cut stream),
the other replica's requests finish, and Serve replaces the replica."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from cluster.app import build_app
from cluster.rank_actors import RANK_NAMESPACE
from replica import LLM, SamplingParams
from tests.cluster.conftest import BASE_URL
from tests.cluster.helpers import HANG_S, replica_actors, replica_loads, streaming_in_flight
from tests.helpers import wait_until
from tests.models import save_random_llama

pytestmark = pytest.mark.integration
APP = "tp"
MAX_TOKENS = 240  # of 256 (max_model_len): long enough to be in flight when the rank dies
STREAMS, WHOLE = 4, 2
PROMPTS = [[5, 17, 33, 8], [9, 9, 9, 40, 41, 42, 43], [60, 61, 62]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_llama(
        tmp_path_factory.mktemp("tp-model"),
        3,
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
    )


@pytest.fixture(scope="module")
def tp_app(ray_session: None, model_dir: Path) -> Iterator[None]:
    serve.run(
        build_app(
            {
                "model": str(model_dir),
                "replicas": 2,
                "tp": 2,
                "max_model_len": 256,
                "max_running": 8,
                "kv_cache_bytes": 64 << 20,
                "replica_cpus": 0.5,
            }
        ),
        name=APP,
        route_prefix="/",
    )
    try:
        yield
    finally:
        serve.delete(APP)


def complete(prompt: list[int], max_tokens: int = 12) -> httpx.Response:
    return httpx.post(
        f"{BASE_URL}/v1/completions",
        timeout=120,
        json={
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
    )


def rank_actors() -> list[str]:
    """Names of the live rank actors (named actors are listed by the GCS: no dashboard needed)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"]
        for a in named
        if a["namespace"] == RANK_NAMESPACE and a["name"].startswith("vattn-rank")
    )


def test_two_replicas_of_tp_2_answer_like_the_offline_engine(tp_app: None, model_dir: Path) -> None:
    expected = LLM(str(model_dir), max_model_len=256, kv_cache_bytes=64 << 20).generate(
        PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    seen = set()
    for _ in range(3):
        for prompt, want in zip(PROMPTS, expected):
            response = complete(prompt)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 12
            seen.add(response.headers["x-vattn-replica"])
    assert len(rank_actors()) == 2  # one rank actor (rank 1) per replica
    # The tokens themselves (the tiny model has no tokenizer): through the replica's handle.
    handle = serve.get_deployment_handle("VattnReplica", app_name=APP)
    from cluster.protocol import GenerateRequest

    # Every rank's cache is on /metrics under its replica: ranks 0 and 1 of both replicas.
    def pages_created_lines() -> list[str]:
        text = httpx.get(f"{BASE_URL}/metrics", timeout=10).text
        return [line for line in text.splitlines() if line.startswith("vattn_kv_pages_created{")]

    wait_until(
        lambda: (
            [sum(f'rank="{rank}"' in line for line in pages_created_lines()) for rank in (0, 1)]
            == [2, 2]
        ),
        20,
        "ranks 0 and 1 of both replicas on /metrics",
    )
    for i, (prompt, want) in enumerate(zip(PROMPTS, expected)):
        request = GenerateRequest(
            f"tp-check-{i}",
            tuple(prompt),
            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        )
        tokens = [
            t for out in handle.options(stream=True).generate.remote(request) for t in out.token_ids
        ]
        assert tokens == list(want.token_ids)


def holding(count: int) -> dict[str, int] | None:
    """Each replica's load, once both hold some of the ``count`` requests and together all."""
    loads = replica_loads(APP, 2)
    return loads if sum(loads.values()) == count and min(loads.values()) >= 1 else None


def test_a_killed_rank_fails_its_replicas_in_flight_requests_and_serve_replaces_the_replica(
    tp_app: None,
) -> None:
    before, replicas_before = set(rank_actors()), replica_actors(APP)
    assert len(before) == 2 and len(replicas_before) == 2
    # In flight on both replicas (the killed rank's replica is known only once Serve replaces it).
    requests = streaming_in_flight([60, 61, 62], MAX_TOKENS, STREAMS, WHOLE)
    streams = requests[:STREAMS]
    loads = wait_until(
        lambda: holding(len(requests)),
        60,
        f"both replicas to hold some of the {len(requests)} requests",
    )
    assert not any(r.ended.is_set() for r in requests), (
        "a request ended before the kill: nothing was tested"
    )
    ray.kill(ray.get_actor(min(before), namespace=RANK_NAMESPACE), no_restart=True)

    for request in requests:
        request.join(timeout=HANG_S * 3)
    assert not any(r.is_alive() for r in requests), "a request hung after the kill"
    # New requests keep being answered: the broken replica fails them (503, a clear error) until
    # Serve replaces it; the healthy one and the replacement answer.
    statuses: list[int] = []

    def replaced_and_answering() -> bool:
        response = complete(PROMPTS[0], 4)
        statuses.append(response.status_code)
        if response.status_code != 200:
            assert response.status_code == 503, response.text
            assert "unavailable" in response.json()["error"]["message"], response.text
        return bool(set(rank_actors()) - before) and statuses[-5:] == [200] * 5

    wait_until(
        replaced_and_answering, 90, "Serve to replace the replica with the dead rank", interval=0.3
    )
    gone = wait_until(
        lambda: set(replicas_before) - set(replica_actors(APP)), 60, "the broken replica to go"
    )
    [broken] = gone
    failed = [r for r in requests if not r.completed()]
    assert len(failed) == loads[broken] >= 1, (loads, broken, [r.describe() for r in requests])
    # Exactly the broken replica's streams failed (a stream names its replica; an error body none).
    assert [s for s in streams if s.replica == broken] == [s for s in failed if s.stream], broken
    for request in failed:  # the step that met the dead rank failed the replica's every request
        assert request.failure is None, request.describe()
        if request.stream:
            assert request.status == 200 and request.chunks >= 1, request.describe()
            assert request.done and request.after_done == 0 and request.finish_reason is None, (
                request.describe()
            )
            error = request.error
        else:  # what the ingress answers for a request its replica failed (not the generic 500)
            assert request.status == 500, request.describe()
            error = request.body["error"]
        assert error is not None and error["type"] == "server_error", request.describe()
        assert error["message"].startswith("generation failed") and "rank" in error["message"], (
            request.describe()
        )
