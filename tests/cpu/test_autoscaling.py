"""The KV-pressure autoscaling policy (``cluster.autoscaling``), without Ray: the rule's formula on
hand-made loads, the bounds, the hysteresis, and hypothesis properties over random loads."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.autoscaling import (
    AT_MAX,
    AT_MIN,
    BUDGET_PAGES,
    DEMAND_PAGES,
    KV_PRESSURE,
    LOW_DEMAND,
    NO_METRICS,
    QUEUE,
    REASONS,
    STEADY,
    WAITING,
    DownscaleStreak,
    ReplicaLoad,
    ScalingRule,
    decide,
    replicas_needed,
)

RULE = ScalingRule(
    min_replicas=1, max_replicas=3, target_utilization=0.8, downscale_utilization=0.5
)


def load(demand: float, budget: float = 100.0, waiting: float = 0.0) -> ReplicaLoad:
    return ReplicaLoad(demand, budget, waiting)


def test_one_full_replica_scales_up_by_the_formula() -> None:
    # D = 170 pages over B = 100 per replica at u = 0.8: ceil(170 / 80) = 3 replicas.
    decision = decide([load(170)], current=1, rule=RULE)
    assert (decision.replicas, decision.reason) == (3, KV_PRESSURE)
    assert decision.demand_pages == 170 and decision.budget_pages == 100
    assert decision.utilization == pytest.approx(1.7)


def test_scale_up_jumps_straight_to_the_need_but_not_past_max() -> None:
    rule = ScalingRule(min_replicas=1, max_replicas=8)
    assert decide([load(95)] * 2, current=2, rule=rule).replicas == 3  # ceil(190 / 80)
    capped = decide([load(100)] * 3, current=3, rule=RULE)
    assert (capped.replicas, capped.reason) == (3, AT_MAX)


def test_a_long_queue_scales_up_when_pages_do_not() -> None:
    rule = ScalingRule(min_replicas=1, max_replicas=10, max_waiting_per_replica=4)
    decision = decide([load(10, waiting=9)], current=1, rule=rule)  # ceil(9 / 4) = 3
    assert (decision.replicas, decision.reason) == (3, QUEUE)


def test_scale_down_waits_for_the_lower_threshold_and_goes_straight_to_the_need() -> None:
    # D = 130 over 3 replicas of 100: up = ceil(130 / 80) = 2 < 3, down = ceil(130 / 50) = 3.
    assert decide([load(50), load(40), load(40)], current=3, rule=RULE).reason == STEADY
    # D = 30: down = ceil(30 / 50) = 1, in one decision (Serve's downscale delay is the wait).
    decision = decide([load(10)] * 3, current=3, rule=RULE)
    assert (decision.replicas, decision.reason) == (1, LOW_DEMAND)
    # D = 120 over 5: down = ceil(120 / 50) = 3.
    rule = ScalingRule(min_replicas=1, max_replicas=8)
    assert decide([load(24)] * 5, current=5, rule=rule).replicas == 3
    # Idle: down = 0, held at min (2) with the reason low_demand while above it.
    high_floor = ScalingRule(min_replicas=2, max_replicas=8)
    decision = decide([load(0)] * 5, current=5, rule=high_floor)
    assert (decision.replicas, decision.reason) == (2, LOW_DEMAND)


def test_a_downscale_streak_answers_its_largest_need() -> None:
    """Serve applies the last answer of a streak of scale-downs that lasted its delay: a dip at
    the end of the streak must not take away replicas that the streak's earlier readings needed."""
    streak = DownscaleStreak()
    three = [load(30)] * 3  # D = 90: down = 2
    idle = [load(0)] * 3  # down = 0 -> min 1
    assert streak.apply(decide(three, 3, RULE)).replicas == 2
    dipped = streak.apply(decide(idle, 3, RULE))
    assert (dipped.replicas, dipped.reason) == (2, LOW_DEMAND)  # not 1: the streak needed 2
    # A decision that is not a scale-down ends the streak; the next starts afresh.
    assert streak.apply(decide([load(60)] * 3, 3, RULE)).reason == STEADY
    assert streak.apply(decide(idle, 3, RULE)).replicas == 1
    assert streak.apply(decide(three, 3, RULE)).replicas == 2  # within it: its largest need
    # Applied (Serve targets 2 now): a streak from the new count starts afresh too.
    assert streak.apply(decide([load(20)] * 2, 2, RULE)).replicas == 1  # D = 40: down = 1
    # Scale-ups pass through untouched.
    assert streak.apply(decide([load(170)], 1, RULE)).replicas == 3


def test_min_replicas_hold_an_idle_deployment_up() -> None:
    rule = ScalingRule(min_replicas=2, max_replicas=4)
    decision = decide([load(0), load(0)], current=2, rule=rule)
    assert (decision.replicas, decision.reason) == (2, AT_MIN)


