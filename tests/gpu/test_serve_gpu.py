"""Ray Serve on the GPU machine: one replica serving a Llama-3-8B-shaped model (synthetic bf16
weights) with the FlashInfer backend, a completion through HTTP; and, with two GPUs, one replica
of tp 2 (NCCL) whose rank 1 is a Ray actor in the replica's placement group. The replica's host
tier is on by default, sized by its share of the node's GPUs (one GPU per rank)."""

from __future__ import annotations

import os

import pytest
import torch

from replica.engine_config import HOST_TIER_MAX_BYTES, HOST_TIER_SHARE, host_memory_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

PORT = 8000


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ray.init(num_gpus=torch.cuda.device_count(), num_cpus=8, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(prompt: list[int], max_tokens: int) -> dict:
    response = httpx.post(
        f"http://127.0.0.1:{PORT}/v1/completions",
        timeout=300,
        json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("tp", [1, 2])
def test_serve_a_llama3_8b_shaped_model(cluster: None, tp: int) -> None:
    if torch.cuda.device_count() < tp:
        pytest.skip(f"tp {tp} needs {tp} GPUs; this machine has {torch.cuda.device_count()}")
    from cluster.app import build_app

    app = build_app(
        {
            "model": "synthetic",
            "device": "cuda",
            "backend": "flashinfer",
            "tp": tp,
            "max_model_len": 1024,
            "max_running": 16,
            "replica_cpus": 1,
        }
    )
    # The replica's host tier: a quarter of the host memory it may use times its share of the
    # node (one GPU of the node's), at most the cap. Read before it starts: the replica reads it
    # after its own process and model took some (within 25% below), nothing frees any between.
    share = HOST_TIER_SHARE * host_memory_bytes() / torch.cuda.device_count()
    expected = min(int(share), HOST_TIER_MAX_BYTES)
    serve.run(app, name=f"gpu-tp{tp}", route_prefix="/")
    try:
        body = complete(list(range(1000, 1100)), 16)
        print(f"tp={tp}:", body["usage"], body["choices"][0]["finish_reason"])
        assert body["usage"] == {
            "prompt_tokens": 100,
            "completion_tokens": 16,
            "total_tokens": 116,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        assert body["choices"][0]["finish_reason"] == "length"
        replica = serve.get_deployment_handle("VattnReplica", app_name=f"gpu-tp{tp}")
        tier = replica.stats_dict.remote().result()["kv"]["host_tier_bytes"]
        assert 0.75 * expected <= tier <= 1.05 * expected, (tier, expected)
    finally:
        serve.delete(f"gpu-tp{tp}")
