"""Faults from the field in the clients and the console scripts, each kind with its report's case as a test,
through real nst-server processes on 127.0.0.1 (port 0) and real subprocesses of the console scripts.

A. Proxy variables ($http_proxy & co.) never reroute calls to loopback; an UNAVAILABLE through a proxy says so.
B. A closed or full stdout/stderr never stops the server or a CLI, nor changes what its exit code says.
C. Every numeric flag and client argument takes its whole documented range (an infinite or huge timeout: no
   deadline) and refuses the rest with a usage error / ValueError naming it.
D. Every address form either works as meant or is refused at once naming the form expected.
E. Auth schemes, URI schemes and printed file names compared and printed the way their standards say.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import socket
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

import serving
from nst_client import NSTClient
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc
from nst_client.aio import AsyncNSTClient
from nst_client.client import is_balanced_target, is_loopback_target, proxy_in_use

TOKEN = "Field-Token-7"
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy", "no_proxy",
                   "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")
JOB = ["--size", "32", "--iterations", "2", "--scales", "1", "--quiet"]


def _env(**extra: str) -> dict[str, str]:
    """This environment without proxy variables, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in PROXY_VARIABLES}
    return {**env, "NST_AUTH_TOKEN": TOKEN, **extra}


def _run(script: str, *args, env: dict[str, str] | None = None, **options) -> subprocess.CompletedProcess:
    """A console script (``nst``, ``nst-server``) as a subprocess: ``python -m`` of its module."""
    module = {"nst": "nst_client.cli", "nst-server": "nst_server.cli"}[script]
    options.setdefault("capture_output", True)
    return subprocess.run([sys.executable, "-m", module, *args], env=env or _env(), timeout=300, **options)


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    """nst-server with a bearer token ($NST_AUTH_TOKEN); health open."""
    process = serving.start(onnx_path, tmp_path_factory.mktemp("field_client") / "server.log",
                            ["--max-running-jobs", "1", "--max-queued-jobs", "8"], env={"NST_AUTH_TOKEN": TOKEN},
                            client_options={"token": TOKEN})
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture()
def refused_port():
    """A port on 127.0.0.1 that refuses connections (bound, not listening) while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _is_png(path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


# A. proxies -----------------------------------------------------------------------------------------------------

def test_health_check_on_loopback_ignores_http_proxy(server, refused_port):
    """The report's case: `http_proxy=http://127.0.0.1:9 nst health --server 127.0.0.1:PORT` was UNAVAILABLE
    (the proxy's address, no word of a proxy); container HEALTHCHECKs make exactly this call."""
    proxy = f"http://127.0.0.1:{refused_port}"
    port = server.target.rsplit(":", 1)[1]
    for variable in ("http_proxy", "https_proxy", "grpc_proxy"):
        for target in (server.target, f"localhost:{port}"):
            done = _run("nst", "health", "--server", target, env=_env(**{variable: proxy}))
            assert (done.returncode, done.stdout.decode().strip()) == (0, "SERVING"), (variable, target,
                                                                                       done.stderr.decode())


def test_library_clients_on_loopback_ignore_http_proxy(server, refused_port, monkeypatch):
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{refused_port}")
    with NSTClient(server.target, token=TOKEN) as client:
        assert client.proxy is None
        assert client.health() == "SERVING"
        assert client.model_info().versions

    async def main() -> str:
        async with AsyncNSTClient(server.target, token=TOKEN) as client:
            return await client.health()
    assert asyncio.run(main()) == "SERVING"


@pytest.mark.parametrize("variables,named", [
    ({"http_proxy": "PROXY"}, "$http_proxy"),
    ({"https_proxy": "PROXY", "http_proxy": "http://127.0.0.1:1"}, "$https_proxy"),
    ({"grpc_proxy": "PROXY", "http_proxy": "http://127.0.0.1:1"}, "$grpc_proxy"),
])
def test_unavailable_through_a_proxy_names_the_proxy_and_its_variable(refused_port, variables, named):
    """A name that only the proxy resolves: the call goes to the (refusing) proxy, and the error says so."""
    proxy = f"http://127.0.0.1:{refused_port}"
    env = _env(**{key: proxy if value == "PROXY" else value for key, value in variables.items()})
    done = _run("nst", "health", "--server", "nst-field.invalid:50051", env=env)
    error = done.stderr.decode()
    assert done.returncode == 1 and "UNAVAILABLE" in error
    assert f"HTTP proxy {proxy}" in error and f"set by {named}" in error, error


def test_proxy_rules_follow_grpc():
    env = {"http_proxy": "http://proxy:3128"}
    assert proxy_in_use("nst.example.com:50051", environ=env) == ("$http_proxy", "http://proxy:3128")
    assert proxy_in_use("nst.example.com:50051", environ={**env, "grpc_proxy": ""}) is None    # set, empty: none
    assert proxy_in_use("nst.example.com:50051", environ={**env, "no_proxy": "example.com"}) is None
    assert proxy_in_use("nst.example.com:50051", environ={**env, "no_proxy": "EXAMPLE.COM"}) is None
    assert proxy_in_use("10.1.2.3:50051", environ={**env, "no_proxy": "10.0.0.0/8"}) is None
    assert proxy_in_use("10.1.2.3:50051", environ={**env, "no_grpc_proxy": "", "no_proxy": "10.0.0.0/8"})
    assert proxy_in_use("unix:/run/nst.sock", environ=env) is None
    assert proxy_in_use("nst.example.com:50051", [("grpc.enable_http_proxy", 0)], environ=env) is None
    for target in ("127.0.0.1:50051", "127.8.9.10:1", "localhost:50051", "[::1]:50051", "dns:///localhost:1",
                   "ipv4:127.0.0.1:1,127.0.0.2:2", "ipv6:[::1]:1"):
        assert is_loopback_target(target), target
    for target in ("10.0.0.1:50051", "nst.example.com:50051", "ipv4:127.0.0.1:1,10.0.0.1:2", "unix:/run/s"):
        assert not is_loopback_target(target), target


# B. closed or full stdout/stderr --------------------------------------------------------------------------------

def test_server_keeps_serving_when_its_stdout_is_closed(onnx_path, tmp_path):
    """The report's case: `nst-server … | head -1` loaded, logged, then exited 2 "[Errno 32] Broken pipe" at its
    next print and never served."""
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "nst_server.cli", "--model", str(onnx_path), "--port", "0"],
                                   stdout=subprocess.PIPE, stderr=log, env=_env(NST_AUTH_TOKEN=""), text=True)
    try:
        first = process.stdout.readline()                # "nst-server bound to 127.0.0.1:PORT; NOT_SERVING …"
        process.stdout.close()                           # what `| head -1` does after its line
        assert "bound to " in first, log_path.read_text()[-3000:]
        target = first.split("bound to ", 1)[1].split(";", 1)[0]
        with NSTClient(target) as client:
            client.wait_until_serving(timeout_s=300)
            # "listening on" is printed (into the closed pipe) right after the "serving" log line.
            serving.wait_for(lambda: "serving nst.v1.StyleTransfer" in log_path.read_text(), timeout_s=60)
            for _ in range(3):
                assert client.health() == "SERVING"
                assert process.poll() is None, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0, log_path.read_text()[-3000:]
    assert "Broken pipe" not in log_path.read_text()


