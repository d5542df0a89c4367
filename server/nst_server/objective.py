"""The function a job minimises: :func:`evaluate` (the seed's content and style costs of the generated image
against its targets, over the resolution pyramid, with total variation), :class:`Objective` (one scale's cost and
gradient through the PyTorch replica, shared with other jobs by the batcher) and the replica's pass.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Callable

import torch

from nst_export.vgg import OUTPUT_LAYERS
from nst_server import costs, packed
from nst_server.batching import ReplicaBatcher
from nst_server.costs import CostTerms
from nst_server.images import resize_lanczos
from nst_server.model import StyleModels
from nst_server.settings import PRECISIONS, StyleTransferSettings
from nst_server.targets import LevelTargets, Targets, layer_positions
from nst_server.tiling import (Forward, Grid, Tile, TiledFeatures, needs_tiles, tile_grid, tiled_backward,
                               tiled_features)

log = logging.getLogger(__name__)

# Speed levers, each kept because ``nst-benchmark`` measured a gain (docs/benchmarks.md). Module attributes, so
# that the benchmark can switch them off to measure them; they change no result beyond float rounding.
#: The replica's weights and the generated image in channels_last (NHWC), oneDNN's native layout on CPU (no
#: reorder around each convolution) and the Tensor Cores' on CUDA. The weights are converted on first use.
CHANNELS_LAST = True
#: The replica's weights cast to the job's autocast dtype once, not at every convolution call (:func:`replica_for`).
CAST_WEIGHTS_ONCE = True
#: On the CPU, fp32 and bf16 passes run on convolution weights packed once in oneDNN's blocked format, each
#: convolution fused with its ReLU (:mod:`nst_server.packed`); where packing fails, the replica, logged.
PACKED_WEIGHTS = True
#: The dtypes :data:`PACKED_WEIGHTS` serves (fp16 on the CPU keeps autocast's path).
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def replica_input(models: StyleModels, image: torch.Tensor) -> torch.Tensor:
    """``image`` in the layout the replica runs in: channels_last when :data:`CHANNELS_LAST` (the replica's
    weights are converted to match, once, under the models' layout lock; jobs running meanwhile see equal
    values)."""
    if models.replica_channels_last != CHANNELS_LAST:
        with models.layout_lock:
            if models.replica_channels_last != CHANNELS_LAST:
                models.replica.to(memory_format=torch.channels_last if CHANNELS_LAST else torch.contiguous_format)
                models.replica_casts.clear()           # made again from the converted weights
                models.replica_channels_last = CHANNELS_LAST
    return image.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST else image


def replica_for(models: StyleModels, precision: str):
    """The replica to run under ``precision``'s autocast, called as ``replica(images, pooling=)``.

    * On the CPU, for fp32 and bf16, when :data:`PACKED_WEIGHTS`: a :class:`~nst_server.packed.PackedReplica`
      (weights packed once for oneDNN, convolution and ReLU fused; made once per dtype and layout under the
      models' layout lock). Where this torch build or CPU cannot pack (:func:`nst_server.packed.available`, or a
      ``RuntimeError`` or a failed check on a 16 px probe pass: a warning), that is logged once and the next
      choice serves.
    * Else, for bf16/fp16 when :data:`CAST_WEIGHTS_ONCE`: a copy of ``models.replica`` whose weights and biases are
      in that dtype already (its ``input_mean`` stays fp32). Autocast casts each fp32 weight to bf16/fp16 at every
      convolution call: its cast cache holds only leaves that require grad, and the replica's weights do not. The
      copy's weights are those casts done once (the same round-to-nearest conversion), so the features are
      bit-identical; what goes is a cast of the 13 convolutions' 12.9 M weights (52 MB read, 26 MB written) per
      replica pass, tile and pyramid level (in the bf16 profile of a 256 px iteration, ``copy_`` was 16 % of it).
    * Else ``models.replica``.

    Call after :func:`replica_input` (which sets the layout)."""
    dtype = PRECISIONS[precision] or torch.float32
    if PACKED_WEIGHTS and models.device.type == "cpu" and dtype in PACKED_DTYPES:
        replica = _made_once(models, ("packed", dtype), lambda: _packed_or_none(models, dtype))
        if replica:                                    # False: packing failed here, once
            return replica
    if dtype == torch.float32 or not CAST_WEIGHTS_ONCE:
        return models.replica
    return _made_once(models, (dtype,), lambda: _cast_copy(models.replica, dtype))


def _made_once(models: StyleModels, key: tuple, make: Callable[[], object]):
    """``models.replica_casts[key + (layout,)]``, made by ``make()`` under the models' layout lock the first time."""
    key = key + (models.replica_channels_last,)
    made = models.replica_casts.get(key)
    if made is None:
        with models.layout_lock:
            made = models.replica_casts.get(key)
            if made is None:
                made = models.replica_casts[key] = make()
    return made


