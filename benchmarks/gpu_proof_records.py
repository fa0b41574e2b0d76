"""The GPU proof's records on disk (``benchmarks/gpu_proof.py`` writes them): one JSON record a
part, ``<results>/<part>.json``, beside its log and output folder; which parts are done at a code
hash; the pack that carries the results folder back from the GPU machine and its unpacking; the
summary table.

    benchmarks/results/gpu-proof/
      suite.json  suite.log  suite/junit.xml
      prefix_chat.json  prefix_chat.log  prefix_chat/prefix-<device>-<date>.json
      ...
      setup.log
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from pathlib import Path
from typing import Any

Record = dict[str, Any]
STATUSES = ("ok", "failed", "timed_out", "skipped")


def load_records(results: Path) -> dict[str, Record]:
    records = {}
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        records[record["part"]] = record
    return records


def save_record(results: Path, record: Record) -> None:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{record['part']}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(path.with_suffix(".tmp"), path)  # never half a record, whenever this is killed


def done(record: Record | None, code: str) -> bool:
    """Whether the part is done at this code: only then is it not run again."""
    return bool(record) and record["status"] == "ok" and record["code_hash"] == code


def pack(results: Path, root: Path, path: Path) -> int:
    """Every file under the results folder, named from the tree's root, into one .tar.gz."""
    files = [p for p in sorted(results.rglob("*")) if p.is_file() and p.suffix != ".tmp"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for file in files:
            tar.add(file, arcname=file.relative_to(root).as_posix())
    return len(files)


def unpack(path: Path, root: Path, results: Path) -> list[str]:
    """Extracts a pack into the tree; refuses anything but files under the results folder."""
    prefix = results.relative_to(root).as_posix() + "/"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        for member in members:
            name = posixpath.normpath(member.name)
            if not member.isfile() or not name.startswith(prefix) or ".." in name.split("/"):
                raise ValueError(f"{path}: {member.name!r} is not a file under {prefix}")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members=members, **safe)
    return [member.name for member in members]


def key_numbers(record: Record) -> str:
    """The reason a part was skipped, or its counts (a list: its first items)."""
    if record.get("reason"):
        return str(record["reason"])
    shown = []
    for key, value in record.get("counts", {}).items():
        if isinstance(value, list):
            value = " ".join(map(str, value[:3])) + (" ..." if len(value) > 3 else "")
        if value not in ("", {}):
            shown.append(f"{key} {value}")
    return ", ".join(shown)


def summary(records: dict[str, Record], codes: dict[str, str]) -> str:
    """One row a part (``codes``: each part's code hash now, in order): status, seconds, whether
    its record is of this code (fresh) or older (stale), key numbers."""
    rows = [("part", "status", "seconds", "code", "key numbers")]
    for name, code in codes.items():
        record = records.get(name)
        if record is None:
            rows.append((name, "pending", "-", "-", ""))
            continue
        fresh = "fresh" if record["code_hash"] == code else "stale"
        seconds = f"{record['seconds']:.0f}"
        rows.append((name, record["status"], seconds, fresh, key_numbers(record)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4] for row in rows]
    return "\n".join(line.rstrip() for line in lines)
