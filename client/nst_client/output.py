"""Where the CLI writes pictures and reports: checked before a job is submitted, written in the format the file's
suffix names (Pillow encodes), and never lost once the job is done.

A job can run for minutes; finding out afterwards that ``-o`` names a missing folder or a format nobody asked
for throws that work away. So :func:`check_output` runs before the request is sent, and :func:`write_image`
falls back to a file in the temporary folder, whose path the CLI prints, when writing still fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from nst_proto.files import atomic_write_bytes

#: Suffix -> Pillow format of the pictures the CLI writes.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
#: Formats that keep an alpha channel (``--keep-content-alpha``).
ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})
#: Formats whose ``--quality`` (1 … 100, Pillow's scale) applies.
LOSSY_FORMATS = frozenset({"JPEG", "WEBP"})
#: JPEG and WebP quality when ``--quality`` is not given.
DEFAULT_QUALITY = 95


def image_format(path: str | os.PathLike, option: str = "-o") -> str:
    """The Pillow format that ``path``'s suffix names (case-insensitive).

    Raises:
        ValueError: a suffix the CLI does not write, naming ``option`` and the suffixes it does.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{option} {path}: {suffix or 'no suffix'} is not a picture format the CLI writes; "
                         f"use one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def check_writable(path: str | os.PathLike, option: str = "-o") -> None:
    """``path`` can be created or replaced: its folder exists, is a folder and is writable, and ``path`` is not
    itself a folder.

    Raises:
        ValueError: naming ``option``, the path and what is wrong.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {folder} is not writable")
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; name a file")


def check_output(path: str | os.PathLike, keep_alpha: bool = False, option: str = "-o") -> str:
    """Everything that can be checked about the result's file before the job runs; returns its format.

    Raises:
        ValueError: as :func:`image_format` and :func:`check_writable`, or an alpha result asked for in a
            format without alpha (JPEG).
    """
    fmt = image_format(path, option)
    if keep_alpha and fmt not in ALPHA_FORMATS:
        raise ValueError(f"{option} {path}: --keep-content-alpha needs a format with transparency "
                         f"(.png, .webp, .tif), not {fmt}")
    check_writable(path, option)
    return fmt


def encode(png: bytes, fmt: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """The server's PNG bytes re-encoded as ``fmt`` (PNG: unchanged). JPEG has no alpha: an RGBA picture is
    composited over white first."""
    if fmt == "PNG":
        return png
    image = Image.open(io.BytesIO(png))
    if fmt == "JPEG" and image.mode != "RGB":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A") if "A" in image.getbands() else None)
        image = background
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt in LOSSY_FORMATS else {}
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_image(png: bytes, path: str | os.PathLike, fmt: str, quality: int = DEFAULT_QUALITY
                ) -> tuple[Path, OSError | None]:
    """Write the picture to ``path`` in ``fmt``; when that fails, write the PNG to a new file in the temporary
    folder instead. Both writes are atomic (:mod:`nst_proto.files`): a failed write leaves an older file at
    ``path`` as it was and no partial or temporary file behind.

    Returns:
        ``(path written, None)``, or ``(fallback path, the error that stopped the first write)``.
    Raises:
        OSError: the fallback could not be written either; its message names both errors and says that the
            result was not saved.
    """
    try:
        return atomic_write_bytes(path, encode(png, fmt, quality)), None
    except OSError as error:
        handle, fallback = tempfile.mkstemp(prefix=f"nst-result-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".png")
        os.close(handle)                    # the name is taken; the bytes go in atomically
        try:
            atomic_write_bytes(fallback, png)
        except BaseException as fallback_error:
            with contextlib.suppress(OSError):
                os.unlink(fallback)
            if not isinstance(fallback_error, OSError):
                raise
            raise OSError(fallback_error.errno, f"cannot write {path} ({error}), nor a fallback file in "
                          f"{os.path.dirname(fallback)} ({fallback_error.strerror or fallback_error}); "
                          "the result was not saved") from fallback_error
        return Path(fallback), error
