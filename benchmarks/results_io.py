"""Reading the benchmark results in ``benchmarks/results/`` and naming their plots; shared by
``report.py`` (tables) and ``plots.py`` (PNGs), so neither imports the other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
Result = tuple[Path, dict[str, Any]]

#: The plots of each result prefix, by the suffix added to the result file's name ("" for none).
PLOT_NAMES: dict[str, tuple[str, ...]] = {
    "engine": ("throughput", "decode-step"),
    "mapping": ("",),
    "router": ("",),
    "prefix": ("ttft-by-turn",),
}


def every(prefix: str, results: Path = RESULTS) -> list[Result]:
    """The result files of ``prefix``, newest first (by the date they were measured); smoke-sized
    runs are left out."""
    found = [
        (p, json.loads(p.read_text()))
        for p in results.glob(f"{prefix}-*.json")
        if "smoke" not in p.name
    ]
    return sorted(found, key=lambda item: item[1]["environment"]["date"], reverse=True)


def newest(prefix: str, results: Path = RESULTS) -> Result | None:
    return next(iter(every(prefix, results)), None)


def plot_path(result: Path, name: str) -> Path:
    """Where the plot ``name`` of a result file goes: beside it, named after it (workload, device,
    date), e.g. ``engine-nvidia-h100-80gb-hbm3-2026-11-27-throughput.png``."""
    return result.with_name(f"{result.stem}-{name}.png" if name else f"{result.stem}.png")


def plot_paths(prefix: str, result: Path) -> list[Path]:
    return [plot_path(result, name) for name in PLOT_NAMES.get(prefix, ())]


def router_runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per arrival rate (``runs``); a file with a single run holds it at the top level."""
    if "runs" in data:
        return data["runs"]
    settings = data["settings"]
    return [
        {
            "rate_per_s": settings["workload"]["rate_per_s"],
            "schedule": settings["schedule"],
            "results": data["results"],
            "comparison": data.get("comparison"),
        }
    ]
