"""``cluster.node_share.ray_gpu_share`` on a live Ray: a fractional GPU, a placement group bundle's
GPU (Ray names it ``GPU_group_...``) and no GPU, on a node that declares 8 GPUs (Ray schedules
declared GPUs without any being there). Its own Ray in a subprocess: the session's has no GPUs,
and declaring some there would move the other tests' apps to device cuda."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.node_share import ray_gpu_share

ray.init(address="local", num_cpus=2, num_gpus=8, include_dashboard=False, log_to_driver=False)


@ray.remote(num_cpus=0)
class Probe:
    def share(self):
        return ray_gpu_share()


group = placement_group([{"CPU": 0.1, "GPU": 1}, {"GPU": 1}], strategy="STRICT_PACK")
ray.get(group.ready())
in_bundle = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=1)
probes = [
    Probe.options(num_gpus=0.5).remote(),
    Probe.options(num_gpus=1, scheduling_strategy=in_bundle).remote(),
    Probe.remote(),
]
print(json.dumps(ray.get([probe.share.remote() for probe in probes])))
ray.shutdown()
"""


def test_a_ray_workers_share_is_its_gpus_over_its_nodes() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    shares = json.loads(result.stdout.strip().splitlines()[-1])
    assert shares == [0.5 / 8, 1 / 8, None]
