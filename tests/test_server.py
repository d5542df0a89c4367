"""End to end through a real nst-server process on 127.0.0.1 (port 0)."""

import io

import grpc
import pytest
from PIL import Image

from nst_client import NSTError, build_request
from nst_server.precision import default_precision


def test_health_and_model_info(client):
    assert client.health() == "SERVING"
    assert client.health("nst.v1.StyleTransfer") == "SERVING"
    info = client.model_info()
    assert list(info.output_layers) == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]
    assert "CPUExecutionProvider" in info.execution_providers
    assert len(info.weights_sha256) == 64 and info.min_side_px == 16
    assert (info.precision, info.precision_reason) == default_precision("cpu")
    assert set(info.supported_precisions) == {"auto", "fp32", "bf16", "fp16"}
    assert (info.max_running_jobs, info.max_queued_jobs) == (1, 4) and info.max_iterations > 0


def test_stream_of_a_64px_job(client, small_images):
    content, style = small_images
    events = list(client.stream(build_request(content, style, max_side_px=64, iterations=6)))
    kinds = [m.WhichOneof("event") for m in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    assert set(kinds[1:-1]) == {"progress"}
    iterations = [m.progress.iteration for m in events[1:-1]]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 6      # strictly increasing
    result = events[-1].result
    image = Image.open(io.BytesIO(result.image_png))
    assert image.size == (64, 48) == (result.width_px, result.height_px)
    assert image.mode == "RGB"


def test_client_stylize_writes_png(client, small_images, tmp_path):
    content, style = small_images
    result = client.stylize(content, style, max_side_px=32, iterations=3, seed=1)
    result.save(tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").size == (32, 24)
    assert result.stop_reason == "STOP_REASON_ITERATIONS_DONE" and len(result.progress) == 3


@pytest.mark.parametrize("options,field", [
    ({"max_side_px": 8}, "max_side_px"),
    ({"max_side_px": 100000}, "max_side_px"),
    ({"iterations": 10**6}, "iterations"),
    ({"style_weight": -1.0}, "style_weight"),
])
def test_out_of_range_fields_are_invalid_argument(client, small_images, options, field):
    with pytest.raises(NSTError) as error:
        client.stylize(*small_images, **options)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details


def test_undecodable_image_is_invalid_argument_and_server_lives_on(client, small_images):
    with pytest.raises(NSTError) as error:
        client.stylize(b"definitely not an image", small_images[1], max_side_px=32, iterations=2)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "content_image" in error.value.details
    with pytest.raises(NSTError) as error:
        client.stylize(small_images[0], b"", max_side_px=32, iterations=2)
    assert "style_image" in error.value.details
    assert client.stylize(*small_images, max_side_px=32, iterations=2).width_px == 32


def test_keep_content_alpha_returns_rgba_with_the_content_transparency(client, small_images):
    import numpy as np
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 180
    rgba[:, 32:, 3] = 255                                  # left half transparent, right half opaque
    from conftest import encode
    content = encode(Image.fromarray(rgba, "RGBA"))
    result = client.stylize(content, small_images[1], max_side_px=32, iterations=2, keep_content_alpha=True)
    image = Image.open(io.BytesIO(result.image_png))
    assert image.mode == "RGBA" and image.size == (32, 24)
    alpha = np.asarray(image)[..., 3]
    assert alpha[:, :14].max() < 20 and alpha[:, 18:].min() > 235
    plain = client.stylize(content, small_images[1], max_side_px=32, iterations=2)
    assert Image.open(io.BytesIO(plain.image_png)).mode == "RGB"


@pytest.fixture(scope="module")
def chunking_server(onnx_path):
    from nst_tools.demo import start_server, stop_server
    process, target = start_server(onnx_path, ["--result-chunk-bytes", "1000"])
    try:
        yield target
    finally:
        stop_server(process)


def test_large_results_arrive_in_chunks_and_reassemble(chunking_server, small_images):
    from nst_client import NSTClient
    with NSTClient(chunking_server, timeout_s=300) as client:
        messages = list(client.stream(build_request(*small_images, max_side_px=64, iterations=2)))
        chunks = [m.image_chunk for m in messages if m.WhichOneof("event") == "image_chunk"]
        result = messages[-1].result
        assert len(chunks) >= 2 and all(len(c.data) <= 1000 for c in chunks)
        assert [c.offset for c in chunks] == [k * 1000 for k in range(len(chunks))]
        assert result.image_png == b"" and chunks[0].total_bytes == sum(len(c.data) for c in chunks)
        whole = client.stylize(*small_images, max_side_px=64, iterations=2)
        assert Image.open(io.BytesIO(whole.image_png)).size == (64, 48)
        assert len(whole.image_png) == chunks[0].total_bytes
