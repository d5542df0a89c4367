"""Between proto messages and the engine: ``StylizeRequest`` to settings and inputs (validation names the
offending field), engine events to ``StylizeResponse``."""

from __future__ import annotations

from nst_proto.v1 import style_transfer_pb2 as pb
from nst_export.vgg import MIN_SIDE_PX
from nst_server import engine
from nst_server.errors import FieldError
from nst_server.images import decode_image, decode_image_and_alpha

OPTIMIZERS = {pb.OPTIMIZER_LBFGS: "lbfgs", pb.OPTIMIZER_ADAM: "adam"}
PRESETS = {pb.PRESET_UNSPECIFIED: "default", pb.PRESET_SEED: "seed", pb.PRESET_CLASSIC: "classic"}
INITS = {pb.INIT_NOISY_CONTENT: "noisy_content", pb.INIT_CONTENT: "content", pb.INIT_RANDOM: "random",
         pb.INIT_IMAGE: "image"}
POOLINGS = {pb.POOLING_MAX: "max", pb.POOLING_AVG: "avg"}
COLOR_CONTROLS = {pb.COLOR_CONTROL_NONE: "none", pb.COLOR_CONTROL_LUMINANCE: "luminance",
                  pb.COLOR_CONTROL_MATCH_STYLE_COLORS: "match_style_colors"}
PRECISIONS = {pb.PRECISION_FP32: "fp32", pb.PRECISION_BF16: "bf16", pb.PRECISION_FP16: "fp16",
              pb.PRECISION_AUTO: "auto"}
NORMALIZATIONS = {pb.NORMALIZATION_NONE: "none", pb.NORMALIZATION_TARGET: "target"}
STOP_REASONS = {
    engine.STOP_ITERATIONS: pb.STOP_REASON_ITERATIONS_DONE,
    engine.STOP_CANCELLED: pb.STOP_REASON_CANCELLED,
    engine.STOP_NON_FINITE: pb.STOP_REASON_NON_FINITE_COST,
    engine.STOP_CONVERGED: pb.STOP_REASON_CONVERGED,
}


def _enum(request: pb.StylizeRequest, name: str, mapping: dict, values: dict, key: str) -> None:
    value = getattr(request, name)
    if value == 0:                                   # *_UNSPECIFIED: keep the preset's value
        return
    if value not in mapping:
        raise FieldError(name, f"unknown value {value}")
    values[key] = mapping[value]


def _layers(entries, name: str) -> dict[str, float]:
    layers: dict[str, float] = {}
    for entry in entries:
        if entry.layer in layers:
            raise FieldError(name, f"layer {entry.layer!r} is listed twice")
        layers[entry.layer] = entry.weight
    return layers


def settings_from_request(request: pb.StylizeRequest, limits) -> engine.StyleTransferSettings:
    """Map a request onto :class:`engine.StyleTransferSettings`: the preset's values, overridden by every field
    the request sets (proto3 ``optional`` fields by presence, others when non-zero).

    Args:
        limits: the server's limits (``max_side_px``, ``max_iterations``).
    Raises:
        FieldError: a field is out of range; ``field`` names it, ``reason`` says why (with the limit).
    """
    if request.preset not in PRESETS:
        raise FieldError("preset", f"unknown value {request.preset}")
    values: dict = {}
    if request.max_side_px:
        if not MIN_SIDE_PX <= request.max_side_px <= limits.max_side_px:
            raise FieldError("max_side_px", f"must be between {MIN_SIDE_PX} and {limits.max_side_px} px, "
                                            f"got {request.max_side_px}")
        values["max_side_px"] = request.max_side_px
    if request.iterations:
        if request.iterations > limits.max_iterations:
            raise FieldError("iterations", f"must be at most {limits.max_iterations}, got {request.iterations}")
        values["iterations"] = request.iterations
    for name in ("content_weight", "style_weight", "learning_rate", "noise_ratio", "style_scale", "tv_weight",
                 "convergence_tolerance", "seed", "scales", "pyramid_levels"):
        if request.HasField(name):
            values[name] = getattr(request, name)
    for name in ("progress_every", "start_side_px", "preview_every", "preview_max_side_px", "lbfgs_history"):
        if getattr(request, name):
            values[name] = getattr(request, name)
    _enum(request, "optimizer", OPTIMIZERS, values, "optimizer")
    _enum(request, "init", INITS, values, "init")
    _enum(request, "pooling", POOLINGS, values, "pooling")
    _enum(request, "color_control", COLOR_CONTROLS, values, "color_control")
    _enum(request, "precision", PRECISIONS, values, "precision")
    _enum(request, "normalization", NORMALIZATIONS, values, "normalization")
    if request.content_layers:
        values["content_layers"] = _layers(request.content_layers, "content_layers")
    if request.style_layers:
        values["style_layers"] = _layers(request.style_layers, "style_layers")
    settings = engine.StyleTransferSettings.preset(PRESETS[request.preset], **values)
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
    if count > engine.MAX_STYLES:
        raise FieldError("styles", f"{count} style images (style_image included), at most {engine.MAX_STYLES} "
                                   f"may be blended")
    if not request.style_image and not request.styles:
        raise FieldError("style_image", "is empty; send style_image or at least one entry in styles")
    engine.blend_weights([entry.blend_weight for entry in request.styles] or [1.0])     # FieldError naming styles
    return settings


def decode_inputs(request: pb.StylizeRequest, max_input_pixels: int) -> engine.JobInputs:
    """Decode the request's images (Pillow; see :func:`nst_server.images.decode_image`).

    ``style_image``, when set, is a style with blend weight 1; every ``styles[k]`` follows with its own
    ``blend_weight`` (weights are relative: :func:`nst_server.engine.blend_weights`).

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
    return engine.JobInputs(content=content, styles=styles, init_image=init,
                            content_alpha=alpha if request.keep_content_alpha else None)


def _costs(costs: engine.Costs) -> pb.Costs:
    return pb.Costs(content=costs.content, style=costs.style, total=costs.total,
                    total_variation=costs.total_variation)


#: Largest result PNG sent in one message, bytes; larger ones go as ImageChunk messages (under gRPC's 4 MiB).
DEFAULT_RESULT_CHUNK_BYTES = 1 << 20


def to_proto(event: engine.Progress | engine.Result,
             chunk_bytes: int = DEFAULT_RESULT_CHUNK_BYTES) -> list[pb.StylizeResponse]:
    """Engine event to stream messages: one for a Progress; for a Result, the PNG's ImageChunk pieces (when it
    is larger than ``chunk_bytes``) and then the Result."""
    if isinstance(event, engine.Progress):
        width, height = event.size
        return [pb.StylizeResponse(progress=pb.Progress(
            iteration=event.iteration, costs=_costs(event.costs), elapsed_ms=event.elapsed_ms,
            preview_png=event.preview_png, scale=event.scale, width_px=width, height_px=height))]
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
