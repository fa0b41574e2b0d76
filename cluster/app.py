"""The Serve application: ``serve run cluster.app:app`` (the embedded model, defaults) or
``serve run cluster.app:build_app model=/path/to/hf-dir tp=2 replicas=2``, and ``serve deploy``
with a config whose ``import_path`` is ``cluster.app:build_app`` (args under ``args``)."""

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.ingress import VattnIngress
from cluster.replica_deployment import VattnReplica
from cluster.router import router_config
from cluster.routing import ROUTERS
from replica.engine_config import EngineConfig


class AppOptions(BaseModel):
    """The application's arguments. Serve validates ``key=value`` strings (``serve run``) and a
    config's ``args`` against this model and hands ``build_app`` the result; unknown keys and
    values of the wrong type are refused with a ``pydantic.ValidationError``."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    model: str = "embedded"
    tp: int = 1
    replicas: int = 1
    backend: str = "auto"
    kv_layout: str = "interleaved"
    device: str = "auto"  # "auto": GPUs when the cluster has them
    max_model_len: int = 4096
    max_running: int | None = None  # None: 256 slots on a GPU, 64 on a CPU (EngineConfig)
    kv_cache_bytes: int | None = None
    page_size: int | None = None
    #: The share of running requests' remaining max_tokens that admission keeps pages for at
    #: first (EngineConfig.growth_reserve; 0: whole prompts only).
    growth_reserve: float = 0.5
    api_key: str | None = None
    routing_stats_period_s: float = 0.5
    #: How long a request no replica has free KV pages for may wait at the free-page router
    #: (0: not at all, it goes to the replica with the most headroom; ``cluster.router``).
    router_hold_s: float = 0.0
    metrics_period_s: float = 1.0  # how often each replica pushes its metrics to the hub
    replica_cpus: float = 1.0
    #: "free-pages": vattn's FreePageRouter (cluster.router); "power-of-two": Serve's default
    #: PowerOfTwoChoicesRequestRouter (for comparison: benchmarks.bench_router).
    router: str = "free-pages"

    @field_validator("router")
    @classmethod
    def _known_router(cls, router: str) -> str:
        if router not in ROUTERS:
            known = ", ".join(ROUTERS)
            raise ValueError(f"AppOptions.router must be one of {known}; got {router!r}")
        return router

    def uses_gpu(self) -> bool:
        if self.device == "cpu":
            return False
        if self.device.startswith("cuda"):
            return True
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0

    def engine_config(self) -> dict[str, Any]:
        config = EngineConfig(
            model=self.model,
            attention=self.backend,
            kv_layout=self.kv_layout,
            device="cuda" if self.uses_gpu() else "cpu",
            max_model_len=self.max_model_len,
            max_running=self.max_running,
            kv_cache_bytes=self.kv_cache_bytes,
            page_size=self.page_size,
            growth_reserve=self.growth_reserve,
            tensor_parallel_size=self.tp,
        )
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}

    def request_router_config(self) -> RequestRouterConfig:
        if self.router == "power-of-two":
            return RequestRouterConfig()  # Serve's default class and stats period
        return router_config(self.routing_stats_period_s, hold_s=self.router_hold_s)


def build_app(args: AppOptions) -> Application:
    # Serve validates its args against this annotation and passes an AppOptions (so this module
    # must not use ``from __future__ import annotations``: Serve would see a string); a dict from
    # Python callers is validated here the same way.
    options = AppOptions.model_validate(args)
    gpu = options.uses_gpu()
    rank0 = {"CPU": options.replica_cpus, "GPU": 1} if gpu else {"CPU": options.replica_cpus}
    rank = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
    tp_options: dict[str, Any] = {}
    if options.tp > 1:  # one bundle per rank, on one node: bundle 0 is this replica (rank 0)
        tp_options = {
            "placement_group_bundles": [rank0] + [rank] * (options.tp - 1),
            "placement_group_strategy": "STRICT_PACK",
            "health_check_period_s": 2,
        }
    deployment = VattnReplica.options(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": 1 if gpu else 0},
        request_router_config=options.request_router_config(),
        **tp_options,
    )
    replica = deployment.bind(options.engine_config(), options.metrics_period_s)
    ingress = VattnIngress.options(ray_actor_options={"num_cpus": 0.1})
    return ingress.bind(replica, options.model, options.api_key)


app = build_app(AppOptions())
