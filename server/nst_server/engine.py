"""The style-transfer engine: the coarse-to-fine schedule, the optimisation loop over the generated image's
pixels, the delivered result.

The engine's rooms: :mod:`nst_server.settings` (every control, its default and range), :mod:`nst_server.events`
(what a job takes and gives), :mod:`nst_server.targets` (content features, style Gram matrices, normalisers),
:mod:`nst_server.objective` (the costs minimised, the replica's pass), :mod:`nst_server.optimizers` (L-BFGS, Adam)
and this module (the loop). It knows nothing of gRPC.
:func:`stylize` is a generator: it yields :class:`Progress` after each reported
iteration and ends with one :class:`Result`; asked to (``checkpoint_s``), it also yields a :class:`Checkpoint` now
and then, and it can go on from one (``resume``). It runs the schedule's scales in turn; one scale's loop (cost and
gradient, optimiser step, projection, best iterate, progress, cancellation, convergence) is
:func:`_optimise_scale`, and the delivery of the best image :func:`_deliver`.

Algorithm (the seed document, after Gatys et al. 2015): content features and style Gram matrices come from
the onnxruntime session (from the replica with ``pooling="avg"``, which the exported graph does not have); the
generated image starts as noisy content and is optimised (by default with L-BFGS, as Gatys et al.; Adam as the
seed's course) on the content and style costs, with gradients from the PyTorch replica. Progress and Result
always report the seed's ``J_content`` and ``J_style`` of the image at its own size; their ``total`` is the
objective the job minimises (:func:`nst_server.objective.evaluate`).

Departures from the seed. The first five are controls with the seed's behaviour one setting away:
``preset="seed"`` sets the first four back and leaves ``precision`` at ``"auto"`` (``"fp32"`` is the seed's);
the last two are not controls:

* the objective weighs relative errors (``normalization="target"``): the content cost is divided by the
  content target's own size and the style cost by the style targets', so one alpha/beta (1 and 15) suits
  paintings whose Gram matrices differ by 5x in magnitude (the seed's ``J = alpha J_content + beta J_style``
  with beta / alpha = 1e-4 gave The Starry Night a painting and The Scream a pink wash);
* the costs are computed at three sizes of the generated image (``pyramid_levels``: 1, 0.71 and 0.5 of its
  side, Lanczos downsampling) and averaged, so the style is matched at the scale of its larger structures, not
  only at the finest texture the full size shows;
* the default schedule is coarse-to-fine (``scales=3``; Gatys et al. 2017, "Controlling perceptual
  factors"): the image is optimised at 1/4 and 1/2 of the final side first (at least 64 px: 64, 91 and 128 px
  for a 128 px job), then upsampled, the 200 iterations split equally; the large structures are laid down
  cheaply and a default job costs fewer full-size passes than 200 single-scale iterations;
* the optimiser is our L-BFGS (:mod:`nst_server.lbfgs`), independent of the objective's scale;
* the replica's passes run in bf16 where the device runs bf16 natively (``precision="auto"``,
  :mod:`nst_server.precision`): a CPU with avx512_bf16 or amx_bf16, a GPU of compute capability 8.0 or later;
  the Gram matrices, the costs and L-BFGS stay fp32 (only the style gradient's product follows the
  activations into bf16, :data:`nst_server.costs.BF16_STYLE_GRADIENT`);
* the optimised variable is the image in pixel levels (RGB 0..255, float32), projected back onto [0, 255]
  after every step, so the image being costed is always a valid image (the seed clips only at the end);
* the result is the best iterate of the final scale (the images each step started from, and the last
  step's), rounded to 8 bits, and its costs are recomputed by the session on exactly those pixels (a plain
  loop reports the costs of an unclamped tensor it never delivers).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from nst_export.vgg import MIN_SIDE_PX
from nst_server import color
from nst_server.batching import ReplicaBatcher
from nst_server.costs import CostTerms
from nst_server.errors import CheckpointMismatch, FieldError
from nst_server.events import (STOP_CANCELLED, STOP_CONVERGED, STOP_ITERATIONS, STOP_NON_FINITE, Checkpoint, Costs,
                               JobInputs, Progress, Result)
from nst_server.images import (encode_png, encode_png_with_alpha, fitted_size, resize_to_max_side, to_tensor,
                                to_uint8)
from nst_server.model import StyleModels
from nst_server.objective import Objective, batch_pass, downsample, evaluate, tiled_costs
from nst_server.optimizers import make_optimizer
from nst_server.precision import default_precision
from nst_server.settings import MAX_STYLES, StyleTransferSettings, blend_weights
from nst_server.targets import (Targets, compute_targets, features, half_octaves, level_sizes,
                                session_forward)
from nst_server.tiling import input_pixels, needs_tiles, pass_pixel_limit, session_grid, tile_grid

#: Window of the convergence test, iterations.
CONVERGENCE_WINDOW = 10


def initial_image(content_pixels: torch.Tensor, mean_pixels: torch.Tensor, settings: StyleTransferSettings,
                  generator: torch.Generator, init_pixels: torch.Tensor | None = None) -> torch.Tensor:
    """The first generated image, ``(1, 3, H, W)`` float32 pixel levels in [0, 255], contiguous.

    Args:
        content_pixels: the content at the first scale's size, pixel levels.
        mean_pixels: ``(1, 3, 1, 1)`` the weights' mean pixel, 0..255.
        init_pixels: the given image at the same size (``init == "image"``).
    Raises:
        FieldError: ``init == "image"`` without ``init_pixels``.
    """
    shape = content_pixels.shape
    if settings.init == "content":
        image = content_pixels.clone()
    elif settings.init == "random":
        image = (torch.rand(shape, generator=generator) * 255.0).to(content_pixels.device)
    elif settings.init == "image":
        if init_pixels is None:
            raise FieldError("init_image", "is required when init is 'image'")
        image = init_pixels.clone()
    else:
        noise = (torch.rand(shape, generator=generator) * 40.0 - 20.0).to(content_pixels.device)
        ratio = settings.noise_ratio
        image = mean_pixels + (1.0 - ratio) * (content_pixels - mean_pixels) + ratio * noise
    return image.clamp_(0.0, 255.0).contiguous()


def scale_sides(settings: StyleTransferSettings, aspect: float) -> list[int]:
    """Longest sides of the coarse-to-fine schedule, ending at ``max_side_px``.

    Geometric from ``start_side_px`` (default ``max_side_px / 2^(scales-1)``, at least 64 px); scales whose
    shorter side would fall under 16 px are dropped. ``aspect`` is shorter side / longer side.
    """
    final = settings.max_side_px
    if settings.scales == 1:
        return [final]
    start = settings.start_side_px or max(min(64, final), round(final / 2 ** (settings.scales - 1)))
    start = max(start, math.ceil(MIN_SIDE_PX / max(aspect, 1e-6)))
    if start >= final:
        return [final]
    sides = [round(start * (final / start) ** (k / (settings.scales - 1))) for k in range(settings.scales)]
    return sorted(set(sides))


def split_iterations(total: int, scales: int) -> list[int]:
    """Iterations per scale: an equal share each, the remainder at the final scale."""
    share = total // scales
    return [share] * (scales - 1) + [total - share * (scales - 1)]


#: Outputs longer than this are laid down by this size's own schedule first (its ``scales``, its start side),
#: then refined at sides at most doubling up to the output (:func:`schedule`).
STRUCTURE_SIDE_PX = 512
#: Share of a large output's iterations that go to the refinement scales above :data:`STRUCTURE_SIDE_PX`.
REFINEMENT_SHARE = 0.16
#: Each refinement scale runs this many times the iterations of the next (finer) one: an iteration there costs
#: about 4x the pixels, so each refinement scale's time is about 4/3 of the one before.
REFINEMENT_RATIO = 3.0
#: The output's own scale gets at least this many of the refinement's iterations (taken from the first refinement
#: scale) where it still gets no more than that one: the texture at 1:1 comes from them, and with 2 at 4096 px it
#: was soft.
FINAL_SCALE_MIN_ITERATIONS = 4
#: At a refinement scale, the style cost of each of the structure scale's own pyramid levels (512, 362 and 256 px
#: by default) counts this many times in the objective (:func:`pyramid_style_weights`). The refinement's finer
#: levels add texture that, downsampled, moves those levels' Gram matrices away from the style's; 7 % more weight
#: holds them (tubingen x starry_night at 2048 px judged at 512 px: J_style from +11.7 % of the 512 px job's to
#: +7.0 %, J_content from +7.6 % to +9.0 %; twice the weight: -35 % and +25 %; docs/benchmarks.md, "The structure
#: levels' style weight").
STRUCTURE_STYLE_WEIGHT = 1.07


def refinement_sides(final: int) -> list[int]:
    """Sides above :data:`STRUCTURE_SIDE_PX` up to ``final``, each at most twice the one before (geometric):
    1024 and 2048 for 2048 px, 1024, 2048 and 4096 for 4096 px, 876 and 1500 for 1500 px."""
    steps = math.ceil(math.log2(final / STRUCTURE_SIDE_PX) - 1e-9)
    return [round(STRUCTURE_SIDE_PX * (final / STRUCTURE_SIDE_PX) ** (k / steps)) for k in range(1, steps + 1)]


def refines(settings: StyleTransferSettings) -> bool:
    """Whether the job's schedule ends with refinement scales above :data:`STRUCTURE_SIDE_PX` (:func:`schedule`)."""
    return settings.scales > 1 and not settings.start_side_px and settings.max_side_px > STRUCTURE_SIDE_PX