def test_stylize_with_stdout_on_dev_full_writes_the_picture_and_exits_0(server, image_files, tmp_path):
    """The report's case: `nst stylize … -o out.png > /dev/full` wrote out.png, then exited 120 (the interpreter's
    flush at exit failed with ENOSPC)."""
    out = tmp_path / "out.png"
    with open("/dev/full", "w") as full:
        done = _run("nst", "stylize", *image_files, "-o", str(out), "--server", server.target, *JOB, stdout=full,
                    stderr=subprocess.PIPE, capture_output=False)
    assert done.returncode == 0, done.stderr.decode()
    assert _is_png(out)


def test_stylize_with_stdout_and_stderr_on_dev_full_and_a_progress_bar(server, image_files, tmp_path):
    out = tmp_path / "out.png"
    with open("/dev/full", "w") as full:
        done = _run("nst", "stylize", *image_files, "-o", str(out), "--server", server.target, *JOB[:-1], stdout=full,
                    stderr=full, capture_output=False)
    assert done.returncode == 0 and _is_png(out)


def test_cli_exit_code_still_reports_a_failure_with_stdout_on_dev_full(tmp_path, image_files):
    with open("/dev/full", "w") as full:
        unreachable = _run("nst", "stylize", *image_files, "-o", str(tmp_path / "o.png"), "--server", "127.0.0.1:1",
                           *JOB, stdout=full, stderr=subprocess.PIPE, capture_output=False)
        health = _run("nst", "health", "--server", "127.0.0.1:1", stdout=full, stderr=subprocess.PIPE,
                      capture_output=False)
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr.decode()
    assert health.returncode == 1
    assert not (tmp_path / "o.png").exists()


