"""Between proto messages and the engine: ``StylizeRequest`` to settings and inputs (validation names the
offending field), engine events to ``StylizeResponse``.

The request's controls map onto :class:`~nst_server.settings.StyleTransferSettings` by name, derived from the proto's
descriptors (:data:`ENUMS`, :data:`LAYER_FIELDS`, :data:`SCALAR_FIELDS`): a new control needs its field in the proto
and in the settings (default, range in ``validate()``), and nothing here. Every ``StylizeRequest`` field is a setting
of the same name except :data:`INPUT_FIELDS` and ``preset`` (tests/test_messages.py checks it).
"""

from __future__ import annotations

from nst_proto import enum_value_names as _value_names
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_export.vgg import MIN_SIDE_PX

from nst_server.errors import FieldError
from nst_server.events import (STOP_CANCELLED, STOP_CONVERGED, STOP_ITERATIONS, STOP_NON_FINITE, Costs, JobInputs,
                               Progress, Result)
from nst_server.images import decode_image, decode_image_and_alpha
from nst_server.settings import MAX_STYLES, StyleTransferSettings, blend_weights

#: ``StylizeRequest`` fields that are no settings: the images (:func:`decode_inputs`) and how the result carries the
#: content's transparency. ``preset`` is none either: it chooses the settings that the other fields override.
INPUT_FIELDS = ("content_image", "style_image", "styles", "init_image", "keep_content_alpha")


_REQUEST = pb.StylizeRequest.DESCRIPTOR
_SETTING_FIELDS = [field for field in _REQUEST.fields if field.name not in (*INPUT_FIELDS, "preset")]

#: Preset number -> :meth:`StyleTransferSettings.preset` name; ``PRESET_UNSPECIFIED`` is ``"default"``.
PRESETS = {0: "default", **_value_names(_REQUEST.fields_by_name["preset"].enum_type)}
#: Enum-typed setting field -> {number: value}, e.g. ``ENUMS["optimizer"] == {1: "lbfgs", 2: "adam"}``; 0 (unset)
#: keeps the preset's value, a number the proto does not define is refused.
ENUMS = {field.name: _value_names(field.enum_type) for field in _SETTING_FIELDS if field.enum_type is not None}
#: ``repeated LayerWeight`` setting fields, each a ``{layer: weight}`` setting (a layer listed twice is refused).
LAYER_FIELDS = tuple(field.name for field in _SETTING_FIELDS
                     if field.is_repeated and field.message_type is pb.LayerWeight.DESCRIPTOR)
#: Scalar setting fields (number, bool): copied when the request sets them, proto3 ``optional`` ones by presence
#: (an explicit 0 counts), the others when non-zero (0: the preset's value).
SCALAR_FIELDS = tuple(field.name for field in _SETTING_FIELDS
                      if not field.is_repeated and field.enum_type is None and field.message_type is None)
_PRESENCE = frozenset(field.name for field in _SETTING_FIELDS if field.has_presence)

STOP_REASONS = {
    STOP_ITERATIONS: pb.STOP_REASON_ITERATIONS_DONE,
    STOP_CANCELLED: pb.STOP_REASON_CANCELLED,
    STOP_NON_FINITE: pb.STOP_REASON_NON_FINITE_COST,
    STOP_CONVERGED: pb.STOP_REASON_CONVERGED,
}


def _layers(entries, name: str) -> dict[str, float]:
    layers: dict[str, float] = {}
    for entry in entries:
        if entry.layer in layers:
            raise FieldError(name, f"layer {entry.layer!r} is listed twice")
        layers[entry.layer] = entry.weight
    return layers


