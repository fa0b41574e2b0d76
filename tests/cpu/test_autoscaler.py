"""The KV-pressure autoscaler's Serve side without a cluster: AppOptions and ``vattn serve``'s
flags build the deployment's ``autoscaling_config`` (never beside ``num_replicas``), and the policy
class answers Ray's real ``AutoscalingContext`` through Serve's own wrapper (delays, bounds)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.app import AppOptions, build_app
from cluster.autoscaler import KVPressurePolicy, replica_loads
from cluster.autoscaling import BUDGET_PAGES, DEMAND_PAGES, WAITING, ReplicaLoad
from cluster.cli import main as vattn_main
from cluster.serve_cli import app_options


def replica_deployment(args: dict[str, Any]) -> Any:
    from ray.serve._private.build_app import build_app as serve_build

    [replica] = [
        d
        for d in serve_build(build_app(args), name="vattn").deployments
        if d.name == "VattnReplica"
    ]
    return replica._deployment_config


# ---- options --------------------------------------------------------------------------------
def test_fixed_replicas_stay_the_default() -> None:
    config = replica_deployment({"replicas": 2})
    assert config.num_replicas == 2 and config.autoscaling_config is None
    assert config.graceful_shutdown_timeout_s == AppOptions().graceful_shutdown_timeout_s


def test_bounds_build_serves_autoscaling_config_with_the_kv_policy() -> None:
    config = replica_deployment({"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 1})
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (1, 3, 1)
    assert scaling.policy.policy_function == "cluster.autoscaler:KVPressurePolicy"
    assert scaling.policy.policy_kwargs["target_utilization"] == 0.8
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (1, 60)
    assert scaling.metrics_interval_s == 1.0 < scaling.look_back_period_s
    # Serve's policy object deserializes to the class its controller instantiates.
    assert scaling.policy.get_policy().__name__ == "KVPressurePolicy"


def test_the_ongoing_requests_policy_is_serves_default() -> None:
    config = replica_deployment(
        {"max_replicas": 3, "autoscaler": "ongoing-requests", "target_ongoing_requests": 4}
    )
    scaling = config.autoscaling_config
    assert scaling.policy.is_default_policy_function()
    assert scaling.target_ongoing_requests == 4


def test_an_explicit_replicas_count_is_the_initial_one() -> None:
    options = AppOptions(replicas=2, min_replicas=1, max_replicas=3)
    assert options.initial_replicas() == 2
    assert AppOptions(min_replicas=2, max_replicas=3).initial_replicas() == 2


@pytest.mark.parametrize(
    "args, message",
    [
        ({"min_replicas": 1}, "min_replicas needs max_replicas"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas"),
        ({"max_replicas": 0}, "max_replicas >= 1"),
        ({"replicas": 5, "max_replicas": 3}, "must lie within min_replicas 1 and max_replicas 3"),
        ({"max_replicas": 2, "target_kv_utilization": 0.4}, "downscale_utilization <"),
        ({"max_replicas": 2, "autoscaler": "queue"}, "autoscaler must be one of"),
        ({"replicas": 0}, "replicas must be >= 1"),
    ],
)
def test_bad_bounds_are_refused_by_name(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AppOptions.model_validate(args)


def test_vattn_serve_autoscaling_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr("cluster.serve_cli.serve_main", lambda args: seen.append(args) or 0)
    assert vattn_main(["serve", "--min-replicas", "1", "--max-replicas", "3"]) == 0
    assert vattn_main(["serve", "--max-replicas", "2", "--autoscaler", "ongoing-requests"]) == 0
    assert vattn_main(["serve"]) == 0
    first, second, plain = (app_options(args) for args in seen)
    assert (first.min_replicas, first.max_replicas, first.autoscaler) == (1, 3, "kv-pressure")
    assert "replicas" not in first.model_fields_set  # starts at min_replicas
    assert second.autoscaler == "ongoing-requests" and second.autoscales()
    assert not plain.autoscales() and plain.replicas == 1


# ---- the policy under Serve's wrapper --------------------------------------------------------
DEPLOYMENT = DeploymentID(name="VattnReplica", app_name="vattn")


def replicas(count: int) -> list[ReplicaID]:
    return [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(count)]


def context(
    reports: dict[ReplicaID, tuple[float, float, float]],
    running: list[ReplicaID],
    target: int,
    config: AutoscalingConfig,
    now: float,
    state: dict[str, Any],
    reported_at: float | None = None,
) -> AutoscalingContext:
    at = now if reported_at is None else reported_at
    merged: dict[str, dict[ReplicaID, Any]] = {}
    for r, values in reports.items():
        for i, key in enumerate((DEMAND_PAGES, BUDGET_PAGES, WAITING)):
            merged.setdefault(key, {})[r] = [
                TimeStampedValue(at - 1, 0.0),
                TimeStampedValue(at, values[i]),
            ]
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name="vattn",
        current_num_replicas=len(running),
        target_num_replicas=target,
        running_replicas=running,
        total_num_requests=1.0,
        total_queued_requests=0.0,
        aggregated_metrics={},
        raw_metrics=merged,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


def test_the_policy_reads_the_newest_report_of_running_replicas_only() -> None:
    [one, two, gone] = replicas(3)
    raw = {
        DEMAND_PAGES: {
            one: [TimeStampedValue(10, 90.0), TimeStampedValue(9, 5.0)],
            two: [TimeStampedValue(10, 1.0)],
            gone: [TimeStampedValue(10, 50.0)],
        },
        BUDGET_PAGES: {r: [TimeStampedValue(10, 100.0)] for r in (one, two, gone)},
        WAITING: {r: [TimeStampedValue(10, 0.0)] for r in (one, two, gone)},
    }
    assert replica_loads(raw, [one, two], now=11, max_age_s=5) == [
        ReplicaLoad(90.0, 100.0, 0.0),
        ReplicaLoad(1.0, 100.0, 0.0),
    ]
    assert replica_loads(raw, [one, two], now=20, max_age_s=5) == []  # stale
    del raw[WAITING][two]
    assert len(replica_loads(raw, [one, two], now=11, max_age_s=5)) == 1  # incomplete


def test_serves_wrapper_scales_up_after_its_short_delay_and_down_after_its_long_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]  # Serve's delay logic reads the wall clock
    monkeypatch.setattr("ray.serve.autoscaling_policy.time", SimpleNamespace(time=lambda: clock[0]))

    def at(now: float, *args: Any) -> AutoscalingContext:
        clock[0] = now
        return context(*args, now, state)

    config = AutoscalingConfig(
        min_replicas=1,
        max_replicas=3,
        upscale_delay_s=2,
        downscale_delay_s=30,
        policy={"policy_function": "cluster.autoscaler:KVPressurePolicy"},
    )
    policy = _apply_autoscaling_config(KVPressurePolicy(model="m", report_period_s=1e9))
    [first] = running = replicas(1)
    state: dict[str, Any] = {}
    full = {first: (170.0, 100.0, 0.0)}  # ceil(170 / 80) = 3 replicas
    decided, state = policy(at(100.0, full, running, 1, config))
    assert decided == 1  # the scale-up must last upscale_delay_s
    decided, state = policy(at(102.0, full, running, 1, config))
    assert decided == 3
    running = replicas(3)
    idle = {r: (0.0, 100.0, 0.0) for r in running}
    decided, state = policy(at(103.0, idle, running, 3, config))
    assert decided == 3
    decided, state = policy(at(120.0, idle, running, 3, config))
    assert decided == 3
    decided, state = policy(at(133.0, idle, running, 3, config))
    assert decided == 1  # straight to the need (min here), after downscale_delay_s
    # Reports that stopped coming (older than max_age_s) say nothing: the count holds.
    clock[0] = 300.0
    stale = context(idle, running, 2, config, 300.0, state, reported_at=100.0)
    assert policy(stale)[0] == 2


def test_serve_applies_the_largest_need_of_a_downscale_streak(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serve applies the last answer once the scale-down has lasted downscale_delay_s; readings
    that needed two of three replicas for most of the delay keep two, though the last is idle."""
    clock = [0.0]
    monkeypatch.setattr("ray.serve.autoscaling_policy.time", SimpleNamespace(time=lambda: clock[0]))
    config = AutoscalingConfig(
        min_replicas=1,
        max_replicas=3,
        downscale_delay_s=10,
        policy={"policy_function": "cluster.autoscaler:KVPressurePolicy"},
    )
    policy = _apply_autoscaling_config(KVPressurePolicy(model="m", report_period_s=1e9))
    running = replicas(3)
    state: dict[str, Any] = {}
    two = {r: (30.0, 100.0, 0.0) for r in running}  # D = 90: down = ceil(90 / 50) = 2
    idle = {r: (0.0, 100.0, 0.0) for r in running}
    for now, metrics in ((100.0, two), (105.0, two), (109.9, two), (110.0, idle)):
        clock[0] = now
        decided, state = policy(context(metrics, running, 3, config, now, state))
    assert decided == 2


def test_replicas_can_share_a_gpu() -> None:
    from ray.serve._private.build_app import build_app as serve_build

    app = build_app({"device": "cuda", "model": "synthetic", "replica_gpus": 0.33})
    [replica] = [d for d in serve_build(app, name="v").deployments if d.name == "VattnReplica"]
    assert replica.ray_actor_options["num_gpus"] == 0.33
