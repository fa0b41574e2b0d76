"""The GPU proof in one resumable command (issue #27): the GPU suite and the benchmarks, in parts
(``benchmarks/gpu_proof_parts.py``: priority order, a time budget each).

    python -m benchmarks.gpu_proof --list                      # the parts, budgets, what is done
    python -m benchmarks.gpu_proof                             # every part not yet done
    python -m benchmarks.gpu_proof --parts suite,state_machine --deadline-s 560 \\
        --wheels .devwhl --pack $OUT/gpu-proof.tar.gz           # on the GPU machine
    python -m benchmarks.gpu_proof unpack gpu-proof.tar.gz     # here: the results into the tree

Setup first, when a part is to run: ``--wheels DIR`` (default ``.devwhl`` when present) installs
the wheels of ``shared/tools/device-wheels.sh`` into /tmp/site, on the subprocesses' PYTHONPATH;
the extension is built in place (``setup.py build_ext --inplace``) when ``replica/_vmm*.so`` for
this interpreter is missing or was built from other sources. Both are skipped when up to date.

Each part runs its commands in their own process group; past its budget the group gets SIGINT
(Python's ``finally`` blocks and pytest's report run), and SIGKILL ``--grace-s`` later: the part is
``timed_out``. Its record, ``<results>/<part>.json``, is written as soon as it ends (status ok,
failed, timed_out or skipped; seconds; return code; the code hash; device; torch and CUDA
versions; date; the files it wrote; key numbers), beside its log ``<part>.log`` and its output
folder ``<part>/``. The code hash covers the files of csrc/ replica/ cluster/ benchmarks/ (less
benchmarks/results/ and build outputs), read from disk, so a copy of the tree without git hashes
alike. A part ``ok`` at the same hash is not run again (``--force`` runs it); a part done at
other code is. ``--deadline-s`` starts no part whose budget (and grace) would end past that many
seconds from the command's start, so the pack still happens inside the caller's limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from benchmarks.gpu_proof_parts import CODE, PARTS, Part
from benchmarks.gpu_proof_records import (
    Record,
    done,
    load_records,
    pack,
    save_record,
    summary,
    unpack,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("benchmarks/results/gpu-proof")
NOT_CODE_DIRS = {"__pycache__", "build"}  # plus dot-folders and *.egg-info
NOT_CODE_SUFFIXES = (".so", ".pyc", ".pyo", ".o")
SITE = Path("/tmp/site")
PROBE = """
import importlib.util, json, platform, sys
info = {"python": platform.python_version(), "device": "cpu", "cuda_available": False}
info["modules"] = {name: importlib.util.find_spec(name) is not None for name in sys.argv[1:]}
try:
    import torch
    info |= {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info |= {"cuda_available": True, "device": torch.cuda.get_device_name(0)}
except ImportError:
    pass
print(json.dumps(info))
"""


def code_hash(root: Path, folders: Sequence[str] = CODE, exclude: Path | None = None) -> str:
    """A digest of the files (relative path and bytes) under ``folders``, less results and build
    outputs: what a copy of the tree without git holds alike."""
    digest = hashlib.sha256()
    files = [p for folder in folders for p in (root / folder).rglob("*") if p.is_file()]
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        dirs = rel.parts[:-1]
        if (
            rel.as_posix().startswith("benchmarks/results/")
            or (exclude is not None and path.is_relative_to(exclude))
            or any(d in NOT_CODE_DIRS or d.startswith(".") or d.endswith(".egg-info") for d in dirs)
            or rel.name.startswith(".")
            or rel.name.endswith(NOT_CODE_SUFFIXES)
        ):
            continue
        digest.update(rel.as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Run:
    """One invocation's settings. ``info``: the environment (device, versions, which modules
    import), probed in a subprocess when None (so this process never holds a CUDA context)."""

    root: Path
    results: Path
    hashes: dict[tuple[str, ...], str]  # the code hash of each part's folders
    site: Path | None = None
    budget_scale: float = 1.0
    deadline_s: float | None = None
    grace_s: float = 20.0
    force: bool = False
    info: dict[str, Any] | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)

    def code(self, part: Part) -> str:
        return self.hashes[part.folders]

    def env(self, part: Part | None = None) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        paths = [str(self.site)] if self.site else []
        paths += [str(self.root), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if self.site:  # Ray's CLI
            env["PATH"] = f"{self.site / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")  # H100 and H200, as results so far
        return env | dict(part.env if part else ())

    def probe(self, parts: Sequence[Part]) -> dict[str, Any]:
        if self.info is not None:
            return self.info
        modules = sorted({need for part in parts for need in part.needs} - {"cuda"})
        done = subprocess.run(
            [sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, env=self.env()
        )
        if done.returncode:
            return {"device": "unknown", "modules": {}, "probe_error": done.stderr[-2000:]}
        return json.loads(done.stdout)


def run_group(
    argv: Sequence[str],
    log: IO[str],
    env: dict[str, str],
    cwd: Path,
    timeout_s: float,
    grace_s: float,
) -> tuple[int | None, bool]:
    """Runs ``argv`` in a process group of its own: (its return code, whether it ran out of time).
    Out of time: SIGINT to the group, SIGKILL ``grace_s`` later. Whatever of the group outlives
    its leader is killed, also when this process is interrupted. The part starts with SIGINT's
    default action even where this process ignores it (a command started with ``&`` from a
    script inherits SIGINT ignored, and so would every part: no clean-up at its budget)."""
    if timeout_s <= 0:
        return None, True
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        signal_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    finally:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, timed_out


def _default_sigint() -> None:  # in the child, before exec: dispositions set there are kept
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group is gone
        pass


def new_record(part: Part, run: Run, info: dict[str, Any], status: str, **fields: Any) -> dict:
    return {
        "part": part.name,
        "status": status,
        "seconds": 0.0,
        "returncode": None,
        "reason": None,
        "code_hash": run.code(part),
        "budget_s": part.budget_s * run.budget_scale,
        **{key: info.get(key) for key in ("device", "torch", "cuda", "python")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commands": [shlex.join(command) for command in part.commands],
        "files": [],
        "counts": {},
        **fields,
    }


def run_part(part: Part, run: Run, info: dict[str, Any]) -> Record:
    """Runs the part's commands under its budget; its record (not yet saved)."""
    out, log_path = run.results / part.name, run.results / f"{part.name}.log"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env, started = run.env(part), time.monotonic()
    deadline = started + part.budget_s * run.budget_scale
    status, returncode = "ok", None
    with log_path.open("w") as log:
        for command in part.commands:
            argv = [
                a.replace("{python}", sys.executable).replace("{out}", str(out)) for a in command
            ]
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            returncode, timed_out = run_group(
                argv, log, env, run.root, deadline - time.monotonic(), run.grace_s
            )
            if timed_out or returncode:
                status = "timed_out" if timed_out else "failed"
                break
        if status != "ok" and "ray" in part.needs:  # nothing of Ray's left for the next part
            stop = [sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"]
            run_group(stop, log, env, run.root, 30, 5)
    seconds = round(time.monotonic() - started, 1)
    try:
        counts = part.parse(out, log_path.read_text(errors="replace")) if part.parse else {}
    except (OSError, ValueError, KeyError, TypeError) as error:  # ET.ParseError is a ValueError
        counts = {"parse_error": f"{type(error).__name__}: {error}"}
    files = [p for p in sorted(out.rglob("*")) if p.is_file()] + [log_path]
    rel = [p.relative_to(run.root).as_posix() for p in files]
    return new_record(
        part, run, info, status, seconds=seconds, returncode=returncode, files=rel, counts=counts
    )


def missing(part: Part, info: dict[str, Any]) -> str | None:
    for need in part.needs:
        if need == "cuda" and not info.get("cuda_available"):
            return "no CUDA device"
        if need != "cuda" and not info.get("modules", {}).get(need):
            return f"{need} does not import (pass --wheels DIR)"
    return None


def run_proof(parts: Sequence[Part], run: Run) -> list[str]:
    """Runs, in order, each part not done at this code; saves each record as its part ends.
    Returns the parts that failed or ran out of time."""
    records, info, bad = load_records(run.results), None, []
    for part in parts:
        if not run.force and done(records.get(part.name), run.code(part)):
            print(f"{part.name}: done at this code", flush=True)
            continue
        info = info or run.probe(parts)
        budget, elapsed = part.budget_s * run.budget_scale, time.monotonic() - run.started
        reason = missing(part, info) or (part.gate and part.gate(records, run.code(part)))
        if reason:
            record = new_record(part, run, info, "skipped", reason=reason)
        elif run.deadline_s is not None and elapsed + budget + run.grace_s > run.deadline_s:
            left = run.deadline_s - elapsed
            print(f"{part.name}: not started ({left:.0f} s left, budget {budget:.0f} s)")
            continue
        else:
            print(f"{part.name}: running, budget {budget:.0f} s", flush=True)
            record = run_part(part, run, info)
        save_record(run.results, record)
        records[part.name] = record
        print(f"{part.name}: {record['status']} {record['reason'] or ''}", flush=True)
        if record["status"] in ("failed", "timed_out"):
            bad.append(part.name)
            log = run.results / f"{part.name}.log"
            print("".join(log.read_text(errors="replace").splitlines(True)[-15:]), flush=True)
    return bad


def setup(run: Run, wheels: Path | None) -> None:
    """Installs the wheels into :data:`SITE` and builds the extension, each when not up to date;
    raises CalledProcessError (the log says why)."""
    run.results.mkdir(parents=True, exist_ok=True)
    with (run.results / "setup.log").open("w") as log:
        if wheels is not None and run.site is not None:
            found = sorted(wheels.glob("*.whl"))
            want = "".join(f"{p.name} {p.stat().st_size}\n" for p in found)
            stamp = run.site / ".vattn-wheels"
            if not (stamp.exists() and stamp.read_text() == want):
                pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
                pip += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(run.site)]
                subprocess.run([*pip, *map(str, found)], stdout=log, stderr=log, check=True)
                stamp.write_text(want)
        built = run.root / "replica" / f"_vmm{sysconfig.get_config_var('EXT_SUFFIX')}"
        sources = [run.root / "setup.py", *sorted((run.root / "csrc").iterdir())]
        digest = hashlib.sha256(built.name.encode())
        for source in sources:
            digest.update(source.name.encode() + source.read_bytes())
        stamp = run.root / "build" / "gpu-proof-vmm.sha256"
        if not (built.exists() and stamp.exists() and stamp.read_text() == digest.hexdigest()):
            build = [sys.executable, "setup.py", "build_ext", "--inplace", "--force"]
            subprocess.run(build, cwd=run.root, stdout=log, stderr=log, check=True, env=run.env())
            stamp.parent.mkdir(exist_ok=True)
            stamp.write_text(digest.hexdigest())


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the part's group is killed, the pack written