def test_health_with_a_closed_stdout_pipe_exits_by_the_health(server):
    reader, writer = os.pipe()
    os.close(reader)                                     # nobody reads: every write is EPIPE
    try:
        done = _run("nst", "health", "--server", server.target, stdout=writer, stderr=subprocess.PIPE,
                    capture_output=False)
    finally:
        os.close(writer)
    assert done.returncode == 0, done.stderr.decode()
    assert "Broken pipe" not in done.stderr.decode()


# C. numbers at the edges ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("timeout", ["inf", "1e10", "1e300"])
def test_stylize_with_an_infinite_or_huge_timeout_runs_the_job(server, image_files, tmp_path, timeout):
    """The report's case: `--timeout-s inf` (or 1e10) failed at once with DEADLINE_EXCEEDED, never reaching the
    server (gRPC's deadline overflows past about 7.4e9 s from now)."""
    out = tmp_path / "out.png"
    done = _run("nst", "stylize", *image_files, "-o", str(out), "--server", server.target, "--timeout-s", timeout, *JOB)
    assert done.returncode == 0, done.stderr.decode()
    assert _is_png(out)


@pytest.mark.parametrize("argv,flag", [
    (["stylize", "c.png", "s.png", "-o", "o.png", "--timeout-s", "nan"], "--timeout-s"),
    (["stylize", "c.png", "s.png", "-o", "o.png", "--timeout-s", "0"], "--timeout-s"),
    (["stylize", "c.png", "s.png", "-o", "o.png", "--timeout-s", "-5"], "--timeout-s"),
    (["stylize", "c.png", "s.png", "-o", "o.png", "--content-weight", "nan"], "--content-weight"),
    (["stylize", "c.png", "s.png", "-o", "o.png", "--style-weight", "inf"], "--style-weight"),
    (["stylize", "c.png", "s.png", "-o", "o.png", "--noise-ratio", "-inf"], "--noise-ratio"),
    (["stylize", "c.png", "s.png", "-o", "o.png", "--learning-rate", "nan"], "--learning-rate"),
    (["health", "--busy-retry-s", "nan"], "--busy-retry-s"),
    (["health", "--busy-retry-s", "-1"], "--busy-retry-s"),
    (["health", "--max-resubmits", "-1"], "--max-resubmits"),
    (["health", "--max-resubmits", "1.5"], "--max-resubmits"),
    (["bench", "--timeout-s", "nan"], "--timeout-s"),
    (["bench", "--size", "-1"], "--size"),
    (["bench", "--iterations", "4294967296"], "--iterations"),
    (["bench", "--jobs-per-level", "-2"], "--jobs-per-level"),
    (["bench", "--warmup-jobs", "-1"], "--warmup-jobs"),
])
def test_nst_refuses_numbers_out_of_range_naming_the_flag(argv, flag, capsys):
    from nst_client.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag", [
    (["--port", "65536"], "--port"), (["--port", "-1"], "--port"), (["--metrics-port", "70000"], "--metrics-port"),
    (["--grace-s", "nan"], "--grace-s"), (["--grace-s", "inf"], "--grace-s"), (["--grace-s", "-1"], "--grace-s"),
    (["--keepalive-time-s", "inf"], "--keepalive-time-s"), (["--keepalive-timeout-s", "0"], "--keepalive-timeout-s"),
    (["--min-ping-interval-s", "nan"], "--min-ping-interval-s"),
    (["--max-connection-age-s", "1e10"], "--max-connection-age-s"),
    (["--max-connection-age-grace-s", "-1"], "--max-connection-age-grace-s"),
    (["--heartbeat-s", "nan"], "--heartbeat-s"), (["--batch-wait-ms", "inf"], "--batch-wait-ms"),
    (["--max-receive-message-bytes", str(2**31)], "--max-receive-message-bytes"),
    (["--result-chunk-bytes", "0"], "--result-chunk-bytes"), (["--threads", "0"], "--threads"),
    (["--max-side-px", "8"], "--max-side-px"), (["--max-running-jobs", "0"], "--max-running-jobs"),
    (["--max-queued-jobs", "-1"], "--max-queued-jobs"), (["--max-iterations", "0"], "--max-iterations"),
])
def test_nst_server_refuses_numbers_out_of_range_naming_the_flag(argv, flag, capsys):
    from nst_server.cli import build_parser
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--model", "m.onnx", *argv])
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_nst_server_port_out_of_range_is_a_usage_error(tmp_path):
    done = _run("nst-server", "--model", str(tmp_path / "none.onnx"), "--port", "65536")
    assert done.returncode == 2
    assert "argument --port: must be between 0 and 65535, got 65536" in done.stderr.decode()


