"""L-BFGS over the generated image's pixels, one function evaluation per iteration and no line search.

This is the optimiser Gatys et al. use (through Torch's ``optim.lbfgs``, as jcjohnson/neural-style does) and
the one ``torch.optim.LBFGS(max_iter=1)`` implements, with two departures that make it independent of the
scale of the objective, so that a normalised cost of order 1 converges as fast as the seed's costs of
order 10^5 (with ``torch.optim.LBFGS`` such an objective stalled for tens of iterations at the start of a
scale: its first step is the raw gradient, a few millionths of a pixel level, and it keeps a curvature pair
only when ``y.s > 1e-10`` in absolute terms, so it kept none):

* the first step of a run moves the pixel that moves most by ``first_step_px`` pixel levels (a probe along
  the negative gradient; Nocedal & Wright, "Numerical Optimization", 2nd ed., section 7.2 leaves the first
  step's length to the implementation);
* a curvature pair ``(s, y)`` is kept when the cosine of ``s`` and ``y`` exceeds ``1e-10`` (the curvature
  condition ``y.s > 0`` with a tolerance that does not change with the objective's units).

Every later step is ``x <- x - H g`` with the two-loop recursion (Nocedal & Wright, algorithm 7.4) and the
initial Hessian ``H_0 = (s.y / y.y) I`` of the most recent pair (their eq. 7.20); the step length is 1.
"""

from __future__ import annotations

from collections import deque

import torch

#: Smallest cosine between s and y for a curvature pair to be kept.
CURVATURE_COSINE = 1e-10
MAX_STEP_PX = 64.0


class LBFGS:
    """Limited-memory BFGS for one flat variable, driven by the caller's evaluations.

    Args:
        history: number of curvature pairs kept (``m``).
        first_step_px: largest change of any pixel in the first step, in the variable's units (pixel levels).
    Memory: ``2 * history`` vectors of the variable's size (float32), e.g. 472 MB for a 512x384 image and
    ``history = 100``.
    """

    def __init__(self, history: int = 100, first_step_px: float = 16.0, max_step_px: float = 0.0) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.history = history
        self.first_step_px = first_step_px
        self.max_step_px = max_step_px or MAX_STEP_PX
        self._pairs: deque[tuple[torch.Tensor, torch.Tensor, float]] = deque(maxlen=history)   # (s, y, 1/(y.s))
        self._last_step: torch.Tensor | None = None
        self._last_grad: torch.Tensor | None = None

    def step(self, variable: torch.Tensor, grad: torch.Tensor) -> None:
        """Move ``variable`` in place given its gradient at the current point.

        Args:
            variable: the optimised tensor (any shape, float32), updated in place (no autograd history).
            grad: ``dJ/dvariable`` at ``variable``'s current value, same shape; must be finite.
        """
        g = grad.detach().reshape(-1).float()
        if self._last_step is not None and self._last_grad is not None:
            y = g - self._last_grad
            s = self._last_step
            ys = float(torch.dot(y, s))
            if ys > CURVATURE_COSINE * float(y.norm()) * float(s.norm()):
                self._pairs.append((s, y, 1.0 / ys))
        direction = self._direction(g)
        if direction is None:                                 # no curvature yet: a probe along -g
            largest = float(g.abs().max())
            if largest == 0.0:
                self._last_step, self._last_grad = None, g.clone()
                return
            direction = g * (-self.first_step_px / largest)
        elif self.max_step_px:
            largest = float(direction.abs().max())
            if largest > self.max_step_px:
                direction.mul_(self.max_step_px / largest)
        with torch.no_grad():
            variable.view(-1).add_(direction.to(variable.dtype))
        self._last_step, self._last_grad = direction, g.clone()

    def projected(self, variable_before: torch.Tensor, variable_after: torch.Tensor) -> None:
        """Tell the optimiser that the variable was projected (e.g. clamped) after :meth:`step`: the step kept
        in memory becomes the one actually taken, so the next curvature pair describes the real move."""
        if self._last_step is not None:
            self._last_step = (variable_after.detach().reshape(-1) - variable_before.detach().reshape(-1)).float()

    def _direction(self, g: torch.Tensor) -> torch.Tensor | None:
        """``-H g`` by the two-loop recursion, or None while no pair is kept."""
        if not self._pairs:
            return None
        q = -g
        alphas = []
        for s, y, rho in reversed(self._pairs):
            alpha = rho * float(torch.dot(s, q))
            q.add_(y, alpha=-alpha)
            alphas.append(alpha)
        s, y, _ = self._pairs[-1]
        q.mul_(float(torch.dot(s, y)) / float(torch.dot(y, y)))
        for (s, y, rho), alpha in zip(self._pairs, reversed(alphas)):
            beta = rho * float(torch.dot(y, q))
            q.add_(s, alpha=alpha - beta)
        return q
