"""The controls of one style-transfer job: :class:`StyleTransferSettings` (every default defined here once, the
presets, the range of each control) and the limits that bound them.

A control out of range raises :class:`nst_server.errors.FieldError` naming the control (the request field of the
same name), so that the servicer can tell the caller which field to fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from nst_export.vgg import MIN_SIDE_PX, OUTPUT_LAYERS
from nst_server.errors import FieldError
from nst_server.optimizers import OPTIMIZERS as optimizer_registry

#: The seed's style layers, each with lambda = 0.2 (the course assignment's choice).
DEFAULT_STYLE_LAYERS: dict[str, float] = {
    "relu1_1": 0.2, "relu2_1": 0.2, "relu3_1": 0.2, "relu4_1": 0.2, "relu5_1": 0.2,
}
#: The seed's content layer (conv4_2 after its ReLU).
DEFAULT_CONTENT_LAYERS: dict[str, float] = {"relu4_2": 1.0}

OPTIMIZERS = tuple(optimizer_registry)          # ("lbfgs", "adam")
INITS = ("noisy_content", "content", "random", "image")
POOLINGS = ("max", "avg")
COLOR_CONTROLS = ("none", "luminance", "match_style_colors")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESETS = ("default", "seed", "classic")
NORMALIZATIONS = ("none", "target")

#: Levels of the resolution pyramid beyond this would all fall under the network's 16 px minimum at any
#: accepted size (2^(-15/2) of 16384 px is 90 px; the next ones are dropped anyway).
MAX_PYRAMID_LEVELS = 16
#: More scales than this would start under 16 px at any accepted size.
MAX_SCALES = 16
#: Most style images one job may blend (``style_image`` included): each is decoded (up to the pixel budget) and
#: costs a forward pass per scale and pyramid level before the first iteration, where no cancel is read.
MAX_STYLES = 16

#: The largest style image side ``style_scale`` may ask for in-process (a server's own limit is lower).
MAX_STYLE_SIDE_PX = 16384

#: A weight (alpha, beta, the TV weight, a layer's weight) is 0 or within these bounds. The job multiplies
#: weights with costs in float32 (the seed's raw style cost reaches 1e10 and more, a layer weight times alpha or
#: beta multiplies it again) and divides by weighted normalisers: wider weights overflow to inf or vanish to 0
#: (then 0/0) although every number in the request is finite.
MIN_WEIGHT, MAX_WEIGHT = 1e-12, 1e12
#: Adam's step is at most about ``learning_rate`` pixel levels: beyond 255 every pixel lands on 0 or 255.
MAX_LEARNING_RATE = 255.0
#: L-BFGS keeps ``2 * lbfgs_history`` vectors of the image's size (float32): 300 is 7.5 GB at 1024x1024 px.
MAX_LBFGS_HISTORY = 300
#: ``seed`` seeds a torch.Generator, which takes 64-bit unsigned seeds (the proto field is uint64).
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class StyleTransferSettings:
    """Every control of one job; each default is defined here once.

    Attributes:
        max_side_px: longest side of the generated image, px (>= 16, the network's minimum). The content image
            is resized to it, keeping its aspect ratio, whatever its own size.
        iterations: optimiser iterations in all (split across scales), one function evaluation each.
        content_weight: alpha, the weight of the content term of the objective (see ``normalization``).
        style_weight: beta, the weight of the style term. With ``normalization="target"`` (the default) both
            weigh relative errors, so one balance suits every painting: alpha = 1, beta = 15. With
            ``"none"`` they weigh the seed's costs as they are (the seed's course: alpha = 10, beta = 40 with
            Adam; with the original VGG-19 weights, 0..255 input, beta / alpha = 1e-4 balances the two terms for
            The Starry Night, and a painting with smaller Gram matrices then gets little style).
        content_layers: ``{layer: weight}`` of J_content (the seed: relu4_2 alone).
        style_layers: ``{layer: lambda}`` of J_style (the seed: relu1_1 … relu5_1, 0.2 each).
        pooling: ``"max"`` (the exported graph) or ``"avg"`` (Gatys et al. 2016; targets then come from the
            replica, whose pooling is switched per call).
        tv_weight: weight of the total variation cost (mean squared neighbour difference, pixel levels^2).
        style_scale: the style image's longest side relative to the output's longest side (> 0).
        init: ``"noisy_content"``, ``"content"``, ``"random"`` (uniform 0..255) or ``"image"`` (given).
        noise_ratio: with ``noisy_content``: ``mean + (1 - r)(content - mean) + r U(-20, 20)`` pixel levels,
            the course assignment's ``generate_noise_image``.
        optimizer: ``"lbfgs"`` (Gatys et al.; no line search, one evaluation per iteration) or ``"adam"``.
        learning_rate: Adam step in pixel levels (0..255 units); 2.0 is the course's value.
        lbfgs_history: L-BFGS history size: the most curvature pairs kept; fewer at large scales, as the
            history's memory allows (:func:`nst_server.optimizers.lbfgs_pairs`).
        color_control: ``"none"``; ``"luminance"`` (transfer on luminance, keep the content's YIQ chroma;
            Gatys et al. 2016, "Preserving color"); ``"match_style_colors"`` (the style image's colour mean and
            covariance matched to the content's before transfer; same paper).
        scales: coarse-to-fine schedule: number of scales (1: single scale); the image is optimised at
            geometric sizes up to ``max_side_px`` and upsampled between them (Gatys et al. 2017). At most this
            many: a job of fewer iterations keeps that many of the largest scales, and scales under the start
            side are dropped (:func:`scale_sides`). Above 512 px without ``start_side_px``: these scales up to
            512 px, then refinement scales up to ``max_side_px`` (:func:`nst_server.engine.schedule`).
        start_side_px: longest side at the first scale; 0: ``max_side_px / 2^(scales-1)`` (at least 64 px).
        precision: ``"auto"`` (bf16 where the replica's device runs it natively, else fp32:
            :func:`nst_server.precision.default_precision`), ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast in
            the replica; Gram matrices and costs are fp32 in every case.
        normalization: ``"target"``: the objective divides the content cost by the content target's own
            size and the style cost by the style targets' (the costs of an image with no features), so that
            alpha and beta weigh relative errors whatever the painting's Gram magnitudes; ``"none"``: the seed's
            ``J = alpha J_content + beta J_style``. Progress and Result report the seed's costs either way.
        pyramid_levels: the costs are computed on the generated image at this many sizes, in half-octave steps
            (1, 0.71, 0.5 of its side; Lanczos downsampling), and the objective is their mean, so that the style
            is matched at the scale of its larger structures too, not only at the finest; 1: its own size only
            (the seed).
        seed: seeds the initial noise; same inputs, seed and settings give the same bytes on CPU.
        progress_every: report a :class:`Progress` every this many iterations (the last one always).
        preview_every: attach a preview PNG every this many iterations (0: never).
        preview_max_side_px: longest side of previews, px.
        convergence_tolerance: stop (``converged``) when the total cost fell by less than this fraction over
            the last 10 iterations at the final scale; 0 disables the test.
    """

    max_side_px: int = 256
    iterations: int = 200
    content_weight: float = 1.0
    style_weight: float = 15.0
    content_layers: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CONTENT_LAYERS))
    style_layers: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_STYLE_LAYERS))
    pooling: str = "max"
    tv_weight: float = 0.0
    style_scale: float = 1.0
    init: str = "noisy_content"
    noise_ratio: float = 0.6
    optimizer: str = "lbfgs"
    learning_rate: float = 2.0
    lbfgs_history: int = 100
    color_control: str = "none"
    scales: int = 3
    start_side_px: int = 0
    precision: str = "auto"
    normalization: str = "target"
    pyramid_levels: int = 3
    seed: int = 0
    progress_every: int = 1
    preview_every: int = 0
    preview_max_side_px: int = 128
    convergence_tolerance: float = 0.0

    @classmethod
    def preset(cls, name: str = "default", **overrides) -> "StyleTransferSettings":
        """Settings of a named preset with ``overrides`` applied.

        ``"seed"`` reproduces the seed's method as the course assignment sets it: content relu4_2, style
        relu1_1 … relu5_1 with lambda 0.2, the seed's costs as they are (no normalisation, one pyramid level)
        with alpha 10, beta 40, noisy content with ratio 0.6, Adam with learning rate 2.0, 200 iterations, one
        scale.

        ``"classic"`` is this service's default before the quality work: the seed's costs as they are with
        alpha 1, beta 1e-4, L-BFGS from noisy content, 200 iterations at one scale and one pyramid level
        (a convincing Van Gogh, a faint wash of most other paintings).

        Raises:
            FieldError: (``preset``) unknown preset name.
        """
        if name == "default":
            return cls(**overrides)
        if name == "classic":
            classic = dict(content_weight=1.0, style_weight=1e-4, normalization="none", pyramid_levels=1, scales=1)
            return cls(**{**classic, **overrides})
        if name == "seed":
            seed = dict(content_weight=10.0, style_weight=40.0, optimizer="adam", learning_rate=2.0,
                        noise_ratio=0.6, init="noisy_content", iterations=200, scales=1, tv_weight=0.0,
                        normalization="none", pyramid_levels=1,
                        content_layers=dict(DEFAULT_CONTENT_LAYERS), style_layers=dict(DEFAULT_STYLE_LAYERS))
            return cls(**{**seed, **overrides})
        raise FieldError("preset", f"must be one of {PRESETS}, got {name!r}")

    def replace(self, **changes) -> "StyleTransferSettings":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Check every control's range.

        Raises:
            FieldError: the first control out of range; ``field`` is its name (the request field's), ``reason``
                the range and the value given.
        """
        if self.max_side_px < MIN_SIDE_PX:
            raise FieldError("max_side_px", f"must be at least {MIN_SIDE_PX} (VGG-19 pools 4 times before "
                             f"relu5_1), got {self.max_side_px}")
        if self.iterations < 1:
            raise FieldError("iterations", f"must be at least 1, got {self.iterations}")
        for name in ("content_weight", "style_weight", "noise_ratio", "tv_weight", "convergence_tolerance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise FieldError(name, f"must be a finite number >= 0, got {value}")
        for name in ("content_weight", "style_weight", "tv_weight"):
            _check_weight(name, getattr(self, name))
        for name in ("learning_rate", "style_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise FieldError(name, f"must be a finite number > 0, got {value}")
        if self.learning_rate > MAX_LEARNING_RATE:
            raise FieldError("learning_rate", f"must be at most {MAX_LEARNING_RATE:g} pixel levels, "
                                              f"got {self.learning_rate:g}")
        for name in ("noise_ratio", "convergence_tolerance"):
            if getattr(self, name) > 1:
                raise FieldError(name, f"must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise FieldError("seed", f"must be in [0, 2^64 - 1], got {self.seed}")
        if self.max_side_px * self.style_scale > MAX_STYLE_SIDE_PX:
            raise FieldError("style_scale", f"{self.style_scale:g} x max_side_px {self.max_side_px} would make the "
                             f"style image larger than {MAX_STYLE_SIDE_PX} px")
        for name, layers in (("content_layers", self.content_layers), ("style_layers", self.style_layers)):
            if not layers:
                raise FieldError(name, "must name at least one layer")
            for layer, weight in layers.items():
                if layer not in OUTPUT_LAYERS:
                    raise FieldError(name, f"must be among {OUTPUT_LAYERS}, got {layer!r}")
                if not math.isfinite(weight) or weight < 0:
                    raise FieldError(name, f"weight of {layer} must be finite and >= 0, got {weight}")
                _check_weight(name, weight, f" (weight of {layer})")
        for name, allowed in (("optimizer", OPTIMIZERS), ("init", INITS), ("pooling", POOLINGS),
                              ("color_control", COLOR_CONTROLS), ("precision", ("auto", *PRECISIONS)),
                              ("normalization", NORMALIZATIONS)):
            if getattr(self, name) not in allowed:
                raise FieldError(name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lbfgs_history", "progress_every", "scales", "preview_max_side_px", "pyramid_levels"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.lbfgs_history > MAX_LBFGS_HISTORY:
            raise FieldError("lbfgs_history", f"must be at most {MAX_LBFGS_HISTORY} (memory: 2 x history image-sized "
                             f"vectors), got {self.lbfgs_history}")
        if self.pyramid_levels > MAX_PYRAMID_LEVELS:
            raise FieldError("pyramid_levels", f"must be at most {MAX_PYRAMID_LEVELS}, got {self.pyramid_levels}")
        if self.scales > MAX_SCALES:
            raise FieldError("scales", f"must be at most {MAX_SCALES}, got {self.scales}")
        if self.start_side_px and not MIN_SIDE_PX <= self.start_side_px <= self.max_side_px:
            raise FieldError("start_side_px", f"must be between {MIN_SIDE_PX} and max_side_px "
                             f"({self.max_side_px}), got {self.start_side_px}")
        if self.preview_every < 0:
            raise FieldError("preview_every", f"must be >= 0, got {self.preview_every}")


def _check_weight(name: str, value: float, what: str = "") -> None:
    """:class:`FieldError` naming ``name`` unless ``value`` is 0 or within [MIN_WEIGHT, MAX_WEIGHT]."""
    if value != 0 and not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise FieldError(name, f"must be 0 or between {MIN_WEIGHT:g} and {MAX_WEIGHT:g}{what}, got {value:g}")


def blend_weights(weights: list[float]) -> list[float]:
    """Normalise blend weights to sum 1; all zero means equal weights.

    Any finite weights >= 0 work, however large or small: they are divided by the largest first, so their sum
    cannot overflow (two weights of 1e308 sum to inf) and subnormal ones are not lost.

    Raises:
        FieldError: (``styles``) a weight is negative, infinite or NaN.
    """
    if any(not math.isfinite(w) or w < 0 for w in weights):
        bad = next(index for index, w in enumerate(weights) if not math.isfinite(w) or w < 0)
        raise FieldError("styles", f"style blend weights must be finite and >= 0, got {weights[bad]} "
                                   f"(weight {bad + 1} of {len(weights)})")
    largest = max(weights, default=0.0)
    if largest == 0:
        return [1.0 / len(weights)] * len(weights)
    relative = [w / largest for w in weights]                    # each in [0, 1], the largest exactly 1
    total = math.fsum(relative)
    return [w / total for w in relative]
