"""Prometheus metrics of a vattn app, one concept a module: the series (``catalogue``), what a
replica and the autoscaler send (``snapshots``), what the hub accumulates (``store``) and the
exposition the ingress renders on ``GET /metrics`` (``render``).

Flow: about once a second every replica takes a ``snapshots.ReplicaSnapshot`` (gauges' values,
counters' totals, latency samples drained since its previous snapshot) and pushes it to the
``MetricsHub`` actor (``cluster.metrics_hub``), whose ``store.MetricsStore`` folds the samples into
histograms per (model, replica) and per (model, replica, rank). ``GET /metrics`` on the ingress
fetches the store's series and renders them, plus the ingress's own router decisions, through
``render.VattnCollector`` in a registry of its own. The KV-pressure autoscaling policy, which Serve
runs in its controller, pushes a ``snapshots.AutoscalerSnapshot`` to the same hub.

Every series is listed in ``catalogue.METRICS``. Nothing here imports Ray or torch (the hub actor
stays a small process).
"""
