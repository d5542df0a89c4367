"""Faults from the field (reported by users of the service), each kind with its case as a test.

Kind 1: finite request numbers whose derived arithmetic (a sum, a product, a normaliser, a memory size)
overflows or vanishes. Each such number is either computed safely or refused as INVALID_ARGUMENT naming its
field; never INTERNAL, never a silent non-finite cost.
"""

import io
import math
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings as hypothesis_settings, strategies as st
from PIL import Image

import serving
from nst_client import NSTClient, NSTError, build_request
from nst_client.cli import main as client_main
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_server import images
from nst_server.errors import ImageInputError
from nst_server.settings import blend_weights

FLOAT_FIELDS = ("content_weight", "style_weight", "learning_rate", "noise_ratio", "style_scale", "tv_weight",
                "convergence_tolerance")
UINT32_FIELDS = ("max_side_px", "iterations", "progress_every", "scales", "start_side_px", "preview_every",
                 "preview_max_side_px", "lbfgs_history", "pyramid_levels")
LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")


def _outcome(client: NSTClient, request: pb.StylizeRequest) -> tuple[str, pb.Result | None, str]:
    """``("ok", result, "")`` or ``("error", None, "CODE: details")`` of one job."""
    try:
        messages = list(client.stream(request, timeout_s=120))
    except NSTError as exc:
        return "error", None, f"{exc.code.name}: {exc.details}"
    return "ok", messages[-1].result, ""


def _finite(costs: pb.Costs) -> bool:
    return all(math.isfinite(v) for v in (costs.content, costs.style, costs.total, costs.total_variation))


@pytest.mark.parametrize("weights,expected", [
    ([1e308, 1e308], [0.5, 0.5]),
    ([1e308, 1e308, 1e308, 0.0], [1 / 3, 1 / 3, 1 / 3, 0.0]),
    ([5e-324, 0.0], [1.0, 0.0]),
    ([5e-324, 5e-324], [0.5, 0.5]),
    ([1e308, 1e-308], [1.0, 0.0]),
    ([0.0, 0.0], [0.5, 0.5]),
])
def test_blend_weights_never_overflow_or_vanish(weights, expected):
    result = blend_weights(weights)
    assert result == pytest.approx(expected, abs=1e-15)
    assert all(math.isfinite(w) for w in result) and math.fsum(result) == pytest.approx(1.0)


def test_two_styles_weighted_1e308_give_a_picture(client, small_images):
    """The issue's case: `--style a.png:1e308 --style b.png:1e308` ended INTERNAL (KeyError 'relu1_1')."""
    content, style = small_images
    request = build_request(content, styles=[(style, 1e308), (content, 1e308)], max_side_px=32, iterations=2)
    kind, result, error = _outcome(client, request)
    assert kind == "ok", error
    assert result.stop_reason == pb.STOP_REASON_ITERATIONS_DONE and _finite(result.costs)
    assert Image.open(io.BytesIO(result.image_png)).size == (32, 24)


@pytest.mark.parametrize("options,field", [
    ({"content_weight": 1e308}, "content_weight"),
    ({"style_weight": 1e300}, "style_weight"),
    ({"style_weight": 1e-300}, "style_weight"),
    ({"tv_weight": 1e39}, "tv_weight"),
    ({"style_layers": {"relu1_1": 1e308}}, "style_layers"),
    ({"content_layers": {"relu4_2": 1e-320}}, "content_layers"),
    ({"learning_rate": 1e308, "optimizer": "adam"}, "learning_rate"),
    ({"convergence_tolerance": 1e308}, "convergence_tolerance"),
    ({"lbfgs_history": 2**32 - 1}, "lbfgs_history"),
])
def test_numbers_whose_products_overflow_are_invalid_argument_naming_the_field(client, small_images, options,
                                                                               field):
    content, style = small_images
    kind, _, error = _outcome(client, build_request(content, style, max_side_px=32, iterations=2, **options))
    assert kind == "error" and error.startswith("INVALID_ARGUMENT") and field in error, error


@pytest.fixture(scope="module")
def small_server(onnx_path, tmp_path_factory):
    """A server whose limits keep every accepted job small (32 px, 3 iterations)."""
    server = serving.start(onnx_path, tmp_path_factory.mktemp("faults") / "server.log",
                           ["--max-side-px", "32", "--max-iterations", "3", "--max-running-jobs", "1",
                            "--max-queued-jobs", "2"])
    try:
        yield server.target
    finally:
        server.stop()


def _whole_float():
    """Every double, extremes included."""
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0.0, 5e-324, 1e-300, 1e-13, 1e13, 1e38, 1e39, 1.7976931348623157e308]))


def _whole_uint32():
    return st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**32 - 1]))


