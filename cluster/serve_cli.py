"""``vattn serve``: start (or join) Ray, deploy the app, print how to call it, stop on Ctrl-C.

Stopping (Ctrl-C or SIGTERM) takes a few seconds: a Ray this command started is shut down at once
with everything in it (a client mid-request sees its connection close), instead of Serve's
graceful shutdown, which waits for every replica's requests (``graceful_shutdown_timeout_s``,
sized for long generations) and which the controller gives up on after 30 s. On a cluster it
joined (``--address``) it deletes its application and lets Serve drain it there: other
applications and the cluster stay.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from cluster.routing import ROUTERS
from replica.engine_config import EngineConfig
from replica.options import add_option_arguments

if TYPE_CHECKING:
    from cluster.app import AppOptions

#: ``--log-level``'s values: ``cluster.app.LOG_LEVELS`` (not imported here: it imports Ray).
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_serve_command(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    declaration: type = EngineConfig,
) -> None:
    """``vattn serve``: the engine's options as flags (replica.options: one per option of
    ``declaration``), then the deployment's."""
    serve_parser = commands.add_parser("serve", help="serve the OpenAI-compatible API on Ray Serve")
    add_option_arguments(serve_parser, declaration)
    serve_parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="a fixed number of replicas (default 1); with --max-replicas, how many to start",
    )
    serve_parser.add_argument(
        "--min-replicas", type=int, default=None, help="autoscale on KV pressure from (default 1)"
    )
    serve_parser.add_argument(
        "--max-replicas", type=int, default=None, help="autoscale on KV pressure up to this many"
    )
    serve_parser.add_argument(
        "--autoscaler",
        default="kv-pressure",
        choices=["kv-pressure", "ongoing-requests"],
        help="kv-pressure: the replicas' expected KV pages and queues; ongoing-requests: Serve's",
    )
    serve_parser.add_argument(
        "--router",
        default=ROUTERS[0],
        choices=ROUTERS,
        help="free-pages: the replica with the most free KV pages; power-of-two: Serve's default",
    )
    serve_parser.add_argument(
        "--address", default=None, help="join this Ray cluster instead of starting one"
    )
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument(
        "--api-key",
        default=os.environ.get("VATTN_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $VATTN_API_KEY)",
    )
    serve_parser.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="the deployments' log level; debug also logs every request (Serve's access log)",
    )
    serve_parser.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="debug",
        help="the same as --log-level debug",
    )
    serve_parser.set_defaults(run=serve_main)


def app_options(args: argparse.Namespace, options: type[AppOptions] | None = None) -> AppOptions:
    """The application's arguments (``options``, default AppOptions) from ``vattn serve``'s flags:
    each flag's dest is the app arg's name; ``--replicas`` only when given."""
    from cluster.app import AppOptions

    options = options or AppOptions
    values = {name: getattr(args, name) for name in options.model_fields if hasattr(args, name)}
    if values.get("replicas") is None:
        values.pop("replicas", None)
    return options(**values)


def fetch_model(model: str) -> bool:
    """Resolves the model here, before Ray starts, so that a first use's download (the embedded
    model's) shows its progress on the console; the replicas, in their actors, then find it in
    the cache. False (said on stderr) when there is no such model."""
    from replica.model.source import resolve_model_dir

    try:
        resolve_model_dir(model, progress=True)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"vattn serve: {error}", file=sys.stderr)
        return False
    return True


def serve_main(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import build_app

    options = app_options(args)  # refused here, before Ray starts, if invalid
    most = options.max_replicas or options.replicas
    if not args.address and not fetch_model(args.model):
        return 2
    if args.address:
        ray.init(address=args.address)
    else:
        # Logical CPUs: replicas and the ingress are scheduled by these, not by cores.
        ray.init(num_cpus=max(os.cpu_count() or 1, 4) + most * args.tp, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(options)
    started = time.monotonic()
    count = (
        f"{options.min_replicas or 1}-{most} replicas, autoscaled on {options.autoscaler}"
        if options.autoscales()
        else f"{options.replicas} replica(s)"
    )
    print(f"deploying {args.model} ({count} x tp {args.tp}) ...", flush=True)
    serve.run(app, name="vattn", route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    auth = ' -H "Authorization: Bearer $VATTN_API_KEY"' if args.api_key else ""
    print(f"vattn is serving at {url}/v1 (ready in {time.monotonic() - started:.0f} s)\n")
    print("Try:")
    print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\")
    print(
        '    -d \'{"messages": [{"role": "user", "content": '
        '"What is the capital of France?"}], "max_tokens": 32}\''
    )
    print("\nCtrl-C stops it.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    stopping = time.monotonic()
    print("\nshutting down ...", flush=True)
    if args.address:
        serve.delete("vattn", _blocking=False)  # Serve drains it on the cluster
    ray.shutdown()  # a Ray started here goes with everything in it
    print(f"stopped in {time.monotonic() - stopping:.1f} s", flush=True)
    return 0
