"""``nst-benchmark contention``: small jobs idle, with two replicas on the same CPUs and beside CPU-bound
spinners, per server environment variant; run at tiny settings (no assertion about speed or ratios: the machine
is shared)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest

from nst_bench import contention


def _gone(pid: int, what: str) -> bool:
    """True when ``pid`` is no process, or another one than ``what`` (a pid reused since)."""
    try:
        return what not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_contention_mode_reports_three_scenarios_per_variant(onnx_path, image_files, tmp_path, capsys):
    from nst_bench.cli import main as benchmark_main
    out = tmp_path / "contention.json"
    code = benchmark_main(["contention", "--size", "32", "--iterations", "2", "--jobs", "2", "--model",
                           str(onnx_path), "--content", image_files[0], "--style", image_files[1],
                           "--server-env", "marked:NST_CONTENTION_TEST=1", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stdout = captured.out
    # The CPU every figure was measured on comes first, with its bf16 flags.
    assert stdout.startswith("CPU: ") and "bf16 flags: " in stdout.splitlines()[0]
    assert ("| variant | idle s/job | two replicas s/job (ratio) | busy neighbours s/job (ratio) |"
            in stdout)
    rows = [line for line in stdout.splitlines() if line.startswith("| default |")
            or line.startswith("| marked (NST_CONTENTION_TEST=1) |")]
    assert len(rows) == 2 and all(line.count("x)") == 2 for line in rows), stdout
    assert "target (issue 24): two replicas <= 2.5 x idle s/job" in stdout

    report = json.loads(out.read_text())
    assert report["command"].startswith("nst-benchmark contention --size 32")
    assert {"cpu_model", "amx_bf16", "avx512_bf16", "cores", "usable_cpus"} <= set(report["machine"])
    assert report["variants"] == {"default": {}, "marked": {"NST_CONTENTION_TEST": "1"}}
    spinners = len(os.sched_getaffinity(0))
    assert report["settings"]["spinners"] == spinners and report["settings"]["jobs"] == 2
    runs = report["runs"]
    assert [run["variant"] for run in runs] == ["default", "marked"]      # default first
    for run in runs:
        assert "error" not in run, run
        scenarios = run["scenarios"]
        assert set(scenarios) == {"idle", "two_replicas", "busy_neighbours"}
        expected_jobs = {"idle": 2, "two_replicas": 4, "busy_neighbours": 2}
        for name, figures in scenarios.items():
            assert len(figures["job_s"]) == expected_jobs[name], name
            assert all(s > 0 for s in figures["job_s"]) and figures["median_s"] > 0
            assert all(job["iterations"] == 2 for job in figures["jobs"])
        assert len(scenarios["idle"]["warmup"]) == 1 and len(scenarios["two_replicas"]["warmup"]) == 1
        # Two servers, each wave of two jobs sent through the multi-address target.
        assert scenarios["two_replicas"]["target"].startswith("ipv4:127.0.0.1:")
        assert len(run["servers"]) == 2 and run["servers"][0]["replica"] != run["servers"][1]["replica"]
        assert [len(wave) for wave in scenarios["two_replicas"]["waves"]] == [2, 2]
        for name in ("two_replicas", "busy_neighbours"):
            assert scenarios[name]["ratio_to_idle"] == pytest.approx(
                scenarios[name]["median_s"] / scenarios["idle"]["median_s"])
        # The spinners and the servers are gone after the run.
        busy = scenarios["busy_neighbours"]
        assert len(busy["spinner_pids"]) == spinners
        assert all(_gone(pid, "getppid") for pid in busy["spinner_pids"])
        assert all(_gone(server["pid"], "nst_server") for server in run["servers"])
    summary = report["summary"]
    assert [row["variant"] for row in summary] == ["default", "marked"]
    for row in summary:
        assert row["idle_s"] > 0 and row["two_replicas_s"] > 0 and row["busy_neighbours_s"] > 0
        assert row["two_replicas_within_target"] == (row["two_replicas_ratio"] <= 2.5)


@pytest.mark.parametrize("value", ["marked", "marked:", "marked:VAR", ":VAR=1", "default:VAR=1", "marked:1VAR=1",
                                   "marked:VAR=1,VAR=2", "bad name:VAR=1"])
def test_a_malformed_server_env_is_a_usage_error(value, capsys):
    from nst_bench.cli import main as benchmark_main
    with pytest.raises(SystemExit) as exit_:
        benchmark_main(["contention", "--server-env", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "nst-benchmark contention: error:" in err and "--server-env" in err


def test_a_variant_named_twice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        contention.main(["--server-env", "a:X=1", "--server-env", "a:Y=2"])
    assert exit_.value.code == 2 and "--server-env: the variant 'a' is named twice" in capsys.readouterr().err


def test_server_env_values_may_be_empty_or_hold_equals():
    assert contention.server_env("passive:OMP_WAIT_POLICY=PASSIVE,GOMP_SPINCOUNT=0") == (
        "passive", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"})
    assert contention.server_env("odd:A=,B=x=y") == ("odd", {"A": "", "B": "x=y"})
    with pytest.raises(argparse.ArgumentTypeError):
        contention.server_env("odd:A=1,")


def test_summary_and_table_from_runs():
    """Medians over every round's jobs, ratios over idle's; a failed run's error in the table."""
    def scenario(*times):
        return {"job_s": list(times)}
    runs = [{"round": 1, "variant": "default", "scenarios": {"idle": scenario(1.0, 3.0), "two_replicas":
             scenario(4.0, 5.0, 4.0, 5.0), "busy_neighbours": scenario(2.0, 2.0)}},
            {"round": 2, "variant": "default", "scenarios": {"idle": scenario(2.0, 2.0), "two_replicas":
             scenario(4.0, 6.0, 4.0, 6.0), "busy_neighbours": scenario(3.0, 3.0)}},
            {"round": 1, "variant": "spin0", "scenarios": {}, "error": "RuntimeError: nst-server exited"}]
    rows = contention.summary(runs, {"default": {}, "spin0": {"GOMP_SPINCOUNT": "0"}})
    default, spin0 = rows
    assert default["idle_s"] == 2.0 and default["two_replicas_s"] == 4.5 and default["busy_neighbours_s"] == 2.5
    assert default["two_replicas_ratio"] == 2.25 and default["two_replicas_within_target"] is True
    assert default["busy_neighbours_ratio"] == 1.25 and default["idle_jobs"] == 4
    assert math.isnan(spin0["idle_s"]) and spin0["two_replicas_within_target"] is None
    table = contention.table(rows)
    assert "| default | 2.000 | 4.500 (2.25x) | 2.500 (1.25x) |" in table
    assert "| spin0 (GOMP_SPINCOUNT=0) | failed: RuntimeError: nst-server exited |" in table