ORDINARY_FLOAT = {"learning_rate": st.floats(0.01, 5), "noise_ratio": st.floats(0, 1),
                  "style_scale": st.floats(0.5, 1),
                  "convergence_tolerance": st.floats(0, 0.5)}
# An ordinary max_side_px keeps the 64x48 content's shorter side at 16 px or more (22 x 0.75 = 16.5).
ORDINARY_UINT32 = {"max_side_px": (22, 32), "iterations": (1, 3), "scales": (1, 3), "start_side_px": (0, 0),
                   "pyramid_levels": (1, 4), "lbfgs_history": (0, 5)}


@st.composite
def stylize_requests(draw, content: bytes, style: bytes) -> pb.StylizeRequest:
    """A request whose every numeric field is drawn: up to three of them (and the blend and layer weights
    with them) from their whole range, the others from ordinary values, so that jobs also run."""
    names = [*FLOAT_FIELDS, *UINT32_FIELDS, "seed", "blend_weight", "layer_weight"]
    extreme = draw(st.sets(st.sampled_from(names), min_size=1, max_size=3))

    def number(name: str, ordinary):
        return draw(_whole_float() if name in extreme else ordinary)

    request = pb.StylizeRequest(content_image=content)
    if draw(st.booleans()):
        request.style_image = style
    # An extreme blend weight is given to every extra style: their sum is what overflows.
    blend_weight = number("blend_weight", st.just(0.0) | st.floats(0.01, 3))
    for _ in range(draw(st.integers(0 if request.style_image else 1, 3))):
        request.styles.add(image=style, blend_weight=blend_weight)
    for name in FLOAT_FIELDS:
        if name in extreme:
            setattr(request, name, draw(_whole_float()))
        elif draw(st.booleans()):
            setattr(request, name, draw(ORDINARY_FLOAT.get(name, st.just(0.0) | st.floats(0.01, 20))))
    for name in UINT32_FIELDS:
        setattr(request, name, draw(_whole_uint32() if name in extreme
                                    else st.integers(*ORDINARY_UINT32.get(name, (0, 4)))))
    request.seed = draw(st.integers(0, 2**64 - 1) if "seed" in extreme else st.integers(0, 10))
    for field in ("content_layers", "style_layers"):
        for layer in draw(st.lists(st.sampled_from(LAYERS), max_size=3, unique=True)):
            getattr(request, field).add(layer=layer, weight=number("layer_weight", st.just(0.0) | st.floats(0.01, 2)))
    return request


def test_every_numeric_field_over_its_whole_range_gives_a_result_or_invalid_argument(small_server, small_images):
    """Property (Hypothesis): whatever the numbers, the server answers a Result with finite costs (or
    NON_FINITE_COST with a real image) or INVALID_ARGUMENT, and keeps serving."""
    content, style = small_images
    seen = {"ok": 0, "error": 0}
    with NSTClient(small_server, timeout_s=120) as client:

        @hypothesis_settings(max_examples=60, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(stylize_requests(content, style))
        @example(build_request(content, styles=[(style, 1e308), (style, 1e308)], max_side_px=32, iterations=2))
        # Ordinary jobs, so that the Result path is exercised whatever Hypothesis draws: its examples vary with
        # the constants it collects from the project's modules loaded at the time (hypothesis' "local
        # constants"), so a count of valid draws is luck.
        @example(build_request(content, style, max_side_px=32, iterations=3))
        @example(build_request(content, style, max_side_px=24, iterations=2, optimizer="adam", learning_rate=2.0))
        @example(build_request(content, style, max_side_px=32, iterations=3, scales=2, pyramid_levels=2))
        @example(build_request(content, style, max_side_px=28, iterations=2, tv_weight=1.0, seed=7))
        def check(request):
            kind, result, error = _outcome(client, request)
            seen[kind] += 1
            if kind == "error":
                assert error.startswith("INVALID_ARGUMENT"), error
                return
            assert result.image_png and Image.open(io.BytesIO(result.image_png)).size == (result.width_px,
                                                                                          result.height_px)
            if result.stop_reason != pb.STOP_REASON_NON_FINITE_COST:
                assert _finite(result.costs), result.costs

        check()
        assert client.health() == "SERVING"
    assert seen["ok"] >= 5 and seen["error"] >= 5, seen


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_under_v1_and_v1alpha(server, version):
    """Kind 4: reflection spoke only v1alpha; v1 answered UNIMPLEMENTED. Both list the services, and each can
    describe the other reflection service (what grpcurl does next: file_containing_symbol)."""
    from grpc_reflection.v1alpha import reflection_pb2

    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    with grpc.insecure_channel(server) as channel:
        call = channel.stream_stream(method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="grpc.reflection.v1.ServerReflection"),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="nst.v1.StyleTransfer")]
        listed, v1_file, nst_file = list(call(iter(requests), timeout=10))
    names = {service.name for service in listed.list_services_response.service}
    assert {"nst.v1.StyleTransfer", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2
    files = [descriptor_pb2.FileDescriptorProto.FromString(data)
             for data in v1_file.file_descriptor_response.file_descriptor_proto]
    assert [(f.name, f.package) for f in files][0] == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert files[0].service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert nst_file.file_descriptor_response.file_descriptor_proto


# Kind 3: metadata makes a valid image unusable.

def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _png_with(chunks_before_idat: list[bytes], chunks_after_idat: list[bytes] = ()) -> bytes:
    """A 40x30 RGB PNG (Pillow's encoding) with extra chunks spliced in before the first IDAT / before IEND."""
    plain = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 60)).save(plain, format="PNG")
    data = plain.getvalue()
    idat = data.index(b"IDAT") - 4
    iend = data.index(b"IEND") - 4
    return data[:idat] + b"".join(chunks_before_idat) + data[idat:iend] + b"".join(chunks_after_idat) + data[iend:]