def settings_from_request(request: pb.StylizeRequest, limits) -> StyleTransferSettings:
    """Map a request onto :class:`StyleTransferSettings`: the preset's values, overridden by every field
    the request sets (proto3 ``optional`` fields by presence, others when non-zero; enums when not ``…_UNSPECIFIED``),
    then checked: the settings' ranges (``validate()``) and the server's own limits.

    Args:
        limits: the server's limits (``max_side_px``, ``max_iterations``).
    Raises:
        FieldError: a field is out of range; ``field`` names it, ``reason`` says why (with the limit).
    """
    if request.preset not in PRESETS:
        raise FieldError("preset", f"unknown value {request.preset}")
    if request.max_side_px and not MIN_SIDE_PX <= request.max_side_px <= limits.max_side_px:
        raise FieldError("max_side_px", f"must be between {MIN_SIDE_PX} and {limits.max_side_px} px, "
                                        f"got {request.max_side_px}")
    if request.iterations > limits.max_iterations:
        raise FieldError("iterations", f"must be at most {limits.max_iterations}, got {request.iterations}")
    values: dict = {}
    for name in SCALAR_FIELDS:
        if request.HasField(name) if name in _PRESENCE else getattr(request, name):
            values[name] = getattr(request, name)
    for name, numbers in ENUMS.items():
        number = getattr(request, name)
        if number == 0:                                   # …_UNSPECIFIED: keep the preset's value
            continue
        if number not in numbers:
            raise FieldError(name, f"unknown value {number}")
        values[name] = numbers[number]
    for name in LAYER_FIELDS:
        if getattr(request, name):
            values[name] = _layers(getattr(request, name), name)
    settings = StyleTransferSettings.preset(PRESETS[request.preset], **values)
    settings.validate()
    style_side = settings.max_side_px * settings.style_scale              # finite: validate() bounds it
    if round(style_side) > limits.max_side_px:
        # The style image is resized to this side (upscaled if need be): an unbounded scale would let one request
        # allocate without limit, and no session profile covers it.
        raise FieldError("style_scale", f"{settings.style_scale:g} x max_side_px {settings.max_side_px} gives "
                                        f"a {round(style_side)} px style image; the server's limit is "
                                        f"{limits.max_side_px} px")
    if settings.init == "image" and not request.init_image:
        raise FieldError("init_image", "is required when init is INIT_IMAGE")
    count = len(request.styles) + (1 if request.style_image else 0)
    if count > MAX_STYLES:
        raise FieldError("styles", f"{count} style images (style_image included), at most {MAX_STYLES} "
                                   f"may be blended")
    if not request.style_image and not request.styles:
        raise FieldError("style_image", "is empty; send style_image or at least one entry in styles")
    blend_weights([entry.blend_weight for entry in request.styles] or [1.0])     # FieldError naming styles
    return settings


def decode_inputs(request: pb.StylizeRequest, max_input_pixels: int) -> JobInputs:
    """Decode the request's images (Pillow; see :func:`nst_server.images.decode_image`).

    ``style_image``, when set, is a style with blend weight 1; every ``styles[k]`` follows with its own
    ``blend_weight`` (weights are relative: :func:`nst_server.settings.blend_weights`).

    Raises:
        ImageInputError: an image cannot be used (the message names the field).
    """
    styles = []
    content, alpha = decode_image_and_alpha(request.content_image, "content_image", max_input_pixels)
    if request.style_image:
        styles.append((decode_image(request.style_image, "style_image", max_input_pixels), 1.0))
    for index, entry in enumerate(request.styles):
        styles.append((decode_image(entry.image, f"styles[{index}].image", max_input_pixels), entry.blend_weight))
    init = decode_image(request.init_image, "init_image", max_input_pixels) if request.init_image else None
    return JobInputs(content=content, styles=styles, init_image=init,
                     content_alpha=alpha if request.keep_content_alpha else None)


def _costs(costs: Costs) -> pb.Costs:
    return pb.Costs(content=costs.content, style=costs.style, total=costs.total,
                    total_variation=costs.total_variation)


#: Largest result PNG sent in one message, bytes; larger ones go as ImageChunk messages (under gRPC's 4 MiB).
DEFAULT_RESULT_CHUNK_BYTES = 1 << 20


def to_proto(event: Progress | Result,
             chunk_bytes: int = DEFAULT_RESULT_CHUNK_BYTES) -> list[pb.StylizeResponse]:
    """Engine event to stream messages: one for a Progress; for a Result, the PNG's ImageChunk pieces (when it
    is larger than ``chunk_bytes``) and then the Result."""
    if isinstance(event, Progress):
        width, height = event.size
        return [pb.StylizeResponse(progress=pb.Progress(
            iteration=event.iteration, costs=_costs(event.costs), elapsed_ms=event.elapsed_ms,
            preview_png=event.preview_png, scale=event.scale, width_px=width, height_px=height,
            scales=event.scales, remaining_ms=event.remaining_ms))]
    height, width = event.image.shape[:2]
    png, messages = event.png, []
    if len(png) > chunk_bytes:
        messages = [pb.StylizeResponse(image_chunk=pb.ImageChunk(
            data=png[offset:offset + chunk_bytes], offset=offset, total_bytes=len(png)))
            for offset in range(0, len(png), chunk_bytes)]
        png = b""
    messages.append(pb.StylizeResponse(result=pb.Result(
        image_png=png, width_px=width, height_px=height, costs=_costs(event.costs),
        iterations=event.iterations, best_iteration=event.best_iteration,
        stop_reason=STOP_REASONS[event.stop_reason], elapsed_ms=event.elapsed_ms, precision=event.precision)))
    return messages
