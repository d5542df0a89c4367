"""The typed stylize controls (``nst_client.StylizeOptions``): one typed field per ``StylizeRequest`` field, the
request built from them, and misspelt or ill-typed options refused before any call."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import pydoc
import types
import typing
from collections.abc import Mapping

import pytest
from google.protobuf.descriptor import FieldDescriptor

from nst_client import AsyncNSTClient, NSTClient, StylizeOptions, build_request
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_client.options import CHOICES, IMAGE_FIELDS, StylizeOverrides

#: Where the image fields of StylizeRequest are represented: parameters of build_request and stylize.
IMAGE_PARAMETERS = {"content_image": "content", "style_image": "style", "styles": "styles",
                    "init_image": "init_image"}
UNREACHABLE = "127.0.0.1:1"          # nothing listens: a call that went out would end UNAVAILABLE


def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _without_none(annotation) -> object:
    """``X | None`` -> ``X``; anything else as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return annotation


def _expected(field: FieldDescriptor):
    """The Python type of a proto field's option (None: an enum, checked against its values)."""
    if field.is_repeated:
        assert field.message_type is pb.LayerWeight.DESCRIPTOR, f"{field.name}: a repeated field of a new kind"
        return Mapping[str, float]
    return {FieldDescriptor.TYPE_UINT32: int, FieldDescriptor.TYPE_UINT64: int, FieldDescriptor.TYPE_DOUBLE: float,
            FieldDescriptor.TYPE_BOOL: bool, FieldDescriptor.TYPE_ENUM: None}[field.type]


def test_every_request_field_has_a_typed_option_or_is_an_image_parameter():
    """Fails when StylizeRequest gains a field that StylizeOptions (or the image parameters) do not represent,
    or when an option's type does not match its proto type."""
    options = {f.name: f for f in dataclasses.fields(StylizeOptions)}
    hints = _hints(StylizeOptions)
    proto_fields = pb.StylizeRequest.DESCRIPTOR.fields
    images = {f.name for f in proto_fields if f.type == FieldDescriptor.TYPE_BYTES
              or (f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is pb.StyleImage.DESCRIPTOR)}
    assert images == set(IMAGE_FIELDS) == set(IMAGE_PARAMETERS)
    for function in (build_request, StylizeOptions.to_request, NSTClient.stylize, AsyncNSTClient.stylize):
        assert set(IMAGE_PARAMETERS.values()) <= set(inspect.signature(function).parameters), function
    for field in proto_fields:
        if field.name in images:
            assert field.name not in options
            continue
        assert field.name in options, f"StylizeRequest.{field.name} has no StylizeOptions field"
        option = options[field.name]
        expected, annotation = _expected(field), _without_none(hints[field.name])
        if expected is None:                                  # an enum: a Literal of its values' names
            assert typing.get_origin(annotation) is typing.Literal, field.name
            names = {value.name.lower()[len(_prefix(field)):] for value in field.enum_type.values
                     if not value.name.endswith("_UNSPECIFIED")}
            assert set(typing.get_args(annotation)) == names == set(CHOICES[field.name]), field.name
        else:
            assert annotation == expected, f"{field.name}: {annotation} is not {expected}"
        if expected is bool:
            assert option.default is False and hints[field.name] is bool
        else:                                                 # None: leave it unset, the server's default
            assert option.default is None and hints[field.name] == _without_none(hints[field.name]) | None
    assert set(options) <= {f.name for f in proto_fields}, "an option that is no StylizeRequest field"


def _prefix(field: FieldDescriptor) -> str:
    """The values' common prefix of an enum field, e.g. ``color_control_`` for ``COLOR_CONTROL_LUMINANCE``."""
    names = [value.name for value in field.enum_type.values]
    return names[0][:names[0].index("_UNSPECIFIED")].lower() + "_"


def test_every_option_is_documented_where_it_is_declared():
    """Each field's documentation is its ``option("…")`` text (``metadata["doc"]``): ``help(StylizeOptions)``
    lists it under "Fields", and ``nst stylize --help`` shows it under the field's flag."""
    text = pydoc.render_doc(StylizeOptions, renderer=pydoc.plaintext)
    for field in dataclasses.fields(StylizeOptions):
        doc = field.metadata.get("doc")
        assert isinstance(doc, str) and doc.strip().endswith("."), field.name
        assert f"{field.name}: {doc.split()[0]}" in text, field.name


def test_the_keyword_typed_dict_matches_the_options():
    """``**overrides: Unpack[StylizeOverrides]`` lets editors check keywords: it must list the same fields."""
    assert _hints(StylizeOverrides) == _hints(StylizeOptions)
    assert list(StylizeOverrides.__annotations__) == [f.name for f in dataclasses.fields(StylizeOptions)]
    assert StylizeOverrides.__total__ is False


def test_defaults_build_a_request_with_only_the_images():
    request = build_request(b"content", b"style", StylizeOptions())
    assert request == pb.StylizeRequest(content_image=b"content", style_image=b"style")
    for name in ("content_weight", "seed", "tv_weight", "scales", "pyramid_levels"):
        assert not request.HasField(name)


