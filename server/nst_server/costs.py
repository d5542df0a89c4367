"""The costs of neural style transfer: the seed document's terms exactly as it writes them, and the total
variation.

Notation (seed, after Gatys et al. 2015): ``a`` is one layer's activation volume with ``n_C`` channels and
``n_H x n_W`` positions; the Gram matrix of ``a`` is ``G = A A^T`` with ``A`` the ``(n_C, n_H n_W)`` unrolled
volume.

* ``J_content(C, G) = 1 / (4 n_H n_W n_C) * sum (a_C - a_G)^2`` (:func:`content_cost`)
* ``J_style^[l](S, G) = 1 / (4 n_C^2 (n_H n_W)^2) * sum_ij (G_S,ij - G_G,ij)^2`` (:func:`style_layer_cost`)
* ``J_style(S, G) = sum_l lambda_l J_style^[l](S, G)``
* ``J(G) = alpha J_content(C, G) + beta J_style(S, G)``

The sums over layers and the objective are the objective's (:func:`nst_server.objective.evaluate`), which by default
divides each term by its target's size and averages over a resolution pyramid; the seed's ``J`` is its
``normalization="none"``, one-level case. A style image of another size than the generated image has its
Gram matrix rescaled to the generated image's positions (:func:`rescale_gram`).

All functions take batched tensors ``(B, …)`` and return per-item costs ``(B,)`` in float32; inputs in lower
precision are promoted to float32 before the Gram product (an fp16 sum of squares overflows past 65504). Only
the style gradient's product runs in bf16 when the activations are bf16 (:data:`BF16_STYLE_GRADIENT`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


#: Speed lever (kept: see docs/benchmarks.md): :func:`style_layer_cost` differentiates through its own
#: backward, one matrix product ``(D + D^T) A``, where autograd through ``A A^T`` computes two. Same values.
FAST_STYLE_GRADIENT = True
#: Speed lever (docs/benchmarks.md): with bf16 activations, that backward product runs in bf16 (its result is cast to
#: bf16 anyway); the forward Gram matrix and the costs stay fp32.
BF16_STYLE_GRADIENT = True


class CostTerms(NamedTuple):
    """The costs of a batch of generated images, each ``(B,)`` float32 (with autograd history while optimising).

    ``content`` and ``style`` are the seed's ``J_content`` and ``J_style`` at the generated image's own size,
    ``total_variation`` the mean squared neighbour difference (pixel levels^2), and ``total`` the objective the
    job minimises (:func:`nst_server.objective.evaluate`), whose gradient the optimiser follows.
    """

    content: torch.Tensor
    style: torch.Tensor
    total_variation: torch.Tensor
    total: torch.Tensor

    def detach(self) -> "CostTerms":
        """The same costs without autograd history."""
        return CostTerms(*(term.detach() for term in self))


def _channels_last(features: torch.Tensor) -> bool:
    """True for a 4-d tensor laid out NHWC (``torch.channels_last``) and not also plain contiguous."""
    return features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()


def _unrolled(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool]:
    """The ``(B, n_C, n_H n_W)`` unrolled volume ``A`` as ``dtype``, or for channels_last activations its
    transpose ``A^T`` ``(B, n_H n_W, n_C)``, which is then a view (no copy when ``features`` has ``dtype``
    already); the flag says which."""
    batch, channels = features.shape[:2]
    if _channels_last(features):
        return features.permute(0, 2, 3, 1).reshape(batch, -1, channels).to(dtype), True
    return features.reshape(batch, channels, -1).to(dtype), False


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Unnormalised Gram matrix ``G = A A^T`` of each item.

    Args:
        features: ``(B, n_C, n_H, n_W)`` activations (any float dtype, NCHW or channels_last).
    Returns:
        ``(B, n_C, n_C)`` float32.
    """
    unrolled, transposed = _unrolled(features)
    if transposed:                                                   # (B, n_H n_W, n_C)
        return torch.bmm(unrolled.transpose(1, 2), unrolled)
    return torch.bmm(unrolled, unrolled.transpose(1, 2))            # (B, n_C, n_H n_W)