def test_without_reports_the_count_stays() -> None:
    assert decide([], current=2, rule=RULE).reason == NO_METRICS
    assert decide([], current=2, rule=RULE).replicas == 2
    assert decide([load(50, budget=0)], current=1, rule=RULE).reason == NO_METRICS


def test_unreported_replicas_count_as_idle_with_the_others_budget() -> None:
    # Three targeted, one reported 70 of 100: D = 70, B = 100, up = 1, down = 2 < 3 -> 2.
    decision = decide([load(70)], current=3, rule=RULE)
    assert (decision.replicas, decision.reason, decision.reporting) == (2, LOW_DEMAND, 1)


def test_reports_are_parsed_strictly() -> None:
    good = {DEMAND_PAGES: 12, BUDGET_PAGES: 100.0, WAITING: 1, "extra": 3}
    assert ReplicaLoad.from_metrics(good) == ReplicaLoad(12.0, 100.0, 1.0)
    for broken in (
        {DEMAND_PAGES: 12, BUDGET_PAGES: 100},
        {**good, DEMAND_PAGES: -1},
        {**good, BUDGET_PAGES: math.nan},
        {**good, WAITING: True},
        {**good, DEMAND_PAGES: "12"},
    ):
        assert ReplicaLoad.from_metrics(broken) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_utilization=0.5, downscale_utilization=0.5),
        dict(target_utilization=1.2),
        dict(downscale_utilization=0.0),
        dict(max_waiting_per_replica=0),
        dict(min_replicas=3, max_replicas=2),
        dict(min_replicas=0, max_replicas=0),
    ],
)
def test_rule_refuses_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ScalingRule(**kwargs)  # type: ignore[arg-type]


# ---- properties ------------------------------------------------------------------------------
loads_strategy = st.lists(
    st.builds(
        ReplicaLoad,
        st.floats(0, 10_000, allow_nan=False),
        st.floats(1, 5_000, allow_nan=False),
        st.integers(0, 200).map(float),
    ),
    max_size=8,
)


@st.composite
def rules(draw: st.DrawFn) -> ScalingRule:
    low = draw(st.integers(0, 4))
    high = draw(st.integers(max(low, 1), 10))
    target = draw(st.floats(0.2, 1.0))
    down = draw(st.floats(0.05, 0.95).map(lambda share: share * target))
    waiting = draw(st.floats(0.5, 32))
    return ScalingRule(low, high, target, down, waiting)


@settings(max_examples=300, deadline=None)
@given(loads=loads_strategy, current=st.integers(0, 12), rule=rules())
def test_decisions_stay_within_bounds_and_move_the_right_way(
    loads: list[ReplicaLoad], current: int, rule: ScalingRule
) -> None:
    decision = decide(loads, current, rule)
    assert rule.min_replicas <= decision.replicas <= rule.max_replicas
    assert decision.reason in REASONS
    if decision.reason == KV_PRESSURE or decision.reason == QUEUE:
        assert decision.replicas > current
    if decision.reason == LOW_DEMAND:
        # Straight to the count that holds the demand at the lower utilisation (not below min).
        need, _ = replicas_needed(
            decision.demand_pages,
            decision.budget_pages,
            decision.waiting,
            rule.downscale_utilization,
            rule,
        )
        assert decision.replicas == max(need, rule.min_replicas) < current
    if decision.reason in (STEADY, NO_METRICS):
        assert decision.replicas == current
    if rule.min_replicas <= current <= rule.max_replicas and decision.replicas > current:
        # Scaling up: the present replicas cannot hold the demand at the target utilisation,
        # or the queue is longer than they should hold.
        capacity = current * decision.budget_pages * rule.target_utilization
        assert (
            decision.demand_pages > capacity
            or decision.waiting > current * rule.max_waiting_per_replica
        )


@settings(max_examples=300, deadline=None)
@given(loads=loads_strategy, current=st.integers(1, 12), rule=rules())
def test_a_decision_applied_is_steady_on_the_same_load(
    loads: list[ReplicaLoad], current: int, rule: ScalingRule
) -> None:
    """Hysteresis: the same total load, re-decided at the count just chosen, changes nothing
    (after an unbounded scale-up), or does not go back up (after a scale-down)."""
    first = decide(loads, current, rule)
    again = decide(loads, first.replicas, rule)
    if first.reason in (KV_PRESSURE, QUEUE):
        assert again.replicas == first.replicas
    if first.reason == LOW_DEMAND:
        assert again.replicas <= first.replicas


@settings(max_examples=200, deadline=None)
@given(loads=loads_strategy, current=st.integers(1, 12), rule=rules(), extra=st.floats(0, 5_000))
def test_more_demand_never_asks_for_fewer_replicas(
    loads: list[ReplicaLoad], current: int, rule: ScalingRule, extra: float
) -> None:
    if not loads:
        return
    heavier = [ReplicaLoad(loads[0].demand_pages + extra, loads[0].budget_pages, loads[0].waiting)]
    heavier += loads[1:]
    assert decide(heavier, current, rule).replicas >= decide(loads, current, rule).replicas
