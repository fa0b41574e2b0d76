"""Writes benchmarks/README.md's results tables from the JSON in benchmarks/results/ (never typed
by hand) and the PNG plots beside them. Reads JSON only: no GPU needed.

    python -m benchmarks.report

A value a result does not have is printed as "–"; nested values as "key value" text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.results_io import Result, every, plot_paths, router_runs

HERE = Path(__file__).parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
MISSING = "–"


def num(value: Any, spec: str = "", suffix: str = "") -> str:
    """``value`` formatted with ``spec``, or "–" when it is missing (None, NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:{spec}}{suffix}"


def text(value: Any) -> str:
    """Any JSON value as a table cell: numbers formatted, dicts as "key value, key value", lists of
    numbers as "(a, b)", missing values (None, NaN, an empty list) as "–"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {text(v)}" for k, v in value.items()) or MISSING
    if isinstance(value, (list, tuple)):
        if value and not any(isinstance(v, (dict, list, tuple)) for v in value):
            return "(" + ", ".join(text(v) for v in value) + ")"
        return "; ".join(text(v) for v in value) or MISSING
    return str(value)


def row(*cells: Any) -> str:
    """A Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*names: str) -> list[str]:
    """A Markdown table's header and rule."""
    return [row(*names), "|" + "---|" * len(names)]


def environment_line(path: Path, env: dict[str, Any]) -> str:
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    return (
        f"`{path.name}`: {env['device']}{driver}, torch {env['torch']}, "
        f"Python {env['python']}, {env['date']}"
    )


def note_lines(data: dict[str, Any]) -> list[str]:
    """A result file's ``note`` (how it was made, which runs it merges) as a paragraph."""
    return [data["note"], ""] if data.get("note") else []


def mapping_tables(path: Path, data: dict[str, Any]) -> list[str]:
    lines = [
        "### Page mapping (`bench_mapping.py`)",
        "",
        environment_line(path, data["environment"]),
        "",
    ]
    lines += header("one page", "median µs")
    lines += [
        row(name.removesuffix("_us_median"), num(value, ".1f"))
        for name, value in data["map_latency"].items()
    ]
    lines += ["", *header("run of pages", "µs per page", "GB/s")]
    lines += [
        row(r["run_pages"], num(r["us_per_page"], ".1f"), num(r["gb_per_s"], ".1f"))
        for r in data["batched"]
    ]
    lines += [
        "",
        *header(
            "pages per step",
            "step ms",
            "caller's wait ms",
            "wait % of step",
            "submit ms",
            "worker busy %",
        ),
    ]
    for r in data["decode_overlap"]:
        lines.append(
            row(
                r["pages_per_step"],
                num(r.get("step_ms_mean"), ".2f"),
                num(r.get("wait_ms_mean"), ".3f"),
                num(r.get("wait_pct_of_step"), ".2f"),
                num(r.get("submit_ms_mean"), ".3f"),
                num(r.get("worker_busy_pct_of_step"), ".1f"),
            )
        )
    return lines + [""]