class _StyleLayerCost(torch.autograd.Function):
    """``sum (A A^T - G_S)^2 / norm`` per item, with the gradient ``2 (D + D^T) A / norm`` (``D = A A^T - G_S``)
    in one matrix product; the target Gram matrix gets no gradient (it is a constant of the job)."""

    @staticmethod
    def forward(ctx, generated: torch.Tensor, style_gram: torch.Tensor, norm: float) -> torch.Tensor:
        diff = gram_matrix(generated) - style_gram                   # (B, n_C, n_C)
        ctx.save_for_backward(generated, diff)
        ctx.norm = norm
        return diff.pow(2).flatten(1).sum(1) / norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        generated, diff = ctx.saved_tensors
        scale = (grad * (2.0 / ctx.norm)).view(-1, 1, 1)
        sym = (diff + diff.transpose(1, 2)) * scale                  # (B, n_C, n_C), symmetric
        if generated.dtype == torch.bfloat16 and BF16_STYLE_GRADIENT:
            # The gradient goes back into the bf16 network as bf16 whatever this product's precision, so the
            # product runs in bf16 (fp32 accumulation in oneDNN and cuBLAS): A is bf16 already, only ``sym`` is
            # rounded. The forward Gram matrix stays fp32: the cost is a sum of squared differences of nearly
            # equal Gram matrices, which bf16's 8-bit mantissa would not resolve.
            unrolled, transposed = _unrolled(generated, torch.bfloat16)
            sym = sym.to(torch.bfloat16)
        else:
            unrolled, transposed = _unrolled(generated)
        batch, channels, height, width = generated.shape
        if transposed:                                               # A^T sym: (B, n_H n_W, n_C), NHWC order
            grad_in = torch.bmm(unrolled, sym).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        else:                                                        # sym A: (B, n_C, n_H n_W)
            grad_in = torch.bmm(sym, unrolled).reshape(batch, channels, height, width)
        return grad_in.to(generated.dtype), None, None


def content_cost(content: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """The seed's ``J_content``: ``sum (a_C - a_G)^2 / (4 n_H n_W n_C)`` per item.

    Args:
        content, generated: ``(B, n_C, n_H, n_W)`` activations of the same layer and shape
            (``content`` may have ``B = 1`` and is then broadcast).
    Returns:
        ``(B,)`` float32.
    Raises:
        ValueError: the shapes differ beyond the batch axis.
    """
    if content.shape[1:] != generated.shape[1:]:
        raise ValueError(f"content cost needs equal layer shapes, got {tuple(content.shape)} "
                         f"and {tuple(generated.shape)}")
    n_c, n_h, n_w = generated.shape[1:]
    diff = generated.float() - content.float()
    return diff.pow(2).flatten(1).sum(1) / (4.0 * n_h * n_w * n_c)


def style_layer_cost(style_gram: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """The seed's ``J_style^[l]``: ``sum (G_S - G_G)^2 / (4 n_C^2 (n_H n_W)^2)`` per item.

    Args:
        style_gram: ``(1 or B, n_C, n_C)`` float32 target Gram matrix, already expressed for ``n_H n_W``
            positions of the generated image (see :func:`style_gram_target`).
        generated: ``(B, n_C, n_H, n_W)`` activations of the generated image at this layer.
    Returns:
        ``(B,)`` float32.
    """
    n_c, n_h, n_w = generated.shape[1:]
    norm = 4.0 * n_c**2 * (n_h * n_w) ** 2
    if FAST_STYLE_GRADIENT and not style_gram.requires_grad:
        return _StyleLayerCost.apply(generated, style_gram, norm)
    diff = gram_matrix(generated) - style_gram
    return diff.pow(2).flatten(1).sum(1) / norm


def style_gram_target(style_features: torch.Tensor, generated_positions: int) -> torch.Tensor:
    """The style image's Gram matrix rescaled to the generated image's number of positions.

    The seed's formula compares unnormalised Gram matrices of images of one size; when the style image has
    ``P_S`` positions and the generated image ``P_G``, we use ``G_S * P_G / P_S`` (identical when the sizes
    are equal), which keeps the per-position statistics that the style cost matches.

    Args:
        style_features: ``(1, n_C, n_H', n_W')`` activations of the style image.
        generated_positions: ``n_H n_W`` of the generated image at this layer.
    Returns:
        ``(1, n_C, n_C)`` float32.
    """
    positions = style_features.shape[2] * style_features.shape[3]
    return rescale_gram(gram_matrix(style_features), positions, generated_positions)


def rescale_gram(style_gram: torch.Tensor, style_positions: int, generated_positions: int) -> torch.Tensor:
    """``G_S * P_G / P_S``: an unnormalised Gram matrix of ``P_S`` positions expressed for ``P_G`` positions
    (see :func:`style_gram_target`). ``(…, n_C, n_C)`` in, same shape out."""
    return style_gram * (generated_positions / style_positions)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation ``sum |x[i+1,j] - x[i,j]|^2 + |x[i,j+1] - x[i,j]|^2`` per item, mean over
    pixels (Mahendran & Vedaldi 2015, beta = 2; the form jcjohnson/neural-style uses).

    Args:
        image: ``(B, 3, H, W)``.
    Returns:
        ``(B,)`` float32, in squared units of the image.
    """
    image = image.float()
    d_h = (image[:, :, 1:, :] - image[:, :, :-1, :]).pow(2).flatten(1).sum(1)
    d_w = (image[:, :, :, 1:] - image[:, :, :, :-1]).pow(2).flatten(1).sum(1)
    return (d_h + d_w) / image[0].numel()
