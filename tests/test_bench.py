"""``nst bench`` against a real server: the JSON and CSV fields, the PNG plot, the percentiles."""

import csv
import json
import math
import os
import threading
import time

import pytest

from nst_client.bench import CSV_COLUMNS, percentiles, synthetic_pair
from nst_client.cli import main as client_main
from nst_server.objective import evaluate
from nst_server.settings import StyleTransferSettings
from nst_server.targets import compute_targets


def test_percentiles_match_numpy():
    np = pytest.importorskip("numpy")
    values = [0.3, 1.2, 0.7, 2.5, 0.9, 1.1, 4.0]
    stats = percentiles(values)
    for p in (50, 90, 95, 99):
        assert stats[f"p{p}"] == pytest.approx(np.percentile(values, p))
    assert percentiles([2.0])["p99"] == 2.0
    assert math.isnan(percentiles([])["p50"])


def test_bench_sweep_writes_json_csv_and_png(server, tmp_path):
    pytest.importorskip("matplotlib")
    out_json, out_csv, out_png = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    code = client_main(["bench", "--server", server, "--size", "32", "--iterations", "2",
                        "--concurrency", "1,2", "--jobs-per-level", "2", "--warmup-jobs", "1",
                        "--output-json", str(out_json), "--output-csv", str(out_csv), "--plot", str(out_png)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["settings"]["max_side_px"] == 32 and report["settings"]["iterations"] == 2
    assert "CPUExecutionProvider" in report["model"]["execution_providers"]
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["completed"] == level["jobs"] == 2 and level["errors"] == {}
        assert level["jobs_per_s"] > 0
        assert level["iterations_per_s"] == pytest.approx(2 * level["jobs_per_s"])
        first, result = level["time_to_first_progress_s"], level["time_to_result_s"]
        for key in ("p50", "p90", "p95", "p99"):
            assert 0 < first[key] <= result[key] <= level["wall_s"]
        assert first["p50"] <= first["p90"] <= first["p95"] <= first["p99"]
        assert len(level["timings"]) == 2
    rows = list(csv.reader(out_csv.open()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 3
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_pair_is_two_pngs():
    content, style = synthetic_pair(64)
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(content)).size == (64, 48)
    assert Image.open(io.BytesIO(style)).size == (64, 64)


def test_iteration_flops_by_hand():
    from nst_bench.measure import iteration_flops
    flops = iteration_flops(32, 32)
    # conv1_1 at 32x32: 2 * 1024 * 3 * 64 * 9; conv5_1 at 2x2: 2 * 4 * 512 * 512 * 9
    assert flops["forward"] > 2 * 1024 * 3 * 64 * 9 + 2 * 4 * 512 * 512 * 9
    by_hand = sum(2 * side * side * c_in * c_out * 9 for side, c_in, c_out in [
        (32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256), (8, 256, 256), (8, 256, 256),
        (8, 256, 256), (4, 256, 512), (4, 512, 512), (4, 512, 512), (4, 512, 512), (2, 512, 512)])
    assert flops["forward"] == flops["backward"] == by_hand
    grams = 4 * (64**2 * 1024 + 128**2 * 256 + 256**2 * 64 + 512**2 * 16 + 512**2 * 4)
    assert flops["gram"] == grams and flops["total"] == 2 * by_hand + grams


def test_tutorial_loop_costs_the_same_function_as_the_engine(models, small_images):
    """The tutorial loop's J of its first image (the content) is the engine's J of that image."""
    import io

    import torch
    from PIL import Image

    
    from nst_bench.tutorial import run_tutorial
    from nst_server.images import resize_to_max_side, to_tensor
    content, style = (Image.open(io.BytesIO(data)).convert("RGB") for data in small_images)
    settings = StyleTransferSettings.preset("classic", max_side_px=32, iterations=3, precision="fp32")
    trace = run_tutorial(models, content, style, settings, 3)
    assert len(trace.times_s) == len(trace.totals) == 3
    c = to_tensor(resize_to_max_side(content, 32))
    targets = compute_targets(models, c, [(to_tensor(resize_to_max_side(style, 32)), 1.0)], settings)
    with torch.no_grad():
        expected = evaluate(models.replica(c), c * 255.0, targets, settings).total.item()
    assert trace.totals[0] == pytest.approx(expected, rel=1e-4)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")
def test_serving_cpu_counts_the_main_thread_and_not_the_worker():
    """nst-benchmark's serving figure: CPU of the main thread (and of threads named otherwise), not of a
    worker thread that keeps the process's name."""
    from nst_bench.measure import serving_cpu_s, thread_cpu_s

    def burn(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    burnt, release = threading.Event(), threading.Event()

    def work() -> None:                 # stays alive until read: /proc lists live threads only
        burn(0.4)
        burnt.set()
        release.wait(30)

    pid = os.getpid()
    before = thread_cpu_s(pid)
    worker = threading.Thread(target=work)
    worker.start()
    burnt.wait(30)
    burn(0.15)
    after = thread_cpu_s(pid)
    release.set()
    worker.join()
    assert after[pid][1] - before[pid][1] >= 0.12
    assert any(tid not in before and seconds >= 0.35 for tid, (_, seconds) in after.items())   # the worker's
    assert 0.12 <= serving_cpu_s(pid, before, after) < 0.35


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")
def test_voluntary_switches_count_a_threads_sleeps():
    """nst-benchmark's compute-thread figure reads voluntary_ctxt_switches per thread: a thread that sleeps 5
    times has slept at least 5 times more."""
    from nst_bench.measure import voluntary_switches

    tid = threading.get_native_id()
    before = voluntary_switches(os.getpid())
    for _ in range(5):
        time.sleep(0.002)
    after = voluntary_switches(os.getpid())
    assert after[tid] - before[tid] >= 5
