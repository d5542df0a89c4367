"""Breaker pass: hostile or malformed input to every RPC and CLI command gets a clear error
naming the problem, never a crash, a hang, a misleading status or a lost job; against a real server."""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image

from nst_client import NSTClient, NSTError
from nst_client.cli import main as client_main
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc

from nst_server.interceptors import BearerTokenInterceptor
from nst_server.settings import MAX_STYLES, blend_weights


def _png(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _call(target: str, request: pb.StylizeRequest, timeout_s: float = 120) -> tuple[grpc.StatusCode, str, list]:
    """Run one raw Stylize call; (code, details, kinds of the messages received)."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = pb_grpc.StyleTransferStub(channel).Stylize(request, timeout=timeout_s)
        kinds = []
        try:
            for message in call:
                kinds.append(message.WhichOneof("event"))
        except grpc.RpcError as error:
            return error.code(), error.details(), kinds
        return grpc.StatusCode.OK, "", kinds


def _request(**fields) -> pb.StylizeRequest:
    return pb.StylizeRequest(**{"content_image": _png((200, 20, 20)), "max_side_px": 32, "iterations": 2,
                                **fields})


@pytest.mark.parametrize("field", ["content_layers", "style_layers"])
def test_a_huge_layer_name_is_invalid_argument_naming_the_field(server, field):
    # The refusal quoted the 100 000-character name; message and details went over gRPC's 16 KiB trailer limit
    # and the client saw RESOURCE_EXHAUSTED "Stream removed (received metadata size exceeds hard limit …)".
    request = _request(style_image=_png((20, 20, 200)), **{field: [pb.LayerWeight(layer="x" * 100_000, weight=1)]})
    code, details, kinds = _call(server, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:200])
    assert details.startswith(f"{field}: must be among") and "shortened" in details
    assert len(details) <= 1000 and kinds == []


@pytest.mark.parametrize("count", [MAX_STYLES + 1, 2000])
def test_too_many_styles_are_refused_before_admission(server, count):
    # 600 distinct 32 px styles in a 100 kB request held the only worker for 205 s even when the client cancelled
    # right after JobAccepted (style targets are built before the first iteration, where the cancel is read).
    styles = [pb.StyleImage(image=_png((index % 256, index // 256, 7)), blend_weight=1) for index in range(count)]
    code, details, kinds = _call(server, _request(styles=styles))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:200])
    assert details == f"styles: {count} style images (style_image included), at most {MAX_STYLES} may be blended"
    assert kinds == []                     # refused before admission: no JobAccepted, no style targets built


def test_max_styles_are_still_served(server):
    styles = [pb.StyleImage(image=_png((10 * index, 40, 200)), blend_weight=index) for index in range(MAX_STYLES - 1)]
    code, details, kinds = _call(server, _request(style_image=_png((20, 200, 20)), styles=styles))
    assert code == grpc.StatusCode.OK, details
    assert kinds[0] == "accepted" and kinds[-1] == "result"


def test_a_bad_blend_weight_among_many_is_named_alone():
    with pytest.raises(ValueError) as error:
        blend_weights([1.2345678901234567] * 5000 + [-1.0])
    assert error.value.field == "styles"
    assert error.value.reason == "style blend weights must be finite and >= 0, got -1.0 (weight 5001 of 5001)"


@pytest.mark.parametrize("token", ["sekrit\n", "a\nb", "sékrit", "tab\there"])
def test_a_token_that_cannot_travel_in_a_header_is_refused_up_front(server, token, tmp_path, capsys):
    # The client sent the call and got "INTERNAL: Invalid metadata" from gRPC; the server started and then refused
    # every client (a token from a secret file with its trailing newline).
    with pytest.raises(ValueError, match="printable ASCII"):
        NSTClient(server, token=token)
    with pytest.raises(ValueError, match="--auth-token: may hold printable ASCII"):
        BearerTokenInterceptor(token)
    content = tmp_path / "c.png"
    content.write_bytes(_png((200, 20, 20)))
    code = client_main(["info", "--server", server, "--token", token])
    assert code == 2 and "nst: token: may hold printable ASCII" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--size", "-5"), ("--iterations", "99999999999"), ("--seed", "-1"),
                                         ("--scales", "4294967296"), ("--preview-every", "x")])
def test_cli_integer_flags_out_of_the_fields_range_name_the_flag(flag, value, tmp_path, capsys):
    # Protobuf refused them after the files were read, as "nst: Value out of range: -5", naming no flag.
    with pytest.raises(SystemExit) as exit_:
        client_main(["stylize", "--server", "127.0.0.1:1", "c.png", "s.png", "-o", str(tmp_path / "o.png"),
                     flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--host", "nst-no-such-host.invalid"],
                                  ["--tls-cert", "/dev/null", "--tls-key", "/dev/null"]])
def test_nst_server_that_cannot_listen_exits_2_without_a_traceback(args):
    # Was a Python traceback (RuntimeError: Failed to bind to address …) and exit code 1.
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "nst_server.cli", "--model", "/nonexistent.onnx", "--port", "0",
                           *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "nst-server: cannot listen on" in done.stderr


@pytest.mark.parametrize("args", [["--size", "-1"], ["--iterations", "-3"], ["--size", "0", "--no-server"]])
def test_nst_benchmark_bad_size_or_iterations_is_a_usage_error(args, tmp_path, capsys):
    # Was a ValueError traceback (exit 1) from the engine's settings, after the output folder was made.
    from nst_bench import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--model", "/nonexistent.onnx", *args, str(tmp_path / "out")])
    assert exit_.value.code == 2 and "nst-benchmark: error: --size/--iterations:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--eval-sizes", "abc"], "argument --eval-sizes: sizes are integers"),
    (["--reference", "/dev/null"], "argument --reference:"),
    (["--reference", "/nonexistent.json"], "argument --reference:"),
])
def test_nst_quality_bad_options_are_usage_errors(args, message, tmp_path, capsys):
    # Were ValueError, JSONDecodeError, FileNotFoundError tracebacks (exit 1).
    from nst_tools import quality
    content, style = tmp_path / "c.png", tmp_path / "s.png"
    content.write_bytes(_png((200, 20, 20)))
    style.write_bytes(_png((20, 20, 200)))
    with pytest.raises(SystemExit) as exit_:
        quality.main(["--pair", f"{content}:{style}", "--server", "127.0.0.1:1", *args, str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_nst_quality_missing_default_pair_is_a_usage_error(tmp_path, capsys, monkeypatch):
    # An ArgumentTypeError traceback when the default pairs' images were not found.
    from nst_tools import quality
    monkeypatch.setenv("NST_SHARED_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        quality.main(["--server", "127.0.0.1:1", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "default --pair: image not found" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max-running-jobs", "0"), ("--result-chunk-bytes", "0"),
                                         ("--max-queued-jobs", "-1"), ("--max-side-px", "8"),
                                         ("--max-iterations", "0"), ("--max-input-pixels", "0")])
def test_nst_server_limits_out_of_range_are_refused_at_start(flag, value):
    # --max-running-jobs 0 said "max_workers must be greater than 0"; the others started a server whose every job
    # failed (--result-chunk-bytes 0: at the end, after all its work) or was refused.
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "nst_server.cli", "--model", "/nonexistent.onnx", "--port", "0",
                           flag, value], capture_output=True, text=True, timeout=120)
    # Now a usage error of argparse, naming the flag (nst_proto.argtypes).
    assert done.returncode == 2 and f"argument {flag}: must be " in done.stderr, done.stderr[-1000:]
