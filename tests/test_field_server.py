"""Faults from the field, on the server's side: each kind as a test against a real nst-server on 127.0.0.1.

1. A client that stops reading holds nothing without bound (``--send-timeout-s``).
2. Another process already listening on the port: the server exits 2 naming the flag and the address.
3. Every form of ``--host`` works as meant or is refused naming the form expected.
8. A shutdown with open health watches logs no error and no traceback.
"""

from __future__ import annotations

import grpc
import pytest

import serving
from nst_client import NSTClient, build_request
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc

#: Channel options of a client whose transport grants the server (almost) no flow-control window and never
#: widens it: its stream's messages are not delivered until it reads.
NON_READING = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)]


def _no_traceback(log: str) -> None:
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]


def test_clients_that_stop_reading_free_their_slots(onnx_path, small_images, tmp_path):
    """Five Stylize calls whose clients never read, against N=1 running + Q=4 queued: today they held every slot
    until the clients went away and a normal job got RESOURCE_EXHAUSTED. With ``--send-timeout-s 2`` each call
    whose message cannot be delivered for 2 s is ended: its job stops, its slot is freed, one log line names the
    peer; a normal job then runs; a stalled client that reads again gets the status; nothing logs a traceback."""
    server = serving.start(onnx_path, tmp_path / "server.log",
                           ["--max-running-jobs", "1", "--max-queued-jobs", "4", "--send-timeout-s", "2"])
    request = build_request(*small_images, max_side_px=48, iterations=2000, preview_every=1)
    stalled = []
    try:
        for _ in range(5):
            channel = grpc.insecure_channel(server.target, options=NON_READING)
            stalled.append((channel, pb_grpc.StyleTransferStub(channel).Stylize(request, timeout=120)))
        serving.wait_for(lambda: server.metric("nst_jobs_total", outcome="send_timeout") == 5, timeout_s=60)
        serving.wait_for(lambda: server.metric("nst_jobs_running") + server.metric("nst_jobs_waiting") == 0)
        with NSTClient(server.target, timeout_s=120) as client:
            result = client.stylize(*small_images, max_side_px=32, iterations=2)
        assert result.iterations == 2
        channel, call = stalled[0]
        with pytest.raises(grpc.RpcError) as ended:
            for _ in call:                                  # the messages it had not read, then the status
                pass
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--send-timeout-s" in ended.value.details()
        for channel, call in stalled:
            call.cancel()
            channel.close()
        log = server.log()
        lines = [line for line in log.splitlines() if "could not deliver" in line]
        assert len(lines) == 5 and all("peer=ipv" in line for line in lines), lines
        assert server.metric("nst_job_cancels_total", reason="send_timeout") >= 4    # a waiting one may end first
    finally:
        assert server.stop() == 0
    _no_traceback(server.log())


def test_a_reader_that_waits_stalls_no_job_and_holds_few_previews(onnx_path, small_images, tmp_path):
    """A client that reads nothing until its job is over: the job runs to its end meanwhile (the computation
    never waits for the reader), and what waits for the reader is bounded: Progress messages beyond the queue's
    bound come without their preview. Then the client reads everything, the Result included."""
    from nst_server.servicer import MAX_QUEUED_EVENTS_WITH_PREVIEWS

    iterations = 40
    server = serving.start(onnx_path, tmp_path / "server.log", ["--send-timeout-s", "300"])
    request = build_request(*small_images, max_side_px=32, iterations=iterations, scales=1, preview_every=1,
                            convergence_tolerance=0.0)
    try:
        channel = grpc.insecure_channel(server.target, options=NON_READING)
        call = pb_grpc.StyleTransferStub(channel).Stylize(request, timeout=120)
        serving.wait_for(lambda: server.metric("nst_iterations_total") >= iterations, timeout_s=120)
        serving.wait_for(lambda: server.metric("nst_jobs_running") == 0)
        messages = list(call)
        channel.close()
    finally:
        assert server.stop() == 0
    kinds = [m.WhichOneof("event") for m in messages]
    progress = [m.progress for m in messages if m.WhichOneof("event") == "progress"]
    assert kinds[0] == "accepted" and kinds[-1] == "result" and len(progress) == iterations
    with_preview = sum(bool(p.preview_png) for p in progress)
    assert 0 < with_preview <= MAX_QUEUED_EVENTS_WITH_PREVIEWS + 1, with_preview
    _no_traceback(server.log())


def _server_command(onnx_path, *args: str) -> list[str]:
    import sys
    return [sys.executable, "-m", "nst_server.cli", "--model", str(onnx_path), *args]


def _run_server(onnx_path, *args: str):
    import subprocess
    return subprocess.run(_server_command(onnx_path, *args), capture_output=True, text=True, timeout=120)


def test_a_port_another_grpc_server_listens_on_is_refused(onnx_path):
    """grpcio's own server (SO_REUSEPORT, its default) holds port P: nst-server --port P used to print "listening"
    and share the port (health answered SERVING and UNIMPLEMENTED by turns); now it exits 2 naming the flag and
    the address, before loading the model."""
    from concurrent import futures
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        run = _run_server(onnx_path, "--port", str(port))
    finally:
        other.stop(None)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"127.0.0.1:{port}" in run.stderr and "--port" in run.stderr and "listening" not in run.stdout
    assert "Traceback" not in run.stderr


def test_a_taken_metrics_port_is_refused_naming_the_flag(onnx_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = _run_server(onnx_path, "--port", "0", "--metrics-port", str(port))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "--metrics-port" in run.stderr and f"127.0.0.1:{port}" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("host", ["127.0.0.1:50051", "[127.0.0.1]", "dns:///localhost", "", "no such host"])
def test_host_forms_that_name_no_address_are_refused_at_start(onnx_path, host):
    run = _run_server(onnx_path, "--host", host, "--port", "0")
    assert run.returncode == 2 and "--host" in run.stderr and "[::1]" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(not serving.has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.parametrize("host", ["::1", "[::1]", "::"])
def test_ipv6_hosts_listen_as_meant(onnx_path, tmp_path, host):
    """--host ::1 and --host :: exited 2 "cannot listen on ::1:50303" (the address joined unbracketed); now they
    listen, and the printed address is one a client can use."""
    server = serving.start(onnx_path, tmp_path / "server.log", ["--host", host])
    try:
        assert server.target.startswith("[::") and server.target.rsplit(":", 1)[1].isdigit(), server.target
        port = server.target.rsplit(":", 1)[1]
        with NSTClient(f"[::1]:{port}") as client:
            assert client.health() == "SERVING"
    finally:
        assert server.stop() == 0


def test_a_shutdown_with_open_health_watches_logs_no_error(onnx_path, tmp_path):
    """30 grpc.health.v1.Health/Watch streams open (balanced clients hold one per replica), then SIGTERM: the
    server exits 0, each watcher sees NOT_SERVING and then its stream end, and the log holds no error and no
    traceback (some shutdowns logged "Exception not handled … CancelledError" for every stream)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = serving.start(onnx_path, tmp_path / "server.log")
    channel = grpc.insecure_channel(server.target)
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60) for _ in range(30)]
    try:
        assert all(next(watch).status == health_pb2.HealthCheckResponse.SERVING for watch in watches)
        assert server.stop() == 0
        for watch in watches:
            seen = []
            with pytest.raises(grpc.RpcError):
                for reply in watch:
                    seen.append(reply.status)
            assert seen in ([], [health_pb2.HealthCheckResponse.NOT_SERVING]), seen
    finally:
        channel.close()
        server.stop()
    _no_traceback(server.log())