BOMB_TEXT = zlib.compress(b"x" * (3 * 1024 * 1024))                   # 3 MiB of text in 3 kB


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("chunk", [
    _chunk(b"iTXt", b"Comment\0\x01\x00\0\0" + BOMB_TEXT),
    _chunk(b"zTXt", b"Comment\0\x00" + BOMB_TEXT),
    _chunk(b"iCCP", b"icc\0\x00" + BOMB_TEXT),
], ids=["iTXt", "zTXt", "iCCP"])
def test_metadata_pillow_refuses_does_not_make_the_picture_unusable(chunk, where, caplog):
    data = _png_with([chunk]) if where == "before" else _png_with([], [chunk])
    with caplog.at_level("WARNING", logger="nst_server.images"):
        image = images.decode_image(data, "content_image")
    assert image.size == (40, 30) and image.getpixel((5, 5)) == (200, 30, 60)
    assert "decoded without its PNG metadata chunks" in caplog.text and chunk[4:8].decode() in caplog.text


def test_without_png_metadata_keeps_the_image_chunks_byte_for_byte():
    data = _png_with([_chunk(b"tEXt", b"a\0b"), _chunk(b"tIME", bytes(7))], [_chunk(b"iTXt", b"k\0\0\0\0\0v")])
    stripped, dropped = images.without_png_metadata(data)
    assert dropped == ["tEXt", "tIME", "iTXt"]
    plain = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 60)).save(plain, format="PNG")
    assert stripped == plain.getvalue()
    assert images.without_png_metadata(b"\xff\xd8 not a png") == (b"\xff\xd8 not a png", [])


def test_a_truncated_png_with_metadata_is_still_refused():
    data = _png_with([_chunk(b"iTXt", b"Comment\0\x01\x00\0\0" + BOMB_TEXT)])
    cut = data[:data.index(b"IDAT") + 10]
    with pytest.raises(ImageInputError, match="content_image: cannot be decoded"):
        images.decode_image(cut, "content_image")


def test_the_itxt_case_is_stylized_through_the_server(client, shared, small_images):
    """A PNG with a 2 MiB compressed iTXt chunk (a case that broke other tools, from the shared cases folder) was
    refused as "truncated or corrupt header"."""
    case = shared / "cases" / "itxt_compressed_2mib.png"
    if not case.exists():
        pytest.skip(f"{case} is absent (set NST_SHARED_DIR)")
    request = build_request(case.read_bytes(), small_images[1], max_side_px=32, iterations=2)
    kind, result, error = _outcome(client, request)
    assert kind == "ok", error
    assert (result.width_px, result.height_px) == (32, 24) and _finite(result.costs)


# Kind 2: the CLI throws away finished work.

def _cli_files(tmp_path, small_images):
    paths = [tmp_path / "content.png", tmp_path / "style.png"]
    for path, data in zip(paths, small_images):
        path.write_bytes(data)
    return [str(path) for path in paths]


@pytest.mark.parametrize("name,words", [
    ("missing/dir/out.png", "does not exist"),
    ("out.gif", "is not a picture format the CLI writes"),
    ("out", "no suffix"),
    (".", "is not a picture format"),
])
def test_the_cli_refuses_an_output_it_cannot_write_before_sending_the_job(tmp_path, small_images, capsys, name,
                                                                          words):
    """Checked before connecting: the server address is one where nothing listens."""
    files = _cli_files(tmp_path, small_images)
    code = client_main(["stylize", *files, "-o", str(tmp_path / name), "--server", "127.0.0.1:1", "--quiet"])
    assert code == 2
    error = capsys.readouterr().err
    assert words in error and "UNAVAILABLE" not in error


