"""Another language calls the API: tests/node/nst_contract.mjs drives the real server of the ``server`` fixture
from Node.js with @grpc/grpc-js, loading proto/nst/v1/style_transfer.proto at run time (no generated code). One
small job streamed to its Result (the PNG reassembled and its IHDR read), and refusals whose google.rpc.BadRequest
the script decodes from the grpc-status-details-bin trailer. Skips when ``node`` or tests/node/node_modules is
absent (install: ``npm ci --prefix tests/node``; .ci/run does it when npm is on PATH)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

NODE_DIR = Path(__file__).resolve().parent / "node"
SCRIPT = NODE_DIR / "nst_contract.mjs"
NODE = shutil.which("node")
TIMEOUT_S = 120

# Marks, not a fixture's pytest.skip: they act before the server fixture exports the model and starts a server.
pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not on PATH: install Node.js >= 18 to run the Node.js client "
                                            "test"),
    pytest.mark.skipif(not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
                       reason=f"{NODE_DIR / 'node_modules'} is absent: install it with `npm ci --prefix tests/node`"),
]


@pytest.fixture()
def images(tmp_path, small_images) -> tuple[Path, Path]:
    """The synthetic 64x48 content and 48x48 style PNGs of conftest, as files for the script."""
    content, style = tmp_path / "content.png", tmp_path / "style.png"
    content.write_bytes(small_images[0])
    style.write_bytes(small_images[1])
    return content, style


def run_node(command: str, target: str, images: tuple[Path, Path], *extra: str) -> dict:
    completed = subprocess.run([NODE, str(SCRIPT), command, "--target", target, "--content", str(images[0]),
                                "--style", str(images[1]), *extra],
                               capture_output=True, text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 0, f"exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
    return json.loads(completed.stdout)


def test_node_client_streams_a_job_to_its_result(server, images, tmp_path):
    out = tmp_path / "result.png"
    summary = run_node("stylize", server, images, "--side", "32", "--iterations", "3", "--out", str(out))
    assert summary["problems"] == [], summary
    assert summary["status"]["name"] == "OK" and summary["error"] is None, summary
    assert summary["model"]["max_side_px"] >= 32 and "relu4_2" in summary["model"]["output_layers"]
    assert summary["events"]["accepted"] == 1 and summary["events"]["result"] == 1
    assert summary["progress_iterations"] == [1, 2, 3]
    result = summary["result"]
    assert (result["width_px"], result["height_px"]) == (32, 24)               # the 64x48 content at 32 px
    assert result["iterations"] == 3 and result["stop_reason"] == "STOP_REASON_ITERATIONS_DONE"
    png = summary["png"]
    assert png["is_png"] and (png["ihdr_width"], png["ihdr_height"]) == (32, 24), png
    with Image.open(io.BytesIO(out.read_bytes())) as image:                    # the bytes Node received decode
        assert image.format == "PNG" and image.size == (32, 24) and image.mode == "RGB"
        assert out.stat().st_size == png["bytes"]


def test_node_client_reads_bad_request_details(server, images):
    summary = run_node("invalid", server, images)
    limit = summary["model"]["max_side_px"]
    cases = {case["name"]: case for case in summary["cases"]}
    expected = {"max_side_px_over_limit": ("max_side_px", [str(limit), str(limit + 1)]),
                "style_weight_nan": ("style_weight", ["finite", "nan"]),
                "content_weight_negative": ("content_weight", [">= 0", "-1"])}
    assert set(cases) == set(expected)
    for name, (field, texts) in expected.items():
        case = cases[name]
        assert case["code_name"] == "INVALID_ARGUMENT" and case["code"] == 3, case
        assert case["messages"] == 0, case                                    # refused before JobAccepted
        assert case["details"].startswith(field), case
        rich = case["rich_status"]
        assert rich is not None, f"{name}: no grpc-status-details-bin trailer"
        assert rich["code"] == 3 and rich["message"] == case["details"], case
        assert [d["type"] for d in rich["details"]] == ["google.rpc.BadRequest"], case
        assert [v["field"] for v in case["field_violations"]] == [field], case
        description = case["field_violations"][0]["description"]
        assert all(text in description for text in texts), (name, description)
