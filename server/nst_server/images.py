"""Decoding, resizing and encoding of images at the service's edge (Pillow does the work).

The input contract (docs/api.md, "Inputs, limits and errors"):

- any format Pillow reads (PNG, JPEG, WebP, GIF, TIFF, BMP …); animated or multi-page files (GIF, APNG,
  WebP, TIFF) use their **first frame** only;
- the size in the file's header is checked before the pixels are decoded: more than ``max_pixels``
  (width x height) is refused (decompression bombs), and so is a shorter side under ``min_side_px`` (16 px,
  VGG-19's minimum; small images are not upscaled behind the user's back);
- EXIF orientation is applied, so width and height are those a photo viewer shows;
- every mode becomes 8-bit sRGB: 1, L, P, RGB, CMYK, YCbCr, LAB, HSV, 16-bit (I;16*), 32-bit integer (I) and
  float (F) grey levels; an embedded ICC profile (RGB, RGBA, CMYK) is converted to sRGB;
- transparency (RGBA, LA, PA, P or L/RGB with a tRNS colour, 16-bit grey with tRNS) is composited over
  :data:`ALPHA_BACKGROUND` (white, as a web page shows a transparent image); :func:`decode_image_and_alpha`
  also returns the alpha channel so that :func:`encode_png_with_alpha` can put it back on the result;
- metadata never makes a decodable picture unusable: a PNG whose text, EXIF or ICC chunks Pillow refuses
  (e.g. a compressed text chunk over ``PngImagePlugin.MAX_TEXT_CHUNK``, Pillow's guard against text bombs)
  is decoded again without its metadata chunks, and EXIF that cannot be read leaves the image as stored;
  both are logged. The pixel budget and the decompression-bomb guard stay;
- a truncated, corrupt or unreadable file is an :class:`~nst_server.errors.ImageInputError` (the servicer's
  INVALID_ARGUMENT),
  never a crash.
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from nst_export.vgg import MIN_SIDE_PX
from nst_server.errors import ImageInputError

#: Background that transparent pixels are composited over (RGB, 0..255): white.
ALPHA_BACKGROUND = (255, 255, 255)

#: Default pixel budget for one encoded input (width x height, checked from the header before decoding).
DEFAULT_MAX_INPUT_PIXELS = 40_000_000

#: Smallest accepted side of an input image, px: VGG-19's minimum (relu5_1 sits behind four 2x2 poolings).
MIN_INPUT_SIDE_PX = MIN_SIDE_PX

#: PNG chunks that carry metadata only (PNG specification, 3rd edition, section 11.3: textual data, EXIF,
#: the ICC profile, the time of last change): dropped when the file cannot be decoded with them.
PNG_METADATA_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"iCCP", b"tIME"})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

log = logging.getLogger(__name__)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def open_image(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
               min_side_px: int = MIN_INPUT_SIDE_PX) -> Image.Image:
    """Decode the first frame of encoded bytes, upright, in the file's own mode (no conversion yet).

    The header's width and height are checked against ``max_pixels`` and ``min_side_px`` before any pixel is
    decoded. Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, 89.5 M; an error above twice
    that) still applies, so budgets above 179 M pixels have no effect.

    Args:
        data: the encoded file (PNG, JPEG, WebP, GIF, TIFF, BMP …).
        field: the request field name, used in error messages (``content_image``, ``style_image`` …).
        max_pixels: pixel budget, width x height from the header.
        min_side_px: smallest accepted shorter side, px (0 turns the check off).
    Returns:
        A loaded ``PIL.Image.Image``, EXIF orientation applied (``size`` is as a photo viewer shows it).
    Raises:
        ImageInputError: empty, not an image, over the pixel budget, under the minimum side, truncated or
            corrupt.
    """
    if not data:
        raise ImageInputError(field, "is empty; send the encoded image bytes (PNG or JPEG)")
    try:
        return _open_image(data, field, max_pixels, min_side_px)
    except ImageInputError as error:
        if error.over_limit:
            raise
        stripped, dropped = without_png_metadata(data)
        if not dropped:
            raise
        try:
            image = _open_image(stripped, field, max_pixels, min_side_px)
        except ImageInputError:
            raise error from None
        log.warning("%s: decoded without its PNG metadata chunks %s, which Pillow refused (%s)", field,
                    ", ".join(dropped), error.reason)
        return image


def without_png_metadata(data: bytes) -> tuple[bytes, list[str]]:
    """``data`` without its :data:`PNG_METADATA_CHUNKS`, and the types of the chunks dropped, in order.

    Chunks are walked by their length fields (PNG specification, section 5.3: length, type, data, CRC); the
    image chunks are copied byte for byte, so the pixels and their checksums are untouched. Anything that is
    not a PNG comes back unchanged with ``[]``.
    """
    if not data.startswith(PNG_SIGNATURE):
        return data, []
    kept, dropped, position = [PNG_SIGNATURE], [], len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        end = position + 12 + length
        if kind in PNG_METADATA_CHUNKS:
            dropped.append(kind.decode("latin-1"))
        else:
            kept.append(data[position:end])
        position = end
        if kind == b"IEND":
            break
    return b"".join(kept), dropped


def _open_image(data: bytes, field: str, max_pixels: int, min_side_px: int) -> Image.Image:
    """:func:`open_image` on one encoding of the file."""
    try:
        image = Image.open(io.BytesIO(data))                  # reads the header only
    except Image.DecompressionBombError as exc:             # over twice Image.MAX_IMAGE_PIXELS
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        raise ImageInputError(field, f"is over the limit of {limit} pixels, checked before decoding ({exc})",
                              over_limit=True) from None
    except UnidentifiedImageError:
        raise ImageInputError(field, "is not an image in a format the server reads (PNG, JPEG, WebP, GIF, "
                                     "TIFF, BMP …)") from None
    except Exception as exc:  # noqa: BLE001 - a plugin may raise anything on a malformed header
        raise ImageInputError(field, f"cannot be decoded: truncated or corrupt header ({type(exc).__name__}: "
                                     f"{exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageInputError(field, f"is {width}x{height} = {width * height} pixels, over the limit of "
                                     f"{max_pixels} pixels (checked before decoding)", over_limit=True)
    if min(width, height) < min_side_px:
        raise ImageInputError(field, f"is {width}x{height} px; its shorter side must be at least {min_side_px} "
                                     f"px (VGG-19 pools 4 times before relu5_1); an image under {min_side_px} px "
                                     f"is not upscaled to it, send a larger one", over_limit=True)
    try:
        image.seek(0)                  # the first frame of an animation, the first page (n_frames is not read:
        image.load()                   # counting a GIF's frames walks through all of them)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, EOFError …
        raise ImageInputError(field, f"cannot be decoded: truncated or corrupt {image.format or 'image'} data "
                                     f"({type(exc).__name__}: {exc})") from None
    try:
        return ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed EXIF: the picture is still good, as stored
        log.warning("%s: EXIF orientation not applied, the EXIF block cannot be read (%s: %s)", field,
                    type(exc).__name__, exc)
        return image


def decode_image(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
                 min_side_px: int = MIN_INPUT_SIDE_PX) -> Image.Image:
    """Decode encoded bytes into an upright 8-bit sRGB image (see the module's contract).

    Args:
        data, field, max_pixels, min_side_px: as in :func:`open_image`.
    Returns:
        ``PIL.Image.Image`` in mode ``RGB``, transparent pixels composited over :data:`ALPHA_BACKGROUND`.
    Raises:
        ImageInputError: as :func:`open_image`, or a mode that cannot be converted.
    """
    return _converted(open_image(data, field, max_pixels, min_side_px), field, to_rgb)


def decode_image_and_alpha(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
                           min_side_px: int = MIN_INPUT_SIDE_PX) -> tuple[Image.Image, Image.Image | None]:
    """:func:`decode_image` plus the image's alpha channel (decoded once).

    Returns:
        ``(rgb, alpha)``: ``rgb`` as :func:`decode_image`; ``alpha`` a mode ``L`` image of the same size
        (0 transparent … 255 opaque, upright), or ``None`` when the image has no alpha or is fully opaque.
    Raises:
        ImageInputError: as :func:`decode_image`.
    """
    image = open_image(data, field, max_pixels, min_side_px)
    return _converted(image, field, to_rgb), _converted(image, field, alpha_channel)


def _converted(image: Image.Image, field: str, convert):
    try:
        return convert(image)
    except Exception as exc:  # noqa: BLE001 - an unusual mode, a broken palette …
        raise ImageInputError(field, f"cannot be converted to RGB (mode {image.mode}: {type(exc).__name__}: "
                                     f"{exc})") from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _grey_levels_to_8bit(array: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels of a 16-bit, 32-bit integer or float image, ``(H, W)``, to ``(H, W)`` uint8.

    Unsigned 16-bit modes (I;16, I;16L, I;16B, I;16N) are 16-bit levels (x 255 / 65535). Otherwise the value
    range decides: 0..1 floats (mode F) x 255; 0..255 as they are; 0..65535 as 16-bit levels (how 16-bit PNG,
    TIFF and PGM files arrive in mode I); anything else (negative, larger) is stretched from its minimum to
    its maximum. NaN and infinities become 0.
    """
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N") or (low >= 0.0 and 255.0 < high <= 65535.0):
        scaled = values * (255.0 / 65535.0)
    elif mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    else:
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey modes to ``L`` (``LA`` when a tRNS grey level marks
    transparency); other modes are returned as they are."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    array = np.asarray(image)                                  # (H, W) uint16 / int32 / float32
    grey = Image.fromarray(_grey_levels_to_8bit(array, image.mode), "L")
    if "transparency" in image.info:
        opaque = np.where(array == image.info["transparency"], 0, 255).astype(np.uint8)
        return Image.merge("LA", (grey, Image.fromarray(opaque, "L")))
    return grey


def _icc_to_srgb(image: Image.Image) -> Image.Image:
    """Convert an RGB, RGBA or CMYK image with an embedded ICC profile to sRGB (perceptual intent, alpha
    kept); without a profile, or when the profile cannot be used (broken, another colour space), the image
    is returned as it is and Pillow's plain conversion follows."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGBA" if image.mode == "RGBA" else "RGB")
    except Exception:  # noqa: BLE001 - ImageCms.PyCMSError, OSError on a broken or mismatched profile
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit sRGB.

    1, L, P, CMYK, YCbCr, LAB, HSV go through Pillow's conversions (CMYK naively, unless an ICC profile is
    embedded); 16-bit, 32-bit integer and float grey levels are scaled to 8 bits (see
    :func:`_grey_levels_to_8bit`); an embedded ICC profile is converted to sRGB; alpha (RGBA, LA, PA, P or
    L/RGB/I;16 with a tRNS entry) is composited over :data:`ALPHA_BACKGROUND` in 8-bit sRGB levels (as
    browsers do).

    Returns:
        ``PIL.Image.Image`` in mode ``RGB``, same size.
    Raises:
        ValueError: a mode Pillow cannot convert (e.g. premultiplied ``La``).
    """
    image = _to_8bit(image)
    if _has_alpha(image):
        image = image.convert("RGBA")                       # keeps info["icc_profile"]
    elif image.mode not in ("RGB", "CMYK"):                 # CMYK meets its profile before RGB
        image = image.convert("RGB")
    image = _icc_to_srgb(image)
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The alpha channel of an image in any mode, as mode ``L`` (0 transparent … 255 opaque), same size;
    ``None`` when the image has no alpha or every pixel is opaque.

    Raises:
        ValueError: a mode Pillow cannot convert.
    """
    image = _to_8bit(image)
    if not _has_alpha(image):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return None if alpha.getextrema() == (255, 255) else alpha


def encode_png_with_alpha(array: np.ndarray, alpha: Image.Image | None) -> bytes:
    """Re-attach a content image's alpha to a generated image: ``(H, W, 3)`` uint8 RGB plus ``alpha`` (mode
    ``L``, any size: resized to ``(W, H)`` with Lanczos, as :func:`resize_to_max_side` resized the content)
    to RGBA PNG bytes; plain RGB PNG (:func:`encode_png`) when ``alpha`` is ``None``.

    The RGB under transparent pixels is the stylised :data:`ALPHA_BACKGROUND`; a viewer that honours alpha
    hides it. Raises ValueError when ``array`` is not ``(H, W, 3)`` uint8.
    """
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {array.shape} {array.dtype}")
    if alpha is None:
        return encode_png(array)
    height, width = array.shape[:2]
    alpha = alpha.convert("L")
    if alpha.size != (width, height):
        alpha = alpha.resize((width, height), Image.Resampling.LANCZOS)
    rgba = Image.fromarray(array, "RGB")
    rgba.putalpha(alpha)
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    return buffer.getvalue()


def fitted_size(width: int, height: int, max_side_px: int) -> tuple[int, int]:
    """``(width, height)`` scaled so that the longer side is ``max_side_px``, keeping the aspect ratio; the shorter
    side is rounded and at least 1 px (the size :func:`resize_to_max_side` gives)."""
    scale = max_side_px / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_to_max_side(image: Image.Image, max_side_px: int) -> Image.Image:
    """Resize (Lanczos) so that the longer side is ``max_side_px``, keeping the aspect ratio; the shorter side
    is rounded and at least 1 px."""
    size = fitted_size(*image.size, max_side_px)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image to ``(1, 3, H, W)`` float32 in [0, 1]."""
    array = np.array(image, dtype=np.uint8)                   # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).float().div_(255.0).contiguous()


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` float pixel levels in [0, 255] to ``(H, W, 3)`` uint8, rounding to nearest."""
    return pixels[0].detach().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def encode_png(array: np.ndarray) -> bytes:
    """``(H, W, 3)`` uint8 RGB to PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _lanczos3(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


@functools.lru_cache(maxsize=16)
def lanczos_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """The ``(out_size, in_size)`` float32 matrix of Pillow's Lanczos (a = 3) resampling along one axis.

    Row ``i`` holds the weights of output sample ``i`` (centre ``(i + 0.5) * in/out`` in input coordinates, the
    kernel stretched by ``in/out`` when downsampling, weights normalised to sum 1), as Pillow's ``ImagingResample``
    computes them, so ``R_h @ x @ R_w^T`` is Pillow's ``resize(..., LANCZOS)`` of a float image without its 8-bit
    rounding, and is differentiable. Source: Pillow, ``src/libImaging/Resample.c`` (``precompute_coeffs``).
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 3.0 * filter_scale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        low, high = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        taps = _lanczos3((np.arange(low, high) - center + 0.5) / filter_scale)
        matrix[i, low:high] = taps / taps.sum() if taps.sum() != 0 else 0.0
    return torch.from_numpy(matrix.astype(np.float32))


def resize_lanczos(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``pixels`` ``(B, C, H, W)`` resized to ``size`` ``(H', W')`` with Pillow's Lanczos filter
    (:func:`lanczos_matrix`), differentiable; values may overshoot the input's range, as Lanczos does."""
    rows = lanczos_matrix(size[0], pixels.shape[2]).to(pixels.device)          # (H', H)
    cols = lanczos_matrix(size[1], pixels.shape[3]).to(pixels.device)          # (W', W)
    return torch.matmul(torch.matmul(rows, pixels.float()), cols.t())
