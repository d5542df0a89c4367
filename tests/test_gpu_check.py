"""nst-gpu-check's machinery that the GPU run depends on, tested on the CPU: a step that runs past its time is
killed with everything it started, and the output folder packs into one archive (the device tool brings back
at most 8 files). The whole --smoke run is deploy/device/rehearse.sh (a CI step)."""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path

import pytest

from nst_tools import gpu_check


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state                  # a zombie waiting for its reaper counts as gone


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_a_step_past_its_time_is_killed_with_what_it_started(tmp_path):
    """The step's shell starts a background sleep and waits: at the limit both are killed (only the direct
    child was before: an orphaned server would hold the GPU), the exit code is 124 and the log says so."""
    pid_file, log = tmp_path / "pid", tmp_path / "step.log"
    code = gpu_check._run(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], log, timeout_s=1.0)
    assert code == 124
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert "timed out after 1 s" in log.read_text() and not gpu_check._CHILDREN


def test_a_step_that_ends_leaves_nothing_running(tmp_path):
    pid_file, log = tmp_path / "pid", tmp_path / "step.log"
    code = gpu_check._run(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; echo done"], log, timeout_s=30.0)
    assert code == 0 and log.read_text().strip() == "done"
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_the_output_folder_packs_into_one_archive(tmp_path):
    folder = tmp_path / "gpu_check"
    (folder / "benchmark").mkdir(parents=True)
    for name in ("summary.json", "machine.json", "parity.json", "benchmark/benchmark.json", "large_2048.png",
                 "large_4096.jpg", "large_2048_1024.jpg"):
        (folder / name).write_text(name)
    (tmp_path / "out").mkdir()
    target = gpu_check.archive(folder, tmp_path / "out" / "gpu_check.tar.gz")
    with tarfile.open(target) as tar:            # the full-size pictures travel beside it, their previews in it
        assert sorted(tar.getnames()) == sorted(["gpu_check", "gpu_check/benchmark", "gpu_check/summary.json",
                                                 "gpu_check/machine.json", "gpu_check/parity.json",
                                                 "gpu_check/benchmark/benchmark.json",
                                                 "gpu_check/large_2048_1024.jpg"])
    assert os.listdir(tmp_path / "out") == ["gpu_check.tar.gz"]


def test_the_sweep_reports_each_cell(onnx_path):
    """The sweep's cells at a CPU size: seconds per iteration and iterations for each precision (TF32 is fp32 on
    the CPU), no peak memory off CUDA, and a cell past the deadline skipped, not run."""
    figures = gpu_check.sweep(onnx_path, (32,), ("fp32", "tf32"), iterations=3, cell_cap_s=60.0)
    for precision in ("fp32", "tf32"):
        cell = figures["cells"][precision]["32"]
        assert cell["iterations"] == 3 and cell["s_per_iteration"] > 0 and cell["peak_gib"] is None
    late = gpu_check.sweep(onnx_path, (32,), ("fp32",), deadline=time.monotonic() - 1)
    assert late["cells"]["fp32"]["32"] == {"error": "skipped: out of time budget"}


def test_conv_search_timings_time_each_shape_in_each_mode(onnx_path):
    """The CUDA EP's first-call and steady times per shape for HEURISTIC and EXHAUSTIVE (run here on the CPU
    provider, which ignores the option: the machinery, not the figure); the module setting is restored."""
    from nst_server import model
    figures = gpu_check.conv_search_timings(onnx_path, ["CPUExecutionProvider"], 64, repeats=1)
    assert set(figures) == {"HEURISTIC", "EXHAUSTIVE"} and model.CUDNN_CONV_ALGO_SEARCH == "HEURISTIC"
    for per_shape in figures.values():
        assert set(per_shape) == {"64x64", "32x48", "64x48"}
        assert all(t["first_s"] > 0 and t["steady_s"] > 0 for t in per_shape.values())


def test_large_jobs_run_whole_default_jobs_and_write_their_pictures(onnx_path, tmp_path):
    """The large_jobs step at CPU sizes: a whole default job per side (3 scales, the default iterations), the
    seconds and iterations of each scale adding up to the job's, the picture and its preview written; a side
    past the deadline is skipped, not run."""
    from PIL import Image

    figures = gpu_check.large_jobs(onnx_path, (96,), tmp_path)
    job = figures["jobs"]["96"]
    assert "error" not in job and job["size"] == [96, 72] and job["peak_gib"] is None
    assert len(job["scales"]) == 3 and sum(scale["iterations"] for scale in job["scales"].values()) == job["iterations"]
    assert job["scales"]["3"]["size"] == [96, 72] and job["scales"]["1"]["size"][0] < 96
    assert 0 < sum(scale["seconds"] for scale in job["scales"].values()) <= job["seconds"]
    with Image.open(tmp_path / job["result"]) as picture:
        assert picture.size == (96, 72)
    assert (tmp_path / "large_96_1024.jpg").is_file()
    late = gpu_check.large_jobs(onnx_path, (40,), tmp_path, deadline=time.monotonic() - 1)
    assert late["jobs"]["40"] == {"error": "skipped: out of time budget"}


def test_unknown_steps_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main([str(tmp_path / "out"), "--steps", "sweep,warp_drive"])
    assert stopped.value.code == 2 and "warp_drive" in capsys.readouterr().err
