"""What a job takes and what it gives: the decoded inputs (:class:`JobInputs`), the costs of one image
(:class:`Costs`), a reported iteration (:class:`Progress`), the delivered image (:class:`Result`), with the
reasons a job stops, and the state a job can go on from (:class:`Checkpoint`, internal: never sent to a client).
Plain data; nothing here runs a network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nst_server.costs import CostTerms

#: Why a job stopped (:attr:`Result.stop_reason`): its iterations are done, it was cancelled, its cost became
#: non-finite (inf or NaN), or the convergence test held.
STOP_ITERATIONS = "iterations_done"
STOP_CANCELLED = "cancelled"
STOP_NON_FINITE = "non_finite_cost"
STOP_CONVERGED = "converged"


@dataclass(frozen=True)
class JobInputs:
    """The decoded images of one job (8-bit RGB, any sizes).

    ``styles`` pairs each style image with its blend weight (relative; all zero means equal weights).
    ``content_alpha`` (mode ``L``), when given, is re-attached to the result, which is then an RGBA PNG.
    """

    content: Image.Image
    styles: list[tuple[Image.Image, float]]
    init_image: Image.Image | None = None
    content_alpha: Image.Image | None = None


@dataclass(frozen=True)
class Costs:
    """The costs of one image: the seed's J_content, J_style, the total variation, and the total J."""

    content: float
    style: float
    total: float
    total_variation: float = 0.0

    @classmethod
    def of(cls, terms: CostTerms, index: int = 0) -> "Costs":
        """Item ``index`` of a batch's :class:`~nst_server.costs.CostTerms` as floats."""
        return cls(content=float(terms.content[index]), style=float(terms.style[index]),
                   total=float(terms.total[index]), total_variation=float(terms.total_variation[index]))


@dataclass(frozen=True)
class Progress:
    """One reported iteration: costs of the iterate the step started from (replica, fp32 costs)."""

    iteration: int              # 1-based, strictly increasing within a job, across scales
    costs: Costs
    elapsed_ms: float           # since the job started (targets included)
    scale: int = 1              # 1-based index in the coarse-to-fine schedule
    size: tuple[int, int] = (0, 0)   # (width, height) optimised at this scale, px
    preview_png: bytes = b""
    scales: int = 1             # scales in the job's schedule
    remaining_ms: float = 0.0   # estimated time to the Result (0: unknown)


@dataclass(frozen=True)
class Result:
    """The delivered image and its costs (computed by the session on the 8-bit pixels delivered)."""

    image: np.ndarray           # (H, W, 3) uint8 RGB
    png: bytes                  # the delivered PNG: RGB, or RGBA with the content's alpha
    costs: Costs
    iterations: int             # iterations run, all scales
    best_iteration: int         # iteration whose image is delivered (0: the initial image)
    stop_reason: str            # one of the STOP_* constants
    elapsed_ms: float
    precision: str = "fp32"     # the replica's compute precision this job ran at ("auto" resolved)


@dataclass(frozen=True)
class Checkpoint:
    """Where a job stands after ``iteration`` iterations: what :func:`nst_server.engine.stylize` needs to go on
    from there (its ``resume`` argument), emitted when ``checkpoint_s`` asks for one. Internal: the job API stores
    it (:mod:`nst_server.jobstore`); ``Stylize`` never asks for checkpoints and none goes on the wire.

    Kept: the generated image at the scale being optimised, the iteration count (so that Progress numbering and
    ``Result.iterations`` continue), the recent costs of the convergence test and, at the final scale, the best
    iterate so far. Not kept, rebuilt on resume: the optimiser's own state. L-BFGS drops its curvature pairs (up to
    ``lbfgs_history`` pairs of two image-sized float32 vectors: 472 MB for a 512 x 384 image and 100 pairs, 200
    times the image) and starts again as at a scale's start (a first step of ``first_step_px``, pairs
    gathered anew over the next iterations); Adam drops its moments and step count (its bias correction starts
    again). A resumed job therefore follows another path from the checkpoint on than the uninterrupted job: its
    result is as good, not the same bytes.

    Attributes:
        scale: 1-based index of the scale in the coarse-to-fine schedule whose image ``pixels`` is.
        scales: scales in the job's schedule (a resume checks that its schedule is the same).
        iteration: iterations done, all scales; the next one is ``iteration + 1``.
        pixels: ``(1, 3, H, W)`` float32 RGB pixel levels in [0, 255], C-contiguous, on the CPU; ``(H, W)`` is
            the scale's size.
        history: J (the objective's total) of the scale's last iterations, oldest first, at most
            ``CONVERGENCE_WINDOW + 1`` of them (the convergence test's window).
        best_pixels: at the final scale, the best iterate so far (same shape and units as ``pixels``); None at
            an earlier scale.
        best_total: its J (``inf``: no iterate costed yet, ``best_pixels`` is the scale's initial image).
        best_iteration: the iteration whose image ``best_pixels`` is (0: the initial image).
        elapsed_ms: the job's time so far (Progress and Result ``elapsed_ms`` go on from it), ms.
    """

    scale: int
    scales: int
    iteration: int
    pixels: np.ndarray
    history: tuple[float, ...] = ()
    best_pixels: np.ndarray | None = None
    best_total: float = math.inf
    best_iteration: int = 0
    elapsed_ms: float = 0.0
