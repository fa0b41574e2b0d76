"""Faults on a live cluster: a whole replica is killed in the middle of load. In-flight requests
on it fail with a clear error (no retry: generation is not idempotent for sampled requests),
the router stops choosing it, Serve brings a new one up, new requests succeed, and the new
replica's allocator starts clean. (Killing a tensor-parallel rank actor: test_serve_tp.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import ray
from ray import serve

from cluster.app import build_app
from tests.cluster.conftest import BASE_URL
from tests.models import save_random_llama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_replicas(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    path = save_random_llama(tmp_path_factory.mktemp("fault-model"), 5, vocab_size=512, hidden_size=256,
                             intermediate_size=512, num_hidden_layers=4, max_position_embeddings=2048)
    serve.run(build_app({"model": str(path), "replicas": 2, "max_model_len": 1024, "max_running": 16,
                         "kv_cache_bytes": 64 << 20, "replica_cpus": 0.5, "routing_stats_period_s": 0.2}),
              name="faults", route_prefix="/")
    try:
        yield
    finally:
        serve.delete("faults")


def complete(max_tokens: int, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{BASE_URL}/v1/completions", timeout=timeout, json={
        "prompt": [7, 8, 9, 10], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


def replica_actors() -> dict[str, str]:
    """Serve replica id -> actor name, for the VattnReplica deployment of the app."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"].split("#")[-1]: a["name"] for a in named
            if a["namespace"] == "serve" and "faults#VattnReplica#" in a["name"]}


def test_a_killed_replica_fails_in_flight_requests_and_is_replaced(two_replicas: None) -> None:
    before = replica_actors()
    assert len(before) == 2
    results: list[httpx.Response | Exception] = []

    def load() -> None:
        for _ in range(6):
            try:
                results.append(complete(600))
            except httpx.HTTPError as error:
                results.append(error)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(2.0)
    victim_id = min(before)
    ray.kill(ray.get_actor(before[victim_id], namespace="serve"), no_restart=True)
    for worker in workers:
        worker.join(timeout=240)
    failed = [r for r in results if not (isinstance(r, httpx.Response) and r.status_code == 200)]
    for response in failed:  # a clear error, never a hang or a malformed body
        assert isinstance(response, httpx.Response), response
        assert response.status_code in (500, 503), response.text
        assert response.json()["error"]["message"]
    # Serve replaces the dead replica; afterwards every request succeeds and none goes to the dead one.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (victim_id in replica_actors() or len(replica_actors()) < 2):
        time.sleep(1)
    after = replica_actors()
    assert victim_id not in after and len(after) == 2
    served = []
    for _ in range(10):
        response = complete(8)
        assert response.status_code == 200, response.text
        served.append(response.headers["x-vattn-replica"])
    assert victim_id not in served
    handle = serve.get_deployment_handle("VattnReplica", app_name="faults")
    fresh = next(iter(set(after) - set(before)))
    stats = {}
    for _ in range(40):  # the handle routes to either replica: ask until the new one answers
        info = handle.stats_dict.remote().result()
        stats[info["replica"]] = info
        if fresh in stats:
            break
    kv = stats[fresh]["kv"]
    assert kv["slots_running"] == 0 and kv["pages_free"] + kv["pages_cached"] + kv["pages_in_use"] == kv["pages_created"]
