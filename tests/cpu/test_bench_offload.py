"""bench_offload at its smoke size on the host backend: both modes' offload and restore timed
against the reference copy of the same bytes, the fractions and ratios in the JSON, the paged
mode's batched copies counted (timings are never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_offload
from benchmarks.gpu_proof_parts import parse_offload


def test_the_smoke_run_reports_both_modes_against_the_pinned_reference(tmp_path: Path) -> None:
    path = bench_offload.main(["--smoke", "--backend", "host", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    assert path.name.startswith("offload-smoke-") and data["environment"]["device"]
    assert [r["tokens"] for r in data["results"]] == data["settings"]["tokens"] == [64, 256]
    for result in data["results"]:
        reference = result["reference"]
        assert reference["d2h_gb_per_s"] > 0 and reference["h2d_gb_per_s"] > 0
        rows = {row["cache"]: row for row in result["caches"]}
        assert {row["mode"] for row in rows.values()} == {"vattention", "paged"}
        assert set(rows) == {"interleaved", "per_layer", "paged"}
        for name, row in rows.items():
            phases = ["offload", "restore", "restore_e2e"]
            phases += ["restore_mapped"] if name != "paged" else []
            for phase in phases:
                assert row[f"{phase}_fraction"] > 0 and row[f"{phase}_gb_per_s"] > 0
                assert row[f"{phase}_fraction_of"] == "wall"  # no GPU on the host backend
            if name != "paged":  # the copy alone, then after shrink(): mapped first
                assert row["restore_pages_mapped"] == 0 < row["restore_mapped_pages_mapped"]
                assert row["restore_over_paged"] > 0 and row["restore_mapped_over_paged"] > 0
        paged = rows["paged"]  # a history's blocks in one staged copy, not one a block and view
        assert paged["offload_copies"] == paged["restore_copies"] == 1
        assert paged["copies_one_per_block_and_view"] == result["tokens"] // 16 * 2 * 2
    summary = data["summary"]
    for cache in ("interleaved", "per_layer", "paged"):
        assert summary[f"{cache}_offload_fraction_min"] > 0
        assert summary[f"{cache}_restore_fraction_min"] > 0
    assert summary["per_layer_restore_mapped_over_paged_min"] > 0


def test_the_gpu_proof_reads_the_summary_back(tmp_path: Path) -> None:
    bench_offload.main(["--smoke", "--backend", "host", "--out", str(tmp_path)])
    counts = parse_offload(tmp_path, "")
    assert counts["paged_offload_fraction_min"] > 0 and counts["gpu_covered"] is True
    assert counts["interleaved_restore_mapped_over_paged_min"] > 0
