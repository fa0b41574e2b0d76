"""A Ray worker's share of its node: the fraction of the node's GPUs Ray assigned it.

The engine sizes its host KV tier by it (``EngineConfig.node_share``): the processes that share a
node (Serve replicas holding fractions of a GPU, tensor-parallel rank actors holding one GPU each)
then pin a quarter of the node's host memory between them, not a quarter each. The engine never
asks Ray itself (``replica/`` does not import it): the replica deployment reads the share here and
hands it down in the engine's config.
"""

from __future__ import annotations

from collections.abc import Mapping

import ray


def gpu_share(assigned: Mapping[str, float], node: Mapping[str, float]) -> float | None:
    """The fraction of the node's GPUs (``node``: its total resources) that a worker assigned
    ``assigned`` holds, fractional GPUs included; None where it holds none or the node has none
    (the engine then takes its default, ``EngineConfig.node_share``). At most 1."""
    held, total = assigned.get("GPU", 0.0), node.get("GPU", 0.0)
    if held <= 0 or total <= 0:
        return None
    return min(held / total, 1.0)


def ray_gpu_share() -> float | None:
    """:func:`gpu_share` of this Ray worker: the resources Ray assigned it (a placement group
    bundle's under their plain names: ``get_assigned_resources`` maps them back) over its node's
    total resources. Call it inside an actor (a Serve replica)."""
    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    node: Mapping[str, float] = next(
        (n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {}
    )
    return gpu_share(context.get_assigned_resources(), node)
