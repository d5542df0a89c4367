"""The server's side of the request: ``StylizeRequest`` onto ``StyleTransferSettings`` as the proto's descriptors
derive it (every control a setting of the same name), and failures onto gRPC statuses in one place
(``servicer.abort_for``), each error carrying its field."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2, status_pb2

from nst_client.options import IMAGE_FIELDS
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_server import messages
from nst_server.errors import FieldError, ImageInputError, ModelFileError, NSTServerError, ServerBusy
from nst_server.jobs import Job
from nst_server.servicer import ServerLimits, abort_for
from nst_server.settings import StyleTransferSettings

REQUEST_FIELDS = pb.StylizeRequest.DESCRIPTOR.fields
SETTINGS = {f.name for f in dataclasses.fields(StyleTransferSettings)}
LIMITS = ServerLimits()


def _request(**fields) -> pb.StylizeRequest:
    return pb.StylizeRequest(style_image=b"not decoded here", init_image=b"nor this", **fields)


def test_every_request_field_is_a_setting_or_an_input():
    """Fails when StylizeRequest gains a field that StyleTransferSettings does not have and that is no input (an
    image, keep_content_alpha) or the preset: the server would have no setting to put it in."""
    images = {f.name for f in REQUEST_FIELDS if f.type == FieldDescriptor.TYPE_BYTES
              or (f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is pb.StyleImage.DESCRIPTOR)}
    assert set(messages.INPUT_FIELDS) == images | {"keep_content_alpha"} == set(IMAGE_FIELDS) | {"keep_content_alpha"}
    mapped = set(messages.SCALAR_FIELDS) | set(messages.ENUMS) | set(messages.LAYER_FIELDS)
    for field in REQUEST_FIELDS:
        if field.name in (*messages.INPUT_FIELDS, "preset"):
            assert field.name not in mapped and field.name not in SETTINGS, field.name
            continue
        assert field.name in SETTINGS, f"StylizeRequest.{field.name} has no StyleTransferSettings field"
        assert field.name in mapped, f"StylizeRequest.{field.name} is of a kind the request mapping does not know"
    assert messages.PRESETS == {0: "default", pb.PRESET_SEED: "seed", pb.PRESET_CLASSIC: "classic"}


def _set_value(field: FieldDescriptor):
    """A value that sets ``field`` (not its zero) and passes the server's limits; the settings' own checks are not
    reached (the test records the overrides and builds the preset alone)."""
    if field.name in messages.LAYER_FIELDS:
        return [pb.LayerWeight(layer="relu3_1", weight=0.5)]
    if field.enum_type is not None:
        return field.enum_type.values[-1].number
    return {FieldDescriptor.TYPE_UINT32: 64, FieldDescriptor.TYPE_UINT64: 64, FieldDescriptor.TYPE_DOUBLE: 0.5,
            FieldDescriptor.TYPE_BOOL: True}[field.type]


def test_every_control_the_request_sets_reaches_its_setting(monkeypatch):
    """Each field, set, goes to the preset's overrides under its own name: LayerWeight lists as dicts, enums as
    their value names; unset fields (0, ``…_UNSPECIFIED``, absent ``optional`` ones) leave the preset's values."""
    overrides = []
    preset = StyleTransferSettings.preset

    def recording(name="default", **values):
        overrides.append((name, values))
        return preset(name)

    monkeypatch.setattr(messages.StyleTransferSettings, "preset", recording)
    fields = [f for f in REQUEST_FIELDS if f.name not in (*messages.INPUT_FIELDS, "preset")]
    messages.settings_from_request(_request(preset=pb.PRESET_CLASSIC, **{f.name: _set_value(f) for f in fields}),
                                   LIMITS)
    name, values = overrides.pop()
    expected = {f.name: _set_value(f) for f in fields}
    for layers in messages.LAYER_FIELDS:
        expected[layers] = {"relu3_1": 0.5}
    for enum, numbers in messages.ENUMS.items():
        expected[enum] = numbers[expected[enum]]
    assert (name, values) == ("classic", expected)
    assert values["precision"] == "auto" and values["color_control"] == "match_style_colors"

    messages.settings_from_request(_request(), LIMITS)
    assert overrides.pop() == ("default", {})
    # optional fields by presence (an explicit 0 is a value), the others when non-zero
    messages.settings_from_request(_request(tv_weight=0.0, seed=0, start_side_px=0, preview_every=0), LIMITS)
    assert overrides.pop() == ("default", {"tv_weight": 0.0, "seed": 0})


