"""The input contract (docs/api.md, "Inputs, limits and errors"): decoding and conversion of every mode
(nst_server.images, in process), the case files of ``$NST_SHARED_DIR/cases`` and synthetic inputs through a
real server, refusals as INVALID_ARGUMENT with google.rpc.BadRequest field violations, and the receive limit.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image, ImageCms

from conftest import encode, shared_dir
from nst_client import NSTClient, NSTError
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_server.errors import ImageInputError
from nst_server.images import (ALPHA_BACKGROUND, DEFAULT_MAX_INPUT_PIXELS, decode_image, decode_image_and_alpha,
                               encode_png_with_alpha, resize_to_max_side, to_rgb)

WHITE = ALPHA_BACKGROUND


# ----------------------------------------------------------------------------------------------- helpers

def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: IHDR as given, one IDAT of ``rows`` (filter bytes included) or of a single
    empty row when ``rows`` is None (then the header may claim any size: nothing matches it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\0")
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def rgb_of(image: Image.Image) -> np.ndarray:
    """``to_rgb`` with the contract's checks: mode RGB, same size; returns ``(H, W, 3)`` int."""
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    return np.asarray(rgb).astype(int)


def decoded(data: bytes, field: str = "content_image") -> np.ndarray:
    image = decode_image(data, field)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def marker_image(width: int = 40, height: int = 24) -> Image.Image:
    """An asymmetric RGB image: grey, a red block at the top-left corner, a blue one at the bottom-left."""
    array = np.full((height, width, 3), 128, np.uint8)
    array[:6, :6] = (255, 0, 0)
    array[-6:, :6] = (0, 0, 255)
    return Image.fromarray(array)


# ------------------------------------------------------------------- modes to RGB (in process, no server)

def test_bilevel_grey_and_palette_modes():
    bilevel = Image.new("1", (20, 20), 0)
    bilevel.paste(1, (0, 0, 10, 20))
    assert (decoded(encode(bilevel))[:, :10] == 255).all() and (decoded(encode(bilevel))[:, 10:] == 0).all()
    assert (decoded(encode(Image.new("L", (20, 20), 100))) == 100).all()
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    for fmt in ("PNG", "GIF", "BMP"):
        assert (decoded(encode(palette, fmt)) == (10, 200, 30)).all(), fmt


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparent_index_is_white(fmt):
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([10, 200, 30, 90, 10, 10] + [0] * 762)
    palette.paste(1, (10, 0, 20, 20))
    array = decoded(encode(palette, fmt, transparency=0))
    assert (array[:, :10] == WHITE).all() and (array[:, 10:] == (90, 10, 10)).all()


def test_palette_with_partial_alpha_table():
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0] * 256)                        # black, alpha 51 (a tRNS table in the PNG)
    array = decoded(encode(palette, "PNG", transparency=bytes([51])))
    assert (np.abs(array - round(255 * (1 - 51 / 255))) <= 1).all()


def test_alpha_modes_composite_over_white():
    la = Image.merge("LA", (Image.new("L", (20, 20), 100), Image.new("L", (20, 20), 0)))
    la.paste((100, 255), (10, 0, 20, 20))
    array = decoded(encode(la))
    assert (array[:, :10] == WHITE).all() and (array[:, 10:] == 100).all()
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 128))
    expected = np.round(np.array([0, 0, 255]) * 128 / 255 + np.array(WHITE) * 127 / 255)
    assert (np.abs(decoded(encode(rgba)) - expected) <= 1).all()
    pa = Image.new("PA", (20, 20), (1, 0))                     # transparent
    pa.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    assert (rgb_of(pa) == WHITE).all()
    pa.paste((1, 255), (0, 0, 20, 20))
    assert (rgb_of(pa) == (200, 0, 0)).all()


def test_trns_colour_of_grey_and_rgb_pngs_is_transparent():
    grey = Image.new("L", (20, 20), 50)
    grey.paste(60, (10, 0, 20, 20))
    array = decoded(encode(grey, transparency=50))
    assert (array[:, :10] == WHITE).all() and (array[:, 10:] == 60).all()
    rgb = Image.new("RGB", (20, 20), (1, 2, 3))
    rgb.paste((4, 5, 6), (10, 0, 20, 20))
    array = decoded(encode(rgb, transparency=(1, 2, 3)))
    assert (array[:, :10] == WHITE).all() and (array[:, 10:] == (4, 5, 6)).all()


