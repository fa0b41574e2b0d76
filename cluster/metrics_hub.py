"""The ``MetricsHub`` actor, where replicas push metric snapshots and the ingress reads them, and
the pusher thread each replica runs.

Lifetime: a normal (not detached) named actor, ``vattn-metrics-hub`` in namespace ``vattn``,
created by the ingress (``get_if_exists=True``), so Ray makes the ingress its owner: it dies with
the ingress, hence with the app, and leaves nothing behind in the cluster. The ingress is the only
reader, so the hub never outlives its use; replicas that scale down or restart do not take the
accumulated histograms with them, which they would if a replica owned it. Replicas only look it up
(``ray.get_actor``) and keep their drained samples until a push succeeds, so they may start before
the ingress. A dead hub (e.g. its ingress restarted) is created again by the next scrape and found
again by the next push; Prometheus sees a counter reset.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.metrics.snapshots import AutoscalerSnapshot, ReplicaSnapshot
from cluster.metrics.store import MetricsStore, ReplicaSeries

log = logging.getLogger(__name__)

HUB_NAME = "vattn-metrics-hub"
HUB_NAMESPACE = "vattn"


@ray.remote(num_cpus=0, max_restarts=0)
class MetricsHub:
    """A :class:`~cluster.metrics.store.MetricsStore` in an actor: every replica of every node
    pushes here, and so does the KV-pressure autoscaling policy from Serve's controller; the
    ingress reads the accumulated series on each scrape."""

    def __init__(self, stale_after_s: float = 30.0) -> None:
        self.store = MetricsStore(stale_after_s)

    def push(self, snapshot: ReplicaSnapshot | AutoscalerSnapshot) -> None:
        self.store.push(snapshot)

    def series(self) -> list[ReplicaSeries | AutoscalerSnapshot]:
        return self.store.series()


def create_hub() -> Any:
    """The hub, created if absent; the caller (the ingress) becomes its owner."""
    return MetricsHub.options(  # type: ignore[attr-defined]
        name=HUB_NAME, namespace=HUB_NAMESPACE, get_if_exists=True
    ).remote()


def find_hub() -> Any | None:
    """The hub if it exists now, else None (replicas never create it)."""
    try:
        return ray.get_actor(HUB_NAME, namespace=HUB_NAMESPACE)
    except ValueError:
        return None


class MetricsPusher:
    """A daemon thread that every ``period_s`` takes a snapshot with ``take`` and pushes it to
    the hub. Samples of a snapshot that could not be sent (no hub yet, hub died) go with the next
    one; a push that timed out is not repeated (it may have landed: better lose samples than count
    them twice)."""

    def __init__(
        self,
        take: Callable[[], ReplicaSnapshot],
        period_s: float = 1.0,
        find: Callable[[], Any | None] = find_hub,
        timeout_s: float = 10.0,
    ) -> None:
        self.take, self.period_s, self.find, self.timeout_s = take, period_s, find, timeout_s
        self._hub: Any | None = None
        self._pending: ReplicaSnapshot | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vattn-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def push_once(self) -> bool:
        """One snapshot and push; True when the hub has it."""
        snapshot = self.take()
        self._pending = snapshot if self._pending is None else self._pending.then(snapshot)
        hub = self._hub or self.find()
        if hub is None:
            return False
        try:
            ray.get(hub.push.remote(self._pending), timeout=self.timeout_s)
        except RayActorError:
            self._hub = None  # gone: the samples wait for the next hub
            return False
        except GetTimeoutError:
            self._hub, self._pending = None, None
            log.warning(
                "the metrics hub did not answer in %.0f s; dropped one snapshot's samples",
                self.timeout_s,
            )
            return False
        self._hub, self._pending = hub, None
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.push_once()
            except Exception:  # metrics must never take the replica down
                log.exception("pushing metrics failed")
