"""Serving under load and failure, through real nst-server processes on 127.0.0.1 (port 0): admission (N, Q,
RESOURCE_EXHAUSTED), cancellation and deadlines (the server's own iteration counter stops), failure
isolation, health and GetModelInfo while jobs run, one log line per RPC, Prometheus metrics, the load test
with the server's memory, and the SIGTERM shutdown."""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import sys
import threading
import time

import grpc
import pytest

import serving
from streams import TimedStream
from nst_client import NSTClient, NSTError, build_request

N_RUNNING, N_QUEUED = 2, 2
OOM_SEED, ERROR_SEED = 13, 14            # NST_FAULT_INJECT: jobs with these seeds fail inside the engine


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    """nst-server with N=2 running, Q=2 queued, metrics, and the fault-injection hook for two seeds."""
    log = tmp_path_factory.mktemp("robustness") / "server.log"
    process = serving.start(onnx_path, log, ["--max-running-jobs", str(N_RUNNING),
                                             "--max-queued-jobs", str(N_QUEUED)],
                            env={"NST_FAULT_INJECT": f"{OOM_SEED}:oom,{ERROR_SEED}:error"})
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture()
def client(server):
    """A client whose ``stylize`` makes one Stylize call (``job_api=False``): these tests are about that RPC's
    handling on the server (admission, cancels, deadlines, its log lines and outcomes); the job API's are
    tests/test_job_api.py and tests/test_job_client.py."""
    with NSTClient(server.target, timeout_s=120, job_api=False) as client:
        yield client


def _idle(server) -> bool:
    return server.metric("nst_jobs_running") == 0 and server.metric("nst_jobs_waiting") == 0


def test_admission_n_running_q_waiting_then_resource_exhausted(server, client, small_images):
    """N=2 run, Q=2 wait (queue positions 0, 0, 1, 2); the fifth is refused at once with RESOURCE_EXHAUSTED;
    cancelling frees all four slots."""
    content, style = small_images
    streams = []
    for _ in range(N_RUNNING + N_QUEUED):
        stream = TimedStream(server.target, build_request(content, style, max_side_px=48, iterations=2000),
                             timeout_s=120)
        serving.wait_for(lambda s=stream: s.responses, timeout_s=30)      # JobAccepted comes first
        streams.append(stream)
    try:
        assert [s.responses[0].accepted.queue_position for s in streams] == [0, 0, 1, 2]
        assert all(len(s.responses[0].accepted.job_id) >= 8 for s in streams)
        serving.wait_for(lambda: server.metric("nst_jobs_running") == 2, timeout_s=30)
        assert server.metric("nst_jobs_waiting") == 2
        refused_before = server.metric("nst_jobs_total", outcome="refused_busy")
        with pytest.raises(NSTError) as error:
            client.stylize(content, style, max_side_px=32, iterations=2)
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # At once, not after a wait for a slot: the four jobs still hold theirs (2000 iterations each).
        assert server.metric("nst_jobs_running") == 2 and server.metric("nst_jobs_waiting") == 2
        assert all(not s.done.is_set() for s in streams)
        assert "2 running + 2 queued" in error.value.details
        assert server.metric("nst_jobs_total", outcome="refused_busy") == refused_before + 1
    finally:
        for stream in streams:
            stream.cancel()
    serving.wait_for(lambda: _idle(server), timeout_s=30)
    result = client.stylize(content, style, max_side_px=32, iterations=2)
    assert result.stop_reason == "STOP_REASON_ITERATIONS_DONE"


def test_cancel_after_second_progress_stops_the_servers_iteration_counter(server, client, small_images):
    """The issue's cancel test: cancel after the second Progress; the server's iteration counter stops (read,
    wait 2 s, read again), and a following job runs."""
    content, style = small_images
    serving.wait_for(lambda: _idle(server), timeout_s=30)
    cancels_before = server.metric("nst_job_cancels_total", reason="client")
    stream = TimedStream(server.target, build_request(content, style, max_side_px=48, iterations=2000), timeout_s=120)
    serving.wait_for(lambda: stream.progress_count() >= 2, timeout_s=60)
    stream.cancel()
    seen = max(m.progress.iteration for m in stream.responses if m.WhichOneof("event") == "progress")
    serving.wait_for(lambda: _idle(server), timeout_s=30)                      # the worker has left the job
    counted = server.metric("nst_iterations_total")
    time.sleep(2.0)
    assert server.metric("nst_iterations_total") == counted                     # no iteration after the stop
    assert server.metric("nst_job_cancels_total", reason="client") == cancels_before + 1
    job_id = stream.responses[0].accepted.job_id
    line = serving.wait_for(lambda: re.search(rf"job={job_id} status=CANCELLED .*iterations=(\d+)", server.log()))
    assert int(line.group(1)) <= seen + 2          # stopped within one iteration of the cancel (+1 in flight)
    result = client.stylize(content, style, max_side_px=32, iterations=3)
    assert result.stop_reason == "STOP_REASON_ITERATIONS_DONE" and result.iterations == 3