def test_cmyk_naive_and_adobe_jpeg():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))       # red
    assert (decoded(encode(cmyk, "TIFF")) == (255, 0, 0)).all()
    assert (np.abs(decoded(encode(cmyk, "JPEG", quality=95)) - (255, 0, 0)) <= 6).all()
    grey = Image.new("CMYK", (32, 32), (0, 0, 0, 128))
    assert (np.abs(decoded(encode(grey, "TIFF")) - 127) <= 1).all()


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    levels = np.array([[0, 257 * 64, 32768, 65535]] * 16, np.uint16).repeat(4, axis=1)     # 16x16
    image = Image.fromarray(levels)
    assert image.mode == "I;16"
    array = decoded(encode(image))
    assert array[0, ::4, 0].tolist() == [0, 64, 128, 255]
    with_trns = decoded(encode(image, transparency=0))             # tRNS grey level 0 -> transparent
    assert (with_trns[:, :4] == WHITE).all() and with_trns[0, 15, 0] == 255


def test_sixteen_bit_rgb_png():
    row = b"\0" + struct.pack(">3H", 65535, 32768, 0) * 16         # filter 0, 16 px of (1.0, 0.5, 0.0)
    array = decoded(raw_png(16, 16, 16, 2, row * 16))
    assert (np.abs(array - (255, 128, 0)) <= 1).all()


def test_int32_and_float_grey_levels():
    ints = Image.fromarray(np.array([[0, 1000, 65535, 65535]] * 16, np.int32).repeat(4, axis=1))
    assert ints.mode == "I"
    assert rgb_of(ints)[0, ::4, 0].tolist() == [0, 4, 255, 255]                 # 16-bit range
    small = Image.fromarray(np.array([[0, 100, 200, 255]] * 16, np.int32).repeat(4, axis=1))
    assert rgb_of(small)[0, ::4, 0].tolist() == [0, 100, 200, 255]              # 8-bit range
    floats = np.array([[0.0, 0.5, 1.0, np.nan]] * 16, np.float32).repeat(4, axis=1)
    array = decoded(encode(Image.fromarray(floats), "TIFF"))
    assert array[0, ::4, 0].tolist() == [0, 128, 255, 0]                        # NaN -> 0
    assert np.isfinite(array).all()


def test_lab_hsv_and_ycbcr():
    lab = Image.new("LAB", (20, 20), (255, 128, 128))          # L* 100: white
    assert (np.abs(decoded(encode(lab, "TIFF")) - 255) <= 2).all()
    assert (rgb_of(Image.new("HSV", (20, 20), (0, 255, 255))) == (255, 0, 0)).all()
    assert (np.abs(rgb_of(Image.new("YCbCr", (20, 20), (128, 128, 128))) - 128) <= 1).all()


def test_icc_profile_is_applied_and_a_broken_one_ignored():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = Image.new("RGB", (20, 20), (200, 30, 40))
    assert (np.abs(decoded(encode(image, "PNG", icc_profile=srgb)) - (200, 30, 40)) <= 2).all()
    assert (decoded(encode(image, "PNG", icc_profile=b"not a profile")) == (200, 30, 40)).all()


@pytest.mark.parametrize("orientation,transpose", [
    (1, None), (2, Image.Transpose.FLIP_LEFT_RIGHT), (3, Image.Transpose.ROTATE_180),
    (4, Image.Transpose.FLIP_TOP_BOTTOM), (5, Image.Transpose.TRANSPOSE), (6, Image.Transpose.ROTATE_270),
    (7, Image.Transpose.TRANSVERSE), (8, Image.Transpose.ROTATE_90),
])
def test_exif_orientation_is_applied(orientation, transpose):
    """EXIF 2.3, tag 0x0112: 6 means "rotate 90 degrees clockwise to view" (Pillow's ROTATE_270)."""
    stored = marker_image()
    exif = Image.Exif()
    exif[0x0112] = orientation
    expected = stored if transpose is None else stored.transpose(transpose)
    array = decoded(encode(stored, "PNG", exif=exif.tobytes()))
    assert array.shape[:2] == (expected.height, expected.width)
    assert (array == np.asarray(expected)).all()


def test_animated_gif_and_png_use_the_first_frame():
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    assert (np.abs(decoded(gif) - (250, 0, 0)) <= 8).all()              # the GIF palette is approximate
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(apng)).n_frames == 3
    assert (decoded(apng) == (250, 0, 0)).all()


# ------------------------------------------------------------------------- refusals (in process)

def refusal(data: bytes, field: str = "style_image", **limits) -> str:
    with pytest.raises(ImageInputError) as error:
        decode_image(data, field, **limits)
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")
    return error.value.reason