def engine_tables(path: Path, data: dict[str, Any]) -> list[str]:
    lines = [
        "### Engine, offline (`bench_engine.py`)",
        "",
        environment_line(path, data["environment"])
        + f"; {SHAPE_NAMES.get(data['settings'].get('shape', 'llama3-8b'), 'Llama-3-8B')} shapes,"
        + f" synthetic bf16 weights; batch {data['settings']['batch']}"
        + (f", {data['settings']['slots']} slots" if "slots" in data["settings"] else ""),
        "",
        *note_lines(data),
        (
            "vs paged: against the paged mode run the same way (CUDA graphs or eager, "
            "asynchronous or `-sync` scheduling); HF against paged."
        ),
        "",
        *header(
            "workload",
            "mode",
            "attention",
            "KV layout",
            "tokens/s",
            "vs paged",
            "mapping wait %",
            "KV waste %",
            "preemptions",
            "prefill phase s",
            "decode phase s",
        ),
    ]
    for workload, rows in mode_rows(data):
        by_mode = {r["mode"]: r for r in rows}
        for r in rows:
            mode = r["mode"]
            variant = mode.removeprefix("vattention").removeprefix("paged")
            if mode.startswith("hf"):
                variant = ""
            paged = by_mode.get("paged" + variant)
            ratio = r["tokens_per_s"] / paged["tokens_per_s"] if paged else None
            lines.append(
                row(
                    workload,
                    mode,
                    r.get("attention", MISSING),
                    r.get("kv_layout", MISSING),
                    num(r["tokens_per_s"], ".0f"),
                    num(ratio, ".2f", "x"),
                    num(r.get("mapping_wait_pct"), ".2f"),
                    num(r.get("kv_waste_pct_mean"), ".2f"),
                    num(r.get("preemptions")),
                    num(r.get("non_decode_steps_s"), ".2f"),
                    num(r.get("decode_phase_s"), ".2f"),
                )
            )
    ratios = [
        r["tokens_per_s"] / paged["tokens_per_s"]
        for _, rows in mode_rows(data)
        for r in rows
        if r["mode"] == "vattention"
        for paged in [next((p for p in rows if p["mode"] == "paged"), None)]
        if paged
    ]
    if ratios:
        lines += ["", f"Minimum vattention / paged over the workloads: **{min(ratios):.3f}x**."]
    lines += [
        "",
        ("Decode step at full batch (median), against the roofline and the practical floor:"),
        "",
    ]
    lines += header(
        "workload",
        "mode",
        "step ms",
        "roofline ms",
        "share of roofline",
        "linears (graph) ms",
        "attention ms",
        "floor ms",
        "step / floor",
        "GPU busy ms",
    )
    for workload, rows in mode_rows(data):
        for r in rows:
            step = r.get("decode_step")
            if not step:
                continue
            share = step.get("roofline_share")
            lines.append(
                row(
                    workload,
                    r["mode"],
                    num(step.get("step_ms"), ".2f"),
                    num(step.get("roofline_ms"), ".2f"),
                    num(None if share is None else 100 * share, ".0f", "%"),
                    num(step.get("linears_graph_ms"), ".2f"),
                    num(step.get("attention_alone_ms"), ".2f"),
                    num(step.get("practical_floor_ms"), ".2f"),
                    num(step.get("step_over_floor"), ".2f", "x"),
                    num(r.get("profiled_device_ms_per_step"), ".2f"),
                )
            )
    floor = data["results"].get("floor")
    if floor:
        lines += [
            "",
            "vAttention decode step against its practical floor (linears in a CUDA graph + "
            "attention alone, same run), by batch and context:",
            "",
            *header("batch", "context", "step ms", "floor ms", "step / floor"),
        ]
        for r in floor:
            fits = r.get("fits", True)
            lines.append(
                row(
                    r["batch"],
                    r["context"],
                    num(r.get("step_ms"), ".2f") if fits else "KV does not fit",
                    num(r.get("practical_floor_ms"), ".2f"),
                    num(r.get("step_over_floor"), ".2f", "x"),
                )
            )
    return lines + [""]


SHAPE_NAMES = {"llama3-8b": "Llama-3-8B", "qwen2.5-7b": "Qwen2.5-7B"}


