"""The style-transfer engine: targets, the optimisation loop over the generated image's pixels, the result.

It knows nothing of gRPC. :func:`stylize` is a generator: it yields :class:`Progress` after each reported
iteration and ends with one :class:`Result`.

Algorithm (the seed document, after Gatys et al. 2015): content features at ``content_layer`` and style Gram
matrices at ``style_layers`` come from the onnxruntime session; the generated image starts as noisy content
and is optimised by Adam on ``J = alpha J_content + beta J_style`` with gradients from the PyTorch replica.
The optimised variable is the image in pixel levels (RGB, 0..255, float32), projected back onto [0, 255]
after every step, so the image being costed is always a valid image (departure from the seed, which clips
only at the end). The result is the best iterate seen, rounded to 8 bits, and its costs are recomputed on
exactly those 8-bit pixels by the session.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from nst_export.vgg import MIN_SIDE_PX, OUTPUT_LAYERS
from nst_server import costs
from nst_server.images import encode_png, resize_to_max_side, to_tensor, to_uint8
from nst_server.model import StyleModels

#: The seed's style layers, each with lambda = 0.2 (the course assignment's choice).
DEFAULT_STYLE_LAYERS: dict[str, float] = {
    "relu1_1": 0.2, "relu2_1": 0.2, "relu3_1": 0.2, "relu4_1": 0.2, "relu5_1": 0.2,
}

OPTIMIZERS = ("lbfgs", "adam")

STOP_ITERATIONS = "iterations_done"
STOP_CANCELLED = "cancelled"
STOP_NON_FINITE = "non_finite_cost"


@dataclass(frozen=True)
class StyleTransferSettings:
    """Every control of one job; each default is defined here once.

    Attributes:
        max_side_px: longest side of the generated image, px (>= 16, the network's minimum).
        iterations: optimiser steps.
        content_weight: alpha. The seed's course uses alpha = 10, beta = 40 with Adam; with these weights'
            activation scale (Caffe VGG-19, 0..255 input) that gives the style term about 10^4 times the content
            term and the content is lost, so the defaults (alpha = 1, beta = 1e-4, L-BFGS) balance the two
            terms at convergence instead.
        style_weight: beta.
        content_layer: layer of J_content (the seed: conv4_2, i.e. relu4_2).
        style_layers: ``{layer: lambda}`` of J_style.
        noise_ratio: initial image = ``mean + (1 - r)(content - mean) + r U(-20, 20)`` (pixel levels), the
            course assignment's ``generate_noise_image``.
        optimizer: ``"lbfgs"`` (Gatys et al.; one function evaluation per iteration) or ``"adam"``.
        lbfgs_history: L-BFGS history size.
        learning_rate: Adam step size in pixel levels (0..255 units); 2.0 is the course's value.
        seed: seeds the initial noise; same inputs, seed and settings give the same bytes on CPU.
        progress_every: report a :class:`Progress` every this many iterations (the last one always).
    """

    max_side_px: int = 256
    iterations: int = 200
    content_weight: float = 1.0
    style_weight: float = 1e-4
    content_layer: str = "relu4_2"
    style_layers: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_STYLE_LAYERS))
    noise_ratio: float = 0.6
    learning_rate: float = 2.0
    optimizer: str = "lbfgs"
    lbfgs_history: int = 100
    seed: int = 0
    progress_every: int = 1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of range."""
        if self.max_side_px < MIN_SIDE_PX:
            raise ValueError(f"max_side_px must be at least {MIN_SIDE_PX} (VGG-19 pools 4 times before "
                             f"relu5_1), got {self.max_side_px}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        for name in ("content_weight", "style_weight", "noise_ratio", "learning_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.noise_ratio > 1:
            raise ValueError(f"noise_ratio must be in [0, 1], got {self.noise_ratio}")
        if self.learning_rate == 0:
            raise ValueError("learning_rate must be > 0")
        if self.content_layer not in OUTPUT_LAYERS:
            raise ValueError(f"content_layer must be one of {OUTPUT_LAYERS}, got {self.content_layer!r}")
        if not self.style_layers:
            raise ValueError("style_layers must name at least one layer")
        for layer, weight in self.style_layers.items():
            if layer not in OUTPUT_LAYERS:
                raise ValueError(f"style layer must be one of {OUTPUT_LAYERS}, got {layer!r}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"style layer weight for {layer} must be finite and >= 0, got {weight}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lbfgs_history < 1:
            raise ValueError(f"lbfgs_history must be at least 1, got {self.lbfgs_history}")
        if self.progress_every < 1:
            raise ValueError(f"progress_every must be at least 1, got {self.progress_every}")


@dataclass(frozen=True)
class Costs:
    """The seed's costs of one image (float, dimensionless)."""

    content: float
    style: float
    total: float


@dataclass(frozen=True)
class Progress:
    """One reported iteration: costs of the iterate the step started from (replica, fp32)."""

    iteration: int          # 1-based, strictly increasing within a job
    costs: Costs
    elapsed_ms: float       # since the job started (targets included)


@dataclass(frozen=True)
class Result:
    """The delivered image and its costs (computed by the session on the 8-bit pixels delivered)."""

    image: np.ndarray       # (H, W, 3) uint8 RGB
    png: bytes
    costs: Costs
    iterations: int         # iterations run
    best_iteration: int     # iteration whose image is delivered (0: the initial image)
    stop_reason: str        # STOP_ITERATIONS, STOP_CANCELLED or STOP_NON_FINITE
    elapsed_ms: float


@dataclass
class _Targets:
    content: torch.Tensor                     # (1, C, H_l, W_l)
    style_grams: dict[str, torch.Tensor]      # layer -> (1, C, C), scaled to the generated image's positions


def _layer_shape(height: int, width: int, layer: str) -> tuple[int, int]:
    # Each 2x2 pooling floors the side; LAYER_STRIDE-style division with floor at every step.
    pools = {"relu1_1": 0, "relu2_1": 1, "relu3_1": 2, "relu4_1": 3, "relu4_2": 3, "relu5_1": 4}[layer]
    for _ in range(pools):
        height, width = height // 2, width // 2
    return height, width


def compute_targets(models: StyleModels, content: torch.Tensor, style: torch.Tensor,
                    settings: StyleTransferSettings) -> _Targets:
    """Content features and style Gram targets from the onnxruntime session.

    Args:
        content: ``(1, 3, H, W)`` float32 RGB [0, 1], already at the output size.
        style: ``(1, 3, H_s, W_s)`` float32 RGB [0, 1].
    """
    content_features = models.features(content)[settings.content_layer]
    style_features = models.features(style)
    height, width = content.shape[2:]
    grams = {}
    for layer in settings.style_layers:
        h_l, w_l = _layer_shape(height, width, layer)
        grams[layer] = costs.style_gram_target(style_features[layer], h_l * w_l)
    return _Targets(content=content_features, style_grams=grams)


def evaluate(features: dict[str, torch.Tensor] | tuple[torch.Tensor, ...], targets: _Targets,
             settings: StyleTransferSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(J_content, J_style, J)`` per item, each ``(B,)`` float32, from the generated image's features."""
    if not isinstance(features, dict):
        features = dict(zip(OUTPUT_LAYERS, features))
    j_content = costs.content_cost(targets.content, features[settings.content_layer])
    j_style = sum(weight * costs.style_layer_cost(targets.style_grams[layer], features[layer])
                  for layer, weight in settings.style_layers.items())
    total = settings.content_weight * j_content + settings.style_weight * j_style
    return j_content, j_style, total


def initial_image(content_pixels: torch.Tensor, mean_pixels: torch.Tensor, noise_ratio: float,
                  generator: torch.Generator) -> torch.Tensor:
    """The seed's noisy content: ``mean + (1 - r)(content - mean) + r U(-20, 20)``, clipped to [0, 255].

    Args:
        content_pixels: ``(1, 3, H, W)`` float32 pixel levels 0..255.
        mean_pixels: ``(1, 3, 1, 1)`` the weights' mean pixel, 0..255.
    """
    noise = torch.rand(content_pixels.shape, generator=generator, dtype=torch.float32) * 40.0 - 20.0
    noise = noise.to(content_pixels.device)
    image = mean_pixels + (1.0 - noise_ratio) * (content_pixels - mean_pixels) + noise_ratio * noise
    return image.clamp_(0.0, 255.0)


def _costs(j_content: torch.Tensor, j_style: torch.Tensor, total: torch.Tensor) -> Costs:
    return Costs(content=float(j_content[0]), style=float(j_style[0]), total=float(total[0]))


def stylize(models: StyleModels, content_image: Image.Image, style_image: Image.Image,
            settings: StyleTransferSettings | None = None,
            should_stop: Callable[[], bool] | None = None) -> Iterator[Progress | Result]:
    """Run one style-transfer job.

    Args:
        models: the session and replica.
        content_image, style_image: RGB images of any size (resized here: content to ``max_side_px``, style
            to the same longest side).
        settings: the job's controls (defaults: :class:`StyleTransferSettings`).
        should_stop: polled once per iteration; when it returns True the job ends with ``STOP_CANCELLED``.
    Yields:
        :class:`Progress` per reported iteration, then exactly one :class:`Result`.
    Raises:
        ValueError: a setting is out of range (before any work is done).
    """
    settings = settings or StyleTransferSettings()
    settings.validate()
    started = time.perf_counter()
    elapsed_ms = lambda: (time.perf_counter() - started) * 1000.0  # noqa: E731
    device = models.device

    content = to_tensor(resize_to_max_side(content_image, settings.max_side_px)).to(device)  # (1, 3, H, W)
    style = to_tensor(resize_to_max_side(style_image, settings.max_side_px)).to(device)
    if min(content.shape[2:]) < MIN_SIDE_PX or min(style.shape[2:]) < MIN_SIDE_PX:
        raise ValueError(f"after resizing to max_side_px={settings.max_side_px} the shorter side is "
                         f"{min(content.shape[2:])} px (content) / {min(style.shape[2:])} px (style); "
                         f"VGG-19 needs at least {MIN_SIDE_PX} px")
    targets = compute_targets(models, content, style, settings)

    generator = torch.Generator().manual_seed(settings.seed)
    mean_pixels = models.replica.input_mean * 255.0
    pixels = initial_image(content * 255.0, mean_pixels, settings.noise_ratio, generator)
    pixels.requires_grad_(True)
    if settings.optimizer == "lbfgs":
        optimizer = torch.optim.LBFGS([pixels], lr=1.0, max_iter=1, history_size=settings.lbfgs_history)
    else:
        optimizer = torch.optim.Adam([pixels], lr=settings.learning_rate)
    costed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        j_content, j_style, total = evaluate(models.replica(pixels / 255.0), targets, settings)
        costed.append((j_content.detach(), j_style.detach(), total.detach()))
        if torch.isfinite(total).all():
            total.sum().backward()
        return total.sum()

    best_pixels, best_total, best_iteration = pixels.detach().clone(), math.inf, 0
    stop_reason, iteration = STOP_ITERATIONS, 0
    for iteration in range(1, settings.iterations + 1):
        if should_stop is not None and should_stop():
            stop_reason, iteration = STOP_CANCELLED, iteration - 1
            break
        before = pixels.detach().clone()
        costed.clear()
        if settings.optimizer == "lbfgs":
            optimizer.step(closure)
        else:
            closure()
            if torch.isfinite(costed[0][2]).all():
                optimizer.step()
        j_content, j_style, total = costed[0]             # costs of ``before``, the iterate this step left
        if not torch.isfinite(total).all():
            stop_reason, iteration = STOP_NON_FINITE, iteration - 1
            break
        if float(total[0]) < best_total:
            best_total, best_iteration = float(total[0]), iteration - 1
            best_pixels.copy_(before)
        with torch.no_grad():
            pixels.clamp_(0.0, 255.0)
        if iteration % settings.progress_every == 0 or iteration == settings.iterations:
            yield Progress(iteration=iteration, costs=_costs(j_content, j_style, total), elapsed_ms=elapsed_ms())

    if stop_reason == STOP_ITERATIONS:
        # The last step's image has not been costed yet: cost it and keep it if it is the best.
        with torch.no_grad():
            final_total = evaluate(models.replica(pixels / 255.0), targets, settings)[2]
        if torch.isfinite(final_total).all() and float(final_total[0]) < best_total:
            best_pixels.copy_(pixels.detach())
            best_iteration = iteration

    image = to_uint8(best_pixels)                                          # (H, W, 3) uint8
    delivered = to_tensor(Image.fromarray(image, "RGB")).to(device)
    with torch.no_grad():
        final = _costs(*evaluate(models.features(delivered), targets, settings))
    yield Result(image=image, png=encode_png(image), costs=final, iterations=iteration,
                 best_iteration=best_iteration, stop_reason=stop_reason, elapsed_ms=elapsed_ms())