def test_nst_server_takes_the_edges_of_its_ranges():
    from nst_server.cli import build_config, build_parser
    args = build_parser().parse_args(["--model", "m.onnx", "--port", "65535", "--metrics-port", "0",
                                      "--grace-s", "0", "--keepalive-time-s", "2147483.647",
                                      "--max-connection-age-s", "0", "--max-receive-message-bytes", str(2**31 - 1),
                                      "--log-level", "debug"])
    config = build_config(args)
    assert (config.port, config.metrics_port, config.grace_s, args.log_level) == (65535, 0, 0.0, "DEBUG")
    assert dict(config.grpc_options())["grpc.keepalive_time_ms"] == 2**31 - 1


def test_library_takes_infinite_and_huge_timeouts(server, small_images):
    content, style = small_images
    with NSTClient(server.target, token=TOKEN, timeout_s=math.inf, keepalive_time_s=math.inf,
                   busy_retry_s=math.inf) as client:
        assert client.timeout_s is None
        assert client.health(timeout_s=math.inf) == "SERVING"
        assert client.health(timeout_s=1e12) == "SERVING"
        assert client.health(timeout_s=None) == "SERVING"
        client.wait_until_serving(timeout_s=math.inf)
        assert client.model_info(timeout_s=1e10).versions
        assert client.stylize(content, style, max_side_px=32, iterations=2, scales=1, timeout_s=1e10).image_png
        assert client.stylize(content, style, max_side_px=32, iterations=2, scales=1).image_png

    async def main() -> None:
        async with AsyncNSTClient(server.target, token=TOKEN, timeout_s=1e15) as client:
            assert await client.health(timeout_s=math.inf) == "SERVING"
            await client.wait_until_serving(timeout_s=math.inf)
            assert (await client.model_info(timeout_s=math.inf)).versions
            result = await client.stylize(content, style, max_side_px=32, iterations=2, scales=1,
                                          timeout_s=math.inf)
            assert result.image_png
    asyncio.run(main())


@pytest.mark.parametrize("arguments,error,named", [
    ({"timeout_s": math.nan}, ValueError, "timeout_s"), ({"timeout_s": 0}, ValueError, "timeout_s"),
    ({"timeout_s": -1.0}, ValueError, "timeout_s"), ({"timeout_s": "10"}, TypeError, "timeout_s"),
    ({"busy_retry_s": math.nan}, ValueError, "busy_retry_s"), ({"busy_retry_s": -0.5}, ValueError, "busy_retry_s"),
    ({"max_resubmits": 1.5}, TypeError, "max_resubmits"), ({"max_resubmits": -1}, ValueError, "max_resubmits"),
    ({"keepalive_time_s": math.nan}, ValueError, "keepalive_time_s"),
    ({"keepalive_time_s": 0.5}, ValueError, "keepalive_time_s"),
    ({"keepalive_timeout_s": math.nan}, ValueError, "keepalive_timeout_s"),
    ({"keepalive_timeout_s": 0}, ValueError, "keepalive_timeout_s"),
])
def test_clients_refuse_numbers_out_of_range_naming_the_argument(arguments, error, named):
    for client_class in (NSTClient, AsyncNSTClient):
        with pytest.raises(error, match=named):
            client_class("127.0.0.1:1", **arguments)


def test_client_calls_refuse_meaningless_timeouts(small_images):
    with NSTClient("127.0.0.1:1") as client:
        for call in (client.health, client.model_info, client.wait_until_serving):
            for bad in (0, -1, math.nan):
                with pytest.raises(ValueError, match="timeout_s"):
                    call(timeout_s=bad)
        with pytest.raises(ValueError, match="timeout_s"):
            client.stylize(*small_images, timeout_s=math.nan)


