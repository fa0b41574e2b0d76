"""What the GPU proof runs (issue #27): its parts, in priority order, each with its commands, its
time budget, what it needs, and how its key numbers are read back. ``benchmarks/gpu_proof.py``
runs them.

Budgets are the most a part may take, in seconds (its subprocesses are killed past it). Every
budget fits one 10-minute call of the GPU machine with the setup (wheels, the extension's build)
beside it, so parts that would take longer are split (the suite, the prefix benchmark, the router
comparison, the autoscaling benchmark). A call on a fresh machine also pays FlashInfer's JIT
(~100 s) in its first GPU part. Sizes fit an H100 (78 GiB) as well as an H200: at most three
Llama-3-8B-shaped replicas (~15 GiB of weights each) with 2-4 GiB of KV each share one GPU. A part
that has run has about twice its H100 time of 2026-12-07 (at least 90 s), so that a call packs
several; parts never run yet keep wide estimates.
"""

from __future__ import annotations

import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

Command = tuple[str, ...]
Counts = dict[str, Any]
#: (the part's output folder, its log's text) -> key numbers.
Parser = Callable[[Path, str], Counts]
#: (every part's last record, the part's code hash) -> why the part must not run now, or None.
Gate = Callable[[Mapping[str, dict[str, Any]], str], "str | None"]
#: The folders whose files make a part's code hash; parts that run tests add tests/.
CODE = ("csrc", "replica", "cluster", "benchmarks")
TESTED = (*CODE, "tests")


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of the proof: ``commands`` run one after another under one budget. In a command,
    ``{python}`` is the runner's interpreter and ``{out}`` the part's output folder. ``needs``:
    "cuda" and modules that must import, else the part is skipped with the reason. ``folders``:
    those whose files key its results (done at the same hash of them: not run again)."""

    name: str
    budget_s: float
    commands: tuple[Command, ...]
    what: str = ""
    needs: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    parse: Parser | None = None
    gate: Gate | None = None
    folders: tuple[str, ...] = CODE


def pytest(*args: str) -> Command:
    options = ("-q", "-p", "no:cacheprovider")  # no .pytest_cache written into the tree
    return ("{python}", "-m", "pytest", *options, "--junitxml", "{out}/junit.xml", *args)


def bench(module: str, *args: str, out: str = "{out}") -> Command:
    return ("{python}", "-m", f"benchmarks.{module}", *args, "--out", out)


def parse_junit(out: Path, log: str) -> Counts:
    """Passed / failed / skipped from pytest's junit XML, and the failed tests' names."""
    root = ET.parse(out / "junit.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    bad = n["failures"] + n["errors"]
    return {
        "passed": n["tests"] - bad - skipped,
        "failed": bad,
        "skipped": skipped,
        "failed_tests": failed,
    }


def parse_state_machine(out: Path, log: str) -> Counts:
    """The junit counts and the operations the state machine ran (it prints "N operations")."""
    operations = sum(int(n) for n in re.findall(r"(\d+) operations", log))
    return {**parse_junit(out, log), "operations": operations}


def results(out: Path, prefix: str) -> Iterator[dict[str, Any]]:
    for path in sorted(out.glob(f"{prefix}-*.json")):
        yield json.loads(path.read_text())


def parse_prefix(out: Path, log: str) -> Counts:
    """Per workload, run order and vAttention layout (cache on): first-turn mean TTFT and wall
    time over the paged mode's, hit tokens over paged's, the callers' mapping wait; and per mode
    and layout, generated tokens/s with the cache on over off where both ran."""
    counts: Counts = {}
    for order, folder in (("", out), ("reverse_", out / "reverse")):
        for data in results(folder, "prefix"):
            for workload, rows in data["results"].items():
                counts.update(prefix_counts(f"{order}{workload}", rows))
    return counts


def prefix_layout(row: dict[str, Any]) -> str:
    """The row's KV layout (results before layouts were recorded ran the automatic choice),
    ``_borrow`` appended where hits were read from their holder (``prefix_borrow``), ``_tier``
    where the host tier was on."""
    layout = row.get("kv_layout") or ("blocks" if row["mode"] == "paged" else "auto")
    layout += "_borrow" if row.get("prefix_borrow") else ""
    return f"{layout}_tier" if row.get("host_tier_gib") else layout


def prefix_counts(name: str, rows: list[dict[str, Any]]) -> Counts:
    counts: Counts = {}
    by = {(r["mode"], prefix_layout(r), r["prefix_cache"]): r for r in rows}
    # The paged mode's row with the same host tier setting (else its row without one).
    paged_rows = {lay.endswith("_tier"): r for (m, lay, c), r in by.items() if m == "paged" and c}
    for (mode, layout, cache), row in by.items():
        paged = paged_rows.get(layout.endswith("_tier"), paged_rows.get(False))
        off = by.get((mode, layout, False))
        if cache and off and off["generated_tokens_per_s"]:
            ratio = row["generated_tokens_per_s"] / off["generated_tokens_per_s"]
            counts[f"{name}_{mode}_{layout}_on_over_off"] = round(ratio, 2)
        if cache and row.get("schedule_floor_s"):  # the closed loop's own length (think times)
            ratio = row["seconds"] / row["schedule_floor_s"]
            counts[f"{name}_{mode}_{layout}_seconds_over_floor"] = round(ratio, 3)
        if mode == "paged" or not cache or paged is None:
            continue
        key = f"{name}_{layout}"
        first_turn = row.get("ttft_mean_s_by_turn") or [row["ttft_mean_s"]]
        paged_first = paged.get("ttft_mean_s_by_turn") or [paged["ttft_mean_s"]]
        counts[f"{key}_ttft1_over_paged"] = round(first_turn[0] / paged_first[0], 3)
        counts[f"{key}_seconds_over_paged"] = round(row["seconds"] / paged["seconds"], 3)
        if row.get("steps") and paged.get("steps"):  # more steps, or slower ones
            counts[f"{key}_steps_over_paged"] = round(row["steps"] / paged["steps"], 3)
            counts[f"{key}_step_s_over_paged"] = round(row["step_s"] / paged["step_s"], 3)
        if paged["prefix_hits_tokens"]:
            hits = row["prefix_hits_tokens"] / paged["prefix_hits_tokens"]
            counts[f"{key}_hits_over_paged"] = round(hits, 3)
        counts[f"{key}_map_wait_pct"] = round(row.get("map_wait_pct", 0.0), 2)
        by_turn = row.get("ttft_mean_s_by_turn") or []
        if len(by_turn) > 1 and by_turn[0]:
            counts[f"{key}_ttft_last_over_first"] = round(by_turn[-1] / by_turn[0], 2)
        queued = row.get("queue_mean_s_by_turn") or []
        if len(by_turn) > 1 and queued and queued[-1] is not None and by_turn[-1]:
            counts[f"{key}_last_turn_queue_share"] = round(queued[-1] / by_turn[-1], 3)
        plain = by.get((mode, layout.removesuffix("_tier"), cache))
        if layout.endswith("_tier") and plain and row["ttft_mean_s"]:
            counts[f"{key}_ttft_gain"] = round(plain["ttft_mean_s"] / row["ttft_mean_s"], 2)
            counts[f"{key}_seconds_over_untiered"] = round(row["seconds"] / plain["seconds"], 3)
    return counts


def parse_router(out: Path, log: str) -> Counts:
    """Mean TTFT and failed turns per router, and the file's comparison with free-pages."""
    counts: Counts = {}
    for data in results(out, "router-prefix"):
        for router, result in data["results"].items():
            counts[f"ttft_mean_s_{router}"] = round(result["ttft_s"].get("mean") or 0.0, 3)
            counts[f"failed_{router}"] = result.get("failed", 0)
        ratios = data.get("comparison", {}).items()
        counts |= {k: v for k, v in ratios if k.startswith("mean_ttft_")}
    return counts


