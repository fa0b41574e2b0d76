"""The GPU proof's plumbing on a CPU (benchmarks/gpu_proof.py): parts that are tiny ``python -c``
commands in a small tree of their own: resume by code hash, budgets enforced on the whole process
group, failures recorded while the rest go on, pack/unpack, the summary. No timings."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from benchmarks import gpu_proof
from benchmarks.gpu_proof import Run, code_hash, run_proof
from benchmarks.gpu_proof_parts import (
    CODE,
    PARTS,
    TESTED,
    Part,
    capacity_gate,
    parse_autoscaling,
    parse_engine,
    parse_junit,
    parse_mapping,
    parse_prefix,
    parse_router,
    small_capacity_gate,
    switch_gate,
)
from benchmarks.gpu_proof_records import load_records, pack, summary, unpack

RESULTS = Path("benchmarks/results/gpu-proof")
INFO = {"device": "Fake GPU", "torch": "0.0", "cuda": "0.0", "python": "3", "cuda_available": True}
INFO["modules"] = {"flashinfer": True}
JUNIT = (
    '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
    '<testcase classname="t" name="ok"/><testcase classname="t" name="bad"><failure/></testcase>'
    "</testsuite></testsuites>"
)


def fake(name: str, *codes: str, budget: float = 60, **fields) -> Part:
    """A part running ``python -c CODE`` for each code, in order."""
    return Part(name, budget, tuple(("{python}", "-c", code) for code in codes), **fields)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for rel in ("csrc/a.cpp", "replica/x.py", "cluster/y.py", "benchmarks/z.py", "tests/t.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    return root


def make_run(root: Path, **fields) -> Run:
    results = root / RESULTS
    hashes = {folders: code_hash(root, folders, results) for folders in (CODE, TESTED)}
    fields = {"info": INFO, "grace_s": 2.0} | fields
    return Run(root, results, hashes, **fields)


def record(root: Path, name: str) -> dict:
    return load_records(root / RESULTS)[name]


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent has not reaped it


def test_a_part_done_at_the_same_code_is_skipped_and_a_changed_file_runs_it_again(tree: Path):
    runs = tree / "runs.txt"
    part = fake("count", f"open({str(runs)!r}, 'a').write('x')")
    run_proof([part], make_run(tree))
    first = record(tree, "count")
    assert runs.read_text() == "x" and first["status"] == "ok"
    assert first["code_hash"] == code_hash(tree)

    run_proof([part], make_run(tree))  # done at this code: not run again, record untouched
    assert runs.read_text() == "x" and record(tree, "count") == first

    # Results, caches and builds are not code; a copy of the tree (no git) hashes alike.
    (tree / "benchmarks/results/other.json").write_text("{}")
    (tree / "replica/__pycache__").mkdir()
    (tree / "replica/__pycache__/x.cpython-312.pyc").write_bytes(b"\0")
    (tree / "replica/_vmm.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\0")
    assert code_hash(tree) == first["code_hash"]
    shutil.copytree(tree, tree.parent / "copy")
    assert code_hash(tree.parent / "copy") == first["code_hash"]

    (tree / "replica/x.py").write_text("# changed\n")
    run_proof([part], make_run(tree))
    assert runs.read_text() == "xx"
    assert record(tree, "count")["code_hash"] == code_hash(tree) != first["code_hash"]

    run_proof([part], make_run(tree, force=True))
    assert runs.read_text() == "xxx"


def test_tests_key_only_the_parts_that_run_them(tree: Path):
    before = make_run(tree)
    (tree / "tests/t.py").write_text("# a test changed\n")
    after = make_run(tree)
    assert after.hashes[CODE] == before.hashes[CODE]
    assert after.hashes[TESTED] != before.hashes[TESTED]


@pytest.fixture(params=["as_is", "ignored"])
def sigint(request: pytest.FixtureRequest):
    """This process's SIGINT as it is, or ignored (as in a command started with ``&`` from a
    script, which its children inherit)."""
    previous = signal.getsignal(signal.SIGINT)
    if request.param == "ignored":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield request.param
    signal.signal(signal.SIGINT, previous)


def test_a_part_past_its_budget_is_killed_with_its_group_and_recorded_timed_out(
    tree: Path, sigint: str
):
    """Also when the proof runs with SIGINT ignored (a full test run started with ``&`` once
    did): the part gets SIGINT's default action back, so its clean-up runs at its budget."""
    pid_file, cleaned = tree / "grandchild.pid", tree / "cleaned.txt"
    spawn = (
        "try:\n"
        "    import subprocess, sys, time\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "    time.sleep(120)\n"
        "finally:\n"  # SIGINT first: the part's own clean-up runs
        f"    open({str(cleaned)!r}, 'w').write('yes')\n"
    )
    deaf = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"
    after = tree / "after.txt"
    parts = [
        fake("slow", spawn, budget=2.5),
        fake("deaf", deaf, budget=0.5),  # ignores SIGINT: SIGKILL after the grace
        fake("after", f"open({str(after)!r}, 'w').write('ran')"),
    ]
    assert run_proof(parts, make_run(tree, grace_s=1.0)) == ["slow", "deaf"]
    for name, budget in (("slow", 2.5), ("deaf", 0.5)):
        timed_out = record(tree, name)
        assert timed_out["status"] == "timed_out"
        assert budget <= timed_out["seconds"] < budget + 1.0 + 5.0  # budget + grace + slack
    assert cleaned.read_text() == "yes"
    grandchild = int(pid_file.read_text())
    assert wait_for(lambda: not alive(grandchild)), "the part's grandchild outlived its budget"
    assert record(tree, "after")["status"] == "ok" and after.read_text() == "ran"


