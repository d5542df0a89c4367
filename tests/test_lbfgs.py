"""Our L-BFGS (nst_server.lbfgs): converges whatever the objective's scale, probes first, caps its steps."""

from __future__ import annotations

import pytest
import torch

from nst_server import lbfgs


def _quadratic(scale: float, n: int = 200):
    """``scale * sum(d_i (x_i - t_i)^2)`` with curvatures spread over two decades; its minimum is ``t``."""
    generator = torch.Generator().manual_seed(0)
    curvature = torch.logspace(-1, 1, n)
    target = torch.rand(n, generator=generator) * 255

    def value_and_grad(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        diff = x - target
        return scale * float((curvature * diff * diff).sum()), scale * 2 * curvature * diff
    return value_and_grad, target


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_converges_alike_whatever_the_objectives_scale(scale):
    """A normalised cost of order 1 has gradients of a few millionths per pixel level; torch.optim.LBFGS's
    absolute tolerances (y.s > 1e-10) kept no curvature pair then and the image stalled."""
    value_and_grad, target = _quadratic(scale)
    x = torch.full_like(target, 128.0)
    optimizer = lbfgs.LBFGS(history=20)
    start = value_and_grad(x)[0]
    for _ in range(60):
        optimizer.step(x, value_and_grad(x)[1])
    assert value_and_grad(x)[0] < 1e-6 * start
    assert torch.allclose(x, target, atol=0.05)


def test_first_step_is_a_probe_and_every_step_is_capped():
    value_and_grad, target = _quadratic(1.0)
    x = torch.full_like(target, 128.0)
    optimizer = lbfgs.LBFGS(history=5, first_step_px=16.0, max_step_px=3.0)
    before = x.clone()
    optimizer.step(x, value_and_grad(x)[1])
    assert float((x - before).abs().max()) == pytest.approx(16.0)
    for _ in range(10):
        before = x.clone()
        optimizer.step(x, value_and_grad(x)[1])
        assert float((x - before).abs().max()) <= 3.0 + 1e-4


def test_projection_is_remembered_as_the_step_taken():
    """After a clamp the curvature pair must describe the move actually made."""
    value_and_grad, _ = _quadratic(1.0, n=4)
    x = torch.tensor([250.0, 10.0, 128.0, 3.0])
    optimizer = lbfgs.LBFGS(history=5, first_step_px=40.0)
    before = x.clone()
    optimizer.step(x, value_and_grad(x)[1])
    x.clamp_(0, 255)
    optimizer.projected(before, x)
    assert torch.equal(optimizer._last_step, x - before)


def test_zero_gradient_leaves_the_variable_alone():
    x = torch.ones(5)
    optimizer = lbfgs.LBFGS()
    optimizer.step(x, torch.zeros(5))
    assert torch.equal(x, torch.ones(5))
