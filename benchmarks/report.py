"""Writes benchmarks/README.md's results tables from the JSON in benchmarks/results/ (never typed
by hand) and the PNG plots beside them.

    python -m benchmarks.report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def every(prefix: str) -> list[tuple[Path, dict[str, Any]]]:
    """The result files of ``prefix``, newest first (by the date they were measured)."""
    found = [(p, json.loads(p.read_text())) for p in RESULTS.glob(f"{prefix}-*.json") if "smoke" not in p.name]
    return sorted(found, key=lambda item: item[1]["environment"]["date"], reverse=True)


def newest(prefix: str) -> tuple[Path, dict[str, Any]] | None:
    return next(iter(every(prefix)), None)


def environment_line(path: Path, env: dict[str, Any]) -> str:
    return (f"`{path.name}`: {env['device']}, driver {env.get('driver', '-')}, torch {env['torch']}, "
            f"Python {env['python']}, {env['date']}")


def note_lines(data: dict[str, Any]) -> list[str]:
    """A result file's ``note`` (how it was made, when runs were merged) as a paragraph."""
    return [data["note"], ""] if data.get("note") else []


def mapping_tables(path: Path, data: dict[str, Any]) -> list[str]:
    lines = ["### Page mapping (`bench_mapping.py`)", "", environment_line(path, data["environment"]), ""]
    latency = data["map_latency"]
    lines += ["| one page | median µs |", "|---|---|"]
    lines += [f"| {name.removesuffix('_us_median')} | {value:.1f} |" for name, value in latency.items()]
    lines += ["", "| run of pages | µs per page | GB/s |", "|---|---|---|"]
    lines += [f"| {r['run_pages']} | {r['us_per_page']:.1f} | {r['gb_per_s']:.1f} |" for r in data["batched"]]
    lines += ["", "| pages per step | step ms | caller's wait ms | wait % of step | submit ms | worker busy % |",
              "|---|---|---|---|---|---|"]
    for r in data["decode_overlap"]:
        lines.append(f"| {r['pages_per_step']} | {r['step_ms_mean']:.2f} | {r['wait_ms_mean']:.3f} | "
                     f"{r['wait_pct_of_step']:.2f} | {r.get('submit_ms_mean', float('nan')):.3f} | "
                     f"{r['worker_busy_pct_of_step']:.1f} |")
    return lines + [""]


