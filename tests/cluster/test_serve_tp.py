"""Tensor-parallel replicas on a live cluster: 2 Serve replicas x tp 2 (gloo), each rank > 0 a
Ray actor in its replica's placement group; answers equal the offline engine's; killing a rank
actor fails its replica's requests cleanly and Serve replaces the replica."""

from __future__ import annotations

import time
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
from tests.models import save_random_llama

pytestmark = pytest.mark.integration
PROMPTS = [[5, 17, 33, 8], [9, 9, 9, 40, 41, 42, 43], [60, 61, 62]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_llama(tmp_path_factory.mktemp("tp-model"), 3, vocab_size=256, hidden_size=128,
                             intermediate_size=256)


@pytest.fixture(scope="module")
def tp_app(ray_session: None, model_dir: Path) -> Iterator[None]:
    serve.run(build_app({"model": str(model_dir), "replicas": 2, "tp": 2, "max_model_len": 256,
                         "max_running": 8, "kv_cache_bytes": 64 << 20, "replica_cpus": 0.5}),
              name="tp", route_prefix="/")
    try:
        yield
    finally:
        serve.delete("tp")


def complete(prompt: list[int], max_tokens: int = 12) -> httpx.Response:
    return httpx.post(f"{BASE_URL}/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
    })


def rank_actors() -> list[str]:
    """Names of the live rank actors (named actors are listed by the GCS: no dashboard needed)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == RANK_NAMESPACE and a["name"].startswith("vattn-rank"))


def test_two_replicas_of_tp_2_answer_like_the_offline_engine(tp_app: None, model_dir: Path) -> None:
    expected = LLM(str(model_dir), max_model_len=256, kv_cache_bytes=64 << 20).generate(
        PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    seen = set()
    for _ in range(3):
        for prompt, want in zip(PROMPTS, expected):
            response = complete(prompt)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 12
            seen.add(response.headers["x-vattn-replica"])
    assert len(rank_actors()) == 2  # one rank actor (rank 1) per replica
    # The tokens themselves (the tiny model has no tokenizer): through the replica's handle.
    handle = serve.get_deployment_handle("VattnReplica", app_name="tp")
    from cluster.protocol import GenerateRequest

    # Every rank's cache is on /metrics under its replica: ranks 0 and 1 of both replicas.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = [l for l in httpx.get(f"{BASE_URL}/metrics").text.splitlines() if l.startswith("vattn_kv_pages_created{")]
        if sum('rank="1"' in l for l in lines) == 2 and sum('rank="0"' in l for l in lines) == 2:
            break
        time.sleep(0.5)
    assert sum('rank="1"' in l for l in lines) == 2, lines
    for i, (prompt, want) in enumerate(zip(PROMPTS, expected)):
        request = GenerateRequest(f"tp-check-{i}", tuple(prompt), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        tokens = [t for out in handle.options(stream=True).generate.remote(request) for t in out.token_ids]
        assert tokens == list(want.token_ids)


def test_a_killed_rank_fails_its_requests_and_serve_replaces_the_replica(tp_app: None) -> None:
    before = set(rank_actors())
    assert len(before) == 2
    ray.kill(ray.get_actor(min(before), namespace=RANK_NAMESPACE), no_restart=True)
    # Requests keep being answered: the broken replica fails (500 with a clear error) until Serve
    # replaces it; the healthy one and the replacement answer.
    statuses = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        response = complete(PROMPTS[0], 4)
        statuses.append(response.status_code)
        if response.status_code != 200:
            assert "generation failed" in response.json()["error"]["message"] or response.status_code == 503
        if len(set(rank_actors()) - before) >= 1 and statuses[-5:] == [200] * 5:
            break
        time.sleep(0.3)
    assert set(rank_actors()) - before, "Serve did not replace the replica with the dead rank"
    assert statuses[-5:] == [200] * 5
