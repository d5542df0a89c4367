"""The style-transfer engine: targets, the optimisation loop over the generated image's pixels, the result.

It knows nothing of gRPC. :func:`stylize` is a generator: it yields :class:`Progress` after each reported
iteration and ends with one :class:`Result`. It runs the schedule's scales in turn; one scale's loop (cost and
gradient, optimiser step, projection, best iterate, progress, cancellation, convergence) is
:func:`_optimise_scale`, and the delivery of the best image :func:`_deliver`.

Algorithm (the seed document, after Gatys et al. 2015): content features and style Gram matrices come from
the onnxruntime session (from the replica with ``pooling="avg"``, which the exported graph does not have); the
generated image starts as noisy content and is optimised (by default with L-BFGS, as Gatys et al.; Adam as the
seed's course) on the content and style costs, with gradients from the PyTorch replica. Progress and Result
always report the seed's ``J_content`` and ``J_style`` of the image at its own size; their ``total`` is the
objective the job minimises (:func:`evaluate`).

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
import dataclasses
import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from nst_export.vgg import LAYER_STRIDE, MIN_SIDE_PX, OUTPUT_LAYERS
from nst_server import color, costs
from nst_server.batching import ReplicaBatcher
from nst_server.lbfgs import LBFGS
from nst_server.precision import default_precision
from nst_server.images import (encode_png, encode_png_with_alpha, resize_lanczos, resize_to_max_side, to_tensor,
                               to_uint8)
from nst_server.model import StyleModels

#: The seed's style layers, each with lambda = 0.2 (the course assignment's choice).
DEFAULT_STYLE_LAYERS: dict[str, float] = {
    "relu1_1": 0.2, "relu2_1": 0.2, "relu3_1": 0.2, "relu4_1": 0.2, "relu5_1": 0.2,
}
#: The seed's content layer (conv4_2 after its ReLU).
DEFAULT_CONTENT_LAYERS: dict[str, float] = {"relu4_2": 1.0}

OPTIMIZERS = ("lbfgs", "adam")
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

STOP_ITERATIONS = "iterations_done"
STOP_CANCELLED = "cancelled"
STOP_NON_FINITE = "non_finite_cost"
STOP_CONVERGED = "converged"

#: Window of the convergence test, iterations.
CONVERGENCE_WINDOW = 10

# Speed levers, each kept because ``nst-benchmark`` measured a gain (docs/benchmarks.md). Module attributes, so
# that the benchmark can switch them off to measure them; they change no result beyond float rounding.
#: The replica's weights and the generated image in channels_last (NHWC), oneDNN's native layout on CPU (no
#: reorder around each convolution) and the Tensor Cores' on CUDA. The weights are converted on first use.
CHANNELS_LAST = True
#: Style Gram matrices of this many recent style images are kept per loaded model (0: none), keyed by the
#: style image's pixels as the network sees them (after resizing and colour control) and the pooling.
STYLE_CACHE_ENTRIES = 8

_LAYOUT_LOCK = threading.Lock()
_STYLE_CACHE_LOCK = threading.Lock()


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
        lbfgs_history: L-BFGS history size.
        color_control: ``"none"``; ``"luminance"`` (transfer on luminance, keep the content's YIQ chroma;
            Gatys et al. 2016, "Preserving color"); ``"match_style_colors"`` (the style image's colour mean and
            covariance matched to the content's before transfer; same paper).
        scales: coarse-to-fine schedule: number of scales (1: single scale); the image is optimised at
            geometric sizes up to ``max_side_px`` and upsampled between them (Gatys et al. 2017). At most this
            many: a job of fewer iterations keeps that many of the largest scales, and scales under the start
            side are dropped (:func:`scale_sides`).
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
            ValueError: unknown preset name.
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
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")

    def replace(self, **changes) -> "StyleTransferSettings":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ``ValueError`` whose message starts with the name of the first field out of range."""
        if self.max_side_px < MIN_SIDE_PX:
            raise ValueError(f"max_side_px must be at least {MIN_SIDE_PX} (VGG-19 pools 4 times before "
                             f"relu5_1), got {self.max_side_px}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        for name in ("content_weight", "style_weight", "noise_ratio", "tv_weight", "convergence_tolerance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("content_weight", "style_weight", "tv_weight"):
            _check_weight(name, getattr(self, name))
        for name in ("learning_rate", "style_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.learning_rate > MAX_LEARNING_RATE:
            raise ValueError(f"learning_rate must be at most {MAX_LEARNING_RATE:g} pixel levels, got {self.learning_rate:g}")
        for name in ("noise_ratio", "convergence_tolerance"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2^64 - 1], got {self.seed}")
        if self.max_side_px * self.style_scale > MAX_STYLE_SIDE_PX:
            raise ValueError(f"style_scale {self.style_scale:g} x max_side_px {self.max_side_px} would make the "
                             f"style image larger than {MAX_STYLE_SIDE_PX} px")
        for name, layers in (("content_layers", self.content_layers), ("style_layers", self.style_layers)):
            if not layers:
                raise ValueError(f"{name} must name at least one layer")
            for layer, weight in layers.items():
                if layer not in OUTPUT_LAYERS:
                    raise ValueError(f"{name} must be among {OUTPUT_LAYERS}, got {layer!r}")
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"{name} weight of {layer} must be finite and >= 0, got {weight}")
                _check_weight(name, weight, f" (weight of {layer})")
        for name, allowed in (("optimizer", OPTIMIZERS), ("init", INITS), ("pooling", POOLINGS),
                              ("color_control", COLOR_CONTROLS), ("precision", ("auto", *PRECISIONS)),
                              ("normalization", NORMALIZATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lbfgs_history", "progress_every", "scales", "preview_max_side_px", "pyramid_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lbfgs_history > MAX_LBFGS_HISTORY:
            raise ValueError(f"lbfgs_history must be at most {MAX_LBFGS_HISTORY} (memory: 2 x history image-sized "
                             f"vectors), got {self.lbfgs_history}")
        if self.pyramid_levels > MAX_PYRAMID_LEVELS:
            raise ValueError(f"pyramid_levels must be at most {MAX_PYRAMID_LEVELS}, got {self.pyramid_levels}")
        if self.scales > MAX_SCALES:
            raise ValueError(f"scales must be at most {MAX_SCALES}, got {self.scales}")
        if self.start_side_px and not MIN_SIDE_PX <= self.start_side_px <= self.max_side_px:
            raise ValueError(f"start_side_px must be between {MIN_SIDE_PX} and max_side_px "
                             f"({self.max_side_px}), got {self.start_side_px}")
        if self.preview_every < 0:
            raise ValueError(f"preview_every must be >= 0, got {self.preview_every}")


def _check_weight(name: str, value: float, what: str = "") -> None:
    """``ValueError`` naming ``name`` unless ``value`` is 0 or within [MIN_WEIGHT, MAX_WEIGHT]."""
    if value != 0 and not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise ValueError(f"{name} must be 0 or between {MIN_WEIGHT:g} and {MAX_WEIGHT:g}{what}, got {value:g}")


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


@dataclass(frozen=True)
class Progress:
    """One reported iteration: costs of the iterate the step started from (replica, fp32 costs)."""

    iteration: int              # 1-based, strictly increasing within a job, across scales
    costs: Costs
    elapsed_ms: float           # since the job started (targets included)
    scale: int = 1              # 1-based index in the coarse-to-fine schedule
    size: tuple[int, int] = (0, 0)   # (width, height) optimised at this scale, px
    preview_png: bytes = b""


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


@dataclass
class LevelTargets:
    """Content features and style Gram matrices for the generated image at one size, and the objective's
    normalisers at that size."""

    size: tuple[int, int]                     # (H, W) of the generated image at this level, px
    content: dict[str, torch.Tensor]          # layer -> (1, C, H_l, W_l)
    style_grams: dict[str, torch.Tensor]      # layer -> (1, C, C), scaled to this size's positions
    content_norm: float = 1.0                 # J_content is divided by this in the objective
    style_norm: float = 1.0                   # J_style is divided by this in the objective


@dataclass
class Targets:
    """The targets of one scale: ``levels[0]`` at the generated image's own size, then the coarser levels of
    the resolution pyramid (the generated image downsampled; see :func:`pyramid_sizes`)."""

    levels: list[LevelTargets]

    @property
    def content(self) -> dict[str, torch.Tensor]:
        return self.levels[0].content

    @property
    def style_grams(self) -> dict[str, torch.Tensor]:
        return self.levels[0].style_grams


def layer_positions(height: int, width: int, layer: str) -> int:
    """``n_H * n_W`` of ``layer`` for an input of ``height x width`` (each 2x2 pooling floors the side, so the
    side is the input's floor-divided by :data:`LAYER_STRIDE`)."""
    stride = LAYER_STRIDE[layer]
    return (height // stride) * (width // stride)


def features(models: StyleModels, image: torch.Tensor, pooling: str) -> dict[str, torch.Tensor]:
    """Forward-only features ``{layer: (B, C, H_l, W_l) float32}`` of ``image`` ((B, 3, H, W) RGB [0, 1]).

    The onnxruntime session computes them when ``pooling`` is the exported graph's; otherwise the replica
    (its pooling switched for this call) under ``no_grad``.
    """
    if pooling == models.replica.pooling:
        return models.features(image)
    with torch.no_grad():
        return dict(zip(OUTPUT_LAYERS, models.replica(image, pooling=pooling)))


def replica_input(models: StyleModels, image: torch.Tensor) -> torch.Tensor:
    """``image`` in the layout the replica runs in: channels_last when :data:`CHANNELS_LAST` (the replica's
    weights are converted to match, once, under a lock; jobs running meanwhile see equal values)."""
    if getattr(models.replica, "_nst_channels_last", False) != CHANNELS_LAST:
        with _LAYOUT_LOCK:
            if getattr(models.replica, "_nst_channels_last", False) != CHANNELS_LAST:
                models.replica.to(memory_format=torch.channels_last if CHANNELS_LAST else torch.contiguous_format)
                models.replica._nst_channels_last = CHANNELS_LAST
    return image.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST else image


def style_grams(models: StyleModels, style: torch.Tensor, pooling: str, layers) -> dict[str, torch.Tensor]:
    """Unscaled Gram matrices ``{layer: (1, C, C) float32}`` of ``style`` ((1, 3, H, W) RGB [0, 1]).

    Served from a per-model LRU cache of :data:`STYLE_CACHE_ENTRIES` style images when possible (a service
    sees the same styles again and again; each miss costs one forward pass of the style image). The key is
    the blake2b digest of the tensor's bytes, its shape and the pooling; the cached tensors are never
    modified in place by the engine.
    """
    if not STYLE_CACHE_ENTRIES:
        style_features = features(models, style, pooling)
        return {layer: costs.gram_matrix(style_features[layer]) for layer in layers}
    array = style.detach().to("cpu", torch.float32).contiguous().numpy()
    key = (hashlib.blake2b(array.tobytes(), digest_size=20).hexdigest(), tuple(style.shape), pooling)
    with _STYLE_CACHE_LOCK:
        cache = models.__dict__.setdefault("_nst_style_cache", OrderedDict())
        grams = cache.get(key)
        if grams is not None and all(layer in grams for layer in layers):
            cache.move_to_end(key)
            return grams
    style_features = features(models, style, pooling)
    grams = {layer: costs.gram_matrix(value) for layer, value in style_features.items()}   # every layer
    with _STYLE_CACHE_LOCK:
        cache[key] = grams
        while len(cache) > STYLE_CACHE_ENTRIES:
            cache.popitem(last=False)
    return grams


def blend_weights(weights: list[float]) -> list[float]:
    """Normalise blend weights to sum 1; all zero means equal weights.

    Any finite weights >= 0 work, however large or small: they are divided by the largest first, so their sum
    cannot overflow (two weights of 1e308 sum to inf) and subnormal ones are not lost.

    Raises:
        ValueError: a weight is negative, infinite or NaN.
    """
    if any(not math.isfinite(w) or w < 0 for w in weights):
        bad = next(index for index, w in enumerate(weights) if not math.isfinite(w) or w < 0)
        raise ValueError(f"style blend weights must be finite and >= 0, got {weights[bad]} (weight {bad + 1} of "
                         f"{len(weights)})")
    largest = max(weights, default=0.0)
    if largest == 0:
        return [1.0 / len(weights)] * len(weights)
    relative = [w / largest for w in weights]                    # each in [0, 1], the largest exactly 1
    total = math.fsum(relative)
    return [w / total for w in relative]


def _blended_grams(models: StyleModels, styles: list[tuple[torch.Tensor, float]], height: int, width: int,
                   settings: StyleTransferSettings) -> dict[str, torch.Tensor]:
    weights = blend_weights([weight for _, weight in styles])
    grams: dict[str, torch.Tensor] = {}
    for (style, _), weight in zip(styles, weights):
        if weight == 0:
            continue
        style_gram = style_grams(models, style, settings.pooling, settings.style_layers)
        for layer in settings.style_layers:
            gram = weight * costs.rescale_gram(style_gram[layer], layer_positions(*style.shape[2:], layer),
                                               layer_positions(height, width, layer))
            grams[layer] = grams[layer] + gram if layer in grams else gram
    return grams


def level_targets(models: StyleModels, content: torch.Tensor, styles: list[tuple[torch.Tensor, float]],
                  settings: StyleTransferSettings) -> LevelTargets:
    """Content features, blended style Gram targets and normalisers for one size (forward passes only).

    Args:
        content: ``(1, 3, H, W)`` float32 RGB [0, 1] at the generated image's size for this level.
        styles: ``[(style (1, 3, H_s, W_s) float32 RGB [0, 1], blend weight)]``.
    Returns:
        Gram matrices ``sum_k w_k G_k`` (weights normalised by :func:`blend_weights`), each rescaled to this
        size's positions (:func:`costs.rescale_gram`). With ``normalization == "target"`` the normalisers are
        the costs of an image whose features are all zero: ``sum_l w_l |a_C^l|^2 / (4 n^l)`` for the content
        and ``sum_l lambda_l |G_S^l|^2 / (4 n_C^2 P^2)`` for the style, the size of each target in the seed's
        own units (:func:`costs.content_cost`, :func:`costs.style_layer_cost`); 1 otherwise.
    """
    content_features = features(models, content, settings.pooling)
    height, width = content.shape[2:]
    grams = _blended_grams(models, styles, height, width, settings)
    level = LevelTargets(size=(height, width),
                         content={layer: content_features[layer] for layer in settings.content_layers},
                         style_grams=grams)
    if settings.normalization == "target":
        level.content_norm = sum(weight * float(costs.content_cost(torch.zeros_like(level.content[layer]),
                                                                   level.content[layer]))
                                 for layer, weight in settings.content_layers.items())
        level.style_norm = sum(weight * float(grams[layer].double().pow(2).sum())
                               / (4.0 * grams[layer].shape[1] ** 2 * layer_positions(height, width, layer) ** 2)
                               for layer, weight in settings.style_layers.items())
        # A blank content image or style (all features zero) has nothing to normalise by: keep its cost as is.
        level.content_norm = level.content_norm if level.content_norm > 0 else 1.0
        level.style_norm = level.style_norm if level.style_norm > 0 else 1.0
    return level


def compute_targets(models: StyleModels, content: torch.Tensor, styles: list[tuple[torch.Tensor, float]],
                    settings: StyleTransferSettings,
                    coarser: list[tuple[torch.Tensor, list[tuple[torch.Tensor, float]]]] = ()) -> Targets:
    """The targets of one scale: :func:`level_targets` at the generated image's size, then at each coarser
    pyramid level.

    Args:
        content, styles: as :func:`level_targets`, at the generated image's size.
        coarser: ``[(content, styles)]`` resized for each coarser level (:func:`pyramid_sizes`), in order.
    """
    return Targets(levels=[level_targets(models, c, s, settings) for c, s in [(content, styles), *coarser]])


def pyramid_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """``(H, W)`` of each level of the resolution pyramid: level ``k`` is the image scaled by ``2^(-k/2)``
    (half-octave steps: 1, 0.71, 0.5, ...); levels whose shorter side would fall under the network's 16 px
    minimum are left out."""
    sizes = []
    for k in range(levels):
        factor = 2.0 ** (-k / 2)
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        if min(size) < MIN_SIDE_PX:
            break
        sizes.append(size)
    return sizes


def evaluate(feats: dict[str, torch.Tensor] | tuple[torch.Tensor, ...], pixels: torch.Tensor, targets: Targets,
             settings: StyleTransferSettings,
             level_feats: list[dict[str, torch.Tensor] | tuple[torch.Tensor, ...]] = ()) -> tuple[torch.Tensor, ...]:
    """``(J_content, J_style, TV, J)`` per item, each ``(B,)`` float32.

    ``J_content`` and ``J_style`` are the seed's costs at the generated image's own size. ``J`` is the objective
    the job minimises: the mean over the pyramid's levels of ``alpha J_content / c + beta J_style / s`` (each
    level's costs of the image downsampled to that level, ``c`` and ``s`` its normalisers, 1 without
    normalisation), plus ``tv_weight * TV``. With one level and ``normalization == "none"`` it is the seed's
    ``J = alpha J_content + beta J_style`` (+ TV).

    Args:
        feats: the generated image's features (dict, or the replica's tuple in OUTPUT_LAYERS order).
        pixels: the generated image ``(B, 3, H, W)`` in pixel levels, for the total variation.
        level_feats: the features of the image downsampled to each coarser level of ``targets`` (the levels
            without features are left out of ``J``).
    """
    j_content = j_style = None
    objective = 0.0
    all_feats = [feats, *level_feats]
    for level, level_feat in zip(targets.levels, all_feats):
        level_feat = feats_dict(level_feat)
        content = sum(weight * costs.content_cost(level.content[layer], level_feat[layer])
                      for layer, weight in settings.content_layers.items())
        style = sum(weight * costs.style_layer_cost(level.style_grams[layer], level_feat[layer])
                    for layer, weight in settings.style_layers.items())
        if j_content is None:
            j_content, j_style = content, style
        objective = objective + (settings.content_weight * content / level.content_norm
                                 + settings.style_weight * style / level.style_norm)
    tv = costs.total_variation(pixels)
    total = objective / min(len(targets.levels), len(all_feats)) + settings.tv_weight * tv
    return j_content, j_style, tv, total


def feats_dict(feats: dict[str, torch.Tensor] | tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The replica's tuple of features (OUTPUT_LAYERS order) as ``{layer: tensor}``; a dict unchanged."""
    return feats if isinstance(feats, dict) else dict(zip(OUTPUT_LAYERS, feats))


def downsample(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``pixels`` ``(B, 3, H, W)`` in pixel levels resized to ``size`` ``(H', W')`` with Pillow's Lanczos filter
    (differentiable) and clamped to [0, 255] as an 8-bit image would be.

    Lanczos, not a blurrier filter: with antialiased bilinear downsampling the optimiser learned to hide
    high-frequency patterns that the filter removes and a viewer's Lanczos does not (J_style at half size
    6.3e7 under the bilinear filter, 4.8e8 under Lanczos, for the same image).
    """
    return resize_lanczos(pixels, size).clamp(0.0, 255.0)


def initial_image(content_pixels: torch.Tensor, mean_pixels: torch.Tensor, settings: StyleTransferSettings,
                  generator: torch.Generator, init_pixels: torch.Tensor | None = None) -> torch.Tensor:
    """The first generated image, ``(1, 3, H, W)`` float32 pixel levels in [0, 255], contiguous.

    Args:
        content_pixels: the content at the first scale's size, pixel levels.
        mean_pixels: ``(1, 3, 1, 1)`` the weights' mean pixel, 0..255.
        init_pixels: the given image at the same size (``init == "image"``).
    Raises:
        ValueError: ``init == "image"`` without ``init_pixels``.
    """
    shape = content_pixels.shape
    if settings.init == "content":
        image = content_pixels.clone()
    elif settings.init == "random":
        image = (torch.rand(shape, generator=generator) * 255.0).to(content_pixels.device)
    elif settings.init == "image":
        if init_pixels is None:
            raise ValueError("init_image is required when init is 'image'")
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


def _autocast(models: StyleModels, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=models.device.type, dtype=dtype)


def _resize_pixels(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False).clamp_(0, 255)


def batch_pass(models: StyleModels) -> Callable[[torch.Tensor, tuple], tuple[torch.Tensor, ...]]:
    """The replica pass a :class:`~nst_server.batching.ReplicaBatcher` runs for jobs of key
    ``(shape, pooling, precision)``: ``images`` ``(B, 3, H, W)`` RGB [0, 1] -> the replica's features."""
    def run_pass(images: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...]:
        _, pooling, precision = key
        with _autocast(models, precision):
            return models.replica(replica_input(models, images), pooling=pooling)
    return run_pass


def stylize(models: StyleModels, inputs: JobInputs, settings: StyleTransferSettings | None = None,
            should_stop: Callable[[], bool] | None = None,
            batcher: ReplicaBatcher | None = None) -> Iterator[Progress | Result]:
    """Run one style-transfer job.

    The schedule's scales run in turn (:func:`_optimise_scale`), each starting from the previous one's image
    upsampled; the best iterate of the final scale is delivered (:func:`_deliver`).

    Args:
        models: the session and replica.
        inputs: decoded content, styles (with blend weights) and optional initial image, any sizes.
        settings: the job's controls (defaults: :class:`StyleTransferSettings`).
        should_stop: polled once per iteration; when it returns True the job ends with ``STOP_CANCELLED``.
        batcher: when given (built over :func:`batch_pass` of the same ``models``), each iteration's replica
            pass is shared with other jobs of equal size, pooling and precision running at the same time.
    Yields:
        :class:`Progress` per reported iteration, then exactly one :class:`Result`.
    Raises:
        ValueError: a setting or input is out of range (before any optimisation): the message starts with
            the field's name.
    """
    settings = _checked(models, inputs, settings or StyleTransferSettings())
    started = time.perf_counter()
    palette = color.ColorControl(settings.color_control, inputs.content)
    job = _Job(models=models, settings=settings, palette=palette, content_image=palette.content(),
               style_images=[(palette.style(style), weight) for style, weight in inputs.styles],
               started=started, should_stop=should_stop, batcher=batcher, replica_pass=batch_pass(models),
               mean_pixels=models.replica.input_mean * 255.0)
    init_image = palette.style(inputs.init_image) if inputs.init_image is not None else None

    width, height = resize_to_max_side(job.content_image, settings.max_side_px).size
    if min(width, height) < MIN_SIDE_PX:
        raise ValueError(f"max_side_px: {settings.max_side_px} px gives a {width}x{height} image for this "
                         f"content's aspect ratio; VGG-19 needs a shorter side of at least {MIN_SIDE_PX} px")
    sides = scale_sides(settings, min(width, height) / max(width, height))[-settings.iterations:]
    budgets = split_iterations(settings.iterations, len(sides))

    generator = torch.Generator().manual_seed(settings.seed)
    tally = _Tally()
    pixels = None
    for index, (side, budget) in enumerate(zip(sides, budgets), start=1):
        content, targets = _scale_inputs(job, side)
        h, w = content.shape[2:]
        if pixels is None:
            init = None if init_image is None else to_tensor(init_image.resize((w, h), Image.Resampling.LANCZOS))
            pixels = initial_image(content * 255.0, job.mean_pixels, settings, generator,
                                   None if init is None else init.to(models.device) * 255.0)
        else:
            pixels = _resize_pixels(pixels.detach(), h, w).contiguous()
        scale = _Scale(index=index, final=index == len(sides), budget=budget, size=(h, w), targets=targets,
                       batch_key=(tuple(pixels.shape), settings.pooling, settings.precision))
        # Only the final scale's iterates are candidates for delivery (costs at other sizes do not compare).
        if scale.final:
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
        last_total = _Objective(job, scale).total(pixels)
        if torch.isfinite(last_total).all() and float(last_total[0]) < tally.best_total:
            tally.best_pixels.copy_(pixels.detach())
            tally.best_iteration = tally.iteration
    yield _deliver(job, inputs, targets, tally)


def _checked(models: StyleModels, inputs: JobInputs, settings: StyleTransferSettings) -> StyleTransferSettings:
    """``settings`` validated, with ``precision="auto"`` resolved for the replica's device; ``ValueError`` naming
    the field when the settings or the inputs' styles and initial image are out of range."""
    settings.validate()
    if settings.precision == "auto":
        settings = settings.replace(precision=default_precision(models.device)[0])
    if not inputs.styles:
        raise ValueError("style_image: at least one style image is required")
    if len(inputs.styles) > MAX_STYLES:
        raise ValueError(f"styles: {len(inputs.styles)} style images, at most {MAX_STYLES} may be blended")
    blend_weights([weight for _, weight in inputs.styles])
    if settings.init == "image" and inputs.init_image is None:
        raise ValueError("init_image: required when init is 'image'")
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

    def cancelled(self) -> bool:
        return self.should_stop is not None and self.should_stop()

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
        ValueError: ``style_scale`` makes a style image smaller than the network's minimum at this side.
    """
    settings, device = job.settings, job.models.device
    content = to_tensor(resize_to_max_side(job.content_image, side)).to(device)            # (1, 3, H, W)
    styles = _resized_styles(job, side)
    for style, _ in styles:
        if min(style.shape[2:]) < MIN_SIDE_PX:
            raise ValueError(f"style_scale: {settings.style_scale:g} makes the style image {style.shape[3]}x"
                             f"{style.shape[2]} px, under the {MIN_SIDE_PX} px minimum; raise style_scale or "
                             f"max_side_px")
    coarser = []
    for level_h, level_w in pyramid_sizes(*content.shape[2:], settings.pyramid_levels)[1:]:
        level_styles = _resized_styles(job, max(level_h, level_w))
        if min(min(style.shape[2:]) for style, _ in level_styles) < MIN_SIDE_PX:
            break                                   # the style would be too small: no coarser level
        level_content = job.content_image.resize((level_w, level_h), Image.Resampling.LANCZOS)
        coarser.append((to_tensor(level_content).to(device), level_styles))
    return content, compute_targets(job.models, content, styles, settings, coarser)


class _Objective:
    """The function one scale minimises: ``J`` of :func:`evaluate` against the scale's targets, the coarser
    pyramid levels' features from the image downsampled, each replica pass through ``job.replica_pass``."""

    def __init__(self, job: _Job, scale: _Scale) -> None:
        self.job, self.targets, self.key = job, scale.targets, scale.batch_key

    def cost(self, feats: tuple[torch.Tensor, ...], image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``evaluate``'s costs of ``image`` (pixel levels) given its features at its own size (a
        :data:`~nst_server.batching.CostFunction`)."""
        level_feats = [self.job.replica_pass(downsample(image, level.size) / 255.0, self.key)
                       for level in self.targets.levels[1:]]
        return evaluate(feats, image, self.targets, self.job.settings, level_feats)

    def costs_and_gradient(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(J_content, J_style, TV, J)`` of ``pixels`` (detached); ``pixels.grad`` holds dJ/dpixels when J is
        finite. Through the batcher when the job has one."""
        pixels.grad = None
        if self.job.batcher is not None:
            j = self.job.batcher.evaluate(self.key, pixels, self.cost)
        else:
            j = self.cost(self.job.replica_pass(pixels / 255.0, self.key), pixels)
            if torch.isfinite(j[-1]).all():
                j[-1].sum().backward()
        return tuple(t.detach() for t in j)

    def total(self, pixels: torch.Tensor) -> torch.Tensor:
        """``J`` of ``pixels``, forward only (never batched)."""
        with torch.no_grad():
            return self.cost(self.job.replica_pass(pixels / 255.0, self.key), pixels)[-1]


def _optimise_scale(job: _Job, scale: _Scale, pixels: torch.Tensor, tally: _Tally) -> Iterator[Progress]:
    """Up to ``scale.budget`` iterations on ``pixels`` (a leaf with ``requires_grad``, pixel levels, updated in
    place), each: cost and gradient of the current image, an optimiser step, the projection onto [0, 255].

    Updates ``tally``: iterations, the stop reason (cancelled, non-finite cost, converged) and, at the final
    scale, the best iterate (the image a step started from, with its cost).

    Yields:
        :class:`Progress` of the reported iterations (the costs of the image each step started from).
    """
    settings = job.settings
    lbfgs = settings.optimizer == "lbfgs"
    optimizer = LBFGS(settings.lbfgs_history) if lbfgs else torch.optim.Adam([pixels], lr=settings.learning_rate)
    objective = _Objective(job, scale)
    history: list[float] = []                      # J of each iteration at this scale
    with job.batcher.joined(scale.batch_key) if job.batcher is not None else contextlib.nullcontext():
        for _ in range(scale.budget):
            if job.cancelled():
                tally.stop_reason = STOP_CANCELLED
                return
            tally.iteration += 1
            before = pixels.detach().clone()
            costs_ = objective.costs_and_gradient(pixels)                 # costs of ``before``
            total = costs_[-1]
            if not torch.isfinite(total).all():
                tally.stop_reason, tally.iteration = STOP_NON_FINITE, tally.iteration - 1
                return
            if lbfgs:
                optimizer.step(pixels, pixels.grad)
            else:
                optimizer.step()
            if scale.final and float(total[0]) < tally.best_total:
                tally.best_total, tally.best_iteration = float(total[0]), tally.iteration - 1
                tally.best_pixels.copy_(before)
            with torch.no_grad():
                pixels.clamp_(0.0, 255.0)
            if lbfgs:
                optimizer.projected(before, pixels)
            history.append(float(total[0]))
            progress = _progress(job, scale, tally.iteration, pixels, costs_)
            if progress is not None:
                yield progress
            if scale.final and _converged(history, settings.convergence_tolerance):
                tally.stop_reason = STOP_CONVERGED
                return


def _progress(job: _Job, scale: _Scale, iteration: int, pixels: torch.Tensor,
              costs_: tuple[torch.Tensor, ...]) -> Progress | None:
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
    return Progress(iteration=iteration, costs=_costs(*costs_), elapsed_ms=job.elapsed_ms(), scale=scale.index,
                    size=(w, h), preview_png=preview)


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
    level_feats = [features(models, downsample(delivered * 255.0, level.size) / 255.0, settings.pooling)
                   for level in targets.levels[1:]]
    final = _costs(*evaluate(features(models, delivered, settings.pooling), delivered * 255.0, targets, settings,
                             level_feats))
    output = job.palette.finish(image)
    return Result(image=output, png=encode_png_with_alpha(output, inputs.content_alpha), costs=final,
                  iterations=tally.iteration, best_iteration=tally.best_iteration, stop_reason=tally.stop_reason,
                  elapsed_ms=job.elapsed_ms(), precision=settings.precision)


def _fit(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _costs(j_content: torch.Tensor, j_style: torch.Tensor, tv: torch.Tensor, total: torch.Tensor) -> Costs:
    return Costs(content=float(j_content[0]), style=float(j_style[0]), total=float(total[0]),
                 total_variation=float(tv[0]))
