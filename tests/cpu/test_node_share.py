"""The host tier's per-node share: a process's share of its node is the fraction of the node's GPUs
Ray assigned it (``cluster.node_share``, from injected resource dicts here; on a live Ray in
tests/cluster/test_node_share_live.py), and a tensor-parallel replica's ranks are all handed the
tier size rank 0 resolved (``replica.tp.driver``). No Ray cluster, no model."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.node_share import gpu_share
from replica import engine_config
from replica.engine_config import EngineConfig
from replica.model import ModelConfig
from replica.tp.driver import TensorParallelDriver
from replica.tp.plan import RankStatus, StepMessage
from replica.tp.runtime import RankRuntime

GIB = 1 << 30
NODE_8 = {"CPU": 128.0, "GPU": 8.0, "memory": 1e12}


@pytest.mark.parametrize(
    ("assigned", "node", "share"),
    [
        ({"CPU": 1.0, "GPU": 1.0}, NODE_8, 1 / 8),  # a TP rank actor (or a tp 1 replica)
        ({"CPU": 2.0, "GPU": 0.25}, NODE_8, 0.25 / 8),  # a quarter of one GPU of 8
        ({"GPU": 0.33}, {"GPU": 1.0}, 0.33),  # three replicas sharing a 1-GPU node
        ({"GPU": 1.0}, {"GPU": 1.0}, 1.0),
        ({"GPU": 2.0}, {"GPU": 1.0}, 1.0),  # at most the whole node
        ({"CPU": 1.0}, NODE_8, None),  # holds no GPU: the engine's default
        ({}, NODE_8, None),
        ({"GPU": 1.0}, {"CPU": 4.0}, None),  # the node's resources unknown
    ],
)
def test_a_workers_share_is_its_gpus_over_the_nodes(
    assigned: dict[str, float], node: dict[str, float], share: float | None
) -> None:
    assert gpu_share(assigned, node) == share


def test_the_rank_actors_share_sizes_the_tier_as_an_eighth_of_a_quarter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight TP ranks of one GPU each on an 8-GPU node pin a quarter of its memory together."""
    monkeypatch.setattr(engine_config, "host_memory_bytes", lambda: 512 * GIB)
    share = gpu_share({"GPU": 1.0}, NODE_8)
    rank = EngineConfig(device="cuda", tensor_parallel_size=8, node_share=share)
    assert 8 * rank.host_tier_bytes(cuda=True) == 128 * GIB == 512 * GIB // 4


class Started(Exception):
    """Raised by :class:`CapturingRuntime` once it has seen the config the ranks would get."""


class CapturingRuntime(RankRuntime):
    """Records the engine config rank 0 hands the other ranks, then stops the start."""

    def __init__(self) -> None:
        self.configs: list[EngineConfig] = []

    def start(self, world_size: int, engine_config: EngineConfig) -> tuple[str, int]:
        self.configs.append(engine_config)
        raise Started

    def broadcast(self, message: StepMessage) -> None:
        raise AssertionError("never started")

    def collect(self, timeout_s: float) -> list[RankStatus]:
        raise AssertionError("never started")

    def stop(self) -> None:
        raise AssertionError("never started")

    def shutdown(self) -> None:
        raise AssertionError("never started")


@pytest.mark.parametrize(
    ("config", "handed"),
    [
        ({"device": "cuda"}, 32 * GIB),  # outside Ray: the replica's 2 ranks share the node
        ({"device": "cuda", "node_share": 1 / 8}, 8 * GIB),  # Ray: one GPU of 8 per rank
        ({"device": "cuda", "kv_offload_bytes": 0}, 0),
        ({"device": "cuda", "kv_offload_bytes": GIB}, GIB),
        ({"device": "cpu"}, 0),
    ],
)
def test_every_rank_is_handed_rank_0s_tier_size(
    monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], handed: int
) -> None:
    """The ranks replay rank 0's allocator calls, so their tiers must be equal: rank 0 resolves
    the size once and hands it to the others, which then keep it whatever host memory they see."""
    monkeypatch.setattr(engine_config, "host_memory_bytes", lambda: 256 * GIB)
    runtime = CapturingRuntime()
    with pytest.raises(Started):
        TensorParallelDriver(
            EngineConfig(model="synthetic", tensor_parallel_size=2, **config),
            ModelConfig.tiny(),
            runtime,
        )
    [sent] = runtime.configs
    assert sent.kv_offload_bytes == handed
    monkeypatch.setattr(engine_config, "host_memory_bytes", lambda: 8 * GIB)  # less, later
    assert sent.host_tier_bytes(cuda=sent.device == "cuda") == handed
