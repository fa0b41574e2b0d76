"""PNG plots of benchmark results, written beside each result file and named after it
(``python -m benchmarks.report`` calls :func:`write_plots`). Needs matplotlib (the ``bench`` extra).

    engine-<device>-<date>-throughput.png    tokens/s per workload and mode (vAttention vs paged,
                                             graphs vs eager, HF)
    engine-<device>-<date>-decode-step.png   the full-batch decode step against its practical floor
                                             and roofline
    mapping-<device>-<date>.png              batched page-mapping throughput by run length
    router-<device>-<date>.png               TTFT p50/p99 per router and arrival rate
    router-prefix-<device>-<date>.png        TTFT mean/p99 per router on multi-turn chat
    prefix-<device>-<date>-ttft-by-turn.png  mean TTFT by turn per workload, mode, layout and
                                             host tier (bench_prefix)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from benchmarks.results_io import PLOT_NAMES, Result, plot_path, router_runs


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def engine_throughput(data: dict[str, Any], path: Path) -> Path:
    results = data["results"]
    modes = list(dict.fromkeys(r["mode"] for rows in results.values() for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):  # a mode appears only in the workloads it ran
        points = [
            (w + i * width, r["tokens_per_s"])
            for w, rows in enumerate(results.values())
            for r in rows
            if r["mode"] == mode
        ]
        bars = ax.bar([x for x, _ in points], [v for _, v in points], width, label=mode)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([w + width * (len(modes) - 1) / 2 for w in range(len(results))], list(results))
    ax.set_ylabel("generated tokens/s")
    ax.set_title(
        f"Engine throughput, batch {data['settings']['batch']}, {data['environment']['device']}"
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def decode_step(data: dict[str, Any], path: Path) -> Path:
    """Each decode step with a practical floor: the decode workload's modes (at its batch) and the
    floor table's (batch, context) cases. A result with neither has no such plot (KeyError)."""
    rows = [
        (r["mode"], r["decode_step"])
        for r in data["results"].get("decode", [])
        if r.get("decode_step", {}).get("practical_floor_ms")
    ]
    rows += [
        (f"batch {r['batch']}, {r['context']:,} keys", r)
        for r in data["results"].get("floor", [])
        if r.get("practical_floor_ms")
    ]
    if not rows:
        raise KeyError("no decode step with a practical floor")
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.5 * len(rows)))
    labels = [label for label, _ in rows]
    steps = [step for _, step in rows]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [s["step_ms"] for s in steps], 0.4, label="engine step (median)")
    ax.barh(
        [i - 0.2 for i in y],
        [s["linears_graph_ms"] for s in steps],
        0.4,
        label="floor: linears (CUDA graph)",
    )
    ax.barh(
        [i - 0.2 for i in y],
        [s["attention_alone_ms"] for s in steps],
        0.4,
        left=[s["linears_graph_ms"] for s in steps],
        label="floor: attention alone",
    )
    for i, s in zip(y, steps, strict=True):
        ax.plot([s["roofline_ms"]] * 2, [i - 0.45, i + 0.45], color="black", linewidth=1)
    ax.set_yticks(list(y), labels)
    ax.set_xlabel("ms per decode step at the full batch (black line: HBM roofline)")
    ax.set_title("Decode step vs its practical floor")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def mapping(data: dict[str, Any], path: Path) -> Path:
    rows = data["batched"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["run_pages"] for r in rows], [r["gb_per_s"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pages mapped per run (2 MiB each)")
    ax.set_ylabel("GB/s mapped")
    ax.set_title(f"Page mapping throughput, {data['environment']['device']}")
    return _save(fig, path)


def router(data: dict[str, Any], path: Path) -> Path:
    chat = data.get("benchmark") == "router-prefix"  # one run: multi-turn chat
    bars_at = (
        [(router, result) for router, result in data["results"].items()]
        + [
            (f"{router}\n(repeat)", result)
            for router, result in data.get("repeat", {}).get("results", {}).items()
        ]
        if chat
        else [
            (f"{router}\n{run['rate_per_s']:g}/s", result)
            for run in router_runs(data)
            for router, result in run["results"].items()
        ]
    )
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(bars_at)), 3.5))
    for i, key in enumerate(("mean", "p99") if chat else ("p50", "p99")):
        values = [result["ttft_s"][key] or 0.0 for _, result in bars_at]
        bars = ax.bar([x + i * 0.4 for x in range(len(bars_at))], values, 0.4, label=f"TTFT {key}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(
        [x + 0.2 for x in range(len(bars_at))], [label for label, _ in bars_at], fontsize=8
    )
    ax.set_ylabel("seconds")
    by = "router, multi-turn chat" if chat else "router and arrival rate"
    ax.set_title(f"Time to first token by {by}, {data['environment']['device']}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def prefix_turns(data: dict[str, Any], path: Path) -> Path:
    """Mean TTFT by turn, a line per mode, layout, cache setting and host tier, a panel per
    workload (the host tier's target: later turns as fast as the first)."""
    workloads = {name: rows for name, rows in data["results"].items() if rows}
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], workloads.items()):
        for row in rows:
            turns = row["ttft_mean_s_by_turn"]
            label = f"{row['mode']} {row.get('kv_layout', '')}"
            label += (" cache on" if row["prefix_cache"] else " cache off") + (
                f", {row['host_tier_gib']:g} GiB host tier" if row.get("host_tier_gib") else ""
            )
            ax.plot(range(1, len(turns) + 1), turns, marker="o", label=label)
        ax.set_xticks(range(1, max(len(r["ttft_mean_s_by_turn"]) for r in rows) + 1))
        ax.set_xlabel("turn")
        ax.set_ylabel("mean TTFT (s)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(f"Time to first token by turn, {data['environment']['device']}", fontsize=10)
    return _save(fig, path)


PLOTS = {
    "engine": (engine_throughput, decode_step),
    "mapping": (mapping,),
    "router": (router,),
    "prefix": (prefix_turns,),
}


def write_plots(shown: dict[str, list[Result]]) -> list[Path]:
    """Writes the plots of every result in ``shown`` (a result prefix -> its (path, data) files),
    each beside its result file (:func:`benchmarks.results_io.plot_path`)."""
    written = []
    for prefix, plots in PLOTS.items():
        for result, data in shown.get(prefix, []):
            for plot, name in zip(plots, PLOT_NAMES[prefix], strict=True):
                try:
                    written.append(plot(data, plot_path(result, name)))
                except KeyError:  # a result without the fields this plot needs
                    continue
    return written
