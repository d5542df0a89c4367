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


#: Memory the L-BFGS curvature pairs may take for an image of P pixels: ``max(LBFGS_HISTORY_FLOOR_BYTES,
#: LBFGS_HISTORY_BYTES_PER_PIXEL * P)``. Each pair is two float32 RGB vectors, 24 bytes per pixel: a 512 px job
#: keeps its 100 pairs (472 MB at 512 x 384; 85 at 512 x 512), a 1024 x 768 scale 28, a 2048 x 1536 or a
#: 4096 x 3072 scale 5 (377 MB; 1.5 GB), so the history grows with the picture no faster than the rest of the
#: job's memory. A refinement scale runs about ten iterations (:func:`nst_server.engine.schedule`), which five
#: pairs already span. jcjohnson/neural-style's multi-resolution recipe for 3620 px prints lowers its history the same way
#: (``-lbfgs_num_correction``).
LBFGS_HISTORY_FLOOR_BYTES = 512 << 20
LBFGS_HISTORY_BYTES_PER_PIXEL = 120
#: Fewest pairs kept, whatever the size.
LBFGS_MIN_PAIRS = 5


def lbfgs_pairs(requested: int, pixels: int) -> int:
    """Curvature pairs L-BFGS keeps for an image of ``pixels`` px: ``requested`` (``lbfgs_history``), lowered to
    what the history's memory allows (see :data:`LBFGS_HISTORY_BYTES_PER_PIXEL`), at least
    :data:`LBFGS_MIN_PAIRS` (or ``requested`` when that is fewer)."""
    budget = max(LBFGS_HISTORY_FLOOR_BYTES, LBFGS_HISTORY_BYTES_PER_PIXEL * pixels)
    fits = budget // (2 * 4 * 3 * max(1, pixels))
    return min(requested, max(LBFGS_MIN_PAIRS, fits))


#: ``settings.optimizer`` -> ``make(pixels, settings)``; the keys are the values :class:`StyleTransferSettings`
#: accepts.
OPTIMIZERS: dict[str, Callable[..., PixelOptimizer]] = {
    "lbfgs": lambda pixels, settings: LBFGS(lbfgs_pairs(settings.lbfgs_history, pixels[0, 0].numel())),
    "adam": lambda pixels, settings: Adam(pixels, settings.learning_rate),
}


def make_optimizer(pixels: torch.Tensor, settings) -> PixelOptimizer:
    """The optimiser ``settings.optimizer`` names, for ``pixels`` (a validated
    :class:`~nst_server.settings.StyleTransferSettings`; KeyError for an unknown name)."""
    return OPTIMIZERS[settings.optimizer](pixels, settings)