def parse_autoscaling(out: Path, log: str) -> Counts:
    """The capacity check's speedups over one replica, and the policies' comparison."""
    counts: Counts = {}
    for data in results(out, "autoscaling"):
        for row in data.get("capacity_check") or []:
            counts[f"speedup_{row['replicas']}_replicas"] = row["speedup_over_one"]
        comparison = data.get("comparison") or {}
        for key in ("p99_ttft_ongoing_over_kv", "replica_seconds_kv_over_ongoing", "failed"):
            if key in comparison:
                counts[key] = comparison[key]
    return counts


def parse_offload(out: Path, log: str) -> Counts:
    """bench_offload's summary: per cache and phase the least fraction of the pinned bandwidth,
    per vAttention layout the least ratio of the paged mode's restore time over its own (without
    and with mapping), and whether the GPU times covered the calls' host work."""
    counts: Counts = {}
    for data in results(out, "offload"):
        counts |= data["summary"]
    return counts


def parse_mapping(out: Path, log: str) -> Counts:
    """The driver's floor per page, idle and under each background load: create, map-only (one
    page a run, and runs of 16), unmap."""
    counts: Counts = {}
    for data in results(out, "mapping"):
        for row in data.get("under_load", []):
            for key in ("create_us", "map_us_run1", "map_us_run16", "unmap_us_run1"):
                counts[f"{row['load']}_{key}"] = round(row[key], 1)
    return counts