def _octave_pyramid(settings: StyleTransferSettings, side: int) -> bool:
    """Whether the scale of longest side ``side`` is a refinement scale with a pyramid (:func:`pyramid_factors`'
    octaves, then the structure scale's levels)."""
    return settings.pyramid_levels > 1 and refines(settings) and side > STRUCTURE_SIDE_PX


def pyramid_factors(settings: StyleTransferSettings, side: int) -> list[float]:
    """The sizes of the objective's pyramid levels at a scale of longest side ``side``, as factors of that side
    (the first 1.0; :func:`nst_server.targets.level_sizes` turns them into sizes).

    At a scale up to :data:`STRUCTURE_SIDE_PX`, or without the large-output schedule (:func:`refines`), or without a
    pyramid (``pyramid_levels == 1``): ``pyramid_levels`` half-octave steps (1, 0.71, 0.5, ...). At a refinement
    scale: whole octaves down to the structure scale (2048 px: 2048 and 1024), then the structure scale's own
    levels (512, 362 and 256 px by default), so that the refinement adds fine texture without undoing the
    structure: its coarsest level is the structure scale's coarsest (with 3 half-octave levels, 2048 down to
    1024 px, a 2048 px picture judged at 512 px had 3.9x the 512 px job's J_style). Octaves above the structure
    scale, not half-octaves, because a level costs its pixels at every iteration: 2048 px has 5 levels that pass
    1.36x its pixels, against 7 half-octave ones passing 1.98x, with the same picture at 2048 px and a slightly
    better one judged at 512 px (docs/benchmarks.md, "Octaves above the structure scale").
    """
    structure = half_octaves(settings.pyramid_levels)
    if not _octave_pyramid(settings, side):
        return structure
    octaves = []
    while side * 2.0 ** -len(octaves) > STRUCTURE_SIDE_PX * 2.0 ** 0.25:  # down to the structure side's octave
        octaves.append(2.0 ** -len(octaves))
    return octaves + [STRUCTURE_SIDE_PX / side * factor for factor in structure]


