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
from nst_client._proto.nst.v1 import style_transfer_pb2_grpc as pb_grpc

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
