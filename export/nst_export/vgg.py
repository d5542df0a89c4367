"""The VGG-19 feature stack used by neural style transfer, cut after relu5_1.

Source: Simonyan & Zisserman 2014 (configuration E); the layer choice is Gatys et al. 2015/2016
(content at relu4_2, style at relu1_1 … relu5_1).

Input contract of this module (whatever weights it carries): ``(B, 3, H, W)`` float32, RGB, values in
``[0, 1]``. The weights' own preprocessing (channel order, scale, mean, std) is folded into the first
convolution and the ``input_mean`` buffer by :func:`nst_export.weights.fold_preprocessing`, which is exact,
zero padding included, because the only operation before ``conv1_1`` is the subtraction of ``input_mean``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Convolution layers up to relu5_1, in network order, with (in_channels, out_channels).
CONV_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512), ("conv4_4", 512, 512),
    ("conv5_1", 512, 512),
)
CONV_NAMES: tuple[str, ...] = tuple(name for name, _, _ in CONV_LAYERS)

#: The named outputs of the feature stack (and of the exported ONNX graph), in this order.
OUTPUT_LAYERS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")

#: Spatial down-sampling of each output relative to the input (one 2x2 pooling per block before it).
LAYER_STRIDE: dict[str, int] = {
    "relu1_1": 1, "relu2_1": 2, "relu3_1": 4, "relu4_1": 8, "relu4_2": 8, "relu5_1": 16,
}

#: Channels of each output (that of the convolution it follows).
OUTPUT_CHANNELS: dict[str, int] = {layer: c_out for layer in OUTPUT_LAYERS for name, _, c_out in CONV_LAYERS
                                   if name == layer.replace("relu", "conv")}

#: The smallest input side the stack accepts: relu5_1 sits behind four 2x2 poolings, so 16 px gives a 1x1 map.
MIN_SIDE_PX = 16

POOLING_MODES = ("max", "avg")


class VGG19Features(nn.Module):
    """VGG-19 convolutions conv1_1 … conv5_1 returning the ReLU outputs named in :data:`OUTPUT_LAYERS`.

    Args:
        pooling: ``"max"`` (the trained network) or ``"avg"`` (Gatys et al. 2016 report smoother results).

    Input: ``(B, 3, H, W)`` float32 RGB in ``[0, 1]``, ``H, W >= 16``.
    Output: tuple of six tensors ``(B, C_l, H // s_l, W // s_l)`` in :data:`OUTPUT_LAYERS` order, with
    ``C_l`` 64, 128, 256, 512, 512, 512 and ``s_l`` from :data:`LAYER_STRIDE` (floor division at each pool).

    Raises:
        ValueError: unknown ``pooling``.
    """

    def __init__(self, pooling: str = "max") -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        self.pooling = pooling
        for name, c_in, c_out in CONV_LAYERS:
            self.add_module(name, nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
        # (1, 3, 1, 1) RGB mean in [0, 1] units, subtracted before conv1_1 (folded from the weights' contract).
        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1))

    def forward(self, image: torch.Tensor, pooling: str | None = None) -> tuple[torch.Tensor, ...]:
        """``pooling`` overrides the module's for this call (the replica serves max and avg jobs at once)."""
        pool_fn = F.avg_pool2d if (pooling or self.pooling) == "avg" else F.max_pool2d

        def pool(t: torch.Tensor) -> torch.Tensor:
            return pool_fn(t, kernel_size=2, stride=2)

        x = image - self.input_mean                       # (B, 3, H, W)
        relu1_1 = F.relu(self.conv1_1(x))                 # (B, 64, H, W)
        x = F.relu(self.conv1_2(relu1_1))
        relu2_1 = F.relu(self.conv2_1(pool(x)))     # (B, 128, H/2, W/2)
        x = F.relu(self.conv2_2(relu2_1))
        relu3_1 = F.relu(self.conv3_1(pool(x)))     # (B, 256, H/4, W/4)
        x = F.relu(self.conv3_2(relu3_1))
        x = F.relu(self.conv3_3(x))
        x = F.relu(self.conv3_4(x))
        relu4_1 = F.relu(self.conv4_1(pool(x)))     # (B, 512, H/8, W/8)
        relu4_2 = F.relu(self.conv4_2(relu4_1))
        x = F.relu(self.conv4_3(relu4_2))
        x = F.relu(self.conv4_4(x))
        relu5_1 = F.relu(self.conv5_1(pool(x)))     # (B, 512, H/16, W/16)
        return relu1_1, relu2_1, relu3_1, relu4_1, relu4_2, relu5_1
