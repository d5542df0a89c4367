"""The replica's pass on packed oneDNN weights (:mod:`nst_server.packed`) gives the replica's features and
gradient to the image, in fp32 and bf16, both layouts, both poolings, a batch, maps on both sides of the packed
range; the engine picks it on the CPU and falls back, logged, where packing fails."""

import io
import logging

import pytest
import torch
from PIL import Image

from nst_server import engine, objective as objective_room, packed
from nst_server.events import JobInputs
from nst_server.settings import StyleTransferSettings


def _pass(replica, image, dtype):
    """Features and the gradient of a weighted sum of them to ``image``, under the job's autocast."""
    pixels = image.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        feats = replica(pixels, pooling=_pass.pooling)
    sum((feat.float() * (index + 1)).sum() for index, feat in enumerate(feats)).backward()
    return [feat.detach() for feat in feats], pixels.grad


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_pass_matches_the_replica(models, monkeypatch, precision, channels_last, pooling):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    usable, why = packed.available(dtype)
    monkeypatch.setattr(objective_room, "CHANNELS_LAST", channels_last)
    monkeypatch.setattr(models, "replica_casts", {})
    image = objective_room.replica_input(models, torch.rand(2, 3, 72, 104, generator=torch.Generator().manual_seed(1)))
    chosen = objective_room.replica_for(models, precision)
    if not usable:                                  # e.g. bf16 on an AVX2-only CPU: autocast's replica serves
        assert not isinstance(chosen, packed.PackedReplica), why
        return
    assert isinstance(chosen, packed.PackedReplica) and chosen is objective_room.replica_for(models, precision)
    # conv1_x (72 x 104 = 7488 positions) and conv2_x (1872) run through F.conv2d, conv3_x and deeper packed.
    monkeypatch.setattr(packed, "PACKED_MAX_POSITIONS", 1000)
    monkeypatch.setattr(objective_room, "PACKED_WEIGHTS", False)
    _pass.pooling = pooling
    want_feats, want_grad = _pass(objective_room.replica_for(models, precision), image, dtype)
    got_feats, got_grad = _pass(chosen, image, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(got_feats, want_feats):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert _relative(got, want) <= tolerance
    assert got_grad.dtype == torch.float32 and _relative(got_grad, want_grad) <= tolerance
    assert torch.count_nonzero(got_grad) > 0


def test_packed_layer_is_the_transposed_convolution():
    """The backward of one packed convolution + ReLU is autograd's for ``relu(conv2d(x, W, b, padding=1))``."""
    usable, why = packed.available(torch.float32)
    assert usable, why                               # fp32 packing needs only oneDNN, in every x86-64 torch build
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 16, 3, 3) * 0.1, torch.randn(24) * 0.1
    x = torch.randn(1, 16, 9, 7, requires_grad=True)
    y = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))
    grad_out = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, x, grad_out)
    flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = packed._ConvReLU.apply(x2, packed._pack(weight), packed._pack(flipped), bias)
    (got,) = torch.autograd.grad(y2, x2, grad_out)
    assert torch.allclose(y2, y, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def _job(models, small_images, **changes):
    content, style = (Image.open(io.BytesIO(data)).convert("RGB") for data in small_images)
    settings = StyleTransferSettings(max_side_px=48, iterations=3, **{"precision": "fp32", **changes})
    return list(engine.stylize(models, JobInputs(content=content, styles=[(style, 1.0)]), settings))[-1]


def test_packing_failure_falls_back_to_the_replica_logged(models, small_images, monkeypatch, caplog):
    monkeypatch.setattr(models, "replica_casts", {})

    def broken(weight):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(packed, "_pack", broken)
    with caplog.at_level(logging.WARNING, logger="nst_server.objective"):
        fallback = _job(models, small_images)
    assert "packed convolution weights" in caplog.text and "could not create a primitive" in caplog.text
    assert objective_room.replica_for(models, "fp32") is models.replica
    assert caplog.text.count("packed convolution weights") == 1          # tried once, not at every pass
    monkeypatch.undo()
    monkeypatch.setattr(models, "replica_casts", {})
    monkeypatch.setattr(objective_room, "PACKED_WEIGHTS", False)
    plain = _job(models, small_images)
    assert fallback.png == plain.png and fallback.costs == plain.costs


def test_packed_job_costs_match_the_replica_job(models, small_images, monkeypatch):
    monkeypatch.setattr(objective_room, "PACKED_WEIGHTS", True)
    with_packed = _job(models, small_images)
    monkeypatch.setattr(objective_room, "PACKED_WEIGHTS", False)
    without = _job(models, small_images)
    assert with_packed.costs.total == pytest.approx(without.costs.total, rel=1e-3)
    assert with_packed.costs.style == pytest.approx(without.costs.style, rel=1e-3)