def parse_engine(out: Path, log: str) -> Counts:
    """Per workload and run order: vAttention's tokens/s over the paged mode's, the paged mode's on
    fa2 and on fa3 over its own (where run), each mode's prefill kernel and the seconds its engine
    thread waited on the host for copies; per floor case and mode, the decode step over its
    practical floor and the device's busy share of it (where profiled)."""
    counts: Counts = {}
    for order, folder in (("", out), ("reverse_", out / "reverse")):
        for data in results(folder, "engine"):
            for workload, rows in data["results"].items():
                if workload == "floor" and isinstance(rows, list):
                    counts |= floor_counts(rows, order)
                if not isinstance(rows, list) or workload == "floor":
                    continue
                speed = {r.get("mode"): r.get("tokens_per_s") for r in rows}
                for name, mode, base in (
                    ("vattention_over_paged", "vattention", "paged"),
                    ("paged_fa2_over_paged", "paged-fa2", "paged"),
                    ("paged_fa3_over_paged", "paged-fa3", "paged"),
                ):
                    if speed.get(mode) and speed.get(base):
                        counts[f"{order}{workload}_{name}"] = round(speed[mode] / speed[base], 3)
                for row in rows:
                    kernel = row.get("prefill_kernel") or {}
                    if kernel and not order:
                        counts[f"{workload}_{row['mode']}_prefill"] = kernel.get("backend")
                    if "copy_wait_s" in row:
                        wait = round(row["copy_wait_s"], 3)
                        counts[f"{order}{workload}_{row['mode']}_copy_wait_s"] = wait
    return counts


def floor_counts(rows: list[dict[str, Any]], order: str) -> Counts:
    """A floor table's cases: the step over its practical floor, and the device's busy share."""
    counts: Counts = {}
    for row in rows:
        if not row.get("fits") or not isinstance(row.get("step_over_floor"), int | float):
            continue  # a case that did not fit, or whose batch never ran whole
        case = f"{order}floor_{row.get('mode', 'vattention')}_{row['batch']}x{row['context']}"
        counts[f"{case}_over_floor"] = round(row["step_over_floor"], 3)
        if "device_busy_share" in row:
            counts[f"{case}_device_busy"] = round(row["device_busy_share"], 3)
    return counts


#: The issue's gate: below this, three replicas on one GPU add too little capacity for
#: autoscaling to show more than admission timing.
CAPACITY_GATE = 2.0


def speedup_gate(part: str, wants_capacity: bool, refusal: str) -> Gate:
    """A gate on capacity check ``part`` done at this code: open where its 3 replicas served at
    least CAPACITY_GATE x one (``wants_capacity``) or less (not), else ``refusal`` (formatted with
    the ``speedup`` and the ``gate``)."""

    def gate(records: Mapping[str, dict[str, Any]], code_hash: str) -> str | None:
        record = records.get(part) or {}
        if record.get("status") != "ok" or record.get("code_hash") != code_hash:
            return f"needs {part} done at this code first"
        speedup = record.get("counts", {}).get("speedup_3_replicas")
        if not isinstance(speedup, int | float):
            return f"{part} measured no speedup"
        if (speedup >= CAPACITY_GATE) == wants_capacity:
            return None
        return refusal.format(speedup=speedup, gate=CAPACITY_GATE)

    return gate


