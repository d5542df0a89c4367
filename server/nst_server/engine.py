"""The style-transfer engine: targets, the optimisation loop over the generated image's pixels, the result.

It knows nothing of gRPC. :func:`stylize` is a generator: it yields :class:`Progress` after each reported
iteration and ends with one :class:`Result`.

Algorithm (the seed document, after Gatys et al. 2015): content features and style Gram matrices come from
the onnxruntime session; the generated image starts as noisy content and is optimised on
``J = alpha J_content + beta J_style (+ tv_weight TV)`` with gradients from the PyTorch replica.

Departures from the seed, each a control with the seed's behaviour one setting away:

* the optimised variable is the image in pixel levels (RGB 0..255, float32), projected back onto [0, 255]
  after every step, so the image being costed is always a valid image (the seed clips only at the end);
* the result is the best iterate seen, rounded to 8 bits, and its costs are recomputed on exactly those
  pixels (a plain loop reports the costs of an unclamped tensor it never delivers);
* the default schedule is coarse-to-fine (Gatys et al. 2017, "Controlling perceptual factors"): the image is
  optimised at a smaller size first, then upsampled, which reaches a lower cost per second.
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
from nst_server.images import encode_png, encode_png_with_alpha, resize_to_max_side, to_tensor, to_uint8
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
PRESETS = ("default", "seed")

#: The largest style image side ``style_scale`` may ask for in-process (a server's own limit is lower).
MAX_STYLE_SIDE_PX = 16384

STOP_ITERATIONS = "iterations_done"
STOP_CANCELLED = "cancelled"
STOP_NON_FINITE = "non_finite_cost"
STOP_CONVERGED = "converged"

#: Window of the convergence test, iterations.
CONVERGENCE_WINDOW = 10

# Speed levers, each kept because ``nst-benchmark`` measured a gain (README, "Benchmarks"). Module attributes, so
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
        content_weight: alpha. The seed's course uses alpha = 10, beta = 40 with Adam; with the original
            VGG-19 weights (0..255 input) that makes the style term about 10^4 times the content term and the
            content is lost, so the defaults (alpha = 1, beta = 1e-4) balance the two terms at convergence.
        style_weight: beta.
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
        scales: coarse-to-fine schedule: number of scales (1: single scale).
        start_side_px: longest side at the first scale; 0: ``max_side_px / 2^(scales-1)`` (at least 64 px).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast in the replica; Gram matrices and costs fp32.
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
    style_weight: float = 1e-4
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
    scales: int = 1
    start_side_px: int = 0
    precision: str = "fp32"
    seed: int = 0
    progress_every: int = 1
    preview_every: int = 0
    preview_max_side_px: int = 128
    convergence_tolerance: float = 0.0

    @classmethod
    def preset(cls, name: str = "default", **overrides) -> "StyleTransferSettings":
        """Settings of a named preset with ``overrides`` applied.

        ``"seed"`` reproduces the seed's method as the course assignment sets it: content relu4_2, style
        relu1_1 … relu5_1 with lambda 0.2, alpha 10, beta 40, noisy content with ratio 0.6, Adam with learning
        rate 2.0, 200 iterations, one scale.

        Raises:
            ValueError: unknown preset name.
        """
        if name == "default":
            return cls(**overrides)
        if name == "seed":
            seed = dict(content_weight=10.0, style_weight=40.0, optimizer="adam", learning_rate=2.0,
                        noise_ratio=0.6, init="noisy_content", iterations=200, scales=1, tv_weight=0.0,
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
        for name in ("learning_rate", "style_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.noise_ratio > 1:
            raise ValueError(f"noise_ratio must be in [0, 1], got {self.noise_ratio}")
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
        for name, allowed in (("optimizer", OPTIMIZERS), ("init", INITS), ("pooling", POOLINGS),
                              ("color_control", COLOR_CONTROLS), ("precision", tuple(PRECISIONS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lbfgs_history", "progress_every", "scales", "preview_max_side_px"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.scales > self.iterations:
            raise ValueError(f"scales must be at most iterations ({self.iterations}), got {self.scales}")
        if self.start_side_px and not MIN_SIDE_PX <= self.start_side_px <= self.max_side_px:
            raise ValueError(f"start_side_px must be between {MIN_SIDE_PX} and max_side_px "
                             f"({self.max_side_px}), got {self.start_side_px}")
        if self.preview_every < 0:
            raise ValueError(f"preview_every must be >= 0, got {self.preview_every}")


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


@dataclass
class Targets:
    """Content features and style Gram matrices for one output size."""

    content: dict[str, torch.Tensor]          # layer -> (1, C, H_l, W_l)
    style_grams: dict[str, torch.Tensor]      # layer -> (1, C, C), scaled to the generated image's positions


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
    """Normalise blend weights to sum 1; all zero means equal weights. Raises ValueError on negative ones."""
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"style blend weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    return [w / total for w in weights] if total > 0 else [1.0 / len(weights)] * len(weights)


def compute_targets(models: StyleModels, content: torch.Tensor, styles: list[tuple[torch.Tensor, float]],
                    settings: StyleTransferSettings) -> Targets:
    """Content features and blended style Gram targets (forward passes only).

    Args:
        content: ``(1, 3, H, W)`` float32 RGB [0, 1] at the output size of this scale.
        styles: ``[(style (1, 3, H_s, W_s) float32 RGB [0, 1], blend weight)]``.
    Returns:
        Targets whose Gram matrices are ``sum_k w_k G_k`` (weights normalised by :func:`blend_weights`), each
        rescaled to this output size's positions (:func:`costs.style_gram_target`).
    """
    content_features = features(models, content, settings.pooling)
    height, width = content.shape[2:]
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
    return Targets(content={layer: content_features[layer] for layer in settings.content_layers},
                   style_grams=grams)


def evaluate(feats: dict[str, torch.Tensor] | tuple[torch.Tensor, ...], pixels: torch.Tensor, targets: Targets,
             settings: StyleTransferSettings) -> tuple[torch.Tensor, ...]:
    """``(J_content, J_style, TV, J)`` per item, each ``(B,)`` float32.

    Args:
        feats: the generated image's features (dict, or the replica's tuple in OUTPUT_LAYERS order).
        pixels: the generated image ``(B, 3, H, W)`` in pixel levels, for the total variation.
    """
    if not isinstance(feats, dict):
        feats = dict(zip(OUTPUT_LAYERS, feats))
    j_content = sum(weight * costs.content_cost(targets.content[layer], feats[layer])
                    for layer, weight in settings.content_layers.items())
    j_style = sum(weight * costs.style_layer_cost(targets.style_grams[layer], feats[layer])
                  for layer, weight in settings.style_layers.items())
    tv = costs.total_variation(pixels)
    total = settings.content_weight * j_content + settings.style_weight * j_style + settings.tv_weight * tv
    return j_content, j_style, tv, total


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
    settings = settings or StyleTransferSettings()
    settings.validate()
    if not inputs.styles:
        raise ValueError("style_image: at least one style image is required")
    blend_weights([weight for _, weight in inputs.styles])
    if settings.init == "image" and inputs.init_image is None:
        raise ValueError("init_image: required when init is 'image'")
    started = time.perf_counter()
    device = models.device

    palette = color.ColorControl(settings.color_control, inputs.content)
    content_image = palette.content()
    style_images = [(palette.style(style), weight) for style, weight in inputs.styles]
    init_image = palette.style(inputs.init_image) if inputs.init_image is not None else None

    width, height = resize_to_max_side(content_image, settings.max_side_px).size
    if min(width, height) < MIN_SIDE_PX:
        raise ValueError(f"max_side_px: {settings.max_side_px} px gives a {width}x{height} image for this "
                         f"content's aspect ratio; VGG-19 needs a shorter side of at least {MIN_SIDE_PX} px")
    sides = scale_sides(settings, min(width, height) / max(width, height))
    budgets = split_iterations(settings.iterations, len(sides))

    generator = torch.Generator().manual_seed(settings.seed)
    replica_pass = batch_pass(models)
    mean_pixels = models.replica.input_mean * 255.0
    pixels = best_pixels = None
    best_total, best_iteration, iteration = math.inf, 0, 0
    stop_reason = STOP_ITERATIONS
    history: list[float] = []

    def scale_inputs(side: int) -> tuple[torch.Tensor, Targets]:
        content = to_tensor(resize_to_max_side(content_image, side)).to(device)            # (1, 3, H, W)
        style_side = max(1, round(side * settings.style_scale))
        styles = [(to_tensor(resize_to_max_side(image, style_side)).to(device), weight)
                  for image, weight in style_images]
        for style, _ in styles:
            if min(style.shape[2:]) < MIN_SIDE_PX:
                raise ValueError(f"style_scale: {settings.style_scale:g} makes the style image {style.shape[3]}x"
                                 f"{style.shape[2]} px, under the {MIN_SIDE_PX} px minimum; raise style_scale or "
                                 f"max_side_px")
        return content, compute_targets(models, content, styles, settings)

    for scale_index, (side, budget) in enumerate(zip(sides, budgets), start=1):
        content, targets = scale_inputs(side)
        h, w = content.shape[2:]
        if pixels is None:
            init = None if init_image is None else to_tensor(init_image.resize((w, h), Image.Resampling.LANCZOS))
            pixels = initial_image(content * 255.0, mean_pixels, settings, generator,
                                   None if init is None else init.to(device) * 255.0)
        else:
            pixels = _resize_pixels(pixels.detach(), h, w).contiguous()
        # Only the final scale's iterates are candidates for delivery (costs at other sizes do not compare).
        final_scale = scale_index == len(sides)
        if final_scale:
            best_pixels, best_total = pixels.detach().clone(), math.inf
        pixels.requires_grad_(True)
        if settings.optimizer == "lbfgs":
            optimizer = torch.optim.LBFGS([pixels], lr=1.0, max_iter=1, history_size=settings.lbfgs_history)
        else:
            optimizer = torch.optim.Adam([pixels], lr=settings.learning_rate)
        costed: list[tuple[torch.Tensor, ...]] = []

        batch_key = (tuple(pixels.shape), settings.pooling, settings.precision)

        def cost(feats: tuple[torch.Tensor, ...], image: torch.Tensor, targets: Targets = targets):
            return evaluate(feats, image, targets, settings)

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            if batcher is not None:
                j = batcher.evaluate(batch_key, pixels, cost)
            else:
                j = cost(replica_pass(pixels / 255.0, batch_key), pixels)
                if torch.isfinite(j[-1]).all():
                    j[-1].sum().backward()
            costed.append(tuple(t.detach() for t in j))
            return j[-1].sum()

        history.clear()
        joined = batcher.joined(batch_key) if batcher is not None else contextlib.nullcontext()
        with joined:
            for _ in range(budget):
                if should_stop is not None and should_stop():
                    stop_reason = STOP_CANCELLED
                    break
                iteration += 1
                before = pixels.detach().clone()
                costed.clear()
                if settings.optimizer == "lbfgs":
                    optimizer.step(closure)
                else:
                    closure()
                    if torch.isfinite(costed[0][-1]).all():
                        optimizer.step()
                j_content, j_style, tv, total = costed[0]           # costs of ``before``
                if not torch.isfinite(total).all():
                    stop_reason, iteration = STOP_NON_FINITE, iteration - 1
                    break
                if final_scale and float(total[0]) < best_total:
                    best_total, best_iteration = float(total[0]), iteration - 1
                    best_pixels.copy_(before)
                with torch.no_grad():
                    pixels.clamp_(0.0, 255.0)
                history.append(float(total[0]))
                last = iteration == settings.iterations
                if iteration % settings.progress_every == 0 or last:
                    preview = b""
                    if settings.preview_every and (iteration % settings.preview_every == 0 or last):
                        small = _resize_pixels(pixels.detach(), *_fit(h, w, settings.preview_max_side_px))
                        preview = encode_png(palette.finish(to_uint8(small)))
                    yield Progress(iteration=iteration, costs=_costs(j_content, j_style, tv, total),
                                   elapsed_ms=(time.perf_counter() - started) * 1000.0, scale=scale_index,
                                   size=(w, h), preview_png=preview)
                if (final_scale and settings.convergence_tolerance and len(history) > CONVERGENCE_WINDOW):
                    old, new = history[-CONVERGENCE_WINDOW - 1], history[-1]
                    if (old - new) <= settings.convergence_tolerance * abs(old):
                        stop_reason = STOP_CONVERGED
                        break
        if stop_reason != STOP_ITERATIONS:
            break

    if best_pixels is None:              # stopped before the final scale: deliver the current image upsampled
        targets = scale_inputs(sides[-1])[1]
        best_pixels = _resize_pixels(pixels.detach(), height, width)
    elif stop_reason in (STOP_ITERATIONS, STOP_CONVERGED):
        # The last step's image has not been costed yet: cost it and keep it if it is the best.
        with torch.no_grad():
            last_total = evaluate(replica_pass(pixels / 255.0, batch_key), pixels, targets, settings)[-1]
        if torch.isfinite(last_total).all() and float(last_total[0]) < best_total:
            best_pixels.copy_(pixels.detach())
            best_iteration = iteration

    image = to_uint8(best_pixels)                                          # (H, W, 3) uint8
    delivered = to_tensor(Image.fromarray(image, "RGB")).to(device)
    final = _costs(*evaluate(features(models, delivered, settings.pooling), delivered * 255.0, targets, settings))
    output = palette.finish(image)
    yield Result(image=output, png=encode_png_with_alpha(output, inputs.content_alpha), costs=final,
                 iterations=iteration, best_iteration=best_iteration, stop_reason=stop_reason,
                 elapsed_ms=(time.perf_counter() - started) * 1000.0)


def _fit(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _costs(j_content: torch.Tensor, j_style: torch.Tensor, tv: torch.Tensor, total: torch.Tensor) -> Costs:
    return Costs(content=float(j_content[0]), style=float(j_style[0]), total=float(total[0]),
                 total_variation=float(tv[0]))
