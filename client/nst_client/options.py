"""The controls of one ``Stylize`` job as a typed, frozen dataclass, :class:`StylizeOptions`, and the
``nst.v1.StylizeRequest`` built from it and the images (:func:`build_request`).

Every field of ``StylizeRequest`` except the images (``content_image``, ``style_image``, ``styles``,
``init_image``: arguments of :func:`build_request`) is a field of :class:`StylizeOptions` with the same name
(tests/test_options.py fails when the proto gains a field that is not represented here). ``None`` leaves a field
unset: the server's default (for the proto's ``optional`` fields and those where 0 means the default).
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict

from nst_proto import enum_value_names
from nst_proto.v1 import style_transfer_pb2 as pb

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

#: An image argument: encoded bytes (PNG, JPEG, WebP, GIF …) or the path of such a file.
Image = bytes | str | os.PathLike


#: Option name -> {value: enum number}, for every enum-typed field of ``StylizeRequest``; the values are the enum's
#: names lower-cased without their prefix, less ``…_UNSPECIFIED`` (unset: the server's default), as the server
#: spells them (:func:`nst_proto.enum_value_names`).
_ENUMS = {field.name: {name: number for number, name in enum_value_names(field.enum_type).items()}
          for field in pb.StylizeRequest.DESCRIPTOR.fields if field.enum_type is not None}
#: Option name -> its allowed values, e.g. ``CHOICES["optimizer"] == ("lbfgs", "adam")``.
CHOICES = {name: tuple(values) for name, values in _ENUMS.items()}

# The enums' values as the options take them (tests/test_options.py checks them against CHOICES).
Optimizer = Literal["lbfgs", "adam"]
Preset = Literal["seed", "classic"]
Init = Literal["noisy_content", "content", "random", "image"]
Pooling = Literal["max", "avg"]
ColorControl = Literal["none", "luminance", "match_style_colors"]
Precision = Literal["fp32", "bf16", "fp16", "auto"]
Normalization = Literal["none", "target"]

#: ``StylizeRequest`` fields that are not options: the images, arguments of :func:`build_request`
#: (``styles`` as ``[(image, blend_weight), …]``).
IMAGE_FIELDS = ("content_image", "style_image", "styles", "init_image")


def option(doc: str, *, default: object = None):
    """A :class:`StylizeOptions` field: its default (None: unset, the server's default) and its documentation, kept
    in the field's ``metadata["doc"]`` (attribute docstrings are lost at runtime): :func:`help` lists it under
    the class's "Fields", ``nst stylize --help`` under the field's flag."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass(frozen=True, kw_only=True, repr=False)
class StylizeOptions:
    """The controls of one job (``nst.v1.StylizeRequest`` less its images); every field defaults to None
    (``keep_content_alpha``: False), unset: the server's default. Build one and pass it to
    :meth:`NSTClient.stylize` / :func:`build_request`, or pass the same names as keywords; :meth:`replace` derives
    a variant. Each field is documented where it is declared (:func:`option`; "Fields" below); ``nst stylize``
    has one flag per field, built from it.

    Enum fields take the proto value's name, lower-cased and without its prefix (``optimizer="adam"`` for
    ``OPTIMIZER_ADAM``); :data:`CHOICES` lists them.

    Raises:
        TypeError: an unknown field name (``StylizeOptions(iteratons=5)``), or a value of the wrong type (a
            float for an integer field, a bool for a number).
        ValueError: an integer outside its proto type's range (uint32: 0 … 2^32 - 1, uint64: 0 … 2^64 - 1), or an
            enum value not in :data:`CHOICES`. Ranges the server sets (sizes, iteration limits, weights) are checked
            there: INVALID_ARGUMENT naming the field.
    """

    max_side_px: int | None = option(
        "Longest side of the generated image, px; the content is resized to it keeping its aspect ratio. "
        "nst-server accepts 16 up to its --max-side-px (4096 by default) where the job's memory estimate fits the "
        "server's memory budget; unset or 0: the server's default, 256.")
    iterations: int | None = option(
        "Optimiser iterations in all (split across the scales); nst-server accepts up to its --max-iterations "
        "(2000 by default); unset or 0: the server's default, 200.")
    content_weight: float | None = option(
        "Alpha, the content cost's weight; unset: the server's default (1, or the preset's).")
    style_weight: float | None = option(
        "Beta, the style cost's weight; unset: the server's default (15 on normalised costs, see "
        "``normalization``; or the preset's).")
    seed: int | None = option(
        "Seeds the initial noise (0 … 2^64 - 1); unset: 0. Same inputs, seed and settings give the same bytes "
        "on one device.")
    optimizer: Optimizer | None = option(
        "``lbfgs`` or ``adam``; unset: the server's default (L-BFGS, or the preset's).")
    learning_rate: float | None = option(
        "Adam's step in pixel levels (0..255 units); unset: the server's default (2).")
    noise_ratio: float | None = option(
        "Share of noise in the initial image (``init`` noisy_content), 0..1; unset: the server's default (0.6).")
    progress_every: int | None = option(
        "Send a ``Progress`` every N iterations (the last one always); unset or 0: every iteration.")
    style_scale: float | None = option(
        "The style image's longest side relative to the output's; unset: 1.")
    preset: Preset | None = option(
        "Starting point for all other fields (``seed``: the seed's course recipe, Adam, alpha 10, beta 40, its "
        "costs as they are; ``classic``: this service's defaults before normalised multi-scale costs, L-BFGS, "
        "alpha 1, beta 1e-4, one scale and level); fields set here override it. Unset: the server's defaults.")
    init: Init | None = option(
        "Initial image: ``noisy_content`` (unset: the default; mean + (1 - r)(content - mean) + r U(-20, 20), "
        "r = noise_ratio), ``content``, ``random`` (uniform over 0..255) or ``image`` (``init_image``, resized).")
    content_layers: Mapping[str, float] | None = option(
        "The content cost's layers and their weights; unset: relu4_2 at 1. Layers: relu1_1, relu2_1, relu3_1, "
        "relu4_1, relu4_2, relu5_1.")
    style_layers: Mapping[str, float] | None = option(
        "The style cost's layers and their weights (lambda); unset: relu1_1, relu2_1, relu3_1, relu4_1 and "
        "relu5_1 at 0.2 each.")
    pooling: Pooling | None = option(
        "``max`` (unset: the default) or ``avg`` (Gatys et al. 2016).")
    tv_weight: float | None = option(
        "Total variation weight; unset: 0.")
    color_control: ColorControl | None = option(
        "``none`` (unset: the default; colours follow the style), ``luminance`` (transfer on luminance, keep the "
        "content's chroma) or ``match_style_colors`` (match the style's colour mean/covariance to the content's).")
    scales: int | None = option(
        "Coarse-to-fine: the number of scales (at most); unset: 3; 1: a single scale. Above 512 px they reach "
        "512 px, then refinement scales reach max_side_px.")
    start_side_px: int | None = option(
        "Longest side at the first scale, px; unset or 0: max_side_px / 2^(scales-1).")
    precision: Precision | None = option(
        "``auto`` (unset: the default; bf16 where the replica's device runs it natively, else fp32), ``fp32``, "
        "``bf16`` or ``fp16``.")
    preview_every: int | None = option(
        "A preview PNG in every N-th ``Progress``; unset or 0: none.")
    preview_max_side_px: int | None = option(
        "Longest side of the previews, px; unset or 0: 128.")
    convergence_tolerance: float | None = option(
        "Stop when the relative cost decrease over 10 iterations (at the final scale) is below this; unset: the "
        "server's default (0: off).")
    lbfgs_history: int | None = option(
        "L-BFGS history size; unset or 0: 100; fewer pairs at large scales, as memory allows.")
    keep_content_alpha: bool = option(
        "The result is RGBA carrying the content's transparency (its alpha, resized) where the content has any; "
        "otherwise, and by default, RGB.", default=False)
    normalization: Normalization | None = option(
        "``target`` (unset: the default; each cost divided by its target's size, so alpha and beta weigh relative "
        "errors) or ``none`` (the seed's J = alpha J_content + beta J_style as it is).")
    pyramid_levels: int | None = option(
        "Costs at this many sizes of the generated image, half an octave apart (1, 0.71, 0.5 … of its side), "
        "averaged; unset: 3; 1: its own size only.")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                checked = _check(field.name, value)
                if checked is not value:
                    object.__setattr__(self, field.name, checked)

    def __repr__(self) -> str:
        """The fields that differ from the defaults, e.g. ``StylizeOptions(max_side_px=256, optimizer='adam')``."""
        changed = (f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self)
                   if getattr(self, field.name) != field.default)
        return f"StylizeOptions({', '.join(changed)})"

    def replace(self, **changes: Unpack[StylizeOverrides]) -> "StylizeOptions":
        """A copy with ``changes`` applied. Raises TypeError naming an unknown field, and as the constructor."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_request(self, content: Image, style: Image | None = None, *,
                   styles: Sequence[tuple[Image, float]] | None = None,
                   init_image: Image | None = None) -> pb.StylizeRequest:
        """The ``StylizeRequest`` of these options and images.

        Args:
            content: the content image (encoded bytes or a file path).
            style: a style image (blend weight 1); may be omitted when ``styles`` is given.
            styles: more style images with their relative blend weights (0 in all: equal weights).
            init_image: the initial image for ``init="image"``.
        Raises:
            OSError: an image path cannot be read.
        """
        request = pb.StylizeRequest(content_image=read_image_bytes(content))
        if style is not None:
            request.style_image = read_image_bytes(style)
        for image, weight in styles or ():
            request.styles.add(image=read_image_bytes(image), blend_weight=weight)
        if init_image is not None:
            request.init_image = read_image_bytes(init_image)
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if value is None:
                continue
            if name in _ENUMS:
                setattr(request, name, _ENUMS[name][value])
            elif name in ("content_layers", "style_layers"):
                for layer, weight in value.items():
                    getattr(request, name).add(layer=layer, weight=weight)
            else:
                setattr(request, name, value)
        return request


def _document_fields(cls: type) -> None:
    """Appends "Fields:", each field with its documentation, to the class docstring (for :func:`help`)."""
    if cls.__doc__ is None:                     # python -OO
        return
    lines = ["", "    Fields:"]
    for field in dataclasses.fields(cls):
        lines += textwrap.wrap(f"{field.name}: {field.metadata['doc']}", 112, initial_indent=" " * 8,
                               subsequent_indent=" " * 12, break_on_hyphens=False)
    cls.__doc__ = cls.__doc__.rstrip() + "\n" + "\n".join(lines) + "\n    "


_document_fields(StylizeOptions)


class StylizeOverrides(TypedDict, total=False):
    """:class:`StylizeOptions`' fields as keywords of :meth:`NSTClient.stylize` and :func:`build_request`
    (``**overrides: Unpack[StylizeOverrides]``: type checkers and editors check their names and types)."""

    max_side_px: int | None
    iterations: int | None
    content_weight: float | None
    style_weight: float | None
    seed: int | None
    optimizer: Optimizer | None
    learning_rate: float | None
    noise_ratio: float | None
    progress_every: int | None
    style_scale: float | None
    preset: Preset | None
    init: Init | None
    content_layers: Mapping[str, float] | None
    style_layers: Mapping[str, float] | None
    pooling: Pooling | None
    tv_weight: float | None
    color_control: ColorControl | None
    scales: int | None
    start_side_px: int | None
    precision: Precision | None
    preview_every: int | None
    preview_max_side_px: int | None
    convergence_tolerance: float | None
    lbfgs_history: int | None
    keep_content_alpha: bool
    normalization: Normalization | None
    pyramid_levels: int | None


_NAMES = tuple(field.name for field in dataclasses.fields(StylizeOptions))


def _check_names(changes: Mapping[str, object]) -> None:
    """TypeError naming the first key of ``changes`` that is no option (and the closest option name)."""
    for name in changes:
        if name not in _NAMES:
            close = difflib.get_close_matches(name, _NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {', '.join(_NAMES)}"
            raise TypeError(f"unknown stylize option {name!r}{hint}")


def _check(name: str, value):
    """``value`` for option ``name`` (layer weights copied into a dict), or TypeError/ValueError naming it."""
    if name in _ENUMS:
        if value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {CHOICES[name]}, got {value!r}")
        return value
    field = pb.StylizeRequest.DESCRIPTOR.fields_by_name[name]
    if field.type in (field.TYPE_UINT32, field.TYPE_UINT64):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        bits = 32 if field.type == field.TYPE_UINT32 else 64
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name} must be between 0 and {(1 << bits) - 1}, got {value}")
        return value if type(value) is int else int(value)
    if field.type == field.TYPE_DOUBLE:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
        return value if type(value) in (int, float) else float(value)
    if field.type == field.TYPE_BOOL:
        if isinstance(value, numbers.Integral) and value in (0, 1):      # True, False, 1, 0
            return bool(value)
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    # content_layers, style_layers: {layer: weight}
    if not isinstance(value, Mapping) or not all(isinstance(layer, str) and isinstance(weight, numbers.Real)
                                                 and not isinstance(weight, bool)
                                                 for layer, weight in value.items()):
        raise TypeError(f"{name} must be a mapping of layer names to float weights, got {value!r}")
    return {layer: float(weight) for layer, weight in value.items()}


def merge_options(options: StylizeOptions | None, overrides: Mapping[str, object]) -> StylizeOptions:
    """``options`` (None: the defaults) with the keyword ``overrides`` applied.

    Raises:
        TypeError: ``options`` is not a :class:`StylizeOptions`, or an override names no option (the message names
            it); as :class:`StylizeOptions` for a wrong value.
    """
    if options is None:
        options = StylizeOptions()
    elif not isinstance(options, StylizeOptions):
        raise TypeError(f"options must be a StylizeOptions, got {type(options).__name__}")
    return options.replace(**overrides) if overrides else options


def read_image_bytes(image: Image) -> bytes:
    """Bytes as they are, or the contents of a file path. Raises OSError when the file cannot be read."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    with open(image, "rb") as handle:
        return handle.read()


def build_request(content: Image, style: Image | None = None, options: StylizeOptions | None = None, *,
                  styles: Sequence[tuple[Image, float]] | None = None, init_image: Image | None = None,
                  **overrides: Unpack[StylizeOverrides]) -> pb.StylizeRequest:
    """A ``StylizeRequest``: the images, and ``options`` with the keyword ``overrides`` applied
    (``build_request(c, s, max_side_px=64, iterations=6)`` or ``build_request(c, s, StylizeOptions(…))``).

    Args:
        content: the content image (encoded bytes or a file path).
        style: a style image (blend weight 1); may be omitted when ``styles`` is given.
        options: the job's controls; None: the server's defaults.
        styles: more style images with their relative blend weights.
        init_image: the initial image for ``init="image"``.
        **overrides: :class:`StylizeOptions` fields (:class:`StylizeOverrides`), applied over ``options``.
    Raises:
        TypeError: an override names no option, or a value has the wrong type. ValueError: a value outside its
            proto type's range or an unknown enum value. OSError: an image path cannot be read.
    """
    return merge_options(options, overrides).to_request(content, style, styles=styles, init_image=init_image)