#: The 8B-shaped autoscaling run: only where its 3 replicas serve CAPACITY_GATE x one.
capacity_gate = speedup_gate(
    "autoscaling_capacity",
    True,
    "capacity gate: 3 replicas serve {speedup}x one (< {gate}x): the small model's parts "
    "(autoscaling_capacity_small, autoscaling_small) run instead (issue #27)",
)
#: The small model's capacity check, the issue's switch: only where 8B-shaped replicas sharing
#: the GPU did not add capacity.
switch_gate = speedup_gate(
    "autoscaling_capacity",
    False,
    "no switch: 8B-shaped replicas serve {speedup}x one (autoscaling runs on them)",
)
#: The small model's autoscaling run: only where its 3 replicas serve CAPACITY_GATE x one.
small_capacity_gate = speedup_gate(
    "autoscaling_capacity_small",
    True,
    "capacity gate: 3 small replicas serve {speedup}x one (< {gate}x): no configuration on one "
    "GPU lets autoscaling show more than admission timing",
)


GPU = ("cuda", "flashinfer")
SERVE = ("cuda", "flashinfer", "ray")
BOTH_LAYOUTS = ("--layouts", "interleaved,per_layer")
#: The burst: both layouts, the cache on, the vAttention mode without and with borrowed reads.
BURST = ("--workloads", "burst", *BOTH_LAYOUTS, "--cache", "on", "--borrow", "off,on")
CHAT = ("bench_router", "--gpu", "--workload", "chat", "--routers")
THINK = ("bench_prefix", "--workloads", "think", "--cache", "on")  # chat with think times

