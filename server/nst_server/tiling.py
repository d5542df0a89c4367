"""Passes over a large image in tiles, with memory bounded by the tile instead of the picture, and the costs and
their gradient exactly those of the whole image.

Why it is exact. Each tile's pass reads its own region plus a halo of :data:`HALO_PX` on every side (clipped at
the picture's border), which covers the receptive field of relu5_1 (156 px: 78 px each side), so the features
of its own region equal the whole image's; the tiles' origins are multiples of :data:`ALIGN_PX` (the stride of
relu5_1), so every pooling window falls where it falls in the whole image. Then:

* the content cost ``sum (a_G - a_C)^2 / (4 n)`` is a sum over positions: the sum of the tiles' own regions';
* the style cost depends on the whole image's Gram matrix ``G = A A^T``, which is the sum of the tiles' own
  regions' ``A_t A_t^T`` (a sum over positions too): a first pass (forward only) accumulates ``G`` and the
  content sums, so the costs are known; the gradient ``dJ/dA = 2 (D + D^T) A / norm`` with ``D = G - G_S`` is local
  once ``D`` is known: a second pass runs each tile forward and backward with the constant ``D`` and adds the
  tile's input gradient (halo included) into the whole image's.

The price of exactness is the halo (each tile's pass covers more pixels than it owns) and the second forward
pass (but for the first pass's last tile, whose graph is kept for the backward: ``keep_last``); :func:`tile_grid`
chooses the grid that passes the fewest pixels within the memory budget (the session's passes, which keep no
activations, run on larger tiles: :func:`session_grid`). Gatys et al.'s costs (the seed's equations) are not
changed: the tests compare the tiled gradient with the whole image's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nst_export.vgg import LAYER_STRIDE, OUTPUT_LAYERS
from nst_server import memory
from nst_server.model import release_free_memory

#: Halo read around a tile's own region, px: at least relu5_1's receptive-field radius (78 px), a multiple of
#: :data:`ALIGN_PX`.
HALO_PX = 80
#: Tile origins are multiples of this (relu5_1's stride: four 2x2 poolings).
ALIGN_PX = 16
#: Largest image (pixels) whose replica pass (forward and backward) runs whole; larger ones run in tiles of at
#: most this many pixels, halo included. A module attribute so that tests and benchmarks can change it.
#: An untiled bf16 pass over 1024 x 768 px (0.79 MP) added 1.2 GiB to the process (2.06 GiB peak over 0.83 GiB
#: after loading, 2-core Xeon); with 100 bytes per pixel of job state and the L-BFGS pairs, a job over 2 GiB + 400
#: bytes per output pixel. 704 x 704 (0.5 MP, about 0.75 GiB) keeps a 512 px job whole and cuts a 1024 x 768
#: output in two (1.16x its pixels passed). The coarser scales of a larger job may pass more
#: (:func:`pass_pixel_limit`).
MAX_PASS_PIXELS = 704 * 704
#: The session's forward passes (float32, no autograd: the targets' features and the delivered costs,
#: :func:`session_grid`) run whole or in tiles of up to this many times :data:`MAX_PASS_PIXELS`: they keep no
#: activations for a backward. One over 704 x 704 px added 0.45-0.52 GiB to the process and one over 848 x 1104
#: px 0.99 GiB, against 0.77 GiB for the bf16 replica's backward pass over 704 x 704 px (2-core Xeon): at 1.5x a tile
#: adds about as much, and a 2048 x 1536 image passes 1.28x its pixels in 6 tiles instead of 1.45x in 10 (its
#: Gram matrices and relu4_2 through the session: 18.3-18.4 s against 20.9-23.0 s, two interleaved rounds). The
#: replica's forward-only first pass stays on the backward pass's tiles: on twice the pixels (1.19x in 4 tiles)
#: it took 7.1-9.9 s against 7.4-9.6 s in four interleaved rounds (bf16): its time per pixel grows with the tile
#: (1.5-1.6 us at 704 x 704 px, 1.9 at 848 x 1104 and at 1536 x 2048), which takes back what the halo gives.
SESSION_PASS_FACTOR = 1.5
#: Give the C heap's free pages back to the OS after each tile (:func:`~nst_server.model.release_free_memory`).
#: A tile's pass frees about 1 GiB of activations that glibc otherwise keeps, fragmented, beside the next tile's:
#: over a 2048 x 1536 image (10 tiles of at most 704 x 704 px, bf16, forward and backward) the pass added 1.03 GiB
#: to the process and kept 0.61 GiB of it after; trimming before each tile, 0.87 and 0.52 GiB (2-core Xeon). The
#: pages come back as page faults in the next tile, a few tenths of a second against its seconds of convolutions;
#: images that are passed whole are never trimmed.
TRIM_BETWEEN_TILES = True

#: ``forward(image)``: ``(1, 3, h, w)`` RGB [0, 1] -> the features in OUTPUT_LAYERS order (a tuple) or by name.
Forward = Callable[[torch.Tensor], "tuple[torch.Tensor, ...] | dict[str, torch.Tensor]"]
#: ``grid(height, width)``: the tiles of a pass over an image of that size (:func:`tile_grid`, :func:`session_grid`).
Grid = Callable[[int, int], "list[Tile]"]


@dataclass(frozen=True)
class Tile:
    """One tile: ``own`` ``(y0, y1, x0, x1)`` the region whose features it contributes, ``input`` the pixels
    its pass reads (``own`` and the halo, clipped at the border), both in px of the whole image."""

    own: tuple[int, int, int, int]
    input: tuple[int, int, int, int]

    def layer_crop(self, layer: str) -> tuple[slice, slice]:
        """Rows and columns of ``own`` in the tile's feature map of ``layer``."""
        stride = LAYER_STRIDE[layer]
        y0, y1, x0, x1 = self.own
        iy0, _, ix0, _ = self.input
        return (slice((y0 - iy0) // stride, (y1 - iy0) // stride),
                slice((x0 - ix0) // stride, (x1 - ix0) // stride))

    def whole_map_slice(self, layer: str, crop: torch.Tensor) -> tuple[slice, slice, slice, slice]:
        """``[:, :, rows, cols]`` of the whole image's feature map of ``layer`` where this tile's own ``crop`` (from
        :meth:`layer_crop`) belongs."""
        stride = LAYER_STRIDE[layer]
        y0, _, x0, _ = self.own
        return (slice(None), slice(None), slice(y0 // stride, y0 // stride + crop.shape[2]),
                slice(x0 // stride, x0 // stride + crop.shape[3]))

    def image_slice(self) -> tuple[slice, slice, slice, slice]:
        """``[:, :, rows, cols]`` of the tile's input in the whole image."""
        iy0, iy1, ix0, ix1 = self.input
        return slice(None), slice(None), slice(iy0, iy1), slice(ix0, ix1)


#: Bytes one replica pass (forward and backward, the costs' float32 copies included) adds per pixel it passes, by
#: precision, for :func:`pass_pixel_limit`. Measured as the growth of the process's peak between a whole pass over
#: 704 x 704 and one over 1024 x 768 px, each in a fresh process (``VmHWM``; 2-core EPYC, AVX512_BF16): bf16
#: 1.146 -> 1.657 GiB (1887 bytes per added pixel), fp32 1.360 -> 2.023 GiB (2448). Rounded up by a fifth.
#: fp16 counts as fp32, as in :data:`nst_server.memory.JOB_FIXED_BYTES`.
BYTES_PER_PASS_PIXEL: dict[str, int] = {"bf16": 2300, "fp32": 2900, "fp16": 2900}


def pass_pixel_limit(scale_pixels: int, output_pixels: int, precision: str) -> int:
    """The most pixels one replica pass (halo included) may cover at a scale of ``scale_pixels`` px of a job whose
    output has ``output_pixels``: :data:`MAX_PASS_PIXELS`, plus what the job's memory estimate holds for its
    output size that this smaller scale does not use.

    A job's estimate (:func:`nst_server.memory.job_peak_bytes`) counts one tile's pass in its fixed part and
    :data:`~nst_server.memory.BYTES_PER_OUTPUT_PIXEL` per output pixel for the optimiser's state, the targets and
    the image copies, which are sized by the scale being optimised. At a coarser scale that part is smaller by
    ``BYTES_PER_OUTPUT_PIXEL x (output_pixels - scale_pixels)``, and that much more may go to the pass
    (:data:`BYTES_PER_PASS_PIXEL` per pixel): the 1024 x 768 px scale of a 2048 x 1536 px job runs whole in bf16
    (1 pass of 786 k px, not 2 tiles covering 1.16x its pixels, each passed twice), and the 2048 x 1536 px scale of
    a 4096 x 3072 px job in 2 tiles, not 10. At the output's own scale the limit is :data:`MAX_PASS_PIXELS`.
    Precisions other than bf16 count as fp32.
    """
    room = memory.BYTES_PER_OUTPUT_PIXEL * max(0, int(output_pixels) - int(scale_pixels))
    per_pixel = BYTES_PER_PASS_PIXEL.get(precision, BYTES_PER_PASS_PIXEL["fp32"])
    return MAX_PASS_PIXELS + room // per_pixel


def needs_tiles(height: int, width: int, max_pixels: int | None = None) -> bool:
    """Whether an image of ``height x width`` px is passed in tiles (more than :data:`MAX_PASS_PIXELS`)."""
    return height * width > (MAX_PASS_PIXELS if max_pixels is None else max_pixels)


def _spans(extent: int, parts: int) -> list[tuple[int, int]]:
    """``extent`` px cut into ``parts`` spans of nearly equal length, every boundary a multiple of
    :data:`ALIGN_PX` (the last span takes the remainder)."""
    cuts = [0] + [round(extent * k / parts / ALIGN_PX) * ALIGN_PX for k in range(1, parts)] + [extent]
    return [(start, end) for start, end in zip(cuts, cuts[1:]) if end > start]


def _grid(height: int, width: int, rows: int, cols: int) -> list[Tile]:
    return [Tile(own=(y0, y1, x0, x1), input=(max(0, y0 - HALO_PX), min(height, y1 + HALO_PX),
                                              max(0, x0 - HALO_PX), min(width, x1 + HALO_PX)))
            for y0, y1 in _spans(height, rows) for x0, x1 in _spans(width, cols)]


def input_pixels(tile: Tile) -> int:
    """The pixels one pass over ``tile`` covers: its own region and its halo."""
    iy0, iy1, ix0, ix1 = tile.input
    return (iy1 - iy0) * (ix1 - ix0)


def tile_grid(height: int, width: int, own_side: int | None = None,
              max_pixels: int | None = None) -> list[Tile]:
    """The tiles covering ``height x width`` px, in row-major order.

    With ``own_side``: own regions of ``own_side`` px (a multiple of :data:`ALIGN_PX`; the last row and column
    take the remainder). Otherwise the grid of nearly equal tiles whose passes (own region and halo) each cover
    at most ``max_pixels`` (:data:`MAX_PASS_PIXELS`) and together the fewest pixels: the halo is work done twice,
    so a 2048 x 1536 image under 1024 x 768 px of budget gets 2 x 3 tiles (1.3x its pixels passed), not 3 x 3.

    Raises:
        ValueError: ``own_side`` is not a positive multiple of :data:`ALIGN_PX`.
    """
    if own_side is not None:
        if own_side <= 0 or own_side % ALIGN_PX:
            raise ValueError(f"a tile's side must be a positive multiple of {ALIGN_PX} px, got {own_side}")
        return _grid(height, width, max(1, math.ceil(height / own_side)), max(1, math.ceil(width / own_side)))
    return list(_best_grid(height, width, MAX_PASS_PIXELS if max_pixels is None else max_pixels))


def session_grid(height: int, width: int) -> list[Tile]:
    """The tiles of the session's forward pass (float32) over ``height x width`` px: :func:`tile_grid` with
    :data:`SESSION_PASS_FACTOR` x :data:`MAX_PASS_PIXELS` per tile."""
    return tile_grid(height, width, max_pixels=int(SESSION_PASS_FACTOR * MAX_PASS_PIXELS))


@functools.lru_cache(maxsize=64)
def _best_grid(height: int, width: int, budget: int) -> tuple[Tile, ...]:
    best: list[Tile] | None = None
    for rows in range(1, max(1, height // ALIGN_PX) + 1):
        for cols in range(1, max(1, width // ALIGN_PX) + 1):
            tiles = _grid(height, width, rows, cols)
            if max(input_pixels(tile) for tile in tiles) > budget:
                continue
            if best is None or sum(map(input_pixels, tiles)) < sum(map(input_pixels, best)):
                best = tiles
            break                                     # more columns only add halo
    return tuple(best if best is not None
                 else _grid(height, width, max(1, height // ALIGN_PX), max(1, width // ALIGN_PX)))


def _named(feats) -> dict[str, torch.Tensor]:
    return feats if isinstance(feats, dict) else dict(zip(OUTPUT_LAYERS, feats))


#: :func:`own_gram` converts the features to float32 this many positions (rows of the map) at a time: the relu1_1
#: crop of one of a 2048 x 1536 image's six session tiles (683 x 768 px own region) is 134 MB in float32.
GRAM_CHUNK_POSITIONS = 1 << 16


def own_gram(feature: torch.Tensor) -> torch.Tensor:
    """``A A^T`` ``(1, C, C)`` float32 of a (cropped) feature map ``(1, C, h, w)``, any layout and dtype; the
    products summed in float32 over chunks of about :data:`GRAM_CHUNK_POSITIONS` positions (whole rows)."""
    batch, channels, height, width = feature.shape
    rows = max(1, GRAM_CHUNK_POSITIONS // max(1, width))
    gram = None
    for start in range(0, max(1, height), rows):               # an empty crop (0 rows): a zero matrix
        chunk = feature[:, :, start:start + rows]
        unrolled = chunk.permute(0, 2, 3, 1).reshape(batch, -1, channels).float()                 # (1, P, C)
        part = torch.bmm(unrolled.transpose(1, 2), unrolled)
        gram = part if gram is None else gram.add_(part)
    return gram


@dataclass
class TiledFeatures:
    """What a forward pass over tiles keeps of an image's features: ``grams`` ``{layer: (1, C, C) float32}``
    (the whole image's, summed over the tiles' own regions) and ``kept`` ``{layer: (1, C, H_l, W_l) float32}``
    (the whole feature map, assembled)."""

    grams: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor]
    #: With ``keep_last``: the last tile, its input (a leaf with ``requires_grad``) and its features with their
    #: autograd graph, for :func:`tiled_backward` to start from without passing that tile forward again.
    last: "tuple[Tile, torch.Tensor, dict[str, torch.Tensor]] | None" = None


def tiled_features(forward: Forward, image: torch.Tensor, gram_layers=(), keep_layers=(),
                   tiles: list[Tile] | None = None, keep_last: bool = False) -> TiledFeatures:
    """Gram matrices of ``gram_layers`` and the assembled feature maps of ``keep_layers`` of ``image``
    ``(1, 3, H, W)`` RGB [0, 1], from forward passes over ``tiles`` (:func:`tile_grid`), without autograd; with
    ``keep_last``, the last tile's pass with autograd, kept (:attr:`TiledFeatures.last`).

    Memory: one tile's pass (with ``keep_last``, the last one's activations stay until its backward, as in
    :func:`tiled_backward`), plus the kept maps (e.g. relu4_2: 512 channels at 1/8 of the side, 32 bytes per
    image pixel in float32) and the Gram matrices.
    """
    height, width = image.shape[2:]
    tiles = tile_grid(height, width) if tiles is None else tiles
    grams: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    last = None
    with torch.no_grad():
        for index, tile in enumerate(tiles):
            _between_tiles(tiles)
            if keep_last and index == len(tiles) - 1:
                with torch.enable_grad():
                    piece = image[tile.image_slice()].detach().requires_grad_(True)
                    feats = _named(forward(piece))
                last = (tile, piece, feats)
            else:
                feats = _named(forward(image[tile.image_slice()]))
            for layer in set(gram_layers) | set(keep_layers):
                rows, cols = tile.layer_crop(layer)
                crop = feats[layer].detach()[:, :, rows, cols]
                if layer in gram_layers:
                    gram = own_gram(crop)
                    grams[layer] = grams[layer] + gram if layer in grams else gram
                if layer in keep_layers:
                    if layer not in kept:
                        stride = LAYER_STRIDE[layer]
                        kept[layer] = torch.zeros(1, crop.shape[1], height // stride, width // stride,
                                                  dtype=torch.float32, device=crop.device)
                    kept[layer][tile.whole_map_slice(layer, crop)] = crop.float()
            del feats
    _between_tiles(tiles)
    return TiledFeatures(grams=grams, kept=kept, last=last)


#: Speed lever (docs/benchmarks.md, "Tile passes"): each tile's cost terms add their gradient into the features'
#: gradient on the own region only, in place, from a tensor hook, instead of through autograd on cropped features
#: (which makes a zero tensor of the whole feature map per output layer and adds it to the gradient coming back
#: from the next layer: on a 2048 x 1536 px bf16 pass, ``SliceBackward`` 3.5 s and ``add_`` 6.2 s of 41 s).
OWN_REGION_HOOKS = True


def _own_region_gradient(feature: torch.Tensor, tile: Tile, layer: str, twice_m: torch.Tensor | None,
                         content: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """The gradient ``(1, C, h, w)`` in ``feature``'s dtype, on ``tile``'s own region of ``layer``, of
    ``<M, A A^T> + k sum (a - c)^2`` with ``twice_m = 2 M`` (symmetric) and ``content = (c whole map, k)``:
    ``2 M A`` (the product in the features' dtype, as :class:`nst_server.costs._StyleLayerCost` runs it) plus
    ``2 k (a - c)`` (float32, then cast)."""
    rows, cols = tile.layer_crop(layer)
    crop = feature.detach()[:, :, rows, cols]
    batch, channels, height, width = crop.shape
    total = None
    if twice_m is not None:
        unrolled = crop.permute(0, 2, 3, 1).reshape(batch, -1, channels)              # (1, P, C)
        product = torch.bmm(unrolled, twice_m.to(crop.dtype))                          # (1, P, C)
        total = product.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    if content is not None:
        target, factor = content
        term = (2.0 * factor) * (crop.float() - target[tile.whole_map_slice(layer, crop)])
        total = term.to(crop.dtype) if total is None else total + term.to(crop.dtype)
    return total


def _add_own_region(feature: torch.Tensor, tile: Tile, layer: str, twice_m: torch.Tensor | None,
                    content: tuple[torch.Tensor, float] | None, incoming: torch.Tensor) -> torch.Tensor:
    """Hook on ``layer``'s features (``feature``, detached): ``incoming`` (the gradient from the layers above, the
    whole tile's map) plus :func:`_own_region_gradient` on the own region, in place."""
    rows, cols = tile.layer_crop(layer)
    incoming[:, :, rows, cols] += _own_region_gradient(feature, tile, layer, twice_m, content)
    return incoming


def tiled_backward(forward: Forward, image: torch.Tensor, gram_weights: dict[str, torch.Tensor],
                   content: dict[str, tuple[torch.Tensor, float]], tiles: list[Tile] | None = None,
                   passed: "tuple[Tile, torch.Tensor, dict[str, torch.Tensor]] | None" = None) -> torch.Tensor:
    """The gradient ``(1, 3, H, W)`` float32 with respect to ``image`` (RGB [0, 1]) of
    ``sum_l <M_l, G_l> + sum_l k_l sum (a_l - c_l)^2``, from one forward and backward pass per tile.

    With ``M_l = dJ/dG_l`` (from the first pass: ``beta lambda_l 2 D_l / norm_l`` and the objective's factors)
    and ``k_l`` the content term's factor, this is ``dJ/dimage`` of the whole image's objective, exactly.

    Each tile: the deepest layer used starts the backward with its own region's gradient (zero elsewhere); every
    other layer used adds its own region's gradient (:func:`_own_region_gradient`) into the gradient reaching it
    from the layers above, in place, from a hook on its features (:data:`OWN_REGION_HOOKS`; otherwise through
    autograd on the cropped features).

    Args:
        forward: the replica's pass with autograd (autocast inside, if any).
        gram_weights: ``{layer: M_l (1, C, C) float32}``, symmetric.
        content: ``{layer: (target (1, C, H_l, W_l) whole map, k_l)}``.
        passed: one of ``tiles`` already passed forward with autograd (:attr:`TiledFeatures.last`): it goes
            backward first, without a second forward pass.
    """
    height, width = image.shape[2:]
    tiles = tile_grid(height, width) if tiles is None else tiles
    grad = torch.zeros_like(image, dtype=torch.float32)
    twice = {layer: 2.0 * weight for layer, weight in gram_weights.items()}
    used = sorted(set(twice) | set(content), key=OUTPUT_LAYERS.index)
    order = tiles if passed is None else [passed[0]] + [tile for tile in tiles if tile != passed[0]]
    for tile in order:
        if passed is not None and tile == passed[0]:
            _, piece, feats = passed
            passed = None
        else:
            _between_tiles(tiles)
            piece = image[tile.image_slice()].detach().requires_grad_(True)
            feats = _named(forward(piece))
        if OWN_REGION_HOOKS:
            for layer in used[:-1]:
                feats[layer].register_hook(functools.partial(
                    _add_own_region, feats[layer].detach(), tile, layer, twice.get(layer), content.get(layer)))
            deepest = used[-1]
            seed = torch.zeros_like(feats[deepest])
            _add_own_region(feats[deepest].detach(), tile, deepest, twice.get(deepest), content.get(deepest), seed)
            torch.autograd.backward(feats[deepest], seed)
        else:
            surrogate = piece.new_zeros((), dtype=torch.float32)
            for layer in used:
                rows, cols = tile.layer_crop(layer)
                constant = _own_region_gradient(feats[layer], tile, layer, twice.get(layer), content.get(layer))
                surrogate = surrogate + (feats[layer][:, :, rows, cols].float() * constant.float()).sum()
            surrogate.backward()
        grad[tile.image_slice()] += piece.grad
        del feats, piece
    _between_tiles(tiles)
    return grad


def _between_tiles(tiles: list[Tile]) -> None:
    """Before a tile's pass and after the last: the previous tile's freed memory back to the OS, when the image
    is passed in more than one tile (:data:`TRIM_BETWEEN_TILES`)."""
    if TRIM_BETWEEN_TILES and len(tiles) > 1:
        release_free_memory()
