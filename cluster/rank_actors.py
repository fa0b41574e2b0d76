"""The other ranks of a tensor-parallel Serve replica, as Ray actors in the replica's placement
group: bundle 0 holds the Serve replica (rank 0, which schedules), bundle r holds rank r's actor.

Implements ``replica.tp.runtime.RankRuntime``: the engine only broadcasts step messages and
collects one status per rank; a rank actor that dies or does not answer in time becomes a BROKEN
status, so the replica fails its requests and reports itself unhealthy instead of hanging.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.metrics.snapshots import ReplicaSnapshot, rank_snapshot
from cluster.metrics_hub import MetricsPusher
from replica.engine_config import EngineConfig
from replica.tp.plan import RankStatus, Shutdown, StatusCode, StepMessage
from replica.tp.runtime import RankRuntime, free_port
from replica.tp.worker import RankWorker

log = logging.getLogger(__name__)

#: NVLink multicast stays off (it can take a shared host's GPUs out of service).
RANK_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


#: Rank actors are named in this namespace (operators and tests find them with ``ray list actors``).
RANK_NAMESPACE = "vattn"


@ray.remote(max_restarts=0)
class RankActor:
    """Hosts one ``RankWorker``; constructing it joins torch.distributed and loads the shard."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        address: str,
        port: int,
        config: EngineConfig,
        metrics: tuple[str, str, float] | None = None,
    ) -> None:
        self.rank = rank
        self.error: str | None = None
        self.lock = threading.Lock()  # the metrics thread reads the cache between steps only
        self.pusher: MetricsPusher | None = None
        try:
            self.worker: RankWorker | None = RankWorker(rank, world_size, address, port, config)
        except Exception as error:  # noqa: BLE001 - any load failure is reported through ready()
            self.worker, self.error = None, f"{type(error).__name__}: {error}"
            return
        if metrics is not None:  # this rank's own KV cache, under the replica's labels
            model, replica, period_s = metrics
            self.pusher = MetricsPusher(lambda: self._snapshot(model, replica), period_s)
            self.pusher.start()

    def _snapshot(self, model: str, replica: str) -> ReplicaSnapshot:
        assert self.worker is not None
        with self.lock:
            return ReplicaSnapshot(
                model, replica, None, (rank_snapshot(self.worker.kv_snapshot()),)
            )

    def ready(self) -> RankStatus:
        if self.worker is None:
            return RankStatus(self.rank, -1, StatusCode.BROKEN, 0, self.error)
        return self.worker.ready()

    def execute(self, message: StepMessage) -> RankStatus:
        assert self.worker is not None
        with self.lock:
            return self.worker.execute(message)

    def shutdown(self) -> None:
        if self.pusher is not None:
            self.pusher.stop()
        if self.worker is not None:
            self.worker.shutdown()


class RayRankRuntime(RankRuntime):
    def __init__(
        self,
        gpus_per_rank: float = 0.0,
        cpus_per_rank: float = 1.0,
        metrics: tuple[str, str, float] | None = None,
    ) -> None:
        self.gpus_per_rank, self.cpus_per_rank, self.metrics = gpus_per_rank, cpus_per_rank, metrics
        self.actors: list[Any] = []
        self.pending: list[Any] = []
        self.stopped = False

    def start(self, world_size: int, engine_config: EngineConfig) -> tuple[str, int]:
        address = ray.util.get_node_ip_address()
        port = free_port(address)
        group = ray.util.get_current_placement_group()
        for rank in range(1, world_size):
            strategy = (
                PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
                if group
                else None
            )
            actor = RankActor.options(
                name=f"vattn-rank{rank}-{secrets.token_hex(4)}",
                namespace=RANK_NAMESPACE,
                num_cpus=self.cpus_per_rank,
                num_gpus=self.gpus_per_rank,
                scheduling_strategy=strategy,
                runtime_env={"env_vars": RANK_ENV},
            ).remote(rank, world_size, address, port, engine_config, self.metrics)
            self.actors.append(actor)
        self.pending = [actor.ready.remote() for actor in self.actors]
        return address, port

    def broadcast(self, message: StepMessage) -> None:
        self.pending = [actor.execute.remote(message) for actor in self.actors]

    def collect(self, timeout_s: float) -> list[RankStatus]:
        deadline = time.monotonic() + timeout_s
        statuses = []
        for rank, ref in enumerate(self.pending, start=1):
            try:
                statuses.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 0.01)))
            except GetTimeoutError:
                statuses.append(
                    RankStatus(
                        rank,
                        -2,
                        StatusCode.BROKEN,
                        0,
                        f"rank {rank} did not answer in {timeout_s:.0f} s",
                    )
                )
            except (RayActorError, RayTaskError) as error:
                statuses.append(
                    RankStatus(rank, -2, StatusCode.BROKEN, 0, f"rank {rank} is gone: {error}")
                )
        self.pending = []
        return statuses

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            for actor in self.actors:
                actor.shutdown.remote()

    def shutdown(self) -> None:
        self.stop()
        time.sleep(0.5)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


__all__ = ["RankActor", "RayRankRuntime", "Shutdown"]