# D. address forms -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,expected", [
    ("::1:50051", "[::1]:50051"), ("::1", "[::1]:50051"), ("ipv6:::1:50051", "[::1]:50051"),
    ("127.0.0.1", "HOST:PORT"), ("localhost", "HOST:PORT"), ("[::1]", "[ADDRESS]:PORT"),
    ("127.0.0.1:0", "between 1 and 65535"), ("127.0.0.1:99999", "between 1 and 65535"),
    ("a:1,b:2", "ipv4:HOST:PORT,HOST:PORT"), ("http://127.0.0.1:50051", "HOST:PORT"),
    ("ipv4:localhost:50051", "not an IPv4 address"), (" 127.0.0.1:50051", "HOST:PORT"), ("", "HOST:PORT"),
])
def test_malformed_targets_are_refused_naming_the_form(target, expected):
    for client_class in (NSTClient, AsyncNSTClient):
        with pytest.raises(ValueError, match=re.escape(expected)):
            client_class(target)


def test_cli_refuses_a_bare_ipv6_address_and_a_missing_port():
    """The report's cases: `--server ::1:50051` and `--server ::1` reached gRPC, which resolved a name
    "::1:50051" or dialled port 443; a target without a port did the same."""
    for target, expected in (("::1:50051", "[::1]:50051"), ("::1", "[::1]:50051"), ("127.0.0.1", "HOST:PORT")):
        done = _run("nst", "health", "--server", target)
        assert done.returncode == 2, (target, done.stderr.decode())
        assert "argument --server:" in done.stderr.decode() and expected in done.stderr.decode()


@pytest.mark.skipif(not serving.has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_cli_health_over_ipv6_loopback_in_brackets(refused_port):
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, health_server)
    servicer.set("nst.v1.StyleTransfer", health_pb2.HealthCheckResponse.SERVING)
    port = health_server.add_insecure_port("[::1]:0")
    health_server.start()
    try:
        for target in (f"[::1]:{port}", f"ipv6:[::1]:{port}", f"IPV6:[::1]:{port}"):
            done = _run("nst", "health", "--server", target,
                        env=_env(http_proxy=f"http://127.0.0.1:{refused_port}"))
            assert (done.returncode, done.stdout.decode().strip()) == (0, "SERVING"), (target, done.stderr.decode())
    finally:
        health_server.stop(None)


def test_scheme_case_is_ignored(server):
    """RFC 3986: schemes are case-insensitive, and gRPC resolves DNS:/IPV4: as dns:/ipv4:."""
    for target in ("DNS:///nst.example.com:50051", "Dns:nst.example.com:50051", "IPV4:10.0.0.1:1", "IPv6:[::1]:1"):
        assert is_balanced_target(target), target
    port = server.target.rsplit(":", 1)[1]
    for target in (f"DNS:///127.0.0.1:{port}", f"IPV4:127.0.0.1:{port}", f"dns:///localhost:{port}"):
        with NSTClient(target, token=TOKEN) as client:
            assert client.balanced
            assert client.health() == "SERVING"


# E. names and schemes -------------------------------------------------------------------------------------------

def test_bearer_scheme_is_case_insensitive_and_the_token_is_not(server):
    """The report's case: `authorization: bearer TOKEN` was refused UNAUTHENTICATED (RFC 9110 section 11.1: the
    auth scheme is case-insensitive)."""
    with grpc.insecure_channel(server.target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = pb_grpc.StyleTransferStub(channel)
        for header in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}", f"Bearer {TOKEN}"):
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30,
                                     metadata=[("authorization", header)]).versions, header
        for header in (f"bearer {TOKEN.lower()}", f"Basic {TOKEN}", f"Bearer{TOKEN}", "bearer", TOKEN):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=[("authorization", header)])
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, header


def test_output_name_the_console_cannot_encode_is_printed_escaped(server, image_files, tmp_path):
    """The report's case: `-o $'out_\\xff.png'` under PYTHONIOENCODING=utf-8:strict wrote the file, then exited 2
    printing its name (UnicodeEncodeError)."""
    out = os.fsencode(tmp_path) + b"/out_\xff.png"
    done = _run("nst", "stylize", *image_files, "-o", out, "--server", server.target, *JOB,
                env=_env(PYTHONIOENCODING="utf-8:strict"))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert _is_png(out)
    assert b"out_\\udcff.png" in done.stdout