def test_decompression_bomb_is_refused_from_the_header():
    # 100000 x 100000 claimed, 50 bytes of file: Pillow's guard fires while reading the header.
    assert "over the limit of 40000000 pixels" in refusal(raw_png(100_000, 100_000, 8, 2))
    # 8000 x 6000 = 48 M: over our budget, under Pillow's; the IDAT is one row, so a decode would fail
    # differently: the size check ran first.
    reason = refusal(raw_png(8000, 6000, 8, 2))
    assert "8000x6000 = 48000000 pixels, over the limit of 40000000 pixels" in reason
    # A real, highly compressible image (400 x 300 black, a few hundred bytes) under a small budget.
    black = encode(Image.new("RGB", (400, 300)))
    assert len(black) < 1000
    assert "over the limit of 100000 pixels" in refusal(black, max_pixels=100_000)
    assert DEFAULT_MAX_INPUT_PIXELS == 40_000_000


@pytest.mark.parametrize("size", [(12, 12), (15, 200), (200, 15)])
def test_minimum_side_is_16_px(size):
    reason = refusal(encode(Image.new("RGB", size)))
    assert f"is {size[0]}x{size[1]} px" in reason and "at least 16 px" in reason


def test_minimum_side_accepts_16_px_and_can_be_changed():
    assert decode_image(encode(Image.new("RGB", (16, 16))), "content_image").size == (16, 16)
    assert decode_image(encode(Image.new("RGB", (8, 8))), "content_image", min_side_px=0).size == (8, 8)


def test_broken_files_are_clear_errors():
    jpeg = encode(marker_image(64, 48), "JPEG")
    assert "truncated or corrupt JPEG" in refusal(jpeg[:-100])
    assert "truncated or corrupt header" in refusal(jpeg[:100])
    png = bytearray(encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))))
    png[60:70] = b"\0" * 10                                       # inside the IDAT
    assert "truncated or corrupt PNG" in refusal(bytes(png))
    assert "truncated or corrupt PNG" in refusal(encode(marker_image())[:-40])
    assert "not an image" in refusal(b"definitely not an image")
    assert "is empty" in refusal(b"")


def test_unconvertible_mode_is_a_clear_error():
    with pytest.raises(ValueError):
        to_rgb(Image.new("La", (20, 20)))


# ------------------------------------------------------------------------------ alpha re-attachment

def test_content_alpha_can_be_reattached_to_the_result():
    rgba = Image.new("RGBA", (96, 72), (10, 20, 30, 255))
    rgba.paste((10, 20, 30, 0), (0, 0, 24, 72))                    # left quarter transparent
    rgb, alpha = decode_image_and_alpha(encode(rgba), "content_image")
    assert rgb.size == alpha.size == (96, 72) and alpha.mode == "L"
    result = np.asarray(resize_to_max_side(rgb, 64))               # stands in for the generated image
    out = Image.open(io.BytesIO(encode_png_with_alpha(result, alpha)))
    assert out.mode == "RGBA" and out.size == (64, 48)
    channel = np.asarray(out)[..., 3]
    assert (channel[:, :12] == 0).all() and (channel[:, 20:] == 255).all()      # Lanczos edge: 3 px
    assert (np.asarray(out)[..., :3] == result).all()


def test_opaque_images_have_no_alpha():
    assert decode_image_and_alpha(encode(Image.new("RGBA", (20, 20), (1, 2, 3, 255))), "x")[1] is None
    assert decode_image_and_alpha(encode(Image.new("RGB", (20, 20))), "x")[1] is None
    array = np.zeros((20, 20, 3), np.uint8)
    assert Image.open(io.BytesIO(encode_png_with_alpha(array, None))).mode == "RGB"


# ------------------------------------------------------------------------------------ through the server

@pytest.fixture(scope="session")
def cases():
    path = shared_dir() / "cases"
    if not path.is_dir():
        pytest.skip(f"case files not found: {path} (set NST_SHARED_DIR)")
    return path


def run_job(client: NSTClient, request: pb.StylizeRequest) -> tuple[pb.Result, np.ndarray]:
    events = list(client.stream(request))
    result = events[-1].result
    assert events[-1].WhichOneof("event") == "result"
    assert result.stop_reason == pb.STOP_REASON_ITERATIONS_DONE
    assert all(math.isfinite(v) for v in (result.costs.content, result.costs.style, result.costs.total))
    image = Image.open(io.BytesIO(result.image_png))
    assert image.mode == "RGB" and image.size == (result.width_px, result.height_px)
    return result, np.asarray(image).astype(int)


