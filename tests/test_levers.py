"""Speed levers change no result: channels_last, the one-product style gradient, the style Gram cache; and the
server runs its jobs on the thread that loaded the model (one OpenMP thread team)."""

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

import serving
from nst_server import costs, engine, objective as objective_room, targets as targets_room
from nst_server.images import resize_to_max_side
from nst_server.events import JobInputs
from nst_server.settings import StyleTransferSettings
from nst_server.targets import features, pyramid_sizes


def _reference_style_cost(style_gram, generated):
    """The seed's J_style^[l] through plain autograd (the formula of costs.style_layer_cost)."""
    n_c, n_h, n_w = generated.shape[1:]
    unrolled = generated.reshape(generated.shape[0], n_c, -1).float()
    diff = torch.bmm(unrolled, unrolled.transpose(1, 2)) - style_gram
    return diff.pow(2).flatten(1).sum(1) / (4.0 * n_c**2 * (n_h * n_w) ** 2)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype,bf16_product", [(torch.float32, True), (torch.bfloat16, True),
                                                (torch.bfloat16, False)])
def test_fast_style_gradient_matches_autograd(layout, dtype, bf16_product, monkeypatch):
    monkeypatch.setattr(costs, "BF16_STYLE_GRADIENT", bf16_product)
    torch.manual_seed(0)
    base = torch.rand(2, 16, 6, 5) * 3
    target = costs.gram_matrix(torch.rand(1, 16, 6, 5) * 3)
    generated = base.to(dtype).contiguous(memory_format=layout).requires_grad_(True)
    fast = costs.style_layer_cost(target, generated)
    (grad_fast,) = torch.autograd.grad((fast * torch.tensor([1.0, 2.0])).sum(), generated)
    plain = base.to(dtype).requires_grad_(True)
    slow = _reference_style_cost(target, plain)
    (grad_slow,) = torch.autograd.grad((slow * torch.tensor([1.0, 2.0])).sum(), plain)
    assert torch.allclose(fast, slow, rtol=1e-5)
    assert grad_fast.dtype == dtype and grad_fast.shape == generated.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((grad_fast.float() - grad_slow.float()).abs().max() / grad_slow.float().abs().max()) < tolerance


def test_bf16_style_gradient_product_matches_the_fp32_product(monkeypatch):
    """At a VGG layer's size (relu2_1 of a 96 px image, activations like a ReLU's) the bf16 backward product
    gives the fp32 product's gradient to within bf16's rounding (relative L2 under 1 %), and the cost is the
    same: the forward Gram matrix stays fp32."""
    torch.manual_seed(0)
    features = torch.relu(torch.randn(1, 128, 48, 48) * 20).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    target = costs.gram_matrix(torch.relu(torch.randn(1, 128, 48, 48) * 20))
    grads, values = {}, {}
    for bf16_product in (False, True):
        monkeypatch.setattr(costs, "BF16_STYLE_GRADIENT", bf16_product)
        generated = features.clone().requires_grad_(True)
        values[bf16_product] = costs.style_layer_cost(target, generated)
        (grads[bf16_product],) = torch.autograd.grad(values[bf16_product].sum(), generated)
    assert torch.equal(values[False], values[True])
    assert grads[True].dtype == torch.bfloat16
    error = (grads[True].float() - grads[False].float()).norm() / grads[False].float().norm()
    assert 0 < error < 1e-2


def test_gram_matrix_is_the_same_in_both_layouts():
    x = torch.rand(1, 8, 5, 7)
    assert torch.allclose(costs.gram_matrix(x), costs.gram_matrix(x.contiguous(memory_format=torch.channels_last)))


def _job(models, small_images, **changes):
    content, style = (Image.open(io.BytesIO(data)).convert("RGB") for data in small_images)
    inputs = JobInputs(content=content, styles=[(style, 1.0)])
    settings = StyleTransferSettings(max_side_px=32, iterations=3, **{"precision": "fp32", **changes})
    events = list(engine.stylize(models, inputs, settings))
    return events[0], events[-1]


