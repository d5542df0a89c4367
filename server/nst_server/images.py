"""Decoding, resizing and encoding of images at the service's edge (Pillow does the work).

Contract: every decoded image becomes 8-bit RGB, upright (EXIF orientation applied), transparent pixels
composited over a white background (``ALPHA_BACKGROUND``); animated images use their first frame.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

#: Background that transparent pixels are composited over (RGB, 0..255).
ALPHA_BACKGROUND = (255, 255, 255)

#: Default pixel budget for one encoded input (width x height, checked from the header before decoding).
DEFAULT_MAX_INPUT_PIXELS = 40_000_000


class ImageInputError(ValueError):
    """An input image that cannot be used; ``field`` names the request field, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def decode_image(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Image.Image:
    """Decode encoded bytes (any format Pillow reads) into an upright 8-bit RGB image.

    Args:
        data: the encoded file (PNG, JPEG, WebP, GIF, TIFF, BMP …).
        field: the request field name, used in error messages.
        max_pixels: refuse images whose header announces more pixels than this (decompression bombs).
    Returns:
        ``PIL.Image.Image`` in mode ``RGB``.
    Raises:
        ImageInputError: empty, undecodable, or over the pixel budget.
    """
    if not data:
        raise ImageInputError(field, "is empty; send the encoded image bytes (PNG or JPEG)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageInputError(field, f"is {width}x{height} = {width * height} pixels, over the limit "
                                             f"of {max_pixels} pixels")
            image.seek(0)                                  # first frame of an animation
            image.load()
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(field, f"refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError …
        raise ImageInputError(field, f"cannot be decoded as an image ({type(exc).__name__}: {exc})") from None
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha (RGBA, LA, PA, P with transparency) is composited over
    :data:`ALPHA_BACKGROUND`; 16-bit and float modes are scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = 1.0 if array.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_to_max_side(image: Image.Image, max_side_px: int) -> Image.Image:
    """Resize (Lanczos) so that the longer side is ``max_side_px``, keeping the aspect ratio; the shorter side
    is rounded and at least 1 px."""
    width, height = image.size
    scale = max_side_px / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
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
