"""Batching concurrent jobs of equal size into one replica pass (nst_server.batching), in-process and through
a real server."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from nst_server import engine, settings as settings_room
from nst_server.batching import ReplicaBatcher
from nst_server.costs import CostTerms
from nst_server.events import JobInputs, Result, STOP_CANCELLED, STOP_ITERATIONS, STOP_NON_FINITE
from nst_server.objective import batch_pass, evaluate
from nst_server.settings import StyleTransferSettings
from nst_server.targets import compute_targets


def _inputs(small_images) -> JobInputs:
    content, style = (Image.open(io.BytesIO(data)).convert("RGB") for data in small_images)
    return JobInputs(content=content, styles=[(style, 1.0)])


def _run_concurrently(models, inputs, settings_list, batcher, should_stop_list=None, timeout_s=300.0):
    """Run one job per settings in its own thread; return their Results (or raised exceptions) in order."""
    results: list = [None] * len(settings_list)
    should_stop_list = should_stop_list or [None] * len(settings_list)

    def job(index: int) -> None:
        try:
            *_, result = engine.stylize(models, inputs, settings_list[index], should_stop_list[index],
                                        batcher=batcher)
            results[index] = result
        except BaseException as exc:      # noqa: BLE001 - returned to the test
            results[index] = exc

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(settings_list))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
        assert not thread.is_alive(), "a batched job hung"
    return results


def test_a_batched_pass_gives_each_job_its_own_costs_and_gradient(models):
    """Three images with three different targets in one pass: each job's costs and dJ/dpixels equal those of a
    pass of its image alone (VGG-19's batch items are independent)."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, 48, 64, generator=generator) * 255.0 for _ in range(3)]
    settings = StyleTransferSettings()
    targets = [compute_targets(models, images[(i + 1) % 3] / 255.0, [(images[(i + 2) % 3] / 255.0, 1.0)],
                               settings) for i in range(3)]
    costs = [lambda feats, image, t=t: evaluate(feats, image, t, settings) for t in targets]
    run_pass = batch_pass(models)
    key = ((1, 3, 48, 64), "max", "fp32")
    alone = []
    for image, cost in zip(images, costs):
        pixels = image.clone().requires_grad_(True)
        j = cost(run_pass(pixels / 255.0, key), pixels)
        j[-1].sum().backward()
        alone.append((torch.stack(j).detach(), pixels.grad))
    batcher = ReplicaBatcher(run_pass, max_batch=3, max_wait_s=60.0)
    together: list = [None] * 3
    all_joined = threading.Barrier(3)

    def job(index: int) -> None:
        pixels = images[index].clone().requires_grad_(True)
        with batcher.joined(key):
            all_joined.wait(60)
            j = batcher.evaluate(key, pixels, costs[index])
        together[index] = (torch.stack(j).detach(), pixels.grad)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert batcher.stats.passes == 1 and batcher.stats.evaluations == 3
    for (j_alone, grad_alone), (j_batched, grad_batched) in zip(alone, together):
        torch.testing.assert_close(j_batched, j_alone, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad_batched, grad_alone, rtol=1e-4, atol=1e-4 * grad_alone.abs().max().item())
    assert not torch.allclose(together[0][1], together[1][1])


def test_batched_jobs_get_their_own_results(models, small_images):
    inputs = _inputs(small_images)
    settings = [StyleTransferSettings(max_side_px=64, iterations=6, seed=seed) for seed in (1, 2, 3)]
    alone = [list(engine.stylize(models, inputs, s))[-1] for s in settings]
    batcher = ReplicaBatcher(batch_pass(models), max_batch=3, max_wait_s=60.0)
    together = _run_concurrently(models, inputs, settings, batcher)
    # A job that starts iterating before the others have joined runs alone; once all three have joined, each
    # waits for the others (60 s at most): 3 jobs x 6 iterations in passes of 3 after the first few.
    assert batcher.stats.evaluations == 18 and batcher.stats.largest == 3 and batcher.stats.passes <= 10
    for single, batched in zip(alone, together):
        assert isinstance(batched, Result), batched
        assert batched.iterations == 6
        # Equal up to rounding, which L-BFGS amplifies over the iterations (about 1e-6 after two, 4e-4 after
        # six at this size): the gradients themselves are checked to 1e-4 above.
        assert batched.costs.total == pytest.approx(single.costs.total, rel=1e-2)
        assert np.abs(batched.image.astype(float) - single.image.astype(float)).mean() < 1.0
    assert together[0].costs.total != together[1].costs.total        # different seeds, different images


def test_different_sizes_or_settings_never_share_a_pass(models, small_images):
    inputs = _inputs(small_images)
    settings = [StyleTransferSettings(max_side_px=64, iterations=4),
                StyleTransferSettings(max_side_px=48, iterations=4),
                StyleTransferSettings(max_side_px=64, iterations=4, pooling="avg")]
    batcher = ReplicaBatcher(batch_pass(models), max_batch=3, max_wait_s=60.0)
    results = _run_concurrently(models, inputs, settings, batcher)
    assert all(isinstance(r, Result) for r in results), results
    assert batcher.stats.passes == batcher.stats.evaluations == 12


def test_a_job_that_leaves_does_not_hold_the_others(models, small_images):
    """With an (effectively) unbounded wait, a job still in its batch's group after it stopped would hang the
    other one: leaving the loop must leave the group."""
    inputs = _inputs(small_images)
    settings = [StyleTransferSettings(max_side_px=64, iterations=3),
                StyleTransferSettings(max_side_px=64, iterations=9, seed=5),
                StyleTransferSettings(max_side_px=64, iterations=9, seed=6)]
    polls = {"n": 0}

    def stop_after_two() -> bool:
        polls["n"] += 1
        return polls["n"] > 2

    batcher = ReplicaBatcher(batch_pass(models), max_batch=3, max_wait_s=3600.0)
    results = _run_concurrently(models, inputs, settings, batcher,
                                should_stop_list=[None, stop_after_two, None], timeout_s=600.0)
    assert [r.stop_reason for r in results] == [STOP_ITERATIONS, STOP_CANCELLED,
                                                STOP_ITERATIONS]
    assert [r.iterations for r in results] == [3, 2, 9]


def test_a_non_finite_job_does_not_spoil_its_batch(models, small_images, monkeypatch):
    # Requests cannot ask for such a weight any more (MAX_WEIGHT); the engine's non-finite guard stays.
    monkeypatch.setattr(settings_room, "MAX_WEIGHT", 1e39)
    inputs = _inputs(small_images)
    settings = [StyleTransferSettings(max_side_px=64, iterations=4, style_weight=1e38),   # J overflows
                StyleTransferSettings(max_side_px=64, iterations=4)]
    alone = list(engine.stylize(models, inputs, settings[1]))[-1]
    batcher = ReplicaBatcher(batch_pass(models), max_batch=2, max_wait_s=60.0)
    broken, healthy = _run_concurrently(models, inputs, settings, batcher)
    assert broken.stop_reason == STOP_NON_FINITE and broken.image.std() > 5
    assert healthy.stop_reason == STOP_ITERATIONS
    assert healthy.costs.total == pytest.approx(alone.costs.total, rel=1e-2)


def test_an_error_in_a_batched_pass_reaches_every_job_of_the_batch(models):
    def run_pass(images, key):               # what a pass too large for the device raises
        raise torch.OutOfMemoryError(f"no room for a batch of {images.shape[0]}")

    batcher = ReplicaBatcher(run_pass, max_batch=2, max_wait_s=60.0)
    errors: list = []
    all_joined = threading.Barrier(2)

    def job() -> None:
        pixels = torch.zeros(1, 3, 32, 32, requires_grad=True)
        with batcher.joined(("k",)):
            all_joined.wait(60)
            try:
                batcher.evaluate(("k",), pixels, lambda feats, image: CostTerms(*[feats[0].sum()] * 4))
            except torch.OutOfMemoryError as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == ["no room for a batch of 2"] * 2


def test_batcher_and_limits_arguments_are_checked():
    from nst_server.servicer import ServerLimits
    with pytest.raises(ValueError, match="max_batch"):
        ReplicaBatcher(lambda images, key: (), max_batch=0)
    for wait in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="max_wait_s"):
            ReplicaBatcher(lambda images, key: (), max_batch=2, max_wait_s=wait)
    with pytest.raises(ValueError, match="--max-batch-size must be between 1 and --max-running-jobs \\(1\\)"):
        ServerLimits(max_batch_size=4)
    for wait in (float("inf"), 1e13, float("nan"), -1.0):
        with pytest.raises(ValueError, match="--batch-wait-ms"):
            ServerLimits(max_running_jobs=2, max_batch_size=2, batch_wait_ms=wait)
    assert ServerLimits(max_running_jobs=4, max_batch_size=4, batch_wait_ms=3_600_000).max_batch_size == 4


