"""The replica's pass with its convolution weights packed once in oneDNN's own blocked format, on the CPU.

Why. ``F.conv2d`` on the CPU hands oneDNN plain (``OIhw``) weights, which oneDNN reorders into the blocked format
its kernel wants at every call, forward and backward. At a coarse scale the deep layers' maps are small
(conv4_x on 12 x 16 positions, conv5_1 on 3 x 4 at a 128 px scale's coarsest level) and that reorder of up to
2.36 M weights is most of the call: one bf16 512 -> 512 convolution on 6 x 8 positions took 2.9 ms forward and
2.1 ms backward with plain weights, 0.74 and 0.70 ms with packed ones (2-core Xeon with AMX). Packing is what
torch.compile's inductor does for frozen CPU graphs (``torch/_inductor/fx_passes/mkldnn_fusion.py``); here it
is done by hand, with a backward of our own, because the replica's pass needs the gradient to the image.

What. :class:`PackedReplica` runs the same VGG-19 stack as :class:`nst_export.vgg.VGG19Features` (same
weights, cast to the job's dtype) with each convolution and its ReLU as one oneDNN call,
``torch.ops.mkldnn._convolution_pointwise(..., "relu")``, on weights packed by
``torch.ops.mkldnn._reorder_convolution_weight``. Its backward (:class:`_ConvReLU`) needs only the gradient to
the input (the weights are constants): ``dx = conv(threshold_backward(dy, y), W')`` with ``W'`` the weights
transposed (in and out channels swapped) and flipped (3 x 3 kernel rotated by 180 degrees), also packed once;
for a 3 x 3 convolution with stride 1 and padding 1 that is the transposed convolution exactly (oneDNN's own
backward-data computes the same sums).

Where. A layer whose input has more than :data:`PACKED_MAX_POSITIONS` positions per image keeps ``F.conv2d`` (its
weights are reordered at each call, but the reorder is small beside its convolution, and packing those layers
too was no faster). The weights are packed for an input of :data:`PACK_HINT_SIDE` px square: oneDNN
picks a format by the input's shape; one format for all small maps keeps two packed copies per dtype (the weights
and their transposes: 52 MB in bf16, 104 MB in fp32) beside the cast weights ``F.conv2d`` uses (26 MB in bf16).

Results. bf16 features, input gradients and whole jobs were bit-identical to ``F.conv2d``'s on an AMX Xeon; fp32
differed by float rounding (1e-6) at a 64 x 48 px image, where oneDNN picks another kernel; the tests bound the
difference (tests/test_packed.py), and docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nst_export.vgg import CONV_NAMES, OUTPUT_LAYERS

#: A layer's input with at most this many positions (H x W, per image) runs on packed weights; larger ones
#: through ``F.conv2d``. Chosen by measurement (docs/benchmarks.md, "Speed: packed weights"): one bf16 pass + backward
#: of the whole stack, best of 2-3 interleaved rounds, AMX Xeon: 48 x 64 px 52.7 -> 25.9 ms with this bound
#: (30.7 with 32 x 32), 96 x 128 px 188.6 -> 81.2 ms, 192 x 256 px 271 -> 236 ms, 384 x 512 px 1073 -> 1033 ms;
#: packing every layer (one hint for all) was no faster at 384 x 512 px (within the machine's noise).
PACKED_MAX_POSITIONS = 64 * 64
#: The weights are packed for an input of this side (px, square), which is within the packed range.
PACK_HINT_SIDE = 16

_PAD = [1, 1]
_ONE = [1, 1]


def available(dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """Whether this torch build and CPU can run packed convolutions in ``dtype``, and if not, why.

    Needs oneDNN (``torch.backends.mkldnn``, x86-64 builds), its fused-convolution and weight-packing operators,
    and for bf16 oneDNN's own bf16 support check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: AVX512 or
    AVX-NE-CONVERT; on an AVX2-only CPU bf16 keeps autocast's path).
    """
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False, "oneDNN (torch.backends.mkldnn) is unavailable or disabled"
    if not all(hasattr(torch.ops.mkldnn, op) for op in ("_convolution_pointwise", "_reorder_convolution_weight")):
        return False, f"torch {torch.__version__} has no torch.ops.mkldnn._convolution_pointwise"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "oneDNN reports no bf16 support on this CPU"
    if dtype not in (torch.float32, torch.bfloat16):
        return False, f"{dtype} is not packed"
    return True, "available"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    shape = [1, weight.shape[1], PACK_HINT_SIDE, PACK_HINT_SIDE]
    return torch.ops.mkldnn._reorder_convolution_weight(weight, _PAD, _ONE, _ONE, 1, shape)


def _conv(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, attr: str) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, _PAD, _ONE, _ONE, 1, attr, [None], None)


class _ConvReLU(torch.autograd.Function):
    """``relu(conv2d(x, W, b, padding=1))`` on packed weights; the backward gives the gradient to ``x`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, packed_t: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        y = _conv(x, packed, bias, "relu")
        ctx.save_for_backward(y)
        ctx.packed_t = packed_t
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        masked = torch.ops.aten.threshold_backward(grad, y, 0)
        if y.is_contiguous(memory_format=torch.channels_last):
            masked = masked.contiguous(memory_format=torch.channels_last)
        else:
            masked = masked.contiguous()
        return _conv(masked, ctx.packed_t, None, "none"), None, None, None


class PackedReplica:
    """The replica's stack on packed weights, called like it: ``replica(images, pooling=)`` -> the six features
    (:data:`~nst_export.vgg.OUTPUT_LAYERS` order) in ``dtype``.

    Args:
        replica: the :class:`~nst_export.vgg.VGG19Features` whose weights (any layout; cast to ``dtype`` here) and
            ``input_mean`` are used.
        dtype: the pass's dtype (the job's autocast dtype, or float32).

    Input: ``(B, 3, H, W)`` float32 RGB in [0, 1], ``H, W >= 16``, either layout (the replica's layout is kept:
    channels_last in, channels_last features out). Outputs are ``dtype``.

    Raises:
        RuntimeError: from oneDNN when packing fails (the caller falls back to the replica, logged).
    """

    def __init__(self, replica, dtype: torch.dtype) -> None:
        self.pooling = replica.pooling
        self.dtype = dtype
        self.input_mean = replica.input_mean
        channels_last = replica.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.layers = []
        for name in CONV_NAMES:
            conv = getattr(replica, name)
            weight = conv.weight.detach().to(dtype).contiguous(memory_format=layout)
            bias = conv.bias.detach().to(dtype)
            flipped = weight.flip(2, 3).transpose(0, 1).contiguous(memory_format=layout)
            self.layers.append((weight, bias, _pack(weight), _pack(flipped)))

    def _layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        weight, bias, packed, packed_t = self.layers[index]
        if x.shape[2] * x.shape[3] <= PACKED_MAX_POSITIONS:
            return _ConvReLU.apply(x, packed, packed_t, bias)
        return F.relu(F.conv2d(x, weight, bias, padding=1))

    def __call__(self, image: torch.Tensor, pooling: str | None = None) -> tuple[torch.Tensor, ...]:
        pool_fn = F.avg_pool2d if (pooling or self.pooling) == "avg" else F.max_pool2d
        with torch.autocast(device_type=image.device.type, enabled=False):
            x = (image - self.input_mean).to(self.dtype)
            outputs = {}
            for index, name in enumerate(CONV_NAMES):
                if index in (2, 4, 8, 12):                     # conv2_1, conv3_1, conv4_1, conv5_1: after a pool
                    x = pool_fn(x, kernel_size=2, stride=2)
                x = self._layer(index, x)
                relu = name.replace("conv", "relu")
                if relu in OUTPUT_LAYERS:
                    outputs[relu] = x
        return tuple(outputs[layer] for layer in OUTPUT_LAYERS)