def echo_request(content: bytes, style: bytes, side: int) -> pb.StylizeRequest:
    """A job whose result is the content as the server decoded it: starts from the content image, one
    scale, no style cost, one iteration (the content cost is ~0 there, so the image barely moves)."""
    return pb.StylizeRequest(content_image=content, style_image=style, max_side_px=side, iterations=1,
                             init=pb.INIT_CONTENT, scales=1, style_weight=0.0, seed=0)


def stylize_request(content: bytes, style: bytes, side: int = 48) -> pb.StylizeRequest:
    return pb.StylizeRequest(content_image=content, style_image=style, max_side_px=side, iterations=2,
                             scales=1, seed=0)


def expect_invalid(client: NSTClient, request: pb.StylizeRequest, field: str, *texts: str) -> NSTError:
    """The call fails with INVALID_ARGUMENT, the message names ``field`` and each of ``texts``, and a
    google.rpc.BadRequest field violation names ``field``."""
    with pytest.raises(NSTError) as error:
        list(client.stream(request))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT, error.value
    assert error.value.details.startswith(field), error.value.details
    for text in texts:
        assert text in error.value.details
    assert [name for name, _ in error.value.field_violations] == [field]
    assert all(text in error.value.field_violations[0][1] for text in texts)
    return error.value


def test_case_exif_orientation_6_comes_out_rotated(client, cases):
    """Stored 96x72 with orientation 6: a viewer shows it 72x96, turned 90 degrees clockwise."""
    data = (cases / "exif_orientation_6.jpg").read_bytes()
    style = (cases / "style_square_150.jpg").read_bytes()
    result, array = run_job(client, echo_request(data, style, 64))
    assert (result.width_px, result.height_px) == (48, 64)
    stored = Image.open(io.BytesIO(data)).convert("RGB")
    clockwise = np.asarray(resize_to_max_side(stored.transpose(Image.Transpose.ROTATE_270), 64)).astype(int)
    anticlockwise = np.asarray(resize_to_max_side(stored.transpose(Image.Transpose.ROTATE_90), 64)).astype(int)
    assert np.abs(array - clockwise).mean() < 2 < 20 < np.abs(array - anticlockwise).mean()
    result, _ = run_job(client, stylize_request(data, style))
    assert (result.width_px, result.height_px) == (36, 48)


@pytest.mark.parametrize("name", ["gray_L.jpg", "gray_LA.png"])
def test_case_grey_images_decode_to_grey_rgb(client, cases, name):
    data = (cases / name).read_bytes()
    style = (cases / "style_square_150.jpg").read_bytes()
    result, array = run_job(client, echo_request(data, style, 64))
    assert (result.width_px, result.height_px) == (64, 48)
    assert np.abs(array - array[..., :1]).max() <= 1                              # R = G = B
    grey = np.asarray(resize_to_max_side(Image.open(io.BytesIO(data)).convert("L"), 64)).astype(int)
    assert np.abs(array[..., 0] - grey).mean() < 2
    run_job(client, stylize_request(style, data))                                 # as the style image


def test_case_rgba_transparent_left_is_white_there(client, cases):
    data = (cases / "rgba_transparent_left.png").read_bytes()
    alpha = np.asarray(Image.open(io.BytesIO(data)))[..., 3]
    assert (alpha[:, :24] == 0).all() and (alpha[:, 24:] == 255).all()           # what the file is
    style = (cases / "style_square_150.jpg").read_bytes()
    result, array = run_job(client, echo_request(data, style, 96))
    assert (result.width_px, result.height_px) == (96, 72)
    assert (array[:, :22] >= 250).all()                                          # white, not black
    opaque = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)[:, 26:]
    assert np.abs(array[:, 26:] - opaque).mean() < 2
    run_job(client, stylize_request(style, data))


def test_case_square_style_with_landscape_content(client, cases):
    style = (cases / "style_square_150.jpg").read_bytes()
    content = (cases / "gray_L.jpg").read_bytes()
    result, array = run_job(client, stylize_request(content, style, 64))
    assert (result.width_px, result.height_px) == (64, 48)
    assert np.abs(array - array[..., :1]).max() > 10                              # the style's colours
    result, _ = run_job(client, stylize_request(style, content, 32))
    assert (result.width_px, result.height_px) == (32, 32)


