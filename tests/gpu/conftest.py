"""The GPU tests' engines get a small host tier.

The host KV tier is on by default on a GPU (``EngineConfig.kv_offload_bytes`` None), pinned when
the engine starts: alone on a 128 GiB GPU machine, ~30 GiB and ~3 s per engine, for about 70
engines in this folder, each freed only once collected. So every test here runs with the default's
cap (``HOST_TIER_MAX_BYTES``) lowered to 1 GiB: the engines still take the default's path (tier
on, sized by the process's share of the node) at the cost of a GiB each, and a tensor-parallel
replica's ranks get the size rank 0 resolved here (``replica.tp.driver``). ``real_host_tier``
restores the real cap for the test of the true default (test_engine_gpu.py). Serve replicas
(test_serve_gpu.py) run in Ray's processes, out of this reach: they take the real default.
"""

from __future__ import annotations

import pytest

from replica import engine_config

#: The default tier's cap for this folder's engines.
TEST_HOST_TIER_MAX_BYTES = 1 << 30
#: The real cap, as the engine declares it.
REAL_HOST_TIER_MAX_BYTES = engine_config.HOST_TIER_MAX_BYTES


@pytest.fixture(autouse=True)
def small_host_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_config, "HOST_TIER_MAX_BYTES", TEST_HOST_TIER_MAX_BYTES)


@pytest.fixture
def real_host_tier(small_host_tier: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own cap, for a test that checks the true default."""
    monkeypatch.setattr(engine_config, "HOST_TIER_MAX_BYTES", REAL_HOST_TIER_MAX_BYTES)