def test_failures_and_skips_are_recorded_and_the_rest_continue(tree: Path):
    second = tree / "second.txt"
    parts = [
        fake("fails", "print('boom'); raise SystemExit(3)", f"open({str(second)!r}, 'w')"),
        fake("needs_gpu", "pass", needs=("cuda",)),
        fake("needs_ray", "pass", needs=("ray",)),
        fake("gated", "pass", gate=lambda records, code: "the gate says no"),
        fake("last", "pass"),
    ]
    info = INFO | {"cuda_available": False}
    with redirect_stdout(io.StringIO()) as out:
        assert run_proof(parts, make_run(tree, info=info)) == ["fails"]
    failed = record(tree, "fails")
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert not second.exists(), "a part's later commands run after one failed"
    assert "boom" in (tree / failed["files"][-1]).read_text() and "boom" in out.getvalue()
    reasons = {name: record(tree, name)["reason"] for name in ("needs_gpu", "needs_ray", "gated")}
    assert reasons == {
        "needs_gpu": "no CUDA device",
        "needs_ray": "ray does not import (pass --wheels DIR)",
        "gated": "the gate says no",
    }
    assert all(record(tree, name)["status"] == "skipped" for name in reasons)
    assert record(tree, "last")["status"] == "ok"

    run_proof(parts, make_run(tree, info=INFO | {"modules": {"ray": True}}))  # not done: again
    assert {record(tree, n)["status"] for n in ("needs_gpu", "needs_ray")} == {"ok"}


def test_a_record_names_the_device_the_code_and_what_the_part_wrote(tree: Path):
    write = f"open(r'{{out}}/junit.xml', 'w').write({JUNIT!r}); print('{{out}}')"
    run_proof([fake("tests", write, parse=parse_junit, folders=TESTED)], make_run(tree))
    written = record(tree, "tests")
    assert written["device"] == "Fake GPU" and written["code_hash"] == make_run(tree).hashes[TESTED]
    assert written["files"] == [f"{RESULTS}/tests/junit.xml", f"{RESULTS}/tests.log"]
    assert written["counts"] == {"passed": 2, "failed": 1, "skipped": 1, "failed_tests": ["t::bad"]}
    assert written["budget_s"] == 60 and re.match(r"\d{4}-\d\d-\d\dT", written["date"])