@pytest.mark.parametrize("field", [f for f in REQUEST_FIELDS if f.enum_type is not None], ids=lambda f: f.name)
def test_every_enum_value_is_a_setting_value_and_others_are_refused(field):
    """Each value of each enum field maps onto a value the settings accept (validate() passes); an undefined number
    is refused naming the field."""
    for value in field.enum_type.values:
        settings = messages.settings_from_request(_request(**{field.name: value.number}), LIMITS)
        if field.name != "preset":
            expected = messages.ENUMS[field.name].get(value.number, getattr(StyleTransferSettings(), field.name))
            assert getattr(settings, field.name) == expected, value.name
    with pytest.raises(FieldError) as error:
        messages.settings_from_request(_request(**{field.name: 99}), LIMITS)
    assert (error.value.field, error.value.reason, str(error.value)) == (
        field.name, "unknown value 99", f"{field.name}: unknown value 99")


@pytest.mark.parametrize("fields, field, reason", [
    (dict(max_side_px=8), "max_side_px", "must be between 16 and 4096 px, got 8"),
    (dict(iterations=2001), "iterations", "must be at most 2000, got 2001"),
    (dict(style_weight=-1.0), "style_weight", "must be a finite number >= 0, got -1.0"),
    (dict(style_scale=20.0), "style_scale", "20 x max_side_px 256 gives a 5120 px style image; the server's limit "
                                            "is 4096 px"),
    (dict(content_layers=[pb.LayerWeight(layer="relu4_2", weight=1)] * 2), "content_layers",
     "layer 'relu4_2' is listed twice"),
    (dict(styles=[pb.StyleImage(blend_weight=-1.0)]), "styles",
     "style blend weights must be finite and >= 0, got -1.0 (weight 1 of 1)"),
])
def test_a_refused_request_names_its_field(fields, field, reason):
    with pytest.raises(FieldError) as error:
        messages.settings_from_request(_request(**fields), LIMITS)
    assert (error.value.field, error.value.reason, str(error.value)) == (field, reason, f"{field}: {reason}")


def _violations(abort) -> list[tuple[str, str]]:
    details = dict(abort.rpc_status().trailing_metadata)["grpc-status-details-bin"]
    bad = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(details).details[0].Unpack(bad)
    return [(v.field, v.description) for v in bad.field_violations]


@pytest.mark.parametrize("error, code, message, violation", [
    (FieldError("max_side_px", "must be at least 16"), grpc.StatusCode.INVALID_ARGUMENT,
     "max_side_px: must be at least 16", ("max_side_px", "must be at least 16")),
    (ImageInputError("styles[2].image", "is empty", over_limit=False), grpc.StatusCode.INVALID_ARGUMENT,
     "styles[2].image: is empty", ("styles[2].image", "is empty")),
    (FieldError("", "the request as a whole"), grpc.StatusCode.INVALID_ARGUMENT, "the request as a whole",
     ("", "the request as a whole")),
    (ValueError("max_side_px: a check without its field"), grpc.StatusCode.INVALID_ARGUMENT,
     "max_side_px: a check without its field", ("", "max_side_px: a check without its field")),
    (ServerBusy("server busy: 5 jobs admitted"), grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: 5 jobs admitted",
     None),
])
def test_errors_become_statuses_from_their_attributes(error, code, message, violation):
    abort = abort_for(error)
    assert (abort.code, abort.message) == (code, message)
    if violation is not None:
        assert _violations(abort) == [violation]


def test_job_failures_name_the_job():
    job = Job("abc123", iterations=7)
    oom = abort_for(torch.OutOfMemoryError("CUDA out of memory"), job)
    assert oom.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert oom.message == ("job abc123 ran out of memory after 7 iterations (OutOfMemoryError: CUDA out of memory); "
                           "try a smaller max_side_px or fewer styles")
    internal = abort_for(RuntimeError("shape mismatch"), job)
    assert (internal.code, internal.message) == (grpc.StatusCode.INTERNAL,
                                                 "job abc123 failed after 7 iterations: RuntimeError: shape mismatch")


def test_every_domain_error_lives_in_errors_and_carries_its_status():
    assert issubclass(FieldError, ValueError) and issubclass(ImageInputError, FieldError)
    assert issubclass(ModelFileError, RuntimeError)
    for cls in (FieldError, ImageInputError, ServerBusy, ModelFileError):
        assert issubclass(cls, NSTServerError) and cls.__module__ == "nst_server.errors"
    long = FieldError("content_layers", "must be among …, got " + "x" * 5000)
    abort = abort_for(long)
    assert len(abort.message) <= 1000 and len(abort.reason) <= 1000 and abort.field == "content_layers"