def test_every_option_reaches_its_request_field():
    options = StylizeOptions(
        max_side_px=64, iterations=6, content_weight=2.0, style_weight=0.0, seed=0, optimizer="adam",
        learning_rate=1.5, noise_ratio=0.3, progress_every=2, style_scale=0.5, preset="classic", init="image",
        content_layers={"relu4_2": 1}, style_layers={"relu1_1": 0.5, "relu2_1": 0.5}, pooling="avg",
        tv_weight=0.0, color_control="match_style_colors", scales=1, start_side_px=32, precision="fp32",
        preview_every=3, preview_max_side_px=48, convergence_tolerance=1e-4, lbfgs_history=20,
        keep_content_alpha=True, normalization="none", pyramid_levels=1)
    request = options.to_request(b"c", styles=[(b"s1", 2.0), (b"s2", 1.0)], init_image=b"i")
    assert (request.max_side_px, request.iterations, request.seed, request.style_weight) == (64, 6, 0, 0.0)
    assert request.optimizer == pb.OPTIMIZER_ADAM and request.preset == pb.PRESET_CLASSIC
    assert request.init == pb.INIT_IMAGE and request.pooling == pb.POOLING_AVG
    assert request.color_control == pb.COLOR_CONTROL_MATCH_STYLE_COLORS and request.precision == pb.PRECISION_FP32
    assert request.normalization == pb.NORMALIZATION_NONE and request.keep_content_alpha
    assert [(w.layer, w.weight) for w in request.style_layers] == [("relu1_1", 0.5), ("relu2_1", 0.5)]
    assert [(w.layer, w.weight) for w in request.content_layers] == [("relu4_2", 1.0)]
    assert [(s.image, s.blend_weight) for s in request.styles] == [(b"s1", 2.0), (b"s2", 1.0)]
    assert request.init_image == b"i" and not request.style_image
    assert (request.lbfgs_history, request.pyramid_levels, request.convergence_tolerance) == (20, 1, 1e-4)
    assert set(f.name for f, _ in request.ListFields()) == (
        {f.name for f in dataclasses.fields(StylizeOptions)} | {"content_image", "styles", "init_image"})


def test_keywords_options_and_overrides_build_the_same_request():
    base = StylizeOptions(max_side_px=64, iterations=6, optimizer="adam")
    assert build_request(b"c", b"s", max_side_px=64, iterations=6, optimizer="adam") == build_request(b"c", b"s",
                                                                                                      base)
    assert build_request(b"c", b"s", base, iterations=9).iterations == 9
    assert base.iterations == 6                                             # frozen: overrides make a copy
    assert base.replace(iterations=9) == StylizeOptions(max_side_px=64, iterations=9, optimizer="adam")
    assert repr(base) == "StylizeOptions(max_side_px=64, iterations=6, optimizer='adam')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.iterations = 7
    layers = {"relu4_2": 1.0}
    options = StylizeOptions(content_layers=layers)
    layers["relu5_1"] = 1.0
    assert options.content_layers == {"relu4_2": 1.0}                       # copied


@pytest.mark.parametrize("overrides,error,match", [
    ({"iteratons": 5}, TypeError, "'iteratons'; did you mean 'iterations'"),
    ({"max_side": 64}, TypeError, "'max_side'; did you mean 'max_side_px'"),
    ({"qwerty": 1}, TypeError, "'qwerty'; the options are max_side_px, iterations"),
    ({"max_side_px": 64.0}, TypeError, "max_side_px must be an int"),
    ({"style_weight": "1"}, TypeError, "style_weight must be a float"),
    ({"keep_content_alpha": "yes"}, TypeError, "keep_content_alpha must be a bool"),
    ({"style_layers": ["relu1_1"]}, TypeError, "style_layers must be a mapping"),
    ({"iterations": -1}, ValueError, "iterations must be between 0 and 4294967295"),
    ({"seed": 2**64}, ValueError, "seed must be between 0 and 18446744073709551615"),
    ({"optimizer": "sgd"}, ValueError, r"optimizer must be one of \('lbfgs', 'adam'\)"),
])
def test_a_misspelt_or_ill_typed_option_raises_before_any_call(small_images, overrides, error, match):
    """Against a port where nothing listens: a call would end with NSTError UNAVAILABLE instead."""
    with pytest.raises(error, match=match):
        build_request(*small_images, **overrides)
    with pytest.raises(error, match=match):
        StylizeOptions(max_side_px=32).replace(**overrides)
    with NSTClient(UNREACHABLE, timeout_s=5) as client:
        with pytest.raises(error, match=match):
            client.stylize(*small_images, **overrides)

    async def run() -> None:
        async with AsyncNSTClient(UNREACHABLE, timeout_s=5) as client:
            with pytest.raises(error, match=match):
                await client.stylize(*small_images, **overrides)
    asyncio.run(run())