def engine_tables(path: Path, data: dict[str, Any]) -> list[str]:
    lines = ["### Engine, offline (`bench_engine.py`)", "",
             environment_line(path, data["environment"])
             + f"; Llama-3-8B shapes, synthetic bf16 weights; batch {data['settings']['batch']}", "",
             *note_lines(data),
             ("vs paged: against the paged mode run the same way (CUDA graphs or eager, asynchronous or `-sync` "
              "scheduling); HF against paged."), "",
             "| workload | mode | attention | tokens/s | vs paged | mapping wait % | KV waste % | preemptions |",
             "|---|---|---|---|---|---|---|---|"]
    for workload, rows in data["results"].items():
        by_mode = {r["mode"]: r for r in rows}
        for r in rows:
            variant = "" if r["mode"].startswith("hf") else r["mode"].removeprefix("vattention").removeprefix("paged")
            paged = by_mode.get("paged" + variant)
            ratio = f"{r['tokens_per_s'] / paged['tokens_per_s']:.2f}x" if paged else "-"
            lines.append(f"| {workload} | {r['mode']} | {r.get('attention', '-')} | {r['tokens_per_s']:.0f} | {ratio} | "
                         f"{r.get('mapping_wait_pct', 0):.2f} | {r.get('kv_waste_pct_mean', 0):.2f} | "
                         f"{r.get('preemptions', 0)} |")
    lines += ["", "Decode step at full batch (median), against the roofline and the practical floor:", "",
              ("| workload | mode | step ms | roofline ms | share of roofline | linears (graph) ms | attention ms | "
               "floor ms | step / floor | GPU busy ms |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for workload, rows in data["results"].items():
        for r in rows:
            step = r.get("decode_step")
            if not step:
                continue
            lines.append(
                f"| {workload} | {r['mode']} | {step['step_ms']:.2f} | {step['roofline_ms']:.2f} | "
                f"{100 * step['roofline_share']:.0f}% | {step.get('linears_graph_ms', float('nan')):.2f} | "
                f"{step.get('attention_alone_ms', float('nan')):.2f} | {step.get('practical_floor_ms', float('nan')):.2f} | "
                f"{step.get('step_over_floor', float('nan')):.2f}x | {r.get('profiled_device_ms_per_step', float('nan')):.2f} |")
    return lines + [""]


def load_tables(path: Path, data: dict[str, Any]) -> list[str]:
    lines = ["### Load (`load_test.py`)", "", environment_line(path, data["environment"]), "",
             "| key | value |", "|---|---|"]
    summary = data.get("summary") or data.get("load", {})  # load_test writes its summary under "load"
    for key, value in ((k, v) for k, v in summary.items() if not isinstance(v, (dict, list))):
        lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return lines + [""]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def router_runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per arrival rate (``runs``); older files hold their one run at the top level."""
    if "runs" in data:
        return data["runs"]
    settings = data["settings"]
    return [{"rate_per_s": settings["workload"]["rate_per_s"], "schedule": settings["schedule"],
             "results": data["results"], "comparison": data.get("comparison")}]


def router_tables(path: Path, data: dict[str, Any]) -> list[str]:
    deployment = data["settings"]["deployment"]
    gpus = f", one GPU each ({data['environment']['gpus']} on the host)" if data["environment"].get("gpus") else ""
    lines = [f"### Router (`bench_router.py`), {data['environment']['device']}", "",
             environment_line(path, data["environment"])
             + f"; {deployment['replicas']} replicas of `{deployment['model']}` at {deployment['replica_cpus']} CPU"
             f"{gpus}, KV budget {deployment['kv_cache_bytes'] / 2**20:.0f} MiB each", "", *note_lines(data)]
    for run in router_runs(data):
        schedule = run["schedule"]
        lines += [(f"{run['rate_per_s']:g} requests/s: {schedule['requests']} requests ({schedule['long']} long) "
                   f"arriving over {schedule['last_arrival_s']:.0f} s"), "",
                  ("| router | ok | errors | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms | preemptions | "
                   "requests/s | output tokens/s | decisions |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
        for router, r in run["results"].items():
            decisions = ", ".join(f"{k} {v}" for k, v in r["router_decisions"]["by_reason"].items()) or "- (Serve's)"
            lines.append(f"| {router} | {r['ok']} | {r['errors']} | {_ms(r['ttft_s']['p50'])} | "
                         f"{_ms(r['ttft_s']['p99'])} | {_ms(r['e2e_s']['p50'])} | {_ms(r['e2e_s']['p99'])} | "
                         f"{r['preemptions']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {decisions} |")
        comparison = run.get("comparison") or {}
        ratio, fewer = comparison.get("p99_ttft_power_of_two_over_free_pages"), comparison.get("preemption_reduction")
        if comparison:
            ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
            fewer_text = "-" if fewer is None else f"{100 * fewer:.0f}%"
            lines += ["", (f"p99 TTFT, power-of-two over free-pages: {ratio_text} (target ≥ 1.3x); "
                           f"preemptions avoided by free-pages: {fewer_text} (target ≥ 50%).")]
        lines.append("")
    return lines + router_variant_tables(data.get("variants", {}))


def router_variant_tables(variants: dict[str, Any]) -> list[str]:
    """Other router settings measured with the same schedules (``variants``: name -> runs)."""
    lines = []
    for name, variant in variants.items():
        where = []
        if "environment" in variant:
            where.append(variant["environment"]["device"])
        if "deployment" in variant:
            where.append(f"KV budget {variant['deployment']['kv_cache_bytes'] / 2**20:.0f} MiB per replica")
        lines += [f"Variant: {name}" + (f" ({', '.join(where)})" if where else ""), "",
                  "| requests/s | router | TTFT p50 ms | TTFT p99 ms | preemptions | requests/s served |",
                  "|---|---|---|---|---|---|"]
        for run in variant["runs"]:
            for router, r in ((k, v) for k, v in run.items() if isinstance(v, dict) and "ttft_s" in v):
                lines.append(f"| {run['rate_per_s']:g} | {router} | {_ms(r['ttft_s']['p50'])} | {_ms(r['ttft_s']['p99'])} | "
                             f"{r['preemptions']} | {r['requests_per_s']:.2f} |")
        lines.append("")
    return lines


def soak_tables(path: Path, data: dict[str, Any]) -> list[str]:
    """One column per run, one row per reported figure (blank where a run does not report it)."""
    runs = {name: body["result"] for name, body in data.get("runs", {}).items()}
    keys = list(dict.fromkeys(k for result in runs.values() for k in result if k != "pytest_tail"))

    def cell(value: Any) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in value.items())
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["### GPU soak (`soak_gpu.py`)", "", environment_line(path, data["environment"]), "", *note_lines(data)]
    lines += ["| figure | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(cell(r[key]) if key in r else "" for r in runs.values()) + " |")
    return lines + [""]


TABLES = (("mapping", mapping_tables), ("engine", engine_tables), ("soak", soak_tables), ("load", load_tables),
          ("router", router_tables))
PLOT_FILES = {"engine": ("engine_throughput.png", "decode_step.png"), "mapping": ("mapping.png",),
              "router": ("router.png",)}
#: Results shown from every file, newest first (the router on GPUs and on CPU); the rest: the newest.
EVERY_FILE = ("router",)


def render(found: dict[str, tuple[Path, dict[str, Any]]],
           older: dict[str, list[tuple[Path, dict[str, Any]]]] | None = None) -> str:
    """The tables of ``found`` (the newest file of each prefix, with its plots), each followed by
    the tables of ``older`` files of the same prefix."""
    sections: list[str] = []
    for prefix, table in TABLES:
        if prefix in found:
            sections += table(*found[prefix])
            sections += [f"![{name}](results/{name})" for name in PLOT_FILES.get(prefix, ())
                         if (RESULTS / name).exists()] + [""]
            for item in (older or {}).get(prefix, []):
                sections += table(*item)
    return "\n".join(sections)


def main() -> None:
    from benchmarks.plots import write_plots

    found = {prefix: result for prefix, _ in TABLES if (result := newest(prefix))}
    older = {prefix: every(prefix)[1:] for prefix in EVERY_FILE}
    for path in write_plots(found, RESULTS):
        print(f"wrote {path}")
    readme = HERE / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render(found, older)}\n{END}{tail}")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