PARTS: tuple[Part, ...] = (
    Part(
        "suite",
        420,
        (pytest("-m", "gpu", "tests/gpu"),),
        "pytest -m gpu tests/gpu",
        SERVE,
        parse=parse_junit,
        folders=TESTED,
    ),
    Part(
        "suite_kv",
        180,
        (pytest("-m", "gpu", "tests/allocator", "tests/attention"),),
        "pytest -m gpu tests/allocator tests/attention",
        GPU,
        parse=parse_junit,
        folders=TESTED,
    ),
    Part(
        "prefix_burst",
        400,
        (
            bench("bench_prefix", *BURST),
            bench("bench_prefix", *BURST, "--modes", "paged,vattention", out="{out}/reverse"),
        ),
        "bench_prefix: 128 first turns arriving together over 4 shared 1K system prompts, both "
        "modes and layouts, cache on, vAttention without and with borrowed prefix reads, in both "
        "orders (#24's burst target)",
        GPU,
        parse=parse_prefix,
    ),
    Part(
        "prefix_shared",
        420,
        (bench("bench_prefix", "--workloads", "shared", *BOTH_LAYOUTS),),
        "bench_prefix: 128 conversations x 5 turns over 4 shared 1K system prompts, both modes "
        "and layouts, cache on and off",
        GPU,
        parse=parse_prefix,
    ),
    Part(
        "prefix_offload",
        480,
        (bench(*THINK, "--kv-cache-gib", "4", "--offload-gib", "0,48"),),
        "bench_prefix: 192 conversations x 5 turns with 3-9 s think times and 4 GiB of KV, both "
        "modes without and with a 48 GiB host tier (the histories' ~36 GiB fit; #25's target)",
        GPU,
        parse=parse_prefix,
    ),
    Part(
        "prefix_think_unbounded",
        200,
        (bench(*THINK, "--kv-cache-gib", "48", "--modes", "paged"),),
        "bench_prefix: prefix_offload's think-time chat with 48 GiB of KV, no tier, the paged "
        "mode: every history stays on the GPU, the TTFT by turn and run time an unbounded cache "
        "gives (#25's ceiling; a property of the workload, so one mode)",
        GPU,
        parse=parse_prefix,
    ),
    Part(
        "offload_bandwidth",
        90,
        (bench("bench_offload"),),
        "bench_offload: the host tier's offload and restore bandwidth, vAttention (both layouts, "
        "restore with and without mapping) and the paged mode, Llama-3-8B and Qwen2.5-7B shapes, "
        "1K/4K/16K-token histories, against one pinned copy of the same bytes (#25's target)",
        ("cuda",),
        parse=parse_offload,
    ),
    Part(
        "mapping",
        90,
        (bench("bench_mapping"),),
        "bench_mapping: the driver's per-page costs (create, map, unmap) idle and while the GPU "
        "copies, computes or takes pinned copies, the floor #24's engine maps are judged against",
        ("cuda",),
        parse=parse_mapping,
    ),
    Part(
        "prefix_chat",
        330,
        (bench("bench_prefix", "--workloads", "chat,system", *BOTH_LAYOUTS, "--cache", "on"),),
        "bench_prefix: multi-turn chat (own system prompts) and one shared system prompt, both "
        "modes and layouts, cache on",
        GPU,
        parse=parse_prefix,
    ),
    Part(
        "router",
        480,
        (bench(*CHAT, "free-pages,prefix-affinity"),),
        "bench_router --gpu --workload chat: free-pages, then prefix-affinity",
        SERVE,
        parse=parse_router,
    ),
    Part(
        "router_reverse",
        480,
        (bench(*CHAT, "prefix-affinity,free-pages"),),
        "the same two routers in the other order",
        SERVE,
        parse=parse_router,
    ),
    Part(
        "router_baselines",
        480,
        (bench(*CHAT, "power-of-two,headroom-only"),),
        "power-of-two and headroom-only on the same chat workload",
        SERVE,
        parse=parse_router,
    ),
    Part(
        "autoscaling_capacity",
        420,
        (bench("bench_autoscaling", "--gpu", "--capacity-check", "--policies", ""),),
        "bench_autoscaling --gpu --capacity-check: what 1, 2, 3 fixed replicas serve",
        SERVE,
        parse=parse_autoscaling,
    ),
    Part(
        "autoscaling",
        480,
        (bench("bench_autoscaling", "--gpu"),),
        "bench_autoscaling --gpu: KV pressure vs ongoing requests, gated on the capacity check",
        SERVE,
        parse=parse_autoscaling,
        gate=capacity_gate,
    ),
    Part(
        "autoscaling_capacity_small",
        420,
        (bench("bench_autoscaling", "--gpu-small", "--capacity-check", "--policies", ""),),
        "bench_autoscaling --gpu-small --capacity-check: the issue's switch where 8B-shaped "
        "replicas add no capacity: 1, 2, 3 replicas of a small Llama bound by their host work",
        SERVE,
        parse=parse_autoscaling,
        gate=switch_gate,
    ),
    Part(
        "autoscaling_small",
        480,
        (bench("bench_autoscaling", "--gpu-small"),),
        "bench_autoscaling --gpu-small: KV pressure vs ongoing requests on the small Llama, "
        "gated on its capacity check",
        SERVE,
        parse=parse_autoscaling,
        gate=small_capacity_gate,
    ),
    Part(
        "state_machine",
        150,
        (pytest("-s", "-m", "gpu", "-k", "cuda", "tests/allocator/test_kv_allocator_state.py"),),
        "the CUDA allocator state machine with share/continue/evict at scale 10 (>= 20,000 ops), "
        "and its borrowed-reads run (>= 5,000)",
        ("cuda",),
        env=(("VATTN_STATEFUL_SCALE", "10"),),
        parse=parse_state_machine,
        folders=TESTED,
    ),
    Part(
        "engine",
        480,
        (
            bench(
                "bench_engine",
                "--workloads",
                "sharegpt,decode,mixed",
                "--modes",
                "vattention,paged",
            ),
        ),
        "bench_engine: sharegpt, decode, mixed; vattention vs paged",
        GPU,
        parse=parse_engine,
    ),
    Part(
        "decode_floor_small",
        300,
        (
            bench(
                "bench_engine",
                "--workloads",
                "none",
                "--floor",
                "--floor-cases",
                "1x1024,8x1024",
                "--floor-modes",
                "vattention,paged",
                "--floor-profile",
                "--name",
                "engine-floor-small",
            ),
        ),
        "bench_engine --floor at batch 1 and 8 with 1K keys, both modes, each case's decode steps "
        "profiled: the step over its practical floor and the device's busy share of it (#24 "
        "item 8: 1.14x and 1.20x the floor on an H200)",
        GPU,
        parse=parse_engine,
    ),
    Part(
        "engine_kernels",
        300,
        tuple(
            bench(
                "bench_engine",
                "--workloads",
                "sharegpt",
                "--slots",
                "256",
                "--modes",
                modes,
                out=out,
            )
            for modes, out in (
                ("vattention,paged,paged-fa3", "{out}"),
                ("paged-fa3,paged,vattention", "{out}/reverse"),
            )
        ),
        "bench_engine sharegpt at 256 slots, both modes on the auto prefill kernel (fa2) and the "
        "paged mode on fa3, in both orders (#24 item 7: at fa3 the paged mode ran 1.165x slower)",
        GPU,
        parse=parse_engine,
    ),
)