def mode_rows(data: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(workload, rows by mode) of an engine result: every workload but the floor table."""
    return [(name, rows) for name, rows in data["results"].items() if name != "floor"]


def layout_tables(path: Path, data: dict[str, Any]) -> list[str]:
    lines = [
        "### What the KV layout costs attention (`bench_layout.py`)",
        "",
        environment_line(path, data["environment"])
        + "; 32 layers, 32 q / 8 kv heads, head_dim 128, bf16, one CUDA graph per step",
        "",
        *note_lines(data),
    ]
    if data.get("results"):
        lines += header(
            "batch",
            "context",
            "interleaved µs",
            "per-layer µs",
            "paged µs",
            "interleaved / paged",
            "per-layer / paged",
        )
        for r in data["results"]:
            lines.append(
                row(
                    r["batch"],
                    r["context"],
                    num(r["interleaved"]["step_us"], ".0f"),
                    num(r["per_layer"]["step_us"], ".0f"),
                    num(r["paged"]["step_us"], ".0f"),
                    num(r["interleaved_step_over_paged"], ".3f", "x"),
                    num(r["per_layer_step_over_paged"], ".3f", "x"),
                )
            )
    probe = data.get("row_stride_probe_us")
    if probe:
        names = [k for k in probe[0] if k not in ("batch", "context")]
        lines += [
            "",
            "The decode kernel alone over one layer, token rows this many bytes apart (µs):",
            "",
            *header("batch", "context", *names),
        ]
        for r in probe:
            lines.append(row(r["batch"], r["context"], *(num(r[n], ".1f") for n in names)))
    return lines + [""]


def load_tables(path: Path, data: dict[str, Any]) -> list[str]:
    setup = data.get("setup", {})
    where = ""
    if "replicas" in setup:
        where = (
            f"; {setup['replicas']} replicas of `{setup['model']}`, "
            f"{setup.get('host_cpus', MISSING)} host CPUs"
        )
    lines = [
        "### Load (`load_test.py`)",
        "",
        environment_line(path, data["environment"]) + where,
        "",
        *header("figure", "value"),
    ]
    summary = data.get("summary") or data.get("load", {})  # load_test writes it under "load"
    lines += [row(key, text(value)) for key, value in summary.items()]
    return lines + [""]


def _ms(value: float | None) -> str:
    return num(None if value is None else 1000 * value, ".0f")


def _comparison_line(comparison: dict[str, Any], results: dict[str, Any]) -> str:
    ratio = comparison.get("p99_ttft_power_of_two_over_free_pages")
    fewer = comparison.get("preemption_reduction")
    counts = " vs ".join(
        str(results[r]["preemptions"]) for r in ("free-pages", "power-of-two") if r in results
    )
    if fewer is None:
        fewer_text = f"{MISSING} (power-of-two preempts none)"
    elif fewer < 0:
        fewer_text = f"none ({counts})"
    else:
        fewer_text = f"{100 * fewer:.0f}%"
    return (
        f"p99 TTFT, power-of-two over free-pages: {num(ratio, '.2f', 'x')} (target ≥ 1.3x); "
        f"preemptions avoided by free-pages: {fewer_text} (target ≥ 50%)."
    )


def router_tables(path: Path, data: dict[str, Any]) -> list[str]:
    if data.get("benchmark") == "router-prefix":
        return router_chat_tables(path, data)
    deployment, env = data["settings"]["deployment"], data["environment"]
    gpus = f", one GPU each ({env['gpus']} on the host)" if env.get("gpus") else ""
    lines = [
        f"### Router (`bench_router.py`), {env['device']}",
        "",
        environment_line(path, env)
        + f"; {deployment['replicas']} replicas of `{deployment['model']}` at "
        f"{deployment['replica_cpus']} CPU{gpus}, "
        f"KV budget {deployment['kv_cache_bytes'] / 2**20:.0f} MiB each",
        "",
        *note_lines(data),
    ]
    for run in router_runs(data):
        schedule = run["schedule"]
        lines += [
            (
                f"{run['rate_per_s']:g} requests/s: {schedule['requests']} requests "
                f"({schedule['long']} long) arriving over "
                f"{schedule['last_arrival_s']:.0f} s"
            ),
            "",
            *header(
                "router",
                "ok",
                "errors",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "e2e p50 ms",
                "e2e p99 ms",
                "preemptions",
                "requests/s",
                "output tokens/s",
                "decisions",
            ),
        ]
        for router, r in run["results"].items():
            by_reason = r["router_decisions"]["by_reason"]
            decisions = text(by_reason) if by_reason else f"{MISSING} (Serve's)"
            lines.append(
                row(
                    router,
                    r["ok"],
                    r["errors"],
                    _ms(r["ttft_s"]["p50"]),
                    _ms(r["ttft_s"]["p99"]),
                    _ms(r["e2e_s"]["p50"]),
                    _ms(r["e2e_s"]["p99"]),
                    r["preemptions"],
                    num(r["requests_per_s"], ".2f"),
                    num(r["output_tokens_per_s"], ".1f"),
                    decisions,
                )
            )
        if run.get("comparison"):
            lines += ["", _comparison_line(run["comparison"], run["results"])]
        lines.append("")
    return lines + router_variant_tables(data.get("variants", {}))


CHAT_HEADER = header(
    "router",
    "ok",
    "failed",
    "TTFT mean ms",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "hit rate",
    "of theoretical",
    "next turn same replica",
    "preemptions",
    "evicted pages",
    "requests/s",
    "output tokens/s",
    "decisions",
)


def router_chat_tables(path: Path, data: dict[str, Any]) -> list[str]:
    """``bench_router --workload chat``: the routers on multi-turn chat over shared system
    prompts, with the prefix hit rate against the workload's theoretical one."""
    settings, env = data["settings"], data["environment"]
    deployment, workload, plan = settings["deployment"], settings["workload"], data["schedule"]
    gpus = f", {deployment['replica_gpus']:g} GPU" if env.get("gpus") else ""
    lines = [
        f"### Router on multi-turn chat (`bench_router.py --workload chat`), {env['device']}",
        "",
        environment_line(path, env)
        + f"; {deployment['replicas']} replicas at {deployment['replica_cpus']} CPU{gpus}, "
        f"KV budget {deployment['kv_cache_bytes'] / 2**20:.0f} MiB each",
        "",
        *note_lines(data),
        f"{plan['conversations']} conversations of {plan['turns']} turns, starting at "
        f"{workload['start_rate_per_s']:g}/s over {plan['last_start_s']:.0f} s, over "
        f"{len(plan['by_system_prompt'])} shared {workload['system_tokens']}-token system "
        f"prompts (conversations each: {text(plan['by_system_prompt'])}); answers of "
        f"{workload['answer']} tokens, the last prompt {plan['last_prompt_tokens']} tokens",
        "",
        *CHAT_HEADER,
    ]
    lines += _chat_rows(data["results"])
    if data.get("repeat"):
        lines += [
            "",
            "Repeat (`repeat`), the same workload:",
            "",
            *CHAT_HEADER,
        ]
        lines += _chat_rows(data["repeat"]["results"])
    comparison = data.get("comparison") or {}
    ratios = [
        f"{other} {comparison[key]:.2f}x"
        for other in ("power-of-two", "prefix-affinity", "headroom-only")
        if (key := f"mean_ttft_{other}_over_free_pages") in comparison
    ]
    if ratios:
        lines += [
            "",
            "Mean TTFT of each router over free-pages' (main run): "
            + ", ".join(ratios)
            + " (targets: "
            "power-of-two ≥ 2x, prefix-affinity ≥ 1.2x).",
        ]
    return lines + [""]


def _chat_rows(results: dict[str, Any]) -> list[str]:
    lines = []
    for router, r in results.items():
        by_reason = r["router_decisions"]["by_reason"]
        lines.append(
            row(
                router,
                r["ok"],
                r["failed"],
                _ms(r["ttft_s"].get("mean")),
                _ms(r["ttft_s"]["p50"]),
                _ms(r["ttft_s"]["p99"]),
                num(100 * r["hit_rate"], ".1f", "%"),
                num(100 * r["hit_rate_of_theoretical"], ".0f", "%"),
                num(
                    None
                    if r["next_turn_same_replica"] is None
                    else 100 * r["next_turn_same_replica"],
                    ".0f",
                    "%",
                ),
                r["preemptions"],
                r["prefix_evicted_pages"],
                num(r["requests_per_s"], ".2f"),
                num(r["output_tokens_per_s"], ".1f"),
                text(by_reason) if by_reason else MISSING,
            )
        )
    return lines


def router_variant_tables(variants: dict[str, Any]) -> list[str]:
    """Other router settings measured with the same schedules (``variants``: name -> runs)."""
    lines = []
    for name, variant in variants.items():
        where = []
        if "environment" in variant:
            where.append(variant["environment"]["device"])
        if "deployment" in variant:
            budget = variant["deployment"]["kv_cache_bytes"] / 2**20
            where.append(f"KV budget {budget:.0f} MiB per replica")
        lines += [
            f"Variant: {name}" + (f" ({', '.join(where)})" if where else ""),
            "",
            *header(
                "requests/s",
                "router",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "preemptions",
                "requests/s served",
            ),
        ]
        for run in variant["runs"]:
            for router, r in run.items():
                if isinstance(r, dict) and "ttft_s" in r:
                    lines.append(
                        row(
                            f"{run['rate_per_s']:g}",
                            router,
                            _ms(r["ttft_s"]["p50"]),
                            _ms(r["ttft_s"]["p99"]),
                            r["preemptions"],
                            num(r["requests_per_s"], ".2f"),
                        )
                    )
        lines.append("")
    return lines


def figure_table(columns: dict[str, dict[str, Any]], skip: tuple[str, ...] = ()) -> list[str]:
    """One column per named result, one row per figure any of them reports ("–" where one
    does not)."""
    keys = dict.fromkeys(k for result in columns.values() for k in result if k not in skip)
    lines = header("figure", *columns)
    lines += [row(key, *(text(r.get(key)) for r in columns.values())) for key in keys]
    return lines + [""]


def soak_tables(path: Path, data: dict[str, Any]) -> list[str]:
    """One column per run, one row per reported figure; a run's load phases in a table of their
    own."""
    runs = {name: body["result"] for name, body in data.get("runs", {}).items()}
    lines = [
        "### GPU soak (`soak_gpu.py`)",
        "",
        environment_line(path, data["environment"]),
        "",
        *note_lines(data),
    ]
    lines += figure_table(runs, skip=("pytest_tail", "phases"))
    for name, result in runs.items():
        if result.get("phases"):
            lines += [f"Load phases of `{name}`, each measured after it:", ""]
            lines += figure_table({f"phase {i}": p for i, p in enumerate(result["phases"], 1)})
    return lines


def attention_tables(path: Path, data: dict[str, Any]) -> list[str]:
    lines = [
        "### Decode attention alone (`bench_attention.py`)",
        "",
        environment_line(path, data["environment"])
        + "; FlashInfer tensor-core decode, head_dim 128, bf16, one layer, in a CUDA graph",
        "",
        (
            "one page: each slot shown as one page; chosen: the page size the engine picks "
            "(`replica/attention/kernel_pages.py`); paged-16: the paged mode's 16-token blocks."
        ),
        "",
        *header(
            "shape",
            "batch",
            "context",
            "chosen page",
            "one page µs",
            "chosen µs",
            "paged-16 µs",
            "chosen / paged-16",
            "chosen TB/s",
            "fp8 µs",
            "fp8 / bf16",
        ),
    ]
    for shape, rows in data["results"].items():
        for r in rows:
            lines.append(
                row(
                    shape,
                    r["batch"],
                    r["context"],
                    r["chosen_page_tokens"],
                    num(r["one_page_us"], ".1f"),
                    num(r["chosen_us"], ".1f"),
                    num(r["paged16_us"], ".1f"),
                    num(r["chosen_over_paged16"], ".3f", "x"),
                    num(r["chosen_hbm_tb_s"], ".2f"),
                    num(r.get("fp8_chosen_us"), ".1f"),
                    num(r.get("fp8_over_bf16_chosen"), ".2f", "x"),
                )
            )
    return lines + [""]


TABLES = (
    ("mapping", mapping_tables),
    ("engine", engine_tables),
    ("attention", attention_tables),
    ("layout", layout_tables),
    ("soak", soak_tables),
    ("load", load_tables),
    ("router", router_tables),
)
#: Results shown from every file, newest first (the engine and the router on each device); the
#: rest: the newest file only.
EVERY_FILE = ("engine", "router", "layout")


def shown_results() -> dict[str, list[Result]]:
    """The result files the README shows, by prefix."""
    shown: dict[str, list[Result]] = {}
    for prefix, _ in TABLES:
        found = every(prefix)
        if found:
            shown[prefix] = found if prefix in EVERY_FILE else found[:1]
    return shown


def render(shown: dict[str, list[Result]]) -> str:
    """The tables of every shown result file, each followed by its plots (those that exist)."""
    sections: list[str] = []
    for prefix, table in TABLES:
        for path, data in shown.get(prefix, []):
            sections += table(path, data)
            plots = [p for p in plot_paths(prefix, path) if p.exists()]
            if plots:
                sections += [f"![{p.stem}]({p.relative_to(HERE).as_posix()})" for p in plots]
                sections.append("")
    return "\n".join(sections)


def main() -> None:
    from benchmarks.plots import write_plots  # matplotlib is needed only to draw

    shown = shown_results()
    for path in write_plots(shown):
        print(f"wrote {path}")
    readme = HERE / "README.md"
    head, rest = readme.read_text().split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render(shown)}\n{END}{tail}")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