def arguments(parts: Sequence[Part]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("action", nargs="?", choices=("run", "unpack"), default="run")
    add("archive", nargs="?", type=Path, help="unpack: the .tar.gz to extract")
    add("--parts", help=f"comma-separated, of: {','.join(p.name for p in parts)} (default all)")
    add("--force", action="store_true", help="run parts already done at this code")
    add("--list", action="store_true", help="list the parts, their budgets and state")
    add("--budget-scale", type=float, default=1.0, help="multiplies every budget")
    add("--deadline-s", type=float, help="start no part that could end later than this")
    add("--grace-s", type=float, default=20.0, help="from SIGINT to SIGKILL past a budget")
    add("--wheels", type=Path, help="wheels to install into /tmp/site (default .devwhl if there)")
    add("--skip-setup", action="store_true", help="no wheels, no build of the extension")
    add("--results", type=Path, default=RESULTS, help=f"the results folder (default {RESULTS})")
    add("--pack", type=Path, help="at the end, pack the results folder into this .tar.gz")
    return parser


def hashes(parts: Sequence[Part], results: Path) -> dict[tuple[str, ...], str]:
    return {folders: code_hash(ROOT, folders, results) for folders in {p.folders for p in parts}}


def codes(parts: Sequence[Part], hashes: dict[tuple[str, ...], str]) -> dict[str, str]:
    """Each part's code hash, by name."""
    return {part.name: hashes[part.folders] for part in parts}


def main(argv: Sequence[str] | None = None, parts: Sequence[Part] = PARTS) -> int:
    parser = arguments(parts)
    args = parser.parse_args(argv)
    results = (ROOT / args.results).resolve()
    if not results.is_relative_to(ROOT):
        parser.error(f"--results must lie in the tree ({ROOT})")
    if args.action == "unpack":
        if args.archive is None:
            parser.error("unpack needs the archive's path")
        print(f"unpacked {len(unpack(args.archive, ROOT, results))} files into {results}")
        print(summary(load_records(results), codes(parts, hashes(parts, results))))
        return 0
    names = [name for name in (args.parts or "").split(",") if name]
    if unknown := set(names) - {part.name for part in parts}:
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(p.name for p in parts)}")
    selected = [part for part in parts if not names or part.name in names]
    if args.wheels and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels}: no such folder")
    wheels = args.wheels or (ROOT / ".devwhl" if (ROOT / ".devwhl").is_dir() else None)
    site = SITE if wheels else None
    run = Run(ROOT, results, hashes(parts, results), site, args.budget_scale, args.deadline_s)
    run = dataclasses.replace(run, grace_s=args.grace_s, force=args.force)
    records = load_records(results)
    to_run = [p for p in selected if args.force or not done(records.get(p.name), run.code(p))]
    if args.list:
        width = max(len(part.name) for part in selected)
        for part in selected:
            record = records.get(part.name) or {"status": "never run", "code_hash": run.code(part)}
            last = record["status"] + ("" if record["code_hash"] == run.code(part) else ", stale")
            state = f"{'to run' if part in to_run else 'done'} ({last})"
            budget = part.budget_s * run.budget_scale
            print(f"{part.name:{width}} {budget:5.0f} s  {state:26} {part.what}")
        return 0
    signal.signal(signal.SIGTERM, interrupted)
    bad: list[str] = []
    try:
        if to_run and not args.skip_setup:
            setup(run, wheels)
        bad = run_proof(selected, run)
    except subprocess.CalledProcessError as error:
        print(f"setup failed ({error}); see {results / 'setup.log'}")
        bad = ["setup"]
    except KeyboardInterrupt:
        print("interrupted: the part under way has no record and runs again next time")
        bad = ["interrupted"]
    finally:
        if args.pack:
            print(f"packed {pack(results, ROOT, args.pack)} files into {args.pack}")
    print(summary(load_records(results), codes(selected, run.hashes)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
