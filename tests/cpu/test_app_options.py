"""AppOptions.router: which request router the replica deployment gets (no Ray cluster needed)."""

from __future__ import annotations

import pytest

from cluster.app import AppOptions, build_app


def router_class(args: dict[str, object]) -> str:
    from ray.serve._private.build_app import build_app as serve_build

    [replica] = [
        d
        for d in serve_build(build_app(args), name="vattn").deployments
        if d.name == "VattnReplica"
    ]
    return replica._deployment_config.request_router_config.request_router_class


def test_the_default_router_is_the_free_page_router() -> None:
    assert AppOptions().router == "free-pages"
    assert router_class({}) == "cluster.router:FreePageRouter"


def test_power_of_two_is_serves_default_router() -> None:
    assert AppOptions.model_validate({"router": "power-of-two"}).router == "power-of-two"
    assert router_class({"router": "power-of-two"}).endswith(":PowerOfTwoChoicesRequestRouter")


@pytest.mark.parametrize("router", ["", "pow2", "Free-Pages", "round-robin"])
def test_an_unknown_router_is_a_clear_value_error(router: str) -> None:
    with pytest.raises(ValueError, match="router must be one of free-pages, power-of-two"):
        AppOptions.model_validate({"router": router})