_DROPPING_CLIENT = """
import sys
from nst_client import NSTClient, build_request
content, style = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
with NSTClient(sys.argv[1]) as client:
    for message in client.stream(build_request(content, style, max_side_px=48, iterations=2000)):
        print(message.WhichOneof("event"), flush=True)
"""


def test_a_dropped_connection_stops_the_job(server, small_images, tmp_path):
    """A client process killed (SIGKILL) mid-job: the server stops the job and its iteration counter."""
    paths = [tmp_path / "content.png", tmp_path / "style.png"]
    for path, data in zip(paths, small_images):
        path.write_bytes(data)
    serving.wait_for(lambda: _idle(server), timeout_s=30)
    process = subprocess.Popen([sys.executable, "-c", _DROPPING_CLIENT, server.target, *map(str, paths)],
                               stdout=subprocess.PIPE, text=True)
    try:
        progress = 0
        for line in process.stdout:
            progress += line.strip() == "progress"
            if progress == 2:
                break
        process.kill()
    finally:
        process.wait(timeout=30)
    serving.wait_for(lambda: _idle(server), timeout_s=30)
    counted = server.metric("nst_iterations_total")
    time.sleep(2.0)
    assert server.metric("nst_iterations_total") == counted
    assert re.search(r"rpc=/nst.v1.StyleTransfer/Stylize job=\w+ status=CANCELLED", server.log())


def test_ctrl_c_in_the_cli_cancels_the_job_without_a_traceback(server, small_images, tmp_path):
    paths = [tmp_path / "content.png", tmp_path / "style.png"]
    for path, data in zip(paths, small_images):
        path.write_bytes(data)
    serving.wait_for(lambda: _idle(server), timeout_s=30)
    # A shell's background job starts with SIGINT ignored: give the CLI the terminal's default.
    process = subprocess.Popen(serving.cli_command(["stylize", *map(str, paths), "-o", str(tmp_path / "out.png"),
                                                    "--server", server.target, "--size", "48", "--iterations", "500",
                                                    "--quiet"], default_sigint=True),
                               stderr=subprocess.PIPE, text=True)
    try:
        serving.wait_for(lambda: server.metric("nst_jobs_running") == 1, timeout_s=60)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    serving.wait_for(lambda: _idle(server), timeout_s=30)
    assert not (tmp_path / "out.png").exists()


def test_deadline_stops_the_job_with_deadline_exceeded(server, client, small_images):
    content, style = small_images
    serving.wait_for(lambda: _idle(server), timeout_s=30)
    before = server.metric("nst_job_cancels_total", reason="deadline")
    with pytest.raises(NSTError) as error:
        client.stylize(content, style, max_side_px=48, iterations=2000, timeout_s=2.0)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    serving.wait_for(lambda: _idle(server), timeout_s=30)
    counted = server.metric("nst_iterations_total")
    time.sleep(1.0)
    assert server.metric("nst_iterations_total") == counted
    assert server.metric("nst_job_cancels_total", reason="deadline") == before + 1
    assert server.metric("nst_jobs_total", outcome="deadline_exceeded") >= 1
    assert re.search(r"rpc=/nst.v1.StyleTransfer/Stylize job=\w+ status=DEADLINE_EXCEEDED", server.log())