def test_a_deadline_leaves_later_parts_pending_and_the_summary_lists_every_part(tree: Path):
    (tree / RESULTS).mkdir(parents=True)
    stale = {"part": "stale", "status": "ok", "seconds": 5.0, "code_hash": "old", "counts": {}}
    (tree / RESULTS / "stale.json").write_text(json.dumps(stale))
    parts = [
        fake("quick", "print(1)", budget=5),
        fake("fails", "raise SystemExit(1)", budget=5),
        fake("skipped", "pass", needs=("cuda",)),
        fake("long", "print(1)", budget=3600),
        fake("stale", "print(1)", budget=3600),
    ]
    with redirect_stdout(io.StringIO()):
        run_proof(parts, make_run(tree, deadline_s=60, info=INFO | {"cuda_available": False}))
    records, run = load_records(tree / RESULTS), make_run(tree)
    assert "long" not in records
    table = summary(records, {part.name: run.code(part) for part in parts}).splitlines()
    assert table[0].split()[:4] == ["part", "status", "seconds", "code"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert list(rows) == [part.name for part in parts]
    assert rows["quick"][1:2] + rows["quick"][3:4] == ["ok", "fresh"]
    assert rows["fails"][1] == "failed" and rows["long"][1:4] == ["pending", "-", "-"]
    assert rows["skipped"][1] == "skipped" and "no CUDA device" in table[3]
    assert rows["stale"][1:4] == ["ok", "5", "stale"]


def test_setup_builds_the_extension_when_missing_or_from_other_sources_and_installs_wheels(
    tree: Path,
):
    builds, built = tree / "builds.txt", f"replica/_vmm{sysconfig.get_config_var('EXT_SUFFIX')}"
    (tree / "setup.py").write_text(  # a stand-in for build_ext --inplace
        f"import sys\nopen({str(builds)!r}, 'a').write('b' if '--force' in sys.argv else 'x')\n"
        f"open({built!r}, 'w').write('')\n"
    )
    run = make_run(tree, site=tree / "site")
    gpu_proof.setup(run, None)
    gpu_proof.setup(run, None)
    assert builds.read_text() == "b"
    (tree / "csrc/a.cpp").write_text("// changed\n")
    gpu_proof.setup(run, None)
    (tree / "csrc/a.h").write_text("// a header changed: every source rebuilt (--force)\n")
    gpu_proof.setup(run, None)
    (tree / built).unlink()
    gpu_proof.setup(run, None)
    assert builds.read_text() == "bbbb"

    wheels = tree / "wheels"
    wheels.mkdir()
    (wheels / "fake-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    (tree / "site").mkdir()
    (tree / "site/.vattn-wheels").write_text("fake-1.0-py3-none-any.whl 9\n")
    gpu_proof.setup(run, wheels)  # installed already: pip is not called
    assert run.env()["PYTHONPATH"].startswith(f"{tree / 'site'}{os.pathsep}{tree}")
    assert run.env()["PATH"].startswith(str(tree / "site/bin"))
    (wheels / "fake-1.0-py3-none-any.whl").write_bytes(b"another wheel")
    with pytest.raises(subprocess.CalledProcessError):  # pip is called, and refuses it
        gpu_proof.setup(run, wheels)
    assert "fake-1.0-py3-none-any.whl" in (tree / RESULTS / "setup.log").read_text()


def test_pack_and_unpack_round_trip_and_unpack_refuses_paths_outside_the_results(tree: Path):
    write = "open(r'{out}/bench-result.json', 'w').write('{\"tokens_per_s\": 1}')"
    run_proof([fake("bench", write), fake("fails", "raise SystemExit(2)")], make_run(tree))
    archive = tree.parent / "proof.tar.gz"
    assert pack(tree / RESULTS, tree, archive) == 5  # 2 records, 2 logs, 1 result

    other = tree.parent / "other"
    names = unpack(archive, other, other / RESULTS)
    assert len(names) == 5
    for name in names:
        assert (other / name).read_bytes() == (tree / name).read_bytes()
    assert load_records(other / RESULTS) == load_records(tree / RESULTS)

    evil = tree.parent / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(tree / "replica/x.py", arcname=f"{RESULTS}/../../../replica/x.py")
    with pytest.raises(ValueError, match="not a file under"):
        unpack(evil, other, other / RESULTS)
    assert not (other / "replica").exists()


def test_the_command_runs_packs_and_unpacks(tree: Path, monkeypatch):
    monkeypatch.setattr(gpu_proof, "ROOT", tree)
    monkeypatch.setattr(Run, "probe", lambda self, parts: INFO)
    parts = [fake("first", "print('first')"), fake("second", "print('second')")]
    archive = tree.parent / "out" / "proof.tar.gz"
    argv = ["--skip-setup", "--parts", "second", "--pack", str(archive)]
    with redirect_stdout(io.StringIO()) as out:
        assert gpu_proof.main(argv, parts) == 0
    assert list(load_records(tree / RESULTS)) == ["second"] and "packed 2 files" in out.getvalue()
    shutil.rmtree(tree / RESULTS)
    with redirect_stdout(io.StringIO()) as out:
        assert gpu_proof.main(["unpack", str(archive)], parts) == 0
    rows = {line.split()[0]: line.split()[1] for line in out.getvalue().splitlines()[2:]}
    assert rows == {"first": "pending", "second": "ok"}
    with redirect_stdout(io.StringIO()) as out:
        assert gpu_proof.main(["--list"], parts) == 0
    listed = [line.split()[:5] for line in out.getvalue().splitlines()]
    assert listed == [["first", "60", "s", "to", "run"], ["second", "60", "s", "done", "(ok)"]]


def test_the_proof_s_parts_are_well_formed():
    root = gpu_proof.ROOT
    names = [part.name for part in PARTS]
    assert len(set(names)) == len(names) and names[:2] == ["suite", "suite_kv"]
    for part in PARTS:
        # One part, with the setup beside it, fits one 10-minute call of the GPU machine.
        assert 0 < part.budget_s <= 540, part.name
        for command in part.commands:
            module = command[2]
            if module == "pytest":
                paths = [arg for arg in command if arg.startswith("tests/")]
                assert paths and all((root / path).exists() for path in paths), part.name
                assert part.folders == TESTED
                continue
            source = (root / (module.replace(".", "/") + ".py")).read_text()
            for flag in (arg for arg in command if arg.startswith("--")):
                assert f'"{flag}"' in source, f"{part.name}: {module} has no {flag}"
    with redirect_stdout(io.StringIO()) as out:
        assert gpu_proof.main(["--list"]) == 0
    assert [line.split()[0] for line in out.getvalue().splitlines()] == names


def capacity_records(**speedups: float) -> dict:
    """Capacity-check records at code "h": part name -> 3 replicas' speedup over one."""
    return {
        part: {"status": "ok", "code_hash": "h", "counts": {"speedup_3_replicas": speedup}}
        for part, speedup in speedups.items()
    }


def test_the_capacity_gate_needs_three_replicas_to_serve_twice_one():
    assert capacity_gate(capacity_records(autoscaling_capacity=2.4), "h") is None
    assert "serve 1.3x one" in capacity_gate(capacity_records(autoscaling_capacity=1.3), "h")
    assert "first" in capacity_gate(capacity_records(autoscaling_capacity=2.4), "other code")


def test_the_small_model_runs_only_where_8b_replicas_add_no_capacity_and_its_own_do():
    """The issue's switch: the small Llama's capacity check runs where 8B-shaped replicas served
    less than twice one; its autoscaling run where its own three served at least twice one."""
    assert "first" in switch_gate({}, "h")
    assert "no switch" in switch_gate(capacity_records(autoscaling_capacity=2.4), "h")
    assert switch_gate(capacity_records(autoscaling_capacity=1.2), "h") is None
    both = capacity_records(autoscaling_capacity=1.2, autoscaling_capacity_small=2.7)
    assert small_capacity_gate(both, "h") is None
    too_few = capacity_records(autoscaling_capacity=1.2, autoscaling_capacity_small=1.5)
    assert "1.5x one" in small_capacity_gate(too_few, "h")
    assert "first" in small_capacity_gate(capacity_records(autoscaling_capacity=1.2), "h")


def test_key_numbers_are_read_from_the_benchmarks_result_files(tmp_path: Path):
    stored = gpu_proof.ROOT / "benchmarks/results"
    for name in (
        "prefix-cpu-x86_64-2026-12-02.json",
        "router-prefix-cpu-x86_64-2026-12-02.json",
        "autoscaling-cpu-x86_64-2026-12-02.json",
        "engine-nvidia-h200-2026-12-02.json",
    ):
        shutil.copy(stored / name, tmp_path / name)
    prefix = json.loads((stored / "prefix-cpu-x86_64-2026-12-02.json").read_text())
    chat = {
        (r["mode"], r["prefix_cache"]): r["generated_tokens_per_s"]
        for r in prefix["results"]["chat"]
    }
    counts = parse_prefix(tmp_path, "")
    paged = round(chat["paged", True] / chat["paged", False], 2)
    assert counts["chat_paged_blocks_on_over_off"] == paged
    assert set(counts) >= {"system_vattention_auto_on_over_off", "system_auto_ttft1_over_paged"}
    router = parse_router(tmp_path, "")
    assert router["mean_ttft_power-of-two_over_free_pages"] == 3.605
    assert router["failed_free-pages"] == 0 and "ttft_mean_s_prefix-affinity" in router
    assert parse_autoscaling(tmp_path, "")["speedup_3_replicas"] == 1.22
    engine = json.loads((stored / "engine-nvidia-h200-2026-12-02.json").read_text())
    speed = {r["mode"]: r["tokens_per_s"] for r in engine["results"]["sharegpt"]}
    ratio = round(speed["vattention"] / speed["paged"], 3)
    assert parse_engine(tmp_path, "")["sharegpt_vattention_over_paged"] == ratio == 0.968


def test_parse_mapping_reads_the_floor_under_each_load(tmp_path: Path) -> None:
    """A smoke run of bench_mapping on the host backend: each load's per-page costs, by name."""
    command = [sys.executable, "-m", "benchmarks.bench_mapping", "--smoke", "--backend", "host"]
    subprocess.run([*command, "--out", str(tmp_path)], check=True, capture_output=True)
    [path] = tmp_path.glob("mapping-*.json")
    rows = {row["load"]: row for row in json.loads(path.read_text())["under_load"]}
    counts = parse_mapping(tmp_path, "")
    assert counts["hbm_map_us_run16"] == round(rows["hbm"]["map_us_run16"], 1)
    assert {key.split("_")[0] for key in counts} == {"idle", "hbm"}
    assert len(counts) == 8  # four costs a load


def test_parse_engine_reads_a_floor_table(tmp_path: Path) -> None:
    """The H200's floor table (vAttention only, before rows named their mode): each case's step
    over its practical floor, by mode and case (#24 item 8's 1.14x and 1.20x)."""
    stored = Path(__file__).parents[2] / "benchmarks" / "results"
    shutil.copy(stored / "engine-floor-nvidia-h200-2026-12-02.json", tmp_path)
    counts = parse_engine(tmp_path, "")
    assert counts["floor_vattention_1x1024_over_floor"] == 1.143
    assert counts["floor_vattention_8x1024_over_floor"] == 1.198
    assert "floor_vattention_64x16384_over_floor" not in counts  # measured no whole batch
    assert not any(key.endswith("_device_busy") for key in counts)  # not profiled then