def pyramid_style_weights(settings: StyleTransferSettings, side: int) -> list[float]:
    """The ``style_weight`` of each level of :func:`pyramid_factors` (same order): :data:`STRUCTURE_STYLE_WEIGHT`
    for the structure scale's own levels at a refinement scale, 1.0 for every other level (and at every scale of
    a job that does not refine)."""
    factors = pyramid_factors(settings, side)
    if not _octave_pyramid(settings, side):
        return [1.0] * len(factors)
    structure = len(half_octaves(settings.pyramid_levels))
    return [1.0] * (len(factors) - structure) + [STRUCTURE_STYLE_WEIGHT] * structure


def schedule(settings: StyleTransferSettings, aspect: float) -> list[tuple[int, int]]:
    """The job's scales as ``(longest side, iterations)``, coarse to fine, ending at ``max_side_px``.

    Up to :data:`STRUCTURE_SIDE_PX`, or with ``scales == 1`` or an explicit ``start_side_px``: the sides of
    :func:`scale_sides`, the iterations split equally (:func:`split_iterations`). A larger output with the default
    schedule is a print, not a bigger thumbnail: the first ``1 - REFINEMENT_SHARE`` of the iterations run the
    schedule of a :data:`STRUCTURE_SIDE_PX` job, which lays down the painting's structure where an iteration is
    cheap, and the rest refine at :func:`refinement_sides`, :data:`REFINEMENT_RATIO` times as many at each side as
    at the next (a 2048 px job of 200 iterations: 56, 56, 56 at 128, 256 and 512 px, then 24 at 1024 and 8 at
    2048; 4096 px: 56, 56, 56, 21, 7, 4, the output's own scale getting at least
    :data:`FINAL_SCALE_MIN_ITERATIONS`). Optimised at full size from the start instead, the style's finest texture
    is matched and its structure lost (the 2048 px picture's J_style judged at 512 px was 7.7x the 512 px job's),
    at 23x the time. With 20 at 1024 and 10 at 2048 px (twice as many at each side) the 2048 px job took 5.2x the
    512 px job's time, with 24 and 8 4.8x, the same composition looked at (docs/benchmarks.md).
    ``aspect`` is shorter side / longer side.
    """
    final = settings.max_side_px
    if not refines(settings):
        sides = scale_sides(settings, aspect)[-settings.iterations:]
        return list(zip(sides, split_iterations(settings.iterations, len(sides))))
    refine = refinement_sides(final)
    structure = scale_sides(settings.replace(max_side_px=STRUCTURE_SIDE_PX), aspect)
    refining = min(settings.iterations - 1, max(len(refine), round(settings.iterations * REFINEMENT_SHARE)))
    if refining < len(refine):                         # too few iterations to refine: the single final scale
        return [(final, settings.iterations)]
    weights = [REFINEMENT_RATIO ** (len(refine) - k) for k in range(1, len(refine) + 1)]      # ..., 9, 3, 1
    shares = [max(1, math.floor(refining * weight / sum(weights))) for weight in weights]
    shares[0] += refining - sum(shares)
    deficit = FINAL_SCALE_MIN_ITERATIONS - shares[-1]
    if len(shares) > 1 and deficit > 0 and shares[0] - deficit >= shares[-1] + deficit:    # coarse to fine still
        shares[0], shares[-1] = shares[0] - deficit, shares[-1] + deficit
    structure = structure[-(settings.iterations - refining):]
    laid = split_iterations(settings.iterations - refining, len(structure))
    return list(zip(structure, laid)) + list(zip(refine, shares))