def test_options_must_be_stylize_options(small_images):
    with pytest.raises(TypeError, match="options must be a StylizeOptions, got dict"):
        build_request(*small_images, {"iterations": 5})


def _stylize_parser():
    from nst_client import cli
    return cli.build_parser()._subparsers._group_actions[0].choices["stylize"]


def test_the_cli_has_a_flag_per_option_built_from_the_field():
    """``nst stylize``'s job controls come from StylizeOptions: one flag per field, ``--`` + the name with dashes
    (``--size`` the one other spelling), the field's documentation as help, not given: None (False for a bool)."""
    from nst_client import cli
    parser = _stylize_parser()
    actions = {action.dest: action for action in parser._actions}
    flags = {name: [f"--{name.replace('_', '-')}"] for name in (f.name for f in dataclasses.fields(StylizeOptions))}
    flags["max_side_px"] = ["--size"]
    for field in dataclasses.fields(StylizeOptions):
        action = actions[field.name]
        assert action.option_strings == flags[field.name]
        assert action.default is field.default
        assert field.metadata["doc"].replace("``", "") in action.help
        if field.name in CHOICES:
            assert tuple(action.choices) == CHOICES[field.name]
    args = parser.parse_args(["c.png", "s.png", "-o", "o.png"])
    assert cli.stylize_options(args) == StylizeOptions()
    help_text = " ".join(parser.format_help().split())
    for field in dataclasses.fields(StylizeOptions):
        assert " ".join(field.metadata["doc"].replace("``", "").split()) in help_text, field.name


def test_every_cli_flag_reaches_its_option():
    """The flags as users spell them (all of them before the flags came from StylizeOptions, and the two new ones,
    --progress-every and --preview-max-side-px), each set, build the options of every field."""
    from nst_client import cli
    argv = ["c.png", "s.png", "-o", "o.png",
            "--size", "64", "--iterations", "6", "--content-weight", "2", "--style-weight", "0", "--seed", "0",
            "--optimizer", "adam", "--learning-rate", "1.5", "--noise-ratio", "0.3", "--progress-every", "2",
            "--style-scale", "0.5", "--preset", "classic", "--init", "image", "--content-layers", "relu4_2:1",
            "--style-layers", "relu1_1:0.5, relu2_1", "--pooling", "avg", "--tv-weight", "0",
            "--color-control", "match_style_colors", "--scales", "1", "--start-side-px", "32",
            "--precision", "fp32", "--preview-every", "3", "--preview-max-side-px", "48",
            "--convergence-tolerance", "1e-4", "--lbfgs-history", "20", "--keep-content-alpha",
            "--normalization", "none", "--pyramid-levels", "1"]
    options = cli.stylize_options(_stylize_parser().parse_args(argv))
    assert options == StylizeOptions(
        max_side_px=64, iterations=6, content_weight=2.0, style_weight=0.0, seed=0, optimizer="adam",
        learning_rate=1.5, noise_ratio=0.3, progress_every=2, style_scale=0.5, preset="classic", init="image",
        content_layers={"relu4_2": 1}, style_layers={"relu1_1": 0.5, "relu2_1": 1.0}, pooling="avg",
        tv_weight=0.0, color_control="match_style_colors", scales=1, start_side_px=32, precision="fp32",
        preview_every=3, preview_max_side_px=48, convergence_tolerance=1e-4, lbfgs_history=20,
        keep_content_alpha=True, normalization="none", pyramid_levels=1)
    assert [f.name for f in dataclasses.fields(StylizeOptions) if getattr(options, f.name) is f.default] == []


@pytest.mark.parametrize("argv, message", [
    (["--size", "-5"], "argument --size: must be between 0 and 4294967295, got -5"),
    (["--seed", "1.5"], "argument --seed: not an integer: '1.5'"),
    (["--preview-max-side-px", "4294967296"], "argument --preview-max-side-px: must be between 0 and 4294967295"),
    (["--tv-weight", "nan"], "argument --tv-weight: must be a finite number, got 'nan'"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd' (choose from"),
    (["--content-layers", "relu4_2:x"], "argument --content-layers: 'relu4_2:x' is not LAYER:WEIGHT"),
    (["--style-layers", "relu1_1:inf"], "argument --style-layers: 'relu1_1:inf': the weight must be a finite"),
    (["--max-side-px", "64"], "unrecognized arguments: --max-side-px 64"),
])
def test_a_bad_cli_control_is_a_usage_error_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _stylize_parser().parse_args(["c.png", "s.png", "-o", "o.png", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_result_repr_leaves_out_the_png_and_the_progress():
    from nst_client import StylizeResult
    result = StylizeResult("job", b"\x89PNG" + bytes(10_000), 64, 48, 1.0, 2.0, 3.0, 20, 19,
                           "STOP_REASON_ITERATIONS_DONE", 5.0, [pb.Progress(iteration=i) for i in range(20)])
    text = repr(result)
    assert len(text) < 400 and "PNG" not in text and "iteration: " not in text
    assert "width_px=64" in text and "stop_reason='STOP_REASON_ITERATIONS_DONE'" in text
