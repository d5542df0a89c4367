"""The job API (SubmitJob, WatchJob, GetJob, GetJobResult, CancelJob, ListJobs) through real nst-server processes on
127.0.0.1, with real SQLite files under tmp_path: reattaching misses nothing and repeats nothing, idempotent
submissions, cancels, pages, expiry, the state budget, the token, and restarts (SIGKILL and SIGTERM) on the same
--state-dir. Jobs are tiny (48 px, a few iterations, one thread) so that the machine's two cores stay usable."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
import uuid

import grpc
import pytest

import serving
from nst_client import NSTClient, NSTError, build_request
from nst_client.cli import main as client_main
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc

#: A tiny job: 48 px, single thread on the server, a fixed seed (same bytes every run on this machine).
TINY = {"max_side_px": 48, "iterations": 6, "seed": 5, "scales": 1, "pyramid_levels": 1}
SERVER_ARGS = ["--threads", "1", "--max-running-jobs", "1", "--max-queued-jobs", "4", "--heartbeat-s", "1"]
FINISHED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


def _wait_finished(client: NSTClient, job_id: str, timeout_s: float = 120.0) -> pb.JobStatus:
    return serving.wait_for(lambda: (s := client.job(job_id)).state in FINISHED and s, timeout_s, 0.1)


def _assemble(events: list[pb.JobEvent]) -> bytes:
    """The result PNG carried by a job's events (ImageChunk pieces, or the Result's image_png)."""
    chunks = [e.response.image_chunk.data for e in events if e.response.WhichOneof("event") == "image_chunk"]
    results = [e.response.result for e in events if e.response.WhichOneof("event") == "result"]
    assert len(results) == 1
    return b"".join(chunks) if chunks else results[0].image_png


@pytest.fixture(scope="module")
def job_server(onnx_path, tmp_path_factory):
    """A server with a state folder and results in 1000-byte chunks (so that the chunks' replay from the result
    file is exercised)."""
    folder = tmp_path_factory.mktemp("job_server")
    server = serving.start(onnx_path, folder / "server.log",
                           [*SERVER_ARGS, "--state-dir", str(folder / "state"), "--result-chunk-bytes", "1000"])
    try:
        yield server, folder / "state"
    finally:
        server.stop()


@pytest.fixture()
def jobs_client(job_server):
    with NSTClient(job_server[0].target, timeout_s=300) as client:
        yield client


def test_a_dropped_watch_resumed_with_after_gets_every_event_once_and_the_stylize_bytes(jobs_client, small_images):
    content, style = small_images
    options = {**TINY, "iterations": 10}
    reply = jobs_client.submit(content, style, request_id=f"reattach-{uuid.uuid4()}", **options)
    assert len(reply.job_id) == 32 and int(reply.job_id, 16) >= 0 and reply.created       # 128 bits, hex
    first = []
    watch = jobs_client.watch(reply.job_id)
    for event in watch:
        first.append(event)
        if sum(e.response.WhichOneof("event") == "progress" for e in first) == 3:
            break
    watch.close()                                          # the watcher leaves; the job goes on
    last = max(e.number for e in first)
    started = time.perf_counter()
    second = list(jobs_client.watch(reply.job_id, after=last))
    numbers = [e.number for e in first + second if e.number]          # heartbeats have number 0
    assert numbers == list(range(1, len(numbers) + 1)), numbers       # every number once, in order
    events = [e for e in first + second if e.number]
    assert events[0].response.WhichOneof("event") == "accepted" and events[0].response.accepted.job_id == reply.job_id
    assert events[-1].state == pb.JOB_STATE_SUCCEEDED and events[-1].response.WhichOneof("event") == "result"
    iterations = [e.response.progress.iteration for e in events if e.response.WhichOneof("event") == "progress"]
    assert iterations == list(range(1, 11))
    png = _assemble(events)
    assert jobs_client.result(reply.job_id) == png
    reference = jobs_client.stylize(content, style, **options)       # one uninterrupted stream, same request
    assert reference.image_png == png
    status = jobs_client.job(reply.job_id)
    assert (status.state, status.iterations, status.events, status.runs) == (pb.JOB_STATE_SUCCEEDED, 10, numbers[-1], 1)
    assert status.result_bytes == len(png) and (status.result_width_px, status.result_height_px) == (48, 36)
    assert status.expires_unix_s == pytest.approx(status.finished_unix_s + 86400)
    print(f"reattached and read the rest of the job in {time.perf_counter() - started:.3f} s")
    # A finished job watched again from 0 replays everything and ends.
    assert [e.number for e in jobs_client.watch(reply.job_id)] == numbers


def test_the_same_request_id_is_one_job_also_from_two_threads_at_once(job_server, jobs_client, small_images):
    content, style = small_images
    request_id = f"same-{uuid.uuid4()}"
    one = jobs_client.submit(content, style, request_id=request_id, **TINY)
    two = jobs_client.submit(content, style, request_id=request_id, **TINY)
    assert one.job_id == two.job_id and one.created and not two.created
    with pytest.raises(NSTError) as error:                 # the same key for another request
        jobs_client.submit(content, style, request_id=request_id, **{**TINY, "seed": 6})
    assert error.value.code == grpc.StatusCode.ALREADY_EXISTS and one.job_id in error.value.details

    concurrent = f"concurrent-{uuid.uuid4()}"
    replies, barrier = [], threading.Barrier(2)

    def submit() -> None:
        with NSTClient(job_server[0].target) as client:          # two clients, two connections
            barrier.wait()
            replies.append(client.submit(content, style, request_id=concurrent, **TINY))
    threads = [threading.Thread(target=submit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(replies) == 2 and replies[0].job_id == replies[1].job_id
    assert sorted(r.created for r in replies) == [False, True]
    with sqlite3.connect(job_server[1] / "jobs.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE request_id = ?", (concurrent,)).fetchone() == (1,)
    for job_id in (one.job_id, replies[0].job_id):
        assert _wait_finished(jobs_client, job_id).state == pb.JOB_STATE_SUCCEEDED


def test_unknown_jobs_are_not_found_and_bad_requests_invalid_argument(jobs_client, small_images):
    unknown = uuid.uuid4().hex
    calls = [lambda: jobs_client.job(unknown), lambda: jobs_client.result(unknown),
             lambda: jobs_client.cancel(unknown), lambda: list(jobs_client.watch(unknown)),
             lambda: jobs_client.job("")]
    for call in calls:
        with pytest.raises(NSTError) as error:
            call()
        assert error.value.code == grpc.StatusCode.NOT_FOUND and "no job" in error.value.details
    with pytest.raises(NSTError) as error:
        jobs_client.submit(small_images[0], small_images[1], max_side_px=8)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in error.value.field_violations] == ["max_side_px"]
    with pytest.raises(NSTError) as error:
        jobs_client.submit(small_images[0], small_images[1], request_id="x" * 129, **TINY)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.field_violations[0][0] == "request_id"
    # An image that cannot be decoded fails the job (as Stylize fails after JobAccepted), naming the field.
    reply = jobs_client.submit(b"not an image", small_images[1], **TINY)
    status = _wait_finished(jobs_client, reply.job_id)
    assert status.state == pb.JOB_STATE_FAILED and "content_image" in status.error_message
    assert status.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    with pytest.raises(NSTError) as error:
        jobs_client.result(reply.job_id)
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION and "FAILED" in error.value.details


def test_cancel_a_running_and_a_queued_job(jobs_client, small_images):
    content, style = small_images
    running = jobs_client.submit(content, style, **{**TINY, "iterations": 500})
    queued = jobs_client.submit(content, style, **{**TINY, "iterations": 500, "seed": 7})
    for event in jobs_client.watch(running.job_id):
        if event.response.WhichOneof("event") == "progress":
            break
    assert jobs_client.job(queued.job_id).state == pb.JOB_STATE_QUEUED
    assert jobs_client.job(queued.job_id).queue_position == 1
    waiting = jobs_client.watch(queued.job_id)                     # quiet while it waits: heartbeats (--heartbeat-s 1)
    events = [next(waiting), next(waiting)]
    waiting.close()
    assert [e.number for e in events] == [1, 0] and events[1].response.heartbeat.queue_position == 1
    cancelled = jobs_client.cancel(queued.job_id)
    assert cancelled.state == pb.JOB_STATE_CANCELLED and "while queued" in cancelled.error_message
    jobs_client.cancel(running.job_id)
    events = [e for e in jobs_client.watch(running.job_id) if e.number]
    assert events[-1].state == pb.JOB_STATE_CANCELLED and events[-1].error_code == grpc.StatusCode.CANCELLED.value[0]
    status = jobs_client.job(running.job_id)
    assert status.state == pb.JOB_STATE_CANCELLED and status.iterations < 500
    assert jobs_client.cancel(running.job_id).state == pb.JOB_STATE_CANCELLED      # a finished job stays as it is
    with pytest.raises(NSTError) as error:
        jobs_client.result(running.job_id)
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_list_jobs_in_pages_and_by_state(job_server, jobs_client, small_images):
    for seed in (11, 12, 13):
        jobs_client.submit(*small_images, **{**TINY, "iterations": 2, "seed": seed})
    jobs_client.cancel(jobs_client.submit(*small_images, **{**TINY, "iterations": 500, "seed": 14}).job_id)
    every = list(jobs_client.jobs())
    assert len(every) >= 4 and [j.submitted_unix_s for j in every] == sorted(j.submitted_unix_s for j in every)
    assert [j.job_id for j in jobs_client.jobs(page_size=2)] == [j.job_id for j in every]
    with grpc.insecure_channel(job_server[0].target) as channel:
        stub = pb_grpc.StyleTransferStub(channel)
        page = stub.ListJobs(pb.ListJobsRequest(page_size=2))
        assert len(page.jobs) == 2 and page.next_page_token
        following = stub.ListJobs(pb.ListJobsRequest(page_size=2, page_token=page.next_page_token))
        assert following.jobs[0].job_id == every[2].job_id
        with pytest.raises(grpc.RpcError) as error:
            stub.ListJobs(pb.ListJobsRequest(page_token="not a token"))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for job in every:
        _wait_finished(jobs_client, job.job_id)
    cancelled = list(jobs_client.jobs("cancelled"))
    assert cancelled and all(j.state == pb.JOB_STATE_CANCELLED for j in cancelled)
    assert {j.job_id for j in jobs_client.jobs(pb.JOB_STATE_SUCCEEDED)} < {j.job_id for j in every}


def test_the_cli_submits_watches_fetches_lists_and_cancels(job_server, small_images, tmp_path, capsys):
    content, style = tmp_path / "content.png", tmp_path / "style.png"
    content.write_bytes(small_images[0])
    style.write_bytes(small_images[1])
    server = ["--server", job_server[0].target]
    assert client_main(["submit", str(content), str(style), *server, "--size", "48", "--iterations", "3",
                        "--seed", "5", "--request-id", f"cli-{uuid.uuid4()}"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert len(job_id) == 32
    assert client_main(["watch", job_id, *server, "--quiet"]) == 0
    assert "succeeded" in capsys.readouterr().out
    assert client_main(["result", job_id, *server, "-o", str(tmp_path / "out.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "out.png").size == (48, 36)
    capsys.readouterr()
    assert client_main(["jobs", *server, "--state", "succeeded"]) == 0
    assert job_id in capsys.readouterr().out
    assert client_main(["cancel", job_id, *server]) == 0
    assert "JOB_STATE_SUCCEEDED" in capsys.readouterr().out
    assert client_main(["watch", uuid.uuid4().hex, *server]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_the_asyncio_client_has_the_job_api(job_server, small_images):
    import asyncio

    from nst_client import AsyncNSTClient

    async def scenario():
        async with AsyncNSTClient(job_server[0].target) as client:
            reply = await client.submit(*small_images, **{**TINY, "iterations": 3})
            numbers = [event.number async for event in client.watch(reply.job_id) if event.number]
            status = await client.job(reply.job_id)
            png = await client.result(reply.job_id)
            listed = await client.jobs(page_size=1)
            return reply, numbers, status, png, listed
    reply, numbers, status, png, listed = asyncio.run(scenario())
    assert numbers == list(range(1, len(numbers) + 1)) and status.state == pb.JOB_STATE_SUCCEEDED
    assert png.startswith(b"\x89PNG") and reply.job_id in {j.job_id for j in listed}


def test_results_expire_and_a_full_state_folder_refuses_new_jobs_but_keeps_old_ones(onnx_path, tmp_path,
                                                                                   small_images):
    state = tmp_path / "state"
    token = "job-api-token"
    server = serving.start(onnx_path, tmp_path / "server.log",
                           [*SERVER_ARGS, "--state-dir", str(state), "--result-ttl-s", "8", "--state-budget", "1MiB",
                            "--auth-token", token], client_options={"token": token})
    try:
        with NSTClient(server.target, token=token) as client:
            old = client.submit(*small_images, **{**TINY, "iterations": 2})
            assert _wait_finished(client, old.job_id).state == pb.JOB_STATE_SUCCEEDED
            (state / "filler.bin").write_bytes(b"\0" * (2 << 20))       # the folder is now over its 1 MiB
            with pytest.raises(NSTError) as error:
                client.submit(*small_images, **{**TINY, "iterations": 2})
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--state-budget" in error.value.details
            assert client.job(old.job_id).state == pb.JOB_STATE_SUCCEEDED          # old jobs stay readable
            assert client.result(old.job_id).startswith(b"\x89PNG")
            assert [e.number for e in client.watch(old.job_id)][-1] == client.job(old.job_id).events
            (state / "filler.bin").unlink()
            serving.wait_for(lambda: server.metric("nst_stored_jobs", state="succeeded") == 1, 30.0, 0.25)
            assert 0 < server.metric("nst_state_bytes") < 1 << 20
            assert server.metric("nst_stored_job_events_total", event="submitted") == 1
            # Every job RPC wants the token.
            with NSTClient(server.target) as anonymous:
                for call in (lambda: anonymous.job(old.job_id), lambda: list(anonymous.jobs()),
                             lambda: anonymous.submit(*small_images, **TINY), lambda: anonymous.result(old.job_id),
                             lambda: list(anonymous.watch(old.job_id)), lambda: anonymous.cancel(old.job_id)):
                    with pytest.raises(NSTError) as error:
                        call()
                    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert (state / "results" / f"{old.job_id}.png").exists()
            finished = client.job(old.job_id).finished_unix_s
            serving.wait_for(lambda: _gone(client, old.job_id), timeout_s=30.0, interval_s=0.25)
            assert time.time() >= finished + 8
            assert not (state / "results" / f"{old.job_id}.png").exists()
            with sqlite3.connect(state / "jobs.sqlite3") as db:
                assert db.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (old.job_id,)).fetchone() == (0,)
    finally:
        server.stop()


def _gone(client: NSTClient, job_id: str) -> bool:
    try:
        client.job(job_id)
    except NSTError as error:
        return error.code == grpc.StatusCode.NOT_FOUND
    return False


def test_sigkill_and_sigterm_mid_job_then_restart_on_the_same_state_dir(onnx_path, tmp_path, small_images):
    state = tmp_path / "state"
    args = [*SERVER_ARGS, "--state-dir", str(state), "--grace-s", "0.2"]
    server = serving.start(onnx_path, tmp_path / "first.log", args)
    long_job = {**TINY, "iterations": 40}
    with NSTClient(server.target) as client:
        first = client.submit(*small_images, request_id="restart-first", **long_job)
        queued = [client.submit(*small_images, **{**TINY, "iterations": 2, "seed": seed}) for seed in (21, 22)]
        seen = []
        for event in client.watch(first.job_id):
            seen.append(event)
            if sum(e.response.WhichOneof("event") == "progress" for e in seen) == 2:
                break
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    started = time.perf_counter()
    server = serving.start(onnx_path, tmp_path / "second.log", args)
    try:
        print(f"restarted and SERVING in {time.perf_counter() - started:.1f} s")
        with NSTClient(server.target) as client:
            after = max(e.number for e in seen)
            rest = list(client.watch(first.job_id, after=after))         # the watcher reattaches
            numbers = [e.number for e in seen + rest if e.number]
            assert numbers == list(range(1, len(numbers) + 1))
            kinds = [e.response.WhichOneof("event") for e in rest if e.number]
            assert kinds[0] == "accepted" and kinds[-1] == "result"     # queued again on the new process
            assert rest[-1].state == pb.JOB_STATE_SUCCEEDED
            status = client.job(first.job_id)
            assert status.runs == 2 and status.iterations == 40
            before_kill = max(e.response.progress.iteration for e in seen
                              if e.response.WhichOneof("event") == "progress")
            print(f"iterations done before the SIGKILL and done again after the restart: {before_kill}")
            # Run again from its first iteration, the job delivers the bytes of one uninterrupted Stylize.
            assert client.result(first.job_id) == client.stylize(*small_images, **long_job).image_png
            assert client.submit(*small_images, request_id="restart-first", **long_job).job_id == first.job_id
            done = [_wait_finished(client, job.job_id) for job in queued]
            assert all(s.state == pb.JOB_STATE_SUCCEEDED for s in done)
            assert status.started_unix_s < done[0].started_unix_s < done[1].started_unix_s      # submission order
            log = server.log()
            assert server.metric("nst_jobs_resumed_total") == 3
            assert "QUEUED when the server stopped" in log and "RUNNING when the server stopped" in log
            # SIGTERM with one job running and one queued: both complete after the next start.
            running = client.submit(*small_images, **{**long_job, "seed": 31})
            waiting = client.submit(*small_images, **{**TINY, "iterations": 2, "seed": 32})
            for event in client.watch(running.job_id):
                if event.response.WhichOneof("event") == "progress":
                    break
        assert server.stop() == 0
        with sqlite3.connect(state / "jobs.sqlite3") as db:                  # intact, both back in line
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            states = dict(db.execute("SELECT job_id, state FROM jobs WHERE job_id IN (?, ?)",
                                     (running.job_id, waiting.job_id)).fetchall())
        assert states == {running.job_id: "QUEUED", waiting.job_id: "QUEUED"}
        server = serving.start(onnx_path, tmp_path / "third.log", args)
        with NSTClient(server.target) as client:
            for job in (running, waiting):
                assert _wait_finished(client, job.job_id).state == pb.JOB_STATE_SUCCEEDED
            assert client.job(running.job_id).runs == 2
    finally:
        server.stop()


def test_stylize_is_unchanged_beside_the_job_api(jobs_client, small_images):
    messages = list(jobs_client.stream(build_request(*small_images, **{**TINY, "iterations": 2})))
    assert messages[0].WhichOneof("event") == "accepted" and messages[-1].WhichOneof("event") == "result"


def test_the_store_alone_one_job_per_request_id_under_threads_expiry_and_stray_files(tmp_path):
    from nst_server.jobstore import JobStore, SUCCEEDED
    store = JobStore(tmp_path)
    results = []

    def insert(index: int) -> None:
        results.append(store.insert(f"{index:032x}", "shared", b"request", "digest", 6, b"first"))
    threads = [threading.Thread(target=insert, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len({row.job_id for row, _ in results}) == 1 and sum(created for _, created in results) == 1
    job_id = results[0][0].job_id
    assert [e.number for e in store.events(job_id, 0)] == [1]
    store.succeed(job_id, b"\x89PNG-bytes", 4, 3, b"", [(b"result", 0, 10)], now_s=100.0)
    assert store.get(job_id).state == SUCCEEDED and store.read_result(job_id) == b"\x89PNG-bytes"
    (store.results_dir / "stray.png.partial").write_bytes(b"x")
    assert store.remove_orphan_files() == 1 and store.result_path(job_id).exists()
    assert store.expire(ttl_s=50.0, now_s=140.0) == [] and store.expire(ttl_s=50.0, now_s=151.0) == [job_id]
    assert store.get(job_id) is None and store.events(job_id, 0) == [] and not store.result_path(job_id).exists()
    store.close()
    store.close()                                            # idempotent