@pytest.mark.parametrize("field", ["content_image", "style_image"])
def test_case_tiny_12x12_is_refused_naming_the_field_and_16_px(client, cases, field):
    tiny = (cases / "tiny_12x12.png").read_bytes()
    other = (cases / "style_square_150.jpg").read_bytes()
    images = {"content_image": other, "style_image": other, field: tiny}
    request = pb.StylizeRequest(max_side_px=32, iterations=2, **images)
    expect_invalid(client, request, field, "12x12 px", "at least 16 px")


def test_synthetic_refusals_through_the_server(client, small_images):
    content, style = small_images
    expect_invalid(client, stylize_request(raw_png(100_000, 100_000, 8, 2), style), "content_image",
                   "over the limit of 40000000 pixels")
    expect_invalid(client, stylize_request(content, raw_png(8000, 6000, 8, 2)), "style_image",
                   "over the limit of 40000000 pixels")
    jpeg = encode(marker_image(64, 48), "JPEG")
    expect_invalid(client, stylize_request(jpeg[: len(jpeg) // 2], style), "content_image", "truncated")
    expect_invalid(client, stylize_request(b"", style), "content_image", "is empty")
    # A request field out of range, and an engine check without an explicit field (its message starts
    # with the field's name): a 64x48 content at max_side_px=16 would be 16x12.
    expect_invalid(client, stylize_request(content, style, side=100_000), "max_side_px", "4096")
    expect_invalid(client, stylize_request(content, style, side=16), "max_side_px", "16 px")
    # The style image would be resized to 512 x 9 = 4608 px, over the server's 4096 px limit.
    huge_style = stylize_request(content, style, side=512)
    huge_style.style_scale = 9.0
    expect_invalid(client, huge_style, "style_scale", "4608 px", "4096 px")
    huge_style.style_scale = 1e307                 # 512 x 1e307 overflows a float: still a refusal, not a crash
    expect_invalid(client, huge_style, "style_scale", "16384 px")
    # The server lives on.
    run_job(client, stylize_request(content, style, 32))


def test_synthetic_modes_through_the_server(client, small_images):
    _, style = small_images
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((250, 0, 0), (0, 250, 0))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    _, array = run_job(client, echo_request(gif, style, 40))
    assert (np.abs(array - (250, 0, 0)) <= 8).all()                              # the first frame
    cmyk = encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)
    _, array = run_job(client, echo_request(cmyk, style, 40))
    assert (np.abs(array - (255, 0, 0)) <= 8).all()
    sixteen = encode(Image.fromarray(np.full((30, 40), 32768, np.uint16)))
    _, array = run_job(client, echo_request(sixteen, style, 40))
    assert (np.abs(array - 128) <= 1).all()


# ------------------------------------------------------------------- limits from the server's configuration

RECEIVE_LIMIT = 200_000


@pytest.fixture(scope="module")
def small_server(onnx_path):
    """A second server with small limits: 200000-byte requests, max_side_px 48, 100000 input pixels."""
    from nst_tools.demo import start_server, stop_server
    process, target = start_server(onnx_path, ["--max-receive-message-bytes", str(RECEIVE_LIMIT),
                                               "--max-side-px", "48", "--max-input-pixels", "100000"])
    try:
        with NSTClient(target, timeout_s=300) as client:
            yield client
    finally:
        stop_server(process)


def test_oversize_request_is_resource_exhausted_naming_both_sizes(small_server):
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8)   # ~120 kB as PNG
    data = encode(Image.fromarray(noise))
    request = stylize_request(data, data)
    assert request.ByteSize() > RECEIVE_LIMIT
    with pytest.raises(NSTError) as error:
        list(small_server.stream(request))
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # gRPC core's text: "Received message larger than max (<request bytes> vs. <limit bytes>)".
    sizes = re.search(r"\((\d+) vs\. (\d+)\)", error.value.details)
    assert sizes, error.value.details
    assert int(sizes.group(1)) == request.ByteSize() and int(sizes.group(2)) == RECEIVE_LIMIT
    assert small_server.health() == "SERVING"


def test_configured_output_and_pixel_limits(small_server, small_images):
    content, style = small_images
    expect_invalid(small_server, stylize_request(content, style, side=64), "max_side_px", "48 px")
    black = encode(Image.new("RGB", (400, 300)))                                  # 429 bytes, 120000 px
    expect_invalid(small_server, stylize_request(black, style), "content_image",
                   "400x300 = 120000 pixels", "limit of 100000 pixels")
    result, _ = run_job(small_server, stylize_request(content, style, side=48))
    assert (result.width_px, result.height_px) == (48, 36)
