"""The optimisers a job can use, behind one small interface (:class:`PixelOptimizer`): the loop computes the
cost and gradient of the generated image, calls :meth:`~PixelOptimizer.step`, projects the image onto [0, 255]
and tells the optimiser with :meth:`~PixelOptimizer.projected`. A new optimiser is one class here and one entry
in :data:`OPTIMIZERS` (and a value of the proto's ``Optimizer`` enum).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from nst_server.lbfgs import LBFGS


class PixelOptimizer(Protocol):
    """Moves the generated image ``(1, 3, H, W)`` float32 (pixel levels, a leaf tensor) given its gradient."""

    def step(self, pixels: torch.Tensor, grad: torch.Tensor) -> None:
        """Update ``pixels`` in place from ``grad`` = dJ/dpixels at the current ``pixels`` (finite)."""

    def projected(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """The image was projected after :meth:`step`: it moved from ``before`` to ``after`` in fact."""


class Adam:
    """Adam (Kingma & Ba 2015) through ``torch.optim.Adam``, the seed's course optimiser; ``learning_rate`` is the
    step in pixel levels. The projection needs no bookkeeping: Adam's moments follow the gradients only."""

    def __init__(self, pixels: torch.Tensor, learning_rate: float) -> None:
        self._adam = torch.optim.Adam([pixels], lr=learning_rate)

    def step(self, pixels: torch.Tensor, grad: torch.Tensor) -> None:
        if pixels.grad is not grad:           # torch's Adam reads the gradient from the parameter
            pixels.grad = grad
        self._adam.step()

    def projected(self, before: torch.Tensor, after: torch.Tensor) -> None:
        pass


#: ``settings.optimizer`` -> ``make(pixels, settings)``; the keys are the values :class:`StyleTransferSettings`
#: accepts.
OPTIMIZERS: dict[str, Callable[..., PixelOptimizer]] = {
    "lbfgs": lambda pixels, settings: LBFGS(settings.lbfgs_history),
    "adam": lambda pixels, settings: Adam(pixels, settings.learning_rate),
}


def make_optimizer(pixels: torch.Tensor, settings) -> PixelOptimizer:
    """The optimiser ``settings.optimizer`` names, for ``pixels`` (a validated
    :class:`~nst_server.settings.StyleTransferSettings`; KeyError for an unknown name)."""
    return OPTIMIZERS[settings.optimizer](pixels, settings)