def test_server_batches_concurrent_jobs(onnx_path, small_images, tmp_path):
    import serving
    from nst_client import NSTClient
    server = serving.start(onnx_path, tmp_path / "server.log", ["--max-running-jobs", "2", "--max-batch-size", "2",
                                                                "--batch-wait-ms", "5000"])
    try:
        with NSTClient(server.target, timeout_s=300) as client:
            assert client.model_info().max_batch_size == 2
            content, style = small_images
            outcomes: list = [None, None]

            def job(index: int) -> None:
                outcomes[index] = client.stylize(content, style, max_side_px=64, iterations=5, seed=index)

            threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            assert all(outcome is not None for outcome in outcomes)
            # The two jobs' 10 iterations went through shared passes (once both have joined, the 5 s wait
            # makes every iteration meet; the first to start may run a few alone).
            assert server.metric("nst_replica_batch_jobs_sum") == 10
            assert server.metric("nst_replica_batch_jobs_count") < 10
            alone = client.stylize(content, style, max_side_px=64, iterations=5, seed=1)
        assert outcomes[1].total_cost == pytest.approx(alone.total_cost, rel=1e-2)
        assert outcomes[0].total_cost != outcomes[1].total_cost
    finally:
        assert server.stop() == 0


def test_server_refuses_a_bad_batch_size(onnx_path):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "nst_server.cli", "--model", str(onnx_path), "--port", "0",
                           "--max-batch-size", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--max-batch-size" in done.stderr
