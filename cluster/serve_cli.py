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
import threading
import time
from typing import TYPE_CHECKING

from cluster.routing import ROUTERS

if TYPE_CHECKING:
    from cluster.app import AppOptions


def add_serve_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve_parser = commands.add_parser("serve", help="serve the OpenAI-compatible API on Ray Serve")
    serve_parser.add_argument(
        "--model", default="embedded", help="HF directory, 'embedded' (default) or 'synthetic'"
    )
    serve_parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
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
        "--backend", default="auto", help="attention: auto, flashinfer, torch-fa2, flash-attn, sdpa"
    )
    serve_parser.add_argument(
        "--kv-layout", default="auto", choices=["auto", "interleaved", "per_layer"]
    )
    serve_parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8"],
        help="KV cache elements: the model's dtype, or fp8 (e4m3: twice the tokens per page)",
    )
    serve_parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    serve_parser.add_argument("--max-model-len", type=int, default=4096)
    serve_parser.add_argument(
        "--max-running",
        type=int,
        default=None,
        help="slots per replica (default: 256 on a GPU, 64 on a CPU)",
    )
    serve_parser.add_argument(
        "--growth-reserve",
        type=float,
        default=0.5,
        help="share of running requests' remaining max_tokens admission keeps KV pages for "
        "at first; it learns from preemptions (0: whole prompts only)",
    )
    serve_parser.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="compute every prompt whole (the default shares cached prefixes' KV pages)",
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
    serve_parser.set_defaults(run=serve_main)


def app_options(args: argparse.Namespace) -> AppOptions:
    """The application's arguments from ``vattn serve``'s options (same names)."""
    from cluster.app import AppOptions

    count = {} if args.replicas is None else {"replicas": args.replicas}
    return AppOptions(
        model=args.model,
        tp=args.tp,
        **count,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        autoscaler=args.autoscaler,
        backend=args.backend,
        kv_layout=args.kv_layout,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_running=args.max_running,
        growth_reserve=args.growth_reserve,
        prefix_cache=args.prefix_cache,
        api_key=args.api_key,
        router=args.router,
    )


def serve_main(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import build_app

    options = app_options(args)  # refused here, before Ray starts, if invalid
    most = options.max_replicas or options.replicas
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