@pytest.mark.parametrize("seed,code,words", [
    (OOM_SEED, grpc.StatusCode.RESOURCE_EXHAUSTED, "ran out of memory"),
    (ERROR_SEED, grpc.StatusCode.INTERNAL, "failed after 1 iterations: RuntimeError"),
])
def test_a_failing_job_ends_alone_and_the_next_job_succeeds(server, client, small_images, seed, code, words):
    """Failure isolation through the NST_FAULT_INJECT hook (the failure is raised inside the engine's
    optimisation loop, on the worker thread): a clear status for that job, the server lives on."""
    content, style = small_images
    with pytest.raises(NSTError) as error:
        client.stylize(content, style, max_side_px=32, iterations=5, seed=seed)
    assert error.value.code == code
    assert words in error.value.details and "NST_FAULT_INJECT" in error.value.details
    assert client.health() == "SERVING"
    result = client.stylize(content, style, max_side_px=32, iterations=3, seed=seed + 100)
    assert result.stop_reason == "STOP_REASON_ITERATIONS_DONE"
    serving.wait_for(lambda: _idle(server), timeout_s=30)


def test_health_and_model_info_answer_while_two_jobs_run(server, client, small_images, record_property):
    """Health and GetModelInfo answer while N jobs run (the issue asks < 100 ms; the measured latencies are
    printed and recorded as properties; the assertion is only a generous bound)."""
    content, style = small_images
    streams = [TimedStream(server.target, build_request(content, style, max_side_px=96, iterations=2000), timeout_s=120)
               for _ in range(N_RUNNING)]
    try:
        serving.wait_for(lambda: all(s.progress_count() >= 1 for s in streams), timeout_s=60)
        health_ms, info_ms = [], []
        for _ in range(20):
            started = time.perf_counter()
            assert client.health(timeout_s=2.0) == "SERVING"
            health_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            assert client.model_info(timeout_s=2.0).versions["nst"]
            info_ms.append((time.perf_counter() - started) * 1000)
            time.sleep(0.02)
        assert all(not s.done.is_set() for s in streams)                       # the jobs were running throughout
    finally:
        for stream in streams:
            stream.cancel()
    summary = {name: (round(statistics.median(values), 1), round(max(values), 1))
               for name, values in (("health_ms", health_ms), ("model_info_ms", info_ms))}
    print(f"\nwhile {N_RUNNING} jobs run, (median, max): {summary}")
    for name, (median, worst) in summary.items():
        record_property(f"{name}_median", median)
        record_property(f"{name}_max", worst)
    # Each call's 2 s deadline is the bound (DEADLINE_EXCEEDED would fail it); the times are reported, not asserted.
    serving.wait_for(lambda: _idle(server), timeout_s=30)


def test_one_log_line_per_rpc(server, client):
    before = len(server.log().splitlines())
    client.health()
    client.model_info()
    with pytest.raises(NSTError):
        client.stylize(b"not an image", b"not an image", max_side_px=32, iterations=2)

    def rpc_lines() -> list[str]:
        return [line for line in server.log().splitlines()[before:] if "rpc=" in line]

    serving.wait_for(lambda: len(rpc_lines()) >= 3)
    new = rpc_lines()
    assert re.search(r"rpc=/grpc.health.v1.Health/Check job=- status=OK duration_ms=[\d.]+", new[0])
    assert re.search(r"rpc=/nst.v1.StyleTransfer/GetModelInfo job=- status=OK duration_ms=[\d.]+", new[1])
    assert re.search(r"rpc=/nst.v1.StyleTransfer/Stylize job=\w{12} status=INVALID_ARGUMENT duration_ms=", new[2])
    assert len(new) == 3


def test_metrics_move(server):
    assert server.metric("nst_jobs_total", outcome="completed") >= 3
    assert server.metric("nst_jobs_total", outcome="cancelled") >= 1
    assert server.metric("nst_jobs_total", outcome="out_of_memory") == 1
    assert server.metric("nst_jobs_total", outcome="failed") == 1
    assert server.metric("nst_job_queue_seconds_count") >= 3
    assert server.metric("nst_iteration_seconds_count") >= 10
    assert server.metric("nst_iterations_total") >= 10
    assert server.metric("nst_rpcs_total", method="/grpc.health.v1.Health/Check", code="OK") >= 1
    assert server.metric("process_resident_memory_bytes") > 0


