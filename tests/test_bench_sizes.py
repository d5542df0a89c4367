"""``nst-benchmark sizes``: s per megapixel-iteration and peak RSS per output side, each side in a fresh process,
and whole default jobs; run at tiny sides (no timing assertions: the machine is shared)."""

from __future__ import annotations

import json
import math

import pytest

from nst_bench import sizes


def test_sizes_mode_reports_a_row_per_side_and_whole_jobs(onnx_path, image_files, tmp_path, capsys):
    from nst_bench.cli import main as benchmark_main
    out = tmp_path / "sizes.json"
    code = benchmark_main(["sizes", "--sides", "64,96", "--iterations", "3", "--model", str(onnx_path),
                           "--content", image_files[0], "--style", image_files[1], "--json", str(out),
                           "--reference-side", "64", "--whole-jobs", "96", "--whole-job-reference", "64",
                           "--whole-job-iterations", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stdout = captured.out
    # The CPU every figure was measured on comes first, with its bf16 flags.
    assert stdout.startswith("CPU: ") and "bf16 flags: " in stdout.splitlines()[0]
    for column in ("side", "size", "MP", "s/iteration", "s/MP-iteration", "ratio to 64 px", "peak RSS GiB",
                   "target GiB", "RSS ok", "iterations", "scales", "job s"):
        assert f"| {column} |" in stdout, column
    assert "| 64 px | 64x48 |" in stdout and "| 96 px | 96x72 |" in stdout
    assert "2 GiB + 400 B per output pixel" in stdout

    report = json.loads(out.read_text())
    assert report["command"].startswith("nst-benchmark sizes --sides 64,96")
    machine = report["machine"]
    assert {"cpu_model", "amx_bf16", "avx512_bf16", "cores", "torch"} <= set(machine)
    assert report["reference_side_px"] == 64 and report["iterations"] == 3
    rows = report["rows"]
    assert [row["side_px"] for row in rows] == [64, 96]
    for row in rows:
        assert "error" not in row, row
        assert row["iterations"] == 3
        assert row["s_per_iteration"] > 0 and row["s_per_mp_iteration"] > 0
        width, height = row["size_px"]
        assert row["megapixels"] == pytest.approx(width * height / 1e6)
        assert row["s_per_mp_iteration"] == pytest.approx(row["s_per_iteration"] / row["megapixels"])
        assert 0 < row["loaded_rss_gib"] <= row["peak_rss_gib"]
        assert row["rss_target_gib"] == pytest.approx(2 + 400 * width * height / 1024**3)
        assert row["rss_within_target"] == (row["peak_rss_gib"] <= row["rss_target_gib"])
    assert rows[0]["ratio_to_reference"] == 1.0
    assert rows[1]["ratio_to_reference"] == pytest.approx(rows[1]["s_per_mp_iteration"] / rows[0]["s_per_mp_iteration"])

    jobs = report["whole_jobs"]
    assert [job["side_px"] for job in jobs] == [64, 96]           # the reference job first
    for job in jobs:
        assert "error" not in job, job
        assert job["iterations"] == 3 and job["job_s"] > 0 and job["peak_rss_gib"] > 0
        assert job["size_px"][0] == job["side_px"] and job["stop_reason"] == "iterations_done"
    assert jobs[0]["ratio_to_reference"] == 1.0
    assert jobs[1]["ratio_to_reference"] == pytest.approx(jobs[1]["job_s"] / jobs[0]["job_s"])
    assert jobs[1]["scales"] >= 1


def test_per_iteration_time_leaves_the_first_iteration_out():
    """(elapsed(K) - elapsed(1)) / (K - 1) / megapixels; the peak against 2 GiB + 400 B per pixel."""
    progress = [{"iteration": i, "elapsed_ms": ms, "scale": 1, "scales": 1, "size_px": [1000, 500],
                 "remaining_ms": 0.0} for i, ms in ((1, 9000.0), (2, 10000.0), (3, 11500.0), (4, 12500.0))]
    measured = {"progress": progress, "result": {"precision": "bf16"}, "loaded_kib": 1024**2,
                "peak_kib": 3 * 1024**2, "cuda_peak_bytes": 0, "device": "cpu", "wall_s": 20.0}
    row = sizes.rate_row(1024, measured)
    assert row["first_iteration_s"] == 9.0
    assert row["s_per_iteration"] == pytest.approx(3.5 / 3)
    assert row["s_per_mp_iteration"] == pytest.approx(3.5 / 3 / 0.5)
    assert row["peak_rss_gib"] == 3.0 and row["loaded_rss_gib"] == 1.0
    assert row["rss_target_gib"] == pytest.approx(2 + 400 * 500_000 / 1024**3)
    assert row["rss_within_target"] is False and row["precision"] == "bf16"
    failed = sizes.rate_row(4096, {"error": "killed by signal 9 (SIGKILL: out of memory?)", "output_tail": []})
    rows = [row, failed]
    sizes.add_ratios(rows, "s_per_mp_iteration", row, "ratio_to_reference")
    assert row["ratio_to_reference"] == 1.0 and math.isnan(failed["ratio_to_reference"])
    table = sizes.rate_table(rows, 1024)
    assert "| ratio to 1024 px |" in table
    assert "| 4096 px | failed: killed by signal 9 (SIGKILL: out of memory?) |" in table


def test_a_failing_child_is_reported_not_raised(tmp_path, image_files):
    measured = sizes.run_child({"model": str(tmp_path / "missing.onnx"), "content": image_files[0],
                                "style": image_files[1], "device": None, "providers": None, "label": "64 px",
                                "settings": {"max_side_px": 64, "iterations": 2}}, timeout_s=300)
    assert measured["error"] == "exit status 1"
    assert any("missing.onnx" in line for line in measured["output_tail"])


@pytest.mark.parametrize("argv", [["--sides", "8"], ["--sides", "64,x"], ["--iterations", "1"],
                                  ["--whole-jobs", "0"]])
def test_bad_sides_or_iterations_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        sizes.main(argv)
    assert exit_.value.code == 2 and "nst-benchmark sizes: error:" in capsys.readouterr().err
