"""The targets of a job at one size: the content features and the blended, rescaled style Gram matrices that
the objective compares the generated image with, the objective's normalisers, and the resolution pyramid's
coarser levels; forward passes only (the onnxruntime session, or the replica for a pooling the exported graph
does not have). Style Gram matrices are cached per loaded model (:attr:`StyleModels.style_cache`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from nst_export.vgg import LAYER_STRIDE, MIN_SIDE_PX, OUTPUT_LAYERS
from nst_server import costs
from nst_server.model import StyleModels
from nst_server.settings import StyleTransferSettings, blend_weights
from nst_server.tiling import Forward, needs_tiles, session_grid, tiled_features

#: Style Gram matrices of this many recent style images are kept per loaded model (0: none), keyed by the
#: style image's pixels as the network sees them (after resizing and colour control) and the pooling.
STYLE_CACHE_ENTRIES = 8


@dataclass
class LevelTargets:
    """Content features and style Gram matrices for the generated image at one size, and the objective's
    normalisers at that size."""

    size: tuple[int, int]                     # (H, W) of the generated image at this level, px
    content: dict[str, torch.Tensor]          # layer -> (1, C, H_l, W_l)
    style_grams: dict[str, torch.Tensor]      # layer -> (1, C, C), scaled to this size's positions
    content_norm: float = 1.0                 # J_content is divided by this in the objective
    style_norm: float = 1.0                   # J_style is divided by this in the objective
    style_weight: float = 1.0                 # and multiplied by this (a level's share of the style term)


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


def session_forward(models: StyleModels, pooling: str) -> Forward:
    """The forward-only pass :func:`features` uses, as a function of the image: the session's, or the replica's
    with ``pooling`` (call it under ``no_grad``)."""
    if pooling == models.replica.pooling:
        return models.features
    return lambda image: models.replica(image, pooling=pooling)


def _grams_of(models: StyleModels, style: torch.Tensor, pooling: str, layers) -> dict[str, torch.Tensor]:
    """Gram matrices of every layer in ``layers`` of ``style``; over tiles when it is large."""
    if needs_tiles(*style.shape[2:]):
        return tiled_features(session_forward(models, pooling), style, gram_layers=tuple(layers),
                              tiles=session_grid(*style.shape[2:])).grams
    style_features = features(models, style, pooling)
    return {layer: costs.gram_matrix(style_features[layer]) for layer in layers}


def style_grams(models: StyleModels, style: torch.Tensor, pooling: str, layers) -> dict[str, torch.Tensor]:
    """Unscaled Gram matrices ``{layer: (1, C, C) float32}`` of ``style`` ((1, 3, H, W) RGB [0, 1]).

    Served from a per-model LRU cache of :data:`STYLE_CACHE_ENTRIES` style images
    (:attr:`~nst_server.model.StyleModels.style_cache`) when possible (a service sees the same styles again and
    again; each miss costs one forward pass of the style image). The key is the blake2b digest of the tensor's
    bytes, its shape and the pooling; the cached tensors are never modified in place by the engine.
    """
    if not STYLE_CACHE_ENTRIES:
        return _grams_of(models, style, pooling, layers)
    array = style.detach().to("cpu", torch.float32).contiguous().numpy()
    key = (hashlib.blake2b(array.tobytes(), digest_size=20).hexdigest(), tuple(style.shape), pooling)
    cache = models.style_cache
    with models.style_cache_lock:
        grams = cache.get(key)
        if grams is not None and all(layer in grams for layer in layers):
            cache.move_to_end(key)
            return grams
    grams = _grams_of(models, style, pooling, OUTPUT_LAYERS)                                # every layer
    with models.style_cache_lock:
        cache[key] = grams
        while len(cache) > STYLE_CACHE_ENTRIES:
            cache.popitem(last=False)
    return grams


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
    height, width = content.shape[2:]
    if needs_tiles(height, width):              # the content layers' maps only, assembled from tiles
        content_features = tiled_features(session_forward(models, settings.pooling), content,
                                          keep_layers=tuple(settings.content_layers),
                                          tiles=session_grid(height, width)).kept
    else:
        content_features = features(models, content, settings.pooling)
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
    return level_sizes(height, width, half_octaves(levels))


def half_octaves(levels: int) -> list[float]:
    """The factors of ``levels`` pyramid levels in half-octave steps: ``2^(-k/2)``, k = 0 .. levels - 1."""
    return [2.0 ** (-k / 2) for k in range(levels)]


def level_sizes(height: int, width: int, factors: list[float]) -> list[tuple[int, int]]:
    """``(H, W)`` of the pyramid levels at ``factors`` of an image of ``height x width`` px (decreasing, the first
    1.0), each side rounded to the nearest pixel; the levels from the first whose shorter side would fall under the
    network's 16 px minimum are left out."""
    sizes = []
    for factor in factors:
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        if min(size) < MIN_SIDE_PX:
            break
        sizes.append(size)
    return sizes