def test_load_four_clients_twenty_small_jobs(server, small_images, record_property):
    """The issue's load test: 4 concurrent clients send 20 small jobs to a server with N=2 and Q=2; every job
    completes or is refused with RESOURCE_EXHAUSTED, none hangs, and the server's memory (VmRSS) after the
    last job is within 10 % of its memory after the fifth."""
    content, style = small_images
    serving.wait_for(lambda: _idle(server), timeout_s=30)
    outcomes, rss_kib, lock = [], {}, threading.Lock()

    def one_client(index: int) -> None:
        with NSTClient(server.target) as client:
            for job in range(5):
                try:
                    result = client.stylize(content, style, max_side_px=32 + 8 * ((index + job) % 3),
                                            iterations=3 + job % 3, seed=1000 + index * 10 + job, timeout_s=60)
                    outcome = "completed" if result.stop_reason == "STOP_REASON_ITERATIONS_DONE" else "other"
                except NSTError as error:
                    outcome = error.code.name
                with lock:
                    outcomes.append(outcome)
                    if len(outcomes) in (5, 20):
                        rss_kib[len(outcomes)] = server.rss_kib()

    threads = [threading.Thread(target=one_client, args=(index,)) for index in range(4)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a client hangs"
    elapsed_s = time.perf_counter() - started
    assert len(outcomes) == 20
    assert set(outcomes) <= {"completed", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes.count("completed") >= 10
    growth = rss_kib[20] / rss_kib[5] - 1
    print(f"\nload: {outcomes.count('completed')} completed, {outcomes.count('RESOURCE_EXHAUSTED')} refused in "
          f"{elapsed_s:.1f} s; VmRSS after job 5 {rss_kib[5] / 1024:.1f} MiB, after job 20 "
          f"{rss_kib[20] / 1024:.1f} MiB ({growth:+.2%})")
    record_property("rss_mib_after_5", round(rss_kib[5] / 1024, 1))
    record_property("rss_mib_after_20", round(rss_kib[20] / 1024, 1))
    assert growth <= 0.10                 # memory handed back after jobs (malloc_trim) is no leak
    serving.wait_for(lambda: _idle(server), timeout_s=30)


def test_sigterm_not_serving_refuses_new_jobs_and_ends_running_ones(onnx_path, tmp_path, small_images):
    """SIGTERM: health NOT_SERVING, new jobs UNAVAILABLE, a short running job finishes within the grace, a long
    one ends with UNAVAILABLE when the grace ends, and the process exits with code 0."""
    grace_s = 4.0
    content, style = small_images
    server = serving.start(onnx_path, tmp_path / "server.log",
                           ["--max-running-jobs", "2", "--max-queued-jobs", "1", "--grace-s", str(grace_s)])
    try:
        long = TimedStream(server.target, build_request(content, style, max_side_px=48, iterations=2000), timeout_s=120)
        short = TimedStream(server.target, build_request(content, style, max_side_px=32, iterations=12), timeout_s=120)
        serving.wait_for(lambda: long.progress_count() >= 1 and short.progress_count() >= 1, timeout_s=60)
        server.process.send_signal(signal.SIGTERM)
        serving.wait_for(lambda: "shutting down" in server.log(), timeout_s=10)
        with NSTClient(server.target) as fresh:
            assert fresh.health() == "NOT_SERVING"
            with pytest.raises(NSTError) as error:
                fresh.stylize(content, style, max_side_px=32, iterations=2)
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in error.value.details
        assert short.done.wait(timeout=grace_s + 10) and short.error is None
        assert short.kinds()[-1] == "result"
        assert long.done.wait(timeout=grace_s + 15)
        assert long.error is not None and long.error.code == grpc.StatusCode.UNAVAILABLE, long.error
        assert "grace period" in long.error.details
        assert server.process.wait(timeout=grace_s + 15) == 0                    # exits; a hang raises TimeoutExpired
    finally:
        server.stop()
    assert "stopped" in server.log()


def test_not_serving_until_loaded_and_warmed_up(onnx_path, tmp_path, small_images):
    """Health is NOT_SERVING, and jobs and GetModelInfo are UNAVAILABLE, until the model is loaded and the
    warm-up pass has run (NST_FAULT_INJECT=warmup:SECONDS holds the warm-up back, so the window is wide)."""
    server = serving.launch(onnx_path, tmp_path / "server.log", env={"NST_FAULT_INJECT": "warmup:4"})
    try:
        with NSTClient(server.target) as client:
            assert client.health() == "NOT_SERVING"
            assert client.health("nst.v1.StyleTransfer") == "NOT_SERVING"
            with pytest.raises(NSTError) as error:
                client.stylize(*small_images, max_side_px=32, iterations=2)
            assert error.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in error.value.details
            with pytest.raises(NSTError) as error:
                client.model_info()
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
            serving.wait_listening(server)
            assert client.health() == "SERVING"
            assert client.stylize(*small_images, max_side_px=32, iterations=2).iterations == 2
    finally:
        assert server.stop() == 0