def _resize_pixels(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False).clamp_(0, 255)


def stylize(models: StyleModels, inputs: JobInputs, settings: StyleTransferSettings | None = None,
            should_stop: Callable[[], bool] | None = None,
            batcher: ReplicaBatcher | None = None, checkpoint_s: float = 0.0,
            checkpoint_now: Callable[[], bool] | None = None,
            resume: Checkpoint | None = None) -> Iterator[Progress | Checkpoint | Result]:
    """Run one style-transfer job.

    The schedule's scales run in turn (:func:`_optimise_scale`), each starting from the previous one's image
    upsampled; the best iterate of the final scale is delivered (:func:`_deliver`).

    Checkpoints (for the job API's restarts; without ``checkpoint_s`` and ``checkpoint_now`` none is made and the
    job runs exactly as before): after an iteration, a :class:`Checkpoint` is yielded when ``checkpoint_s`` seconds
    have passed since the job's start or its last checkpoint, or when ``checkpoint_now`` returns True; and once
    more when the job is stopped (``should_stop``), holding the state it stopped in, unless no iteration ran since
    the last one. ``resume`` starts the schedule at the checkpoint's scale with its image, iteration count, best
    iterate and recent costs: Progress numbering goes on from ``resume.iteration + 1`` and ``Result.iterations``
    counts every iteration of the job, those before the checkpoint included. The optimiser's state is not in a
    checkpoint (see :class:`Checkpoint`): it starts again at the resumed scale.

    Args:
        models: the session and replica.
        inputs: decoded content, styles (with blend weights) and optional initial image, any sizes.
        settings: the job's controls (defaults: :class:`StyleTransferSettings`).
        should_stop: polled once per iteration; when it returns True the job ends with ``STOP_CANCELLED``.
        batcher: when given (built over :func:`batch_pass` of the same ``models``), each iteration's replica
            pass is shared with other jobs of equal size, pooling and precision running at the same time.
        checkpoint_s: at most one checkpoint per this many seconds, s; 0: none on a timer.
        checkpoint_now: polled once per iteration, after it; True: a checkpoint now (a shutdown begins).
        resume: a checkpoint of this job (same inputs and settings) to go on from.
    Yields:
        :class:`Progress` per reported iteration and :class:`Checkpoint` when asked for, then exactly one
        :class:`Result`.
    Raises:
        FieldError: a setting or input is out of range (before any optimisation); ``field`` names it (a
            ``ValueError``).
        CheckpointMismatch: ``resume`` does not fit this job's schedule (before any optimisation).
    """
    settings = _checked(models, inputs, settings or StyleTransferSettings())
    started = time.perf_counter()
    palette = color.ColorControl(settings.color_control, inputs.content)
    job = _Job(models=models, settings=settings, palette=palette, content_image=palette.content(),
               style_images=[(palette.style(style), weight) for style, weight in inputs.styles],
               started=started, should_stop=should_stop, batcher=batcher, replica_pass=batch_pass(models),
               mean_pixels=models.replica.input_mean * 255.0, checkpoint_s=checkpoint_s,
               checkpoint_now=checkpoint_now, checkpoint_clock=started)
    if resume is not None:                   # the job's time goes on from the checkpoint's
        job.started -= resume.elapsed_ms / 1000.0
        job.checkpointed = resume.iteration
    init_image = palette.style(inputs.init_image) if inputs.init_image is not None else None

    width, height = resize_to_max_side(job.content_image, settings.max_side_px).size
    if min(width, height) < MIN_SIDE_PX:
        raise FieldError("max_side_px", f"{settings.max_side_px} px gives a {width}x{height} image for this "
                         f"content's aspect ratio; VGG-19 needs a shorter side of at least {MIN_SIDE_PX} px")
    aspect = min(width, height) / max(width, height)
    plan = schedule(settings, aspect)
    sides = [side for side, _ in plan]
    budgets = [budget for _, budget in plan]
    job.plan = [(side * side * aspect, budget) for side, budget in plan]
    job.output_pixels = width * height
    job.work = [iteration_work(*fitted_size(*job.content_image.size, side)[::-1], side, settings, job.output_pixels)
                for side in sides]
    if resume is not None:
        _check_resume(resume, budgets)

    generator = torch.Generator().manual_seed(settings.seed)
    tally = _Tally()
    pixels = None
    history: tuple[float, ...] = ()
    for index, (side, budget) in enumerate(zip(sides, budgets), start=1):
        if resume is not None and index < resume.scale:
            continue                             # done before the checkpoint
        content, targets = _scale_inputs(job, side)
        h, w = content.shape[2:]
        if resume is not None and index == resume.scale:
            pixels = _resumed_pixels(job, resume, (h, w), tally)
            budget, history = sum(budgets[:index]) - resume.iteration, resume.history
        elif pixels is None:
            init = None if init_image is None else to_tensor(init_image.resize((w, h), Image.Resampling.LANCZOS))
            pixels = initial_image(content * 255.0, job.mean_pixels, settings, generator,
                                   None if init is None else init.to(models.device) * 255.0)
        else:
            pixels = _resize_pixels(pixels.detach(), h, w).contiguous()
        scale = _Scale(index=index, final=index == len(sides), budget=budget, size=(h, w), targets=targets,
                       batch_key=(tuple(pixels.shape), settings.pooling, settings.precision), history=history)
        history = ()
        # Only the final scale's iterates are candidates for delivery (costs at other sizes do not compare).
        if scale.final and tally.best_pixels is None:
            tally.best_pixels, tally.best_total = pixels.detach().clone(), math.inf
        pixels.requires_grad_(True)
        yield from _optimise_scale(job, scale, pixels, tally)
        if tally.stop_reason != STOP_ITERATIONS:
            break

    if tally.best_pixels is None:        # stopped before the final scale: deliver the current image upsampled
        targets = _scale_inputs(job, sides[-1])[1]
        tally.best_pixels = _resize_pixels(pixels.detach(), height, width)
    elif tally.stop_reason in (STOP_ITERATIONS, STOP_CONVERGED):
        # The last step's image has not been costed yet: cost it and keep it if it is the best.
        last_total = _objective(job, scale).total(pixels)
        if torch.isfinite(last_total).all() and float(last_total[0]) < tally.best_total:
            tally.best_pixels.copy_(pixels.detach())
            tally.best_iteration = tally.iteration
    yield _deliver(job, inputs, targets, tally)


