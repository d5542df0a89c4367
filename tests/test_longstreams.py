"""Long streams through real nst-server processes on 127.0.0.1: heartbeats while a job waits and while it runs
with sparse Progress, and a client that pings every 10 s waiting 45 s in a queue (gRPC's default server policy
would answer it with GOAWAY too_many_pings after about 30 s)."""

from __future__ import annotations

import statistics
import threading
import time

import pytest

import serving
from nst_client import NSTClient, build_request
from nst_server.cpus import cpu_budget
from streams import TimedStream

HEARTBEAT_S = 0.5
#: The server's ping policy in the keepalive test: its default (5 s). ["--min-ping-interval-s", "300"] (gRPC's
#: default) makes the test fail: GOAWAY too_many_pings at about 30 s.
MIN_PING_INTERVAL_ARGS: list[str] = []
#: The blocker of the 45 s wait: 2000 iterations at 32 px with one thread took 25 s on a 2-core EPYC (AVX512_BF16),
#: and the queued job then ran before the wait was over; 20000 keep the line busy on a machine several times
#: faster.
LONG_BLOCKER_ITERATIONS = 20000


@pytest.fixture(scope="module")
def heartbeat_server(onnx_path, tmp_path_factory):
    """N=1 running, Q=1 waiting, a heartbeat every 0.5 s, threads from the CPUs it may use."""
    log = tmp_path_factory.mktemp("heartbeat") / "server.log"
    process = serving.start(onnx_path, log, ["--max-running-jobs", "1", "--max-queued-jobs", "1",
                                             "--heartbeat-s", str(HEARTBEAT_S)])
    try:
        yield process
    finally:
        process.stop()


def _blocker(target: str, small_images, iterations: int = 2000, **options) -> TimedStream:
    """A job that runs until cancelled (``iterations`` at 32 px), Progress only every 1000 iterations."""
    content, style = small_images
    return TimedStream(target, build_request(content, style, max_side_px=32, iterations=iterations,
                                             progress_every=1000, **options))


def test_queued_and_running_jobs_get_heartbeats(heartbeat_server, small_images):
    """A job waiting behind another gets a Heartbeat about every --heartbeat-s with its place in line and the time
    waited; the running job, whose Progress comes every 1000 iterations, gets them too (queue position 0,
    iterations growing); when the first is cancelled the second runs and delivers."""
    content, style = small_images
    running = _blocker(heartbeat_server.target, small_images)
    serving.wait_for(lambda: heartbeat_server.metric("nst_jobs_running") == 1, timeout_s=60)
    queued = TimedStream(heartbeat_server.target, build_request(content, style, max_side_px=32, iterations=2))
    serving.wait_for(lambda: len(queued.of_kind("heartbeat")) >= 6, timeout_s=60)
    waiting_until = time.monotonic()
    running.cancel()
    assert queued.done.wait(timeout=120) and queued.error is None, queued.error

    accepted = queued.of_kind("accepted")[0][1]
    assert accepted.queue_position == 1
    beats = [(at, beat) for at, beat in queued.of_kind("heartbeat") if at <= waiting_until]
    assert [beat.queue_position for _, beat in beats] == [1] * len(beats)
    waited = [beat.waited_ms for _, beat in beats]
    assert waited == sorted(waited) and waited[-1] > waited[0] + 2 * HEARTBEAT_S * 1000
    assert all(beat.iterations == 0 for _, beat in beats)
    gaps = queued.gaps_s(until=waiting_until)
    print(f"\nqueued job: {len(beats)} heartbeats, gaps median {statistics.median(gaps):.3f} s, "
          f"max {max(gaps):.3f} s (--heartbeat-s {HEARTBEAT_S})")
    assert max(gaps) < 4 * HEARTBEAT_S                       # the period, with room for a loaded machine
    assert queued.of_kind("result")[0][1].iterations == 2

    running_beats = [beat for _, beat in running.of_kind("heartbeat")]
    assert running_beats and all(beat.queue_position == 0 for beat in running_beats)
    assert running_beats[-1].iterations > running_beats[0].iterations
    assert running.of_kind("progress") == []                 # none before iteration 1000
    running_gaps = running.gaps_s()
    print(f"running job, progress_every 1000: {len(running_beats)} heartbeats, max gap {max(running_gaps):.3f} s")
    assert max(running_gaps) < 4 * HEARTBEAT_S


def test_threads_from_the_cpus_this_process_may_use(heartbeat_server):
    """Without --threads, torch's and onnxruntime's pools get the CPU budget (affinity, cgroup quota): reported by
    GetModelInfo and logged at start."""
    with NSTClient(heartbeat_server.target) as client:
        info = client.model_info()
    budget = cpu_budget()
    assert info.intra_op_threads == budget.cpus
    assert info.threads_source == budget.source
    assert info.heartbeat_s == HEARTBEAT_S
    assert info.replica.endswith(f"/{heartbeat_server.pid}")
    assert f"{budget.cpus} intra-op threads for torch and onnxruntime ({budget.source})" in heartbeat_server.log()


@pytest.mark.slow
def test_client_pinging_every_10_s_waits_45_s_in_the_queue(onnx_path, tmp_path, small_images, capfd):
    """The issue's report: a client with keepalive_time 10 s and permit_without_calls waits 45 s behind another
    job and completes, and its connection gets no GOAWAY too_many_pings (gRPC's default server policy allows a
    ping every 300 s and sends that GOAWAY at the third early one, about 30 s in; gRPC core logs it on the
    client's stderr). Heartbeats are set to 60 s here, so that only the keepalive policy keeps the connection:
    data frames would reset the server's ping strikes."""
    server = serving.start(onnx_path, tmp_path / "server.log", [
        "--max-running-jobs", "1", "--max-queued-jobs", "1", "--heartbeat-s", "60", "--threads", "1",
        "--max-iterations", str(LONG_BLOCKER_ITERATIONS), *MIN_PING_INTERVAL_ARGS])
    try:
        content, style = small_images
        running = _blocker(server.target, small_images, iterations=LONG_BLOCKER_ITERATIONS)
        serving.wait_for(lambda: server.metric("nst_jobs_running") == 1, timeout_s=60)
        outcome: dict = {}

        def queued_job() -> None:
            with NSTClient(server.target, keepalive_time_s=10.0, timeout_s=300) as client:
                try:
                    outcome["result"] = client.stylize(content, style, max_side_px=32, iterations=2)
                except Exception as exc:             # reported below
                    outcome["error"] = exc

        started = time.monotonic()
        thread = threading.Thread(target=queued_job)
        thread.start()
        serving.wait_for(lambda: server.metric("nst_jobs_waiting") == 1, timeout_s=30)
        thread.join(timeout=max(0.0, started + 45.0 - time.monotonic()))
        assert thread.is_alive(), f"the queued job ended while it should wait: {outcome}"
        running.cancel()
        thread.join(timeout=120)
        waited_s = time.monotonic() - started
        assert "error" not in outcome, f"the queued job failed: {outcome.get('error')}"
        assert outcome["result"].iterations == 2
        assert waited_s >= 45.0
        assert "too_many_pings" not in capfd.readouterr().err
    finally:
        server.stop()