@pytest.mark.parametrize("extra,words", [
    (["--keep-content-alpha", "-o", "out.jpg"], "needs a format with transparency"),
    (["--quality", "101", "-o", "out.jpg"], "--quality must be between 1 and 100"),
    (["--quality", "80", "-o", "out.png"], "--quality applies to JPEG and WebP"),
])
def test_the_cli_refuses_contradictory_output_options_before_sending(tmp_path, small_images, capsys, extra, words):
    files = _cli_files(tmp_path, small_images)
    extra = [str(tmp_path / item) if item.startswith("out.") else item for item in extra]
    assert client_main(["stylize", *files, *extra, "--server", "127.0.0.1:1", "--quiet"]) == 2
    assert words in capsys.readouterr().err


def test_bench_outputs_are_checked_before_the_sweep(tmp_path, capsys):
    code = client_main(["bench", "--server", "127.0.0.1:1", "--output-json", str(tmp_path / "no" / "b.json")])
    assert code == 2 and "--output-json" in capsys.readouterr().err


@pytest.mark.parametrize("suffix,fmt,extra", [(".jpg", "JPEG", ["--quality", "80"]), (".webp", "WEBP", []),
                                              (".tiff", "TIFF", []), (".png", "PNG", [])])
def test_the_written_format_follows_the_suffix(server, tmp_path, small_images, capsys, suffix, fmt, extra):
    files = _cli_files(tmp_path, small_images)
    target = tmp_path / f"out{suffix}"
    code = client_main(["stylize", *files, "-o", str(target), "--server", server, "--size", "32", "--iterations",
                        "2", "--preview-every", "1", "--quiet", *extra])
    assert code == 0, capsys.readouterr().err
    with Image.open(target) as written:
        assert written.format == fmt and written.size == (32, 24)
    previews = sorted(tmp_path.glob(f"out.preview*{suffix}"))
    assert previews and all(Image.open(p).format == fmt for p in previews)


def test_a_result_that_cannot_be_written_is_saved_elsewhere_and_said(server, tmp_path, small_images):
    """The output folder disappears while the job runs: previews stop, the result goes to a fallback file
    whose path the CLI prints, and the exit code says something went wrong."""
    folder = tmp_path / "gone"
    folder.mkdir()
    files = _cli_files(tmp_path, small_images)
    process = subprocess.Popen([sys.executable, "-m", "nst_client.cli", "stylize", *files, "-o",
                                str(folder / "out.png"), "--server", server, "--size", "48",
                                "--iterations", "60", "--preview-every", "1", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        serving.wait_for(lambda: any(folder.glob("out.preview*")), timeout_s=120)
        shutil.rmtree(folder)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 2, stderr
    assert "previews are no longer saved" in stderr and "Traceback" not in stderr
    fallback = Path(stderr.split("the result is saved as ", 1)[1].split(" instead", 1)[0])
    with Image.open(fallback) as saved:
        assert saved.format == "PNG" and saved.size == (48, 36)
    assert str(fallback) in stdout
    fallback.unlink()


# Kind 5: memory across many requests of many sizes.

SOAK_SIZES = [(48 + 3 * k, 32) if k % 2 == 0 else (32, 48 + 3 * k) for k in range(40)]    # 48..165 px, both ways


def test_memory_stays_bounded_over_40_jobs_of_40_sizes(onnx_path, tmp_path, small_images, record_property):
    """40 jobs of 2–3 iterations, each at a new size (landscape and portrait, 48–165 px), through one server:
    resident memory (the metrics endpoint's process_resident_memory_bytes) grows by under 10 % between job 10
    and job 40. Before, nothing bounded what the CPU kernels kept per input shape (+20 % over 40 jobs)."""
    style = small_images[1]
    server = serving.start(onnx_path, tmp_path / "server.log", ["--max-running-jobs", "1"])
    rss = {}
    try:
        with NSTClient(server.target, timeout_s=120) as client:
            for k, (width, height) in enumerate(SOAK_SIZES, start=1):
                content = io.BytesIO()
                Image.new("RGB", (width, height), (40 + k, 120, 200 - k)).save(content, format="PNG")
                result = client.stylize(content.getvalue(), style, max_side_px=max(width, height),
                                        iterations=2 + k % 2)
                assert (result.width_px, result.height_px) == (width, height)
                if k in (1, 10, 40):
                    # The server trims its heap after a job and only then counts it finished.
                    serving.wait_for(lambda: server.metric("nst_jobs_running") == 0, timeout_s=30)
                    rss[k] = server.metric("process_resident_memory_bytes")
    finally:
        server.stop()
    growth = rss[40] / rss[10] - 1
    print(f"resident memory: job 1 {rss[1] / 2**20:.0f} MiB, job 10 {rss[10] / 2**20:.0f} MiB, "
          f"job 40 {rss[40] / 2**20:.0f} MiB ({growth:+.1%} from job 10 to 40)")
    record_property("rss_mib", {k: round(v / 2**20, 1) for k, v in rss.items()})
    assert growth < 0.10
