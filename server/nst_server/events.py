"""What a job takes and what it gives: the decoded inputs (:class:`JobInputs`), the costs of one image
(:class:`Costs`), a reported iteration (:class:`Progress`) and the delivered image (:class:`Result`), with the
reasons a job stops. Plain data; nothing here runs a network.
"""

from __future__ import annotations

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