def _cast_copy(replica: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``replica`` with its weights and biases in ``dtype`` (``input_mean`` is a buffer: it stays fp32)."""
    cast = copy.deepcopy(replica)
    for parameter in cast.parameters():
        parameter.data = parameter.data.to(dtype)
    return cast


def _packed_or_none(models: StyleModels, dtype: torch.dtype):
    """A :class:`~nst_server.packed.PackedReplica` of ``models.replica`` in ``dtype`` that passed a probe (a
    16 px image's features and gradient, finite and of the replica's shapes), or False, logged."""
    usable, why = packed.available(dtype)
    if not usable:
        log.info("no packed convolution weights in %s (%s): the replica runs F.conv2d", dtype, why)
        return False
    try:
        replica = packed.PackedReplica(models.replica, dtype)
        probe = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).contiguous(
            memory_format=torch.channels_last if models.replica_channels_last else torch.contiguous_format)
        with torch.enable_grad():                      # the first caller may be a pass without autograd
            probe.requires_grad_(True)
            feats = replica(probe)
            sum(feat.float().sum() for feat in feats).backward()
        if not (torch.isfinite(probe.grad).all() and all(feat.shape[1] == conv.out_channels for feat, conv in
                                                          zip(feats, _output_convs(models.replica)))):
            raise RuntimeError("the probe pass gave non-finite gradients or wrong shapes")
    except RuntimeError as exc:
        log.warning("packed convolution weights (%s) are unavailable here, the replica runs F.conv2d: %s",
                    dtype, exc)
        return False
    log.info("replica passes in %s on packed oneDNN weights", dtype)
    return replica


def _output_convs(replica) -> list:
    return [getattr(replica, layer.replace("relu", "conv")) for layer in OUTPUT_LAYERS]


def evaluate(feats: dict[str, torch.Tensor] | tuple[torch.Tensor, ...], pixels: torch.Tensor, targets: Targets,
             settings: StyleTransferSettings,
             level_feats: list[dict[str, torch.Tensor] | tuple[torch.Tensor, ...]] = ()) -> CostTerms:
    """The costs of a batch of generated images, each ``(B,)`` float32 (:class:`~nst_server.costs.CostTerms`).

    ``J_content`` and ``J_style`` are the seed's costs at the generated image's own size. ``J`` is the objective
    the job minimises: the mean over the pyramid's levels of ``alpha J_content / c + beta w J_style / s`` (each
    level's costs of the image downsampled to that level, ``c`` and ``s`` its normalisers, 1 without
    normalisation, ``w`` its ``style_weight``, 1 except at a large output's structure levels), plus
    ``tv_weight * TV``. With one level and ``normalization == "none"`` it is the seed's
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
        content, style = _level_costs(level, feats_dict(level_feat), settings)
        if j_content is None:
            j_content, j_style = content, style
        objective = objective + (settings.content_weight * content / level.content_norm
                                 + settings.style_weight * level.style_weight * style / level.style_norm)
    tv = costs.total_variation(pixels)
    total = objective / min(len(targets.levels), len(all_feats)) + settings.tv_weight * tv
    return CostTerms(content=j_content, style=j_style, total_variation=tv, total=total)


def _level_costs(level: LevelTargets, feats: dict[str, torch.Tensor],
                 settings: StyleTransferSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """One pyramid level's ``J_content`` and ``J_style`` ``(B,)`` of features ``feats`` against ``level``'s targets:
    the layers' weighted sums of the seed's content and style costs (:mod:`nst_server.costs`)."""
    content = sum(weight * costs.content_cost(level.content[layer], feats[layer])
                  for layer, weight in settings.content_layers.items())
    style = sum(weight * costs.style_layer_cost(level.style_grams[layer], feats[layer])
                for layer, weight in settings.style_layers.items())
    return content, style


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


def _autocast(models: StyleModels, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=models.device.type, dtype=dtype)


def batch_pass(models: StyleModels) -> Callable[[torch.Tensor, tuple], tuple[torch.Tensor, ...]]:
    """The replica pass a :class:`~nst_server.batching.ReplicaBatcher` runs for jobs of key
    ``(shape, pooling, precision)``: ``images`` ``(B, 3, H, W)`` RGB [0, 1] -> the replica's features."""
    def run_pass(images: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...]:
        _, pooling, precision = key
        images = replica_input(models, images)
        with _autocast(models, precision):
            return replica_for(models, precision)(images, pooling=pooling)
    return run_pass


class Objective:
    """The function one scale of a job minimises: ``J`` of :func:`evaluate` against the scale's ``targets``, the
    coarser pyramid levels' features from the image downsampled, every replica pass through ``replica_pass``
    (:func:`batch_pass`) with ``key`` ``(shape, pooling, precision)``; through ``batcher`` when given, which
    shares each pass with other jobs of equal key.

    ``max_pass_pixels``: the most pixels one replica pass may cover (default
    :data:`~nst_server.tiling.MAX_PASS_PIXELS`; a job's coarser scales may have more,
    :func:`~nst_server.tiling.pass_pixel_limit`). A scale larger than that is passed in tiles. A scale larger than
    :data:`~nst_server.tiling.MAX_PASS_PIXELS` is costed level by level (:func:`tiled_costs_and_gradient`: each
    pyramid level's pass freed before the next, whole where it is within ``max_pass_pixels``) and never batched
    (a batch of B images is B times a pass's memory)."""

    def __init__(self, targets: Targets, settings: StyleTransferSettings,
                 replica_pass: Callable[[torch.Tensor, tuple], tuple[torch.Tensor, ...]], key: tuple,
                 batcher: ReplicaBatcher | None = None, max_pass_pixels: int | None = None) -> None:
        self.targets, self.settings, self.replica_pass, self.key, self.batcher = (targets, settings, replica_pass,
                                                                                  key, batcher)
        self.max_pass_pixels = max_pass_pixels

    def cost(self, feats: tuple[torch.Tensor, ...], image: torch.Tensor) -> CostTerms:
        """:func:`evaluate`'s costs of ``image`` ``(B, 3, H, W)`` (pixel levels) given its features at its own
        size (a :data:`~nst_server.batching.CostFunction`)."""
        level_feats = [self.replica_pass(downsample(image, level.size) / 255.0, self.key)
                       for level in self.targets.levels[1:]]
        return evaluate(feats, image, self.targets, self.settings, level_feats)

    @property
    def tiled(self) -> bool:
        """Whether the replica's passes at this scale run in tiles (:mod:`nst_server.tiling`): the generated
        image is larger than ``max_pass_pixels``."""
        return needs_tiles(*self.targets.levels[0].size, self.max_pass_pixels)

    def _grid(self, height: int, width: int) -> list[Tile]:
        return tile_grid(height, width, max_pixels=self.max_pass_pixels)

    def _forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.replica_pass(image, self.key)

    def costs_and_gradient(self, pixels: torch.Tensor) -> CostTerms:
        """The costs of ``pixels`` ``(1, 3, H, W)`` (a leaf with ``requires_grad``), detached; ``pixels.grad``
        holds dJ/dpixels when J is finite. An image over :data:`~nst_server.tiling.MAX_PASS_PIXELS` is passed
        level by level, in tiles over ``max_pass_pixels`` (:func:`tiled_costs_and_gradient`), never batched."""
        pixels.grad = None
        if needs_tiles(*self.targets.levels[0].size):
            return tiled_costs_and_gradient(self._forward, pixels, self.targets, self.settings, self.max_pass_pixels)
        if self.batcher is not None:
            terms = self.batcher.evaluate(self.key, pixels, self.cost)
        else:
            terms = self.cost(self.replica_pass(pixels / 255.0, self.key), pixels)
            if torch.isfinite(terms.total).all():
                terms.total.sum().backward()
        return terms.detach()

    def total(self, pixels: torch.Tensor) -> torch.Tensor:
        """``J`` ``(B,)`` of ``pixels``, forward only (never batched)."""
        if needs_tiles(*self.targets.levels[0].size):
            return tiled_costs(self._forward, pixels, self.targets, self.settings, self._grid).total
        with torch.no_grad():
            return self.cost(self.replica_pass(pixels / 255.0, self.key), pixels).total


def _level_factors(level: LevelTargets, settings: StyleTransferSettings, levels: int) -> tuple[float, float]:
    """The factors of one level's ``J_content`` and ``J_style`` in ``J`` (:func:`evaluate`)."""
    return (settings.content_weight / (level.content_norm * levels),
            settings.style_weight * level.style_weight / (level.style_norm * levels))


def _tiled_level(forward: Forward, image: torch.Tensor, level: LevelTargets, settings: StyleTransferSettings,
                 grid: Grid = tile_grid, keep_last: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], TiledFeatures]:
    """One level's ``J_content``, ``J_style`` ``(1,)`` and ``D_l / norm_l`` (``D_l = G_l - G_S``, ``norm_l = 4 n_C^2
    P^2``: ``J_style^[l] = sum D_l^2 / norm_l``) of ``image`` ``(1, 3, h, w)`` pixel levels, from a forward pass over
    the tiles ``grid(h, w)`` gives (and what that pass kept: :func:`~nst_server.tiling.tiled_features`, with
    ``keep_last``)."""
    passed = tiled_features(forward, image / 255.0, gram_layers=tuple(settings.style_layers),
                            keep_layers=tuple(settings.content_layers), tiles=grid(*image.shape[2:]),
                            keep_last=keep_last)
    content = sum(weight * costs.content_cost(level.content[layer], passed.kept[layer])
                  for layer, weight in settings.content_layers.items())
    height, width = image.shape[2:]
    diffs = {layer: passed.grams[layer] - level.style_grams[layer] for layer in settings.style_layers}
    per_norm = {layer: diff / (4.0 * diff.shape[1] ** 2 * layer_positions(height, width, layer) ** 2)
                for layer, diff in diffs.items()}
    style = sum(weight * (diffs[layer] * per_norm[layer]).flatten(1).sum(1)
                for layer, weight in settings.style_layers.items())
    return content, style, per_norm, passed


def tiled_costs(forward: Forward, pixels: torch.Tensor, targets: Targets,
                settings: StyleTransferSettings, grid: Grid = tile_grid) -> CostTerms:
    """:func:`evaluate`'s costs of ``pixels`` ``(1, 3, H, W)`` (pixel levels), every level's features from
    forward passes over tiles (:func:`nst_server.tiling.tiled_features`; ``forward`` is the replica's pass or the
    session's), without autograd. Equal to :func:`evaluate` on the whole image up to float rounding.

    ``grid``: the tiles of an image's pass: :func:`~nst_server.tiling.tile_grid` (the backward pass's), or
    :func:`~nst_server.tiling.session_grid` for the session's (larger: it keeps no activations)."""
    with torch.no_grad():
        pixels = pixels.detach()
        levels = len(targets.levels)
        objective, first = 0.0, None
        for level in targets.levels:
            image = pixels if level.size == tuple(pixels.shape[2:]) else downsample(pixels, level.size)
            content, style, _, _ = _tiled_level(forward, image, level, settings, grid)
            first = first or (content, style)
            content_factor, style_factor = _level_factors(level, settings, levels)
            objective = objective + content_factor * content + style_factor * style
        tv = costs.total_variation(pixels)
        return CostTerms(content=first[0], style=first[1], total_variation=tv,
                         total=objective + settings.tv_weight * tv)


#: Speed lever: a tiled level's forward-only first pass runs its last tile with autograd and keeps it, and the
#: forward and backward pass starts from it: one tile's forward pass less per tiled level and iteration
#: (:func:`~nst_server.tiling.tiled_features`, ``keep_last``). Off: every tile passed forward twice.
KEEP_LAST_TILE = True


def _whole_level(forward: Forward, image: torch.Tensor, level: LevelTargets, settings: StyleTransferSettings,
                 content_factor: float, style_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One level's ``J_content``, ``J_style`` ``(1,)`` (detached) of ``image`` ``(1, 3, h, w)`` pixel levels (still
    attached to the pixels' graph) from one whole forward pass; its share of ``J`` (``content_factor J_content +
    style_factor J_style``) backpropagated into the pixels' gradient when finite. :func:`evaluate`'s terms."""
    content, style = _level_costs(level, feats_dict(forward(image / 255.0)), settings)
    share = content_factor * content + style_factor * style
    if torch.isfinite(share).all():
        share.sum().backward()
    return content.detach(), style.detach()


def tiled_costs_and_gradient(forward: Forward, pixels: torch.Tensor, targets: Targets,
                             settings: StyleTransferSettings, max_pixels: int | None = None) -> CostTerms:
    """The costs of ``pixels`` ``(1, 3, H, W)`` (a leaf with ``requires_grad``, pixel levels) and
    ``pixels.grad`` = dJ/dpixels, with the replica's memory bounded by a pass over at most ``max_pixels``
    (default :data:`~nst_server.tiling.MAX_PASS_PIXELS`; :mod:`nst_server.tiling`).

    Each pyramid level larger than that: a forward pass over tiles gives its costs and ``D_l = G_l - G_S``; a
    forward and backward pass per tile gives the gradient with respect to the level's image, ``dJ/dG_l =
    beta_level lambda_l 2 D_l / norm_l`` held constant. A level within ``max_pixels`` (the coarser levels of the
    pyramid, usually) is passed whole, once, forward and backward (:func:`_whole_level`): a tile grid of one tile
    would pass it forward twice. The levels' gradients are carried back through the downsampling (autograd) to
    ``pixels``. The same ``J`` as :func:`evaluate` on the whole image, and its gradient, up to float rounding
    (tests/test_tiling.py).
    """
    levels = len(targets.levels)
    objective, first = 0.0, None
    for level in targets.levels:
        image = pixels if level.size == tuple(pixels.shape[2:]) else downsample(pixels, level.size)
        content_factor, style_factor = _level_factors(level, settings, levels)
        if not needs_tiles(*level.size, max_pixels):
            content, style = _whole_level(forward, image, level, settings, content_factor, style_factor)
            first = first or (content, style)
            objective = objective + content_factor * content + style_factor * style
            del image
            if not torch.isfinite(objective).all():
                break
            continue
        detached = image.detach()
        content, style, per_norm, passed = _tiled_level(forward, detached, level, settings, functools.partial(
            tile_grid, max_pixels=max_pixels), keep_last=KEEP_LAST_TILE)
        first = first or (content, style)
        objective = objective + content_factor * content + style_factor * style
        if not torch.isfinite(objective).all():
            break
        gram_weights = {layer: (style_factor * weight * 2.0) * per_norm[layer]        # dJ/dG_l
                        for layer, weight in settings.style_layers.items()}
        content_terms = {layer: (level.content[layer],
                                 content_factor * weight / (4.0 * level.content[layer][0].numel()))
                         for layer, weight in settings.content_layers.items()}
        grad = tiled_backward(forward, detached / 255.0, gram_weights, content_terms,
                              tile_grid(*detached.shape[2:], max_pixels=max_pixels), passed.last).div_(255.0)
        del passed
        # Carried back through the downsampling now, level by level: its graph and this gradient are freed
        # before the next level's passes (two image-sized tensors per level less at the peak).
        torch.autograd.backward(image, grad)
        del image, detached, grad
    tv = costs.total_variation(pixels)
    total = objective + settings.tv_weight * tv
    if torch.isfinite(total).all():
        torch.autograd.backward([settings.tv_weight * tv], [torch.ones_like(tv)])
    else:
        pixels.grad = None
    return CostTerms(content=first[0], style=first[1], total_variation=tv, total=total).detach()
