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


# ---------------------------------------------------------------------------------------------------------
# nst-benchmark's floor stage: the bare network, its pass, the engine's profile, the stage's report
# ---------------------------------------------------------------------------------------------------------

def test_bare_network_gives_the_replicas_relu5_1(models):
    """The floor's network holds the replica's weights: in fp32 its output is the replica's relu5_1 (its input
    is the replica's minus input_mean, the one op it leaves out)."""
    import torch

    from nst_bench.floor import bare_network
    net = bare_network(models, torch.float32)
    assert isinstance(net[0], torch.nn.Conv2d) and isinstance(net[-1], torch.nn.ReLU)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net) == 13
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net) == 4
    assert not any(p.requires_grad for p in net.parameters())
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 80, device=models.device)            # (1, 3, H, W) RGB [0, 1]
    with torch.no_grad():
        expected = models.replica(image)[-1]                          # (1, 512, 4, 5)
        got = net((image - models.replica.input_mean).contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape == (1, 512, 4, 5)
    assert expected.abs().max() > 0
    assert torch.allclose(got.float(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    with pytest.raises(ValueError, match="deepest"):
        bare_network(models, torch.float32, deepest="relu5_1")


def test_floor_pass_s_is_a_positive_time(models):
    import torch

    from nst_bench.floor import bare_network, floor_pass_s
    seconds = floor_pass_s(bare_network(models, torch.float32, deepest="conv2_1"), 32, 48, torch.float32,
                           models.device, repeats=2, warmup=1)
    assert math.isfinite(seconds) and seconds > 0


def _small_inputs(small_images):
    import io

    from PIL import Image

    from nst_server.events import JobInputs
    content, style = (Image.open(io.BytesIO(data)).convert("RGB") for data in small_images)
    return JobInputs(content=content, styles=[(style, 1.0)])


def test_engine_profile_shares_sum_to_one_and_name_aten_ops(models, small_images):
    from nst_bench.floor import PROFILE_TOP, engine_profile
    settings = StyleTransferSettings.preset("classic", max_side_px=64, iterations=4, precision="fp32")
    table = engine_profile(models, _small_inputs(small_images), settings, start=1, count=2)
    assert 2 <= len(table) <= PROFILE_TOP + 1 and table[-1]["op"] == "other"
    assert sum(row["share"] for row in table) == pytest.approx(1.0, abs=1e-6)
    assert all(row["share"] >= 0 and row["ms_per_iteration"] >= 0 for row in table)
    ops = [row["op"] for row in table[:-1]]
    assert ops[0].startswith(("aten::", "mkldnn::"))
    # At 64 px every layer runs on packed weights (nst_server.packed) where oneDNN can: mkldnn's fused call.
    assert any(op in ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::convolution",
                      "aten::_convolution", "aten::cudnn_convolution", "mkldnn::_convolution_pointwise")
               for op in ops), ops


def test_floor_stage_reports_engine_over_floor_per_precision(models, small_images):
    from nst_bench.floor import floor_precisions, floor_stage
    stage = floor_stage(models, _small_inputs(small_images), 64, iterations=4, profile_iterations=2, repeats=1,
                        warmup=1, matmul_n=256, floor_repeats=2)
    assert stage["size_px"] == [64, 48]
    assert list(stage["precisions"]) == floor_precisions(models.device) and "fp32" in stage["precisions"]
    for figures in stage["precisions"].values():
        assert figures["engine_over_floor"] == pytest.approx(
            figures["engine_per_iteration_s"] / figures["floor_pass_s"])
        assert figures["engine_per_iteration_s"] > 0 and figures["floor_pass_s"] > 0
        assert figures["matmul_flop_per_s"] > 0 and figures["floor_fraction_of_matmul"] > 0
        assert sum(row["share"] for row in figures["profile"]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="precision"):
        floor_stage(models, _small_inputs(small_images), 64, iterations=4, warmup=1, precisions=["fp8"])


def test_the_quality_target_is_the_tutorials_last_finite_best_when_it_diverged():
    """The tutorial's J after N iterations, or, when its L-BFGS diverged on the way (NaN from some iteration on,
    as on an H200), the lowest finite J before that and the iteration it diverged at."""
    import math

    from nst_bench.measure import Trace
    from nst_bench.report import quality_target

    assert quality_target(Trace("tutorial", [1.0, 2.0, 3.0], [9.0, 7.0, 8.0])) == (8.0, None)
    assert quality_target(Trace("tutorial", [1.0, 2.0, 3.0, 4.0], [9.0, 6.0, 7.0, math.nan])) == (6.0, 4)
    assert quality_target(Trace("tutorial", [1.0, 2.0], [9.0, math.inf])) == (9.0, 2)
    target, diverged = quality_target(Trace("tutorial", [1.0], [math.nan]))
    assert math.isnan(target) and diverged == 1


def test_the_benchmarks_server_job_is_the_engines_job(server, models, small_images):
    """(c) runs the job (b) runs: the request carries the classic preset's weights, normalisation and pyramid
    levels, so the server's J per iteration is the engine's (until 2026-12-04 it ran the server's defaults)."""
    import io

    from PIL import Image

    from nst_bench.measure import run_engine, run_server
    from nst_server.events import JobInputs

    settings = StyleTransferSettings.preset("classic", max_side_px=48, iterations=3, precision="fp32")
    served = run_server(server, small_images[0], small_images[1], settings)
    inputs = JobInputs(content=Image.open(io.BytesIO(small_images[0])).convert("RGB"),
                       styles=[(Image.open(io.BytesIO(small_images[1])).convert("RGB"), 1.0)])
    engine = run_engine(models, inputs, settings)
    assert len(served.totals) == len(engine.totals) == 3
    assert served.totals == pytest.approx(engine.totals, rel=1e-4)