def _checked(models: StyleModels, inputs: JobInputs, settings: StyleTransferSettings) -> StyleTransferSettings:
    """``settings`` validated, with ``precision="auto"`` resolved for the replica's device; :class:`FieldError` naming
    the field when the settings or the inputs' styles and initial image are out of range."""
    settings.validate()
    if settings.precision == "auto":
        settings = settings.replace(precision=default_precision(models.device)[0])
    if not inputs.styles:
        raise FieldError("style_image", "at least one style image is required")
    if len(inputs.styles) > MAX_STYLES:
        raise FieldError("styles", f"{len(inputs.styles)} style images, at most {MAX_STYLES} may be blended")
    blend_weights([weight for _, weight in inputs.styles])
    if settings.init == "image" and inputs.init_image is None:
        raise FieldError("init_image", "required when init is 'image'")
    return settings


@dataclass
class _Job:
    """What every scale of one job shares."""

    models: StyleModels
    settings: StyleTransferSettings          # validated, precision resolved
    palette: color.ColorControl
    content_image: Image.Image               # after colour control
    style_images: list[tuple[Image.Image, float]]   # after colour control, with their blend weights
    started: float                           # time.perf_counter() at the job's start
    should_stop: Callable[[], bool] | None
    batcher: ReplicaBatcher | None
    replica_pass: Callable[[torch.Tensor, tuple], tuple[torch.Tensor, ...]]   # :func:`batch_pass`
    mean_pixels: torch.Tensor                # (1, 3, 1, 1) the weights' mean pixel, 0..255
    plan: list[tuple[float, int]] = ()       # each scale's (pixels, iterations), for the time estimate
    work: list[float] = ()                   # each scale's :func:`iteration_work`, for the time estimate
    output_pixels: int = 0                   # height x width of the output (the final scale)
    checkpoint_s: float = 0.0                # a checkpoint at most this often, s (0: none on a timer)
    checkpoint_now: Callable[[], bool] | None = None
    checkpoint_clock: float = 0.0            # time.perf_counter() of the start or the last checkpoint
    checkpointed: int = 0                    # iteration of the last checkpoint (or the resumed one)

    def cancelled(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    @property
    def checkpointing(self) -> bool:
        return self.checkpoint_s > 0 or self.checkpoint_now is not None

    def checkpoint_due(self) -> bool:
        """After an iteration: a checkpoint is asked for (``checkpoint_now``) or ``checkpoint_s`` has passed."""
        asked = self.checkpoint_now is not None and self.checkpoint_now()
        return asked or (self.checkpoint_s > 0 and time.perf_counter() - self.checkpoint_clock >= self.checkpoint_s)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


@dataclass
class _Scale:
    """One scale of the coarse-to-fine schedule."""

    index: int                               # 1-based
    final: bool                              # the output size: its iterates are candidates for delivery
    budget: int                              # iterations at this scale
    size: tuple[int, int]                    # (H, W) of the generated image, px
    targets: Targets
    batch_key: tuple                         # (shape, pooling, precision): jobs of equal keys share passes
    history: tuple[float, ...] = ()          # J of iterations at this scale before a resumed checkpoint


@dataclass
class _Tally:
    """Where the job stands, across scales: iterations run, why it stopped, the best iterate of the final scale."""

    iteration: int = 0                       # iterations run, all scales
    stop_reason: str = STOP_ITERATIONS
    best_pixels: torch.Tensor | None = None  # set when the final scale starts
    best_total: float = math.inf
    best_iteration: int = 0                  # 0: the final scale's initial image


def _resized_styles(job: _Job, side: int) -> list[tuple[torch.Tensor, float]]:
    """The style images, each resized to ``side * style_scale`` px, as tensors with their blend weights."""
    style_side = max(1, round(side * job.settings.style_scale))
    return [(to_tensor(resize_to_max_side(image, style_side)).to(job.models.device), weight)
            for image, weight in job.style_images]


def _scale_inputs(job: _Job, side: int) -> tuple[torch.Tensor, Targets]:
    """The content at a scale's side ``(1, 3, H, W)`` RGB [0, 1] and that scale's targets, every pyramid level
    whose style images stay above the network's minimum included.

    Raises:
        FieldError: ``style_scale`` makes a style image smaller than the network's minimum at this side.
    """
    settings, device = job.settings, job.models.device
    content = to_tensor(resize_to_max_side(job.content_image, side)).to(device)            # (1, 3, H, W)
    styles = _resized_styles(job, side)
    for style, _ in styles:
        if min(style.shape[2:]) < MIN_SIDE_PX:
            raise FieldError("style_scale", f"{settings.style_scale:g} makes the style image {style.shape[3]}x"
                             f"{style.shape[2]} px, under the {MIN_SIDE_PX} px minimum; raise style_scale or "
                             f"max_side_px")
    coarser = []
    for level_h, level_w in level_sizes(*content.shape[2:], pyramid_factors(settings, side))[1:]:
        level_styles = _resized_styles(job, max(level_h, level_w))
        if min(min(style.shape[2:]) for style, _ in level_styles) < MIN_SIDE_PX:
            break                                   # the style would be too small: no coarser level
        level_content = job.content_image.resize((level_w, level_h), Image.Resampling.LANCZOS)
        coarser.append((to_tensor(level_content).to(device), level_styles))
    targets = compute_targets(job.models, content, styles, settings, coarser)
    for level, weight in zip(targets.levels, pyramid_style_weights(settings, side)):
        level.style_weight = weight
    return content, targets


def _objective(job: _Job, scale: _Scale) -> Objective:
    """The :class:`~nst_server.objective.Objective` of one scale of ``job``: its passes cover at most
    :func:`~nst_server.tiling.pass_pixel_limit` pixels (larger at the coarser scales of a large job)."""
    height, width = scale.size
    limit = pass_pixel_limit(height * width, job.output_pixels, job.settings.precision)
    return Objective(scale.targets, job.settings, job.replica_pass, scale.batch_key, job.batcher, limit)


def _optimise_scale(job: _Job, scale: _Scale, pixels: torch.Tensor, tally: _Tally) -> Iterator[Progress]:
    """Up to ``scale.budget`` iterations on ``pixels`` (a leaf with ``requires_grad``, pixel levels, updated in
    place), each: cost and gradient of the current image, an optimiser step, the projection onto [0, 255].

    Updates ``tally``: iterations, the stop reason (cancelled, non-finite cost, converged) and, at the final
    scale, the best iterate (the image a step started from, with its cost).

    Yields:
        :class:`Progress` of the reported iterations (the costs of the image each step started from).
    """
    settings = job.settings
    optimizer = make_optimizer(pixels, settings)
    objective = _objective(job, scale)
    history: list[float] = list(scale.history)     # J of each iteration at this scale
    scale_started = time.perf_counter()
    with job.batcher.joined(scale.batch_key) if job.batcher is not None else contextlib.nullcontext():
        for done in range(scale.budget):
            if job.cancelled():
                tally.stop_reason = STOP_CANCELLED
                if job.checkpointing and tally.iteration > job.checkpointed:     # the state it stopped in
                    yield _checkpoint(job, scale, pixels, tally, history)
                return
            tally.iteration += 1
            before = pixels.detach().clone()
            terms = objective.costs_and_gradient(pixels)                  # costs of ``before``
            total = terms.total
            if not torch.isfinite(total).all():
                tally.stop_reason, tally.iteration = STOP_NON_FINITE, tally.iteration - 1
                return
            optimizer.step(pixels, pixels.grad)
            if scale.final and float(total[0]) < tally.best_total:
                tally.best_total, tally.best_iteration = float(total[0]), tally.iteration - 1
                tally.best_pixels.copy_(before)
            with torch.no_grad():
                pixels.clamp_(0.0, 255.0)
            optimizer.projected(before, pixels)
            history.append(float(total[0]))
            progress = _progress(job, scale, tally.iteration, pixels, terms,
                                 _remaining_ms(job, scale, done + 1, time.perf_counter() - scale_started))
            if progress is not None:
                yield progress
            if scale.final and _converged(history, settings.convergence_tolerance):
                tally.stop_reason = STOP_CONVERGED
                return
            if job.checkpointing and not (scale.final and done + 1 == scale.budget) and job.checkpoint_due():
                yield _checkpoint(job, scale, pixels, tally, history)     # (none after the last: its Result follows)


def _checkpoint(job: _Job, scale: _Scale, pixels: torch.Tensor, tally: _Tally, history: list[float]) -> Checkpoint:
    """The :class:`Checkpoint` of ``job`` now (after ``tally.iteration`` iterations; ``pixels`` projected), copied
    to the CPU; the checkpoint clock starts again."""
    job.checkpoint_clock, job.checkpointed = time.perf_counter(), tally.iteration
    best = scale.final and tally.best_pixels is not None
    return Checkpoint(scale=scale.index, scales=len(job.plan), iteration=tally.iteration, pixels=_cpu(pixels),
                      history=tuple(history[-(CONVERGENCE_WINDOW + 1):]),
                      best_pixels=_cpu(tally.best_pixels) if best else None,
                      best_total=tally.best_total if best else math.inf,
                      best_iteration=tally.best_iteration if best else 0, elapsed_ms=job.elapsed_ms())


def _cpu(pixels: torch.Tensor) -> np.ndarray:
    """A copy of ``pixels`` as a C-contiguous float32 array on the CPU."""
    return np.ascontiguousarray(pixels.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy())


def _check_resume(resume: Checkpoint, budgets: list[int]) -> None:
    """Raise :class:`CheckpointMismatch` unless ``resume`` fits a schedule of these iterations per scale."""
    if resume.scales != len(budgets) or not 1 <= resume.scale <= len(budgets):
        raise CheckpointMismatch(f"the checkpoint is at scale {resume.scale} of {resume.scales}; this job's "
                                 f"schedule has {len(budgets)} scales")
    before, through = sum(budgets[:resume.scale - 1]), sum(budgets[:resume.scale])
    if not before <= resume.iteration <= through:
        raise CheckpointMismatch(f"the checkpoint is after iteration {resume.iteration}, outside its scale "
                                 f"{resume.scale} (iterations {before + 1} to {through} in this job's schedule)")


def _resumed_pixels(job: _Job, resume: Checkpoint, size: tuple[int, int], tally: _Tally) -> torch.Tensor:
    """The checkpoint's image ``(1, 3, H, W)`` on the job's device, with ``tally`` set as the checkpoint left it
    (iterations, and at the final scale the best iterate). Raises :class:`CheckpointMismatch` for another size."""
    expected = (1, 3, *size)
    shapes = [resume.pixels.shape] + ([] if resume.best_pixels is None else [resume.best_pixels.shape])
    if any(tuple(shape) != expected for shape in shapes):
        raise CheckpointMismatch(f"the checkpoint's image is {tuple(resume.pixels.shape)}; scale {resume.scale} of "
                                 f"this job is {expected}")
    device = job.models.device
    tally.iteration = resume.iteration
    if resume.best_pixels is not None:
        tally.best_pixels = torch.from_numpy(np.array(resume.best_pixels, dtype=np.float32)).to(device)
        tally.best_total, tally.best_iteration = resume.best_total, resume.best_iteration
    return torch.from_numpy(np.array(resume.pixels, dtype=np.float32)).to(device).contiguous()


#: Seconds per unit of :func:`iteration_work` measured at large scales (at least :data:`SPEED_MIN_PIXELS`), by device
#: type and precision, a running mean over this process's jobs: small scales are dominated by per-iteration
#: overheads, so their speed per pixel says little about a larger scale's.
_SPEED: dict[tuple[str, str], float] = {}
SPEED_MIN_PIXELS = 256 * 256

#: A forward pass's share of a forward and backward pass, for :func:`iteration_work`'s tiled levels, which are passed
#: forward once more. The backward computes only the gradient with respect to the input (the weights are fixed), one
#: product per convolution as the forward's (the FLOP count of ``nst-benchmark``); profiled at 512 px, bf16, the
#: convolutions forward took 40 % of an iteration and backward 37 % (docs/benchmarks.md).
FORWARD_SHARE = 0.5

#: The time estimate's allowance, in iterations of the scale concerned, for what a later scale does besides its
#: iterations (its targets: the session's fp32 passes over the content and style images at each pyramid level) and
#: for the job's end (the last step's image costed, then the delivered image's costs recomputed by the session).
#: Measured on a default 2048 px job through the server (2-core EPYC, AVX512_BF16, bf16): the 2048 px scale's
#: targets took about 17 s beside iterations of 21 s, the 1024 px scale's about 2 s beside 2.7 s, and the end
#: 20.6 s after the last iteration; without them, and with the 2048 px scale costed per output pixel at the
#: 1024 px scale's speed, the estimate was under half the time that remained (docs/benchmarks.md).
SCALE_SETUP_ITERATIONS = 1.0
DELIVERY_ITERATIONS = 1.0


def iteration_work(height: int, width: int, side: int, settings: StyleTransferSettings,
                   output_pixels: int) -> float:
    """The replica's work in one iteration at a scale of ``height x width`` px (longest side ``side``) of a job
    whose output has ``output_pixels``, in pixels passed forward and backward: each pyramid level's pixels
    (:func:`pyramid_factors`), and for a level passed in tiles (over :func:`~nst_server.tiling.pass_pixel_limit`)
    its tiles' pixels, halos included, and their forward-only first pass (:data:`FORWARD_SHARE` of them again).
    The time estimate's yardstick (:func:`_remaining_ms`): a 2048 x 1536 px scale of a 2048 px job is about 7.6x
    the work of its 1024 x 768 px scale, for 4x the pixels. A model, not a measurement: the kept last tile
    (:data:`nst_server.objective.KEEP_LAST_TILE`) and the batcher are left out."""
    limit = pass_pixel_limit(height * width, output_pixels, settings.precision)
    work = 0.0
    for level_h, level_w in level_sizes(height, width, pyramid_factors(settings, side)):
        if needs_tiles(level_h, level_w, limit):
            passed = sum(map(input_pixels, tile_grid(level_h, level_w, max_pixels=limit)))
            work += passed * (1.0 + FORWARD_SHARE)
        else:
            work += level_h * level_w
    return work


def _remaining_ms(job: _Job, scale: _Scale, done: int, seconds: float) -> float:
    """Estimated time to the Result, ms: this scale's iterations left at its measured speed (``done`` iterations in
    ``seconds``); each later scale's iterations and its set-up (:data:`SCALE_SETUP_ITERATIONS`) at the speed per
    unit of :func:`iteration_work` measured at large scales (:data:`_SPEED`; this scale's while none is known), never
    faster than this scale's iterations; and the end (:data:`DELIVERY_ITERATIONS` of the final scale)."""
    if not done or not job.plan:
        return 0.0
    pixels, _ = job.plan[scale.index - 1]
    work = job.work[scale.index - 1]
    per_iteration = seconds / done
    key = (job.models.device.type, job.settings.precision)
    if pixels >= SPEED_MIN_PIXELS:
        known = _SPEED.get(key)
        measured = per_iteration / work
        _SPEED[key] = measured if known is None else 0.9 * known + 0.1 * measured
    per_work = _SPEED.get(key, per_iteration / work)
    later = sum(max(per_iteration, per_work * later_work) * (budget + SCALE_SETUP_ITERATIONS)
                for later_work, (_, budget) in zip(job.work[scale.index:], job.plan[scale.index:]))
    delivery = DELIVERY_ITERATIONS * max(per_iteration, per_work * job.work[-1])
    return 1000.0 * ((scale.budget - done) * per_iteration + later + delivery)


def _progress(job: _Job, scale: _Scale, iteration: int, pixels: torch.Tensor,
              terms: CostTerms, remaining_ms: float = 0.0) -> Progress | None:
    """The :class:`Progress` of ``iteration`` when it is reported (every ``progress_every``, and the job's last),
    with a preview of ``pixels`` when one is due; None otherwise."""
    settings = job.settings
    last = iteration == settings.iterations
    if not (iteration % settings.progress_every == 0 or last):
        return None
    h, w = scale.size
    preview = b""
    if settings.preview_every and (iteration % settings.preview_every == 0 or last):
        small = _resize_pixels(pixels.detach(), *_fit(h, w, settings.preview_max_side_px))
        preview = encode_png(job.palette.finish(to_uint8(small)))
    return Progress(iteration=iteration, costs=Costs.of(terms), elapsed_ms=job.elapsed_ms(), scale=scale.index,
                    size=(w, h), preview_png=preview, scales=len(job.plan), remaining_ms=remaining_ms)


def _converged(history: list[float], tolerance: float) -> bool:
    """Whether J fell by no more than ``tolerance`` of itself over the last :data:`CONVERGENCE_WINDOW` iterations
    (never with tolerance 0 or a shorter history)."""
    if not tolerance or len(history) <= CONVERGENCE_WINDOW:
        return False
    old, new = history[-CONVERGENCE_WINDOW - 1], history[-1]
    return (old - new) <= tolerance * abs(old)


def _deliver(job: _Job, inputs: JobInputs, targets: Targets, tally: _Tally) -> Result:
    """The :class:`Result`: ``tally.best_pixels`` rounded to 8 bits, its costs recomputed by the session on
    exactly those pixels against ``targets`` (the final scale's), the colour control finished and the content's
    alpha re-attached."""
    settings, models = job.settings, job.models
    image = to_uint8(tally.best_pixels)                                    # (H, W, 3) uint8
    delivered = to_tensor(Image.fromarray(image, "RGB")).to(models.device)
    if needs_tiles(*delivered.shape[2:]):
        final = Costs.of(tiled_costs(session_forward(models, settings.pooling), delivered * 255.0, targets,
                                     settings, session_grid))
    else:
        level_feats = [features(models, downsample(delivered * 255.0, level.size) / 255.0, settings.pooling)
                       for level in targets.levels[1:]]
        final = Costs.of(evaluate(features(models, delivered, settings.pooling), delivered * 255.0, targets,
                                  settings, level_feats))
    output = job.palette.finish(image)
    return Result(image=output, png=encode_png_with_alpha(output, inputs.content_alpha), costs=final,
                  iterations=tally.iteration, best_iteration=tally.best_iteration, stop_reason=tally.stop_reason,
                  elapsed_ms=job.elapsed_ms(), precision=settings.precision)


def _fit(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))
