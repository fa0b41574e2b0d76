"""The Serve application: ``serve run cluster.app:app`` (the embedded model, defaults) or
``serve run cluster.app:build_app model=/path/to/hf-dir tp=2 replicas=2`` (or ``min_replicas=1
max_replicas=3``: autoscaling on KV pressure), and ``serve deploy`` with a config whose
``import_path`` is ``cluster.app:build_app`` (args under ``args``)."""

import dataclasses
import warnings
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import LoggingConfig

from cluster import autoscaler
from cluster.autoscaling import ScalingRule
from cluster.ingress import VattnIngress
from cluster.protocol import served_model_name
from cluster.replica_deployment import VattnReplica
from cluster.router import router_config
from cluster.routing import ROUTERS
from replica.engine_config import EngineConfig
from replica.options import declared_options, option_values


def engine_options_model(declaration: type) -> type[BaseModel]:
    """A pydantic model of ``declaration``'s options (replica.options): one field each, named as
    users write it (``backend``, ``tp``), with the declared type, default and help."""
    fields: dict[str, Any] = {
        spec.name: (spec.annotation, Field(spec.default, description=spec.help))
        for spec in declared_options(declaration)
    }
    name = declaration.__name__.removesuffix("Config") + "Options"  # EngineConfig: EngineOptions
    return create_model(name, **fields)


#: The engine's options as app args, derived from their one declaration (EngineConfig).
EngineOptions = engine_options_model(EngineConfig)


#: ``AppOptions.log_level``'s values.
LOG_LEVELS = ("debug", "info", "warning", "error")


