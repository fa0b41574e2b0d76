"""What a benchmark result must name: the device, the software versions and the date."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def sleep_cycles_per_ms() -> float:
    """The current CUDA device's ``torch.cuda._sleep`` cycles per millisecond, measured (a GPU
    sleep keeps the device busy while the host runs ahead, for timing what it enqueues)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm: the first launch's cost is not the rate's
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    return 1_000_000 / start.elapsed_time(end)


def describe_device(backend: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "backend": backend,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
    }
    if backend == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["cuda_runtime"] = torch.version.cuda
        try:
            lines = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()  # one line per GPU
            info["driver"] = lines[0] if lines else "unknown"
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = "unknown"
    else:
        info["device"] = f"CPU ({platform.machine()})"
    return info


def save(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Writes ``<name>-<device>-<date>.json`` and returns its path."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    device = (
        str(payload["environment"]["device"])
        .lower()
        .replace(" ", "-")
        .replace("(", "")
        .replace(")", "")
    )
    date = str(payload["environment"]["date"])[:10]
    path = out_dir / f"{name}-{device}-{date}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