def test_channels_last_changes_no_cost(models, small_images, monkeypatch):
    monkeypatch.setattr(objective_room, "CHANNELS_LAST", False)
    first_nchw, result_nchw = _job(models, small_images)
    monkeypatch.setattr(objective_room, "CHANNELS_LAST", True)
    first_cl, result_cl = _job(models, small_images)
    assert models.replica.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)
    assert first_cl.costs.total == pytest.approx(first_nchw.costs.total, rel=1e-5)
    assert result_cl.costs.total == pytest.approx(result_nchw.costs.total, rel=1e-3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_weights_cast_once_give_the_same_features_and_job(models, small_images, monkeypatch, channels_last):
    """The replica with its weights cast to bf16 once gives the bits autocast's per-call casts give (forward and
    the gradient to the image), is made once per layout, and leaves fp32 jobs on the replica itself."""
    monkeypatch.setattr(objective_room, "CHANNELS_LAST", channels_last)
    monkeypatch.setattr(objective_room, "PACKED_WEIGHTS", False)          # tests/test_packed.py tests that one
    run = objective_room.batch_pass(models)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 40, 56)
    key = (tuple(image.shape), "max", "bf16")
    results = {}
    for once in (False, True):
        monkeypatch.setattr(objective_room, "CAST_WEIGHTS_ONCE", once)
        pixels = image.clone().requires_grad_(True)
        feats = run(pixels, key)
        sum((feat.float() * (index + 1)).sum() for index, feat in enumerate(feats)).backward()
        results[once] = ([feat.detach() for feat in feats], pixels.grad)
    assert all(feat.dtype == torch.bfloat16 for feat in results[True][0])
    assert all(torch.equal(a, b) for a, b in zip(results[False][0], results[True][0]))
    assert torch.equal(results[False][1], results[True][1])
    cast = objective_room.replica_for(models, "bf16")
    assert cast is not models.replica and cast is objective_room.replica_for(models, "bf16")
    assert cast.conv1_1.weight.dtype == torch.bfloat16 and cast.input_mean.dtype == torch.float32
    assert cast.conv1_1.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert models.replica.conv1_1.weight.dtype == torch.float32
    assert objective_room.replica_for(models, "fp32") is models.replica
    first, result = _job(models, small_images, precision="bf16")
    monkeypatch.setattr(objective_room, "CAST_WEIGHTS_ONCE", False)
    first_cast, result_cast = _job(models, small_images, precision="bf16")
    assert first.costs == first_cast.costs and result.png == result_cast.png


def test_style_cache_serves_the_second_job(models, small_images, monkeypatch):
    monkeypatch.setattr(targets_room, "STYLE_CACHE_ENTRIES", 0)
    _, uncached = _job(models, small_images, seed=3)
    monkeypatch.setattr(targets_room, "STYLE_CACHE_ENTRIES", 2)
    models.style_cache.clear()
    calls = []
    real = features
    counted = lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)       # noqa: E731
    monkeypatch.setattr(targets_room, "features", counted)        # the targets' passes
    monkeypatch.setattr(engine, "features", counted)              # the delivered image's
    _, first = _job(models, small_images, seed=3)
    _, second = _job(models, small_images, seed=3)
    width, height = resize_to_max_side(Image.open(io.BytesIO(small_images[0])), 32).size
    levels = len(pyramid_sizes(height, width, StyleTransferSettings().pyramid_levels))
    # Per pyramid level: content and style, content and the delivered image; then no style.
    assert len(calls) == (2 * 2 + 1) * levels
    assert first.png == second.png == uncached.png
    _job(models, small_images, seed=3, style_scale=0.9)
    _job(models, small_images, seed=3, pooling="avg")
    assert len(models.style_cache) == 2                    # three keys seen, the oldest evicted


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads each thread's CPU time from Linux /proc")
def test_server_jobs_run_on_the_thread_that_loaded_the_model(onnx_path, small_images, tmp_path):
    """The server loads, warms up and runs jobs on the same thread, so the process keeps one OpenMP thread team
    (GNU OpenMP keeps one per thread that starts a parallel region; with loading on another thread the team's
    threads slept at every barrier: several hundred futex sleeps per iteration, seen with the old server).

    What holds on every CPU: the thread that did the most work while loading and warming up (the main thread
    aside) is the one that does the most work in a job, and the job starts no thread of its own. How often the
    team sleeps is a figure of the CPU and is measured by ``nst-benchmark`` (compute threads' voluntary context
    switches per iteration), not asserted here."""
    from nst_client import NSTClient
    from nst_bench.measure import thread_cpu_s

    server = serving.start(onnx_path, tmp_path / "server.log", ["--max-running-jobs", "1"])
    try:
        loaded = thread_cpu_s(server.pid)                   # after load and warm-up: SERVING
        with NSTClient(server.target) as client:
            client.stylize(*small_images, max_side_px=96, iterations=6)
            after = thread_cpu_s(server.pid)
    finally:
        server.stop()
    loader = max((tid for tid in loaded if tid != server.pid), key=lambda tid: loaded[tid][1])
    worker = max(after, key=lambda tid: after[tid][1] - loaded.get(tid, ("", 0.0))[1])
    assert worker == loader, (f"the job's busiest thread {worker} is not the loading thread {loader}: "
                              f"{ {tid: (loaded.get(tid, ('', 0.0))[1], after[tid][1]) for tid in after} }")