class AppOptions(EngineOptions):  # type: ignore[misc, valid-type]
    """The application's arguments: the engine's options (``EngineOptions``, derived from
    ``EngineConfig``: ``model``, ``tp``, ``backend``, ``kv_layout``, ``max_running`` ...) and the
    deployment's, below. Serve validates ``key=value`` strings (``serve run``) and a config's
    ``args`` against this model and hands ``build_app`` the result; unknown keys, values of the
    wrong type and engine options the engine refuses are refused with a
    ``pydantic.ValidationError``."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)
    #: The declaration the engine's options come from (a test derives these from a copy).
    engine_declaration: ClassVar[type] = EngineConfig

    #: A fixed number of replicas; with ``max_replicas`` set, the number to start with (default:
    #: ``min_replicas``).
    replicas: int = 1
    #: Autoscaling (``cluster.autoscaling``) between these bounds, on when ``max_replicas`` is set.
    min_replicas: int | None = None  # default 1
    max_replicas: int | None = None
    #: "kv-pressure": vattn's policy on the replicas' KV demand and queues; "ongoing-requests":
    #: Serve's default policy (for comparison: benchmarks.bench_autoscaling).
    autoscaler: str = "kv-pressure"
    #: Scale up when the replicas' expected KV demand exceeds this share of their pages ...
    target_kv_utilization: float = 0.8
    #: ... and down (straight to the replicas that hold it under this share) once it would fit.
    downscale_kv_utilization: float = 0.5
    max_waiting_per_replica: float = 8.0  # scale up too when queues are longer than this
    target_ongoing_requests: float = 2.0  # the ongoing-requests policy's target per replica
    autoscaling_metrics_interval_s: float = 1.0  # replicas push their autoscaling stats this often
    upscale_delay_s: float = 2.0  # a scale-up decision must last this long to be applied
    downscale_delay_s: float = 60.0  # a scale-down decision must last this long
    #: How long a stopping replica (scale-down, redeploy) may take to finish its requests: sized for
    #: a long generation (a 4K-token answer at 10 tokens/s takes 410 s).
    graceful_shutdown_timeout_s: float = 600.0
    api_key: str | None = None
    routing_stats_period_s: float = 0.5
    #: How long a request no replica has free KV pages for may wait at the free-page router
    #: (0: not at all, it goes to the replica with the most headroom; ``cluster.router``).
    router_hold_s: float = 0.0
    metrics_period_s: float = 1.0  # how often each replica pushes its metrics to the hub
    replica_cpus: float = 1.0
    #: GPUs per replica of tp 1: a fraction shares a GPU between replicas (each with its own KV
    #: budget: set kv_cache_bytes), e.g. 0.33 for three (benchmarks.bench_autoscaling --gpu).
    replica_gpus: float = 1.0
    #: "free-pages": vattn's FreePageRouter (cluster.router); for comparison
    #: (benchmarks.bench_router): "power-of-two", Serve's default PowerOfTwoChoicesRequestRouter;
    #: "headroom-only", the FreePageRouter ignoring prefixes; "prefix-affinity", Ray Serve LLM's
    #: PrefixCacheAffinityRouter (cluster.affinity_router).
    router: str = "free-pages"
    #: The deployments' log level (``LOG_LEVELS``); at "debug" Serve also logs every request (its
    #: access log, two lines a request: the ingress's and the replica's), off otherwise.
    log_level: str = "info"

    @field_validator("router")
    @classmethod
    def _known_router(cls, router: str) -> str:
        if router not in ROUTERS:
            known = ", ".join(ROUTERS)
            raise ValueError(f"AppOptions.router must be one of {known}; got {router!r}")
        return router

    @field_validator("autoscaler")
    @classmethod
    def _known_autoscaler(cls, policy: str) -> str:
        if policy not in autoscaler.AUTOSCALERS:
            known = ", ".join(autoscaler.AUTOSCALERS)
            raise ValueError(f"AppOptions.autoscaler must be one of {known}; got {policy!r}")
        return policy

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, level: str) -> str:
        if level.lower() not in LOG_LEVELS:
            known = ", ".join(LOG_LEVELS)
            raise ValueError(f"AppOptions.log_level must be one of {known}; got {level!r}")
        return level.lower()

    @model_validator(mode="after")
    def _engine_accepts(self) -> "AppOptions":
        self.engine_declaration(**option_values(self, self.engine_declaration))  # or ValueError
        return self

    @model_validator(mode="after")
    def _replica_bounds(self) -> "AppOptions":
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("AppOptions.min_replicas needs max_replicas (autoscaling bounds)")
        if self.max_replicas is not None:
            self.scaling_rule()  # checks the bounds and utilisations
            low, high = self.min_replicas or 1, self.max_replicas
            if "replicas" in self.model_fields_set and not low <= self.replicas <= high:
                raise ValueError(
                    f"AppOptions.replicas (the initial count when autoscaling) must lie within "
                    f"min_replicas {low} and max_replicas {high}; got {self.replicas}"
                )
        elif self.replicas < 1:
            raise ValueError(f"AppOptions.replicas must be >= 1; got {self.replicas}")
        return self

    def autoscales(self) -> bool:
        return self.max_replicas is not None

    def scaling_rule(self) -> ScalingRule:
        """The KV-pressure policy's rule with these bounds (raises ValueError when invalid)."""
        return ScalingRule(
            min_replicas=1 if self.min_replicas is None else self.min_replicas,
            max_replicas=self.replicas if self.max_replicas is None else self.max_replicas,
            target_utilization=self.target_kv_utilization,
            downscale_utilization=self.downscale_kv_utilization,
            max_waiting_per_replica=self.max_waiting_per_replica,
        )

    def initial_replicas(self) -> int:
        if not self.autoscales() or "replicas" in self.model_fields_set:
            return self.replicas
        return self.scaling_rule().min_replicas

    def replica_count_options(self) -> dict[str, Any]:
        """``num_replicas``, or the ``autoscaling_config`` (Serve refuses both)."""
        if not self.autoscales():
            return {"num_replicas": self.replicas}
        rule = self.scaling_rule()
        policy_kwargs = {
            "model": served_model_name(self.model),
            "target_utilization": rule.target_utilization,
            "downscale_utilization": rule.downscale_utilization,
            "max_waiting_per_replica": rule.max_waiting_per_replica,
            "max_age_s": max(4 * self.autoscaling_metrics_interval_s, 2.0),
        }
        config = autoscaler.autoscaling_config(
            rule.min_replicas,
            rule.max_replicas,
            self.initial_replicas(),
            policy=self.autoscaler,
            metrics_interval_s=self.autoscaling_metrics_interval_s,
            upscale_delay_s=self.upscale_delay_s,
            downscale_delay_s=self.downscale_delay_s,
            policy_kwargs=policy_kwargs,
            target_ongoing_requests=self.target_ongoing_requests,
        )
        return {"autoscaling_config": config}

    def uses_gpu(self) -> bool:
        if self.device == "cpu":
            return False
        if self.device.startswith("cuda"):
            return True
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0

    def engine_config(self) -> dict[str, Any]:
        """The replica's engine config (as a dict: Serve passes it to the deployment)."""
        values = option_values(self, self.engine_declaration)
        values["device"] = "cuda" if self.uses_gpu() else "cpu"
        config = self.engine_declaration(**values)
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}

    def logging_config(self) -> LoggingConfig:
        """Serve's logging of both deployments: quiet by default (no line per request)."""
        return LoggingConfig(
            log_level=self.log_level.upper(), enable_access_log=self.log_level == "debug"
        )

    def request_router_config(self) -> RequestRouterConfig:
        if self.router == "power-of-two":
            return RequestRouterConfig()  # Serve's default class and stats period
        if self.router == "prefix-affinity":
            from cluster.affinity_router import affinity_router_config

            return affinity_router_config()
        return router_config(
            self.routing_stats_period_s,
            hold_s=self.router_hold_s,
            prefix=self.router != "headroom-only",
        )


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
    with warnings.catch_warnings():
        # NOTE: Ray 2.60 reads the push interval from the deprecated metrics_interval_s (the
        # environment variables its warning names are not read yet: cluster.autoscaler).
        warnings.filterwarnings("ignore", "The `metrics_interval_s` field", DeprecationWarning)
        deployment = VattnReplica.options(
            ray_actor_options={
                "num_cpus": options.replica_cpus,
                "num_gpus": (options.replica_gpus if options.tp == 1 else 1) if gpu else 0,
            },
            request_router_config=options.request_router_config(),
            # A stopping replica gets no new requests and finishes the ones it has.
            graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
            graceful_shutdown_wait_loop_s=1.0,
            logging_config=options.logging_config(),
            **options.replica_count_options(),
            **tp_options,
        )
    replica = deployment.bind(options.engine_config(), options.metrics_period_s)
    ingress = VattnIngress.options(
        ray_actor_options={"num_cpus": 0.1}, logging_config=options.logging_config()
    )
    return ingress.bind(replica, options.model, options.api_key)


app = build_app(AppOptions())
