"""The asyncio client (``nst_client.AsyncNSTClient``, grpc.aio) against a real nst-server on 127.0.0.1: streams,
results (chunked), early exits that cancel the job on the server, concurrent jobs on one client, refusals and
resends, errors as the sync client raises them, health and model info. pytest-asyncio is not used: each test runs
its coroutine with ``asyncio.run``."""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import pytest
from PIL import Image

import serving
from nst_client import AsyncNSTClient, NSTClient, NSTError, StylizeOptions, StylizeResult, build_request
from nst_proto.v1 import style_transfer_pb2 as pb

N_RUNNING, N_QUEUED, CHUNK_BYTES = 2, 2, 1000
LONG = StylizeOptions(max_side_px=48, iterations=2000)              # runs until it is cancelled


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    """nst-server with N=2 running, Q=2 queued, metrics, results in 1000-byte chunks (every result of these
    tests is larger) and a heartbeat every 0.5 s."""
    log = tmp_path_factory.mktemp("aio") / "server.log"
    process = serving.start(onnx_path, log, ["--max-running-jobs", str(N_RUNNING), "--max-queued-jobs",
                                             str(N_QUEUED), "--result-chunk-bytes", str(CHUNK_BYTES),
                                             "--heartbeat-s", "0.5"])
    try:
        yield process
    finally:
        process.stop()


def _counted(server, outcome: str) -> float:
    """Jobs of ``outcome`` (completed, cancelled) on the server: Stylize calls and job-API jobs (which ``stylize``
    runs where the server has the job API) together."""
    event = {"completed": "succeeded"}.get(outcome, outcome)
    return server.metric("nst_jobs_total", outcome=outcome) + server.metric("nst_stored_job_events_total",
                                                                            event=event)


def _idle(server) -> bool:
    return server.metric("nst_jobs_running") == 0 and server.metric("nst_jobs_waiting") == 0


async def _eventually(predicate, timeout_s: float = 60.0, interval_s: float = 0.05):
    """Poll ``predicate`` without blocking the event loop until it returns a true value (returned)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)
    return value


def _kinds(messages) -> list[str]:
    return [m.WhichOneof("event") for m in messages]


def test_a_small_job_streams_to_its_result(server, small_images):
    async def run():
        async with AsyncNSTClient(server.target, timeout_s=120) as client:
            return [m async for m in client.stream(build_request(*small_images, max_side_px=64, iterations=4))]
    messages = asyncio.run(run())
    kinds = _kinds(messages)
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    assert [m.progress.iteration for m in messages if m.WhichOneof("event") == "progress"] == [1, 2, 3, 4]
    chunks = [m.image_chunk for m in messages if m.WhichOneof("event") == "image_chunk"]
    assert len(chunks) >= 2 and [c.offset for c in chunks] == [k * CHUNK_BYTES for k in range(len(chunks))]
    assert messages[-1].result.image_png == b""                 # sent in chunks
    png = b"".join(c.data for c in chunks)
    assert len(png) == chunks[0].total_bytes
    assert Image.open(io.BytesIO(png)).size == (64, 48) == (messages[-1].result.width_px,
                                                            messages[-1].result.height_px)


def test_stylize_returns_the_same_result_as_the_sync_client(server, small_images):
    """Same inputs, seed and settings on one server: the same bytes; callbacks may be coroutine functions; the
    job counts as completed on the server (the client reads past the Result)."""
    progress = []

    async def on_progress(message) -> None:
        await asyncio.sleep(0)
        progress.append(message.iteration)

    async def run() -> StylizeResult:
        async with AsyncNSTClient(server.target, timeout_s=120) as client:
            return await client.stylize(*small_images, StylizeOptions(max_side_px=32, seed=3), iterations=3,
                                        on_progress=on_progress)
    completed = _counted(server, "completed")
    result = asyncio.run(run())
    assert isinstance(result, StylizeResult) and progress == [1, 2, 3] == [p.iteration for p in result.progress]
    assert Image.open(io.BytesIO(result.image_png)).size == (32, 24) == (result.width_px, result.height_px)
    assert result.stop_reason == "STOP_REASON_ITERATIONS_DONE" and result.attempts == 1
    assert result.job_id and result.replica and result.precision
    serving.wait_for(lambda: _counted(server, "completed") == completed + 1)
    assert _counted(server, "cancelled") == 0
    with NSTClient(server.target, timeout_s=120) as client:
        same = client.stylize(*small_images, max_side_px=32, iterations=3, seed=3)
    assert same.image_png == result.image_png and same.total_cost == result.total_cost


async def _read_until_second_progress(stream, seen: list) -> None:
    async for message in stream:
        seen.append(message)
        if _kinds(seen).count("progress") >= 2:
            return


@pytest.mark.parametrize("how", ["break", "aclose", "cancel_stream_task", "cancel_stylize_task"])
def test_leaving_early_cancels_the_job_on_the_server(server, small_images, how):
    """After the second Progress: ``break`` out of ``async for``, ``await stream.aclose()``, or cancel the task
    reading the stream or awaiting ``stylize``. The server counts a client cancel, its iteration counter stops,
    and the same client runs the next job."""
    content, style = small_images
    request = LONG.to_request(content, style)

    async def run() -> None:
        await _eventually(lambda: _idle(server))
        cancels = server.metric("nst_job_cancels_total", reason="client")
        async with AsyncNSTClient(server.target, timeout_s=120) as client:
            seen: list = []
            if how == "break":
                async for message in client.stream(request):
                    seen.append(message)
                    if _kinds(seen).count("progress") >= 2:
                        break
            elif how == "aclose":
                stream = client.stream(request)            # held: only aclose() can end it here
                await _read_until_second_progress(stream, seen)
                await asyncio.sleep(0.5)
                assert server.metric("nst_job_cancels_total", reason="client") == cancels   # still running
                assert server.metric("nst_jobs_running") == 1
                await stream.aclose()
            else:
                if how == "cancel_stream_task":
                    task = asyncio.create_task(_read_all(client.stream(request), seen))
                else:
                    task = asyncio.create_task(client.stylize(content, style, LONG, on_progress=seen.append))
                await _eventually(lambda: len([m for m in seen if isinstance(m, pb.Progress)
                                               or m.WhichOneof("event") == "progress"]) >= 2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await _eventually(lambda: server.metric("nst_job_cancels_total", reason="client") == cancels + 1)
            await _eventually(lambda: _idle(server))
            counted = server.metric("nst_iterations_total")
            await asyncio.sleep(1.0)
            assert server.metric("nst_iterations_total") == counted      # no iteration after the stop
            result = await client.stylize(content, style, max_side_px=32, iterations=2)
            assert result.iterations == 2
    asyncio.run(run())


async def _read_all(stream, seen: list) -> None:
    async for message in stream:
        seen.append(message)


def test_two_concurrent_jobs_on_one_client(server, small_images):
    content, style = small_images

    async def run() -> list[StylizeResult]:
        await _eventually(lambda: _idle(server))
        running = []

        def on_progress(progress) -> None:
            running.append(server.metric("nst_jobs_running"))

        async with AsyncNSTClient(server.target, timeout_s=120) as client:
            return await asyncio.gather(
                client.stylize(content, style, max_side_px=48, iterations=8, seed=1, on_progress=on_progress),
                client.stylize(style, content, max_side_px=40, iterations=6, seed=2)), running
    (first, second), running = asyncio.run(run())
    assert first.job_id != second.job_id
    assert (first.iterations, first.width_px) == (8, 48) and (second.iterations, second.width_px) == (6, 40)
    assert 2 in running                                  # both jobs were on the server at once


def test_invalid_argument_is_the_same_nst_error_as_the_sync_clients(server, small_images):
    async def run() -> NSTError:
        async with AsyncNSTClient(server.target, timeout_s=120) as client:
            with pytest.raises(NSTError) as error:
                await client.stylize(*small_images, max_side_px=8, iterations=2)
            return error.value
    error = asyncio.run(run())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "max_side_px" in error.details
    assert [field for field, _ in error.field_violations] == ["max_side_px"]
    with NSTClient(server.target, timeout_s=120) as client:
        with pytest.raises(NSTError) as sync_error:
            client.stylize(*small_images, max_side_px=8, iterations=2)
    assert (error.code, error.details, error.field_violations) == (
        sync_error.value.code, sync_error.value.details, sync_error.value.field_violations)
    assert str(error) == str(sync_error.value)


def test_health_model_info_and_wait_until_serving(server):
    async def run():
        async with AsyncNSTClient(server.target) as client:
            await client.wait_until_serving(timeout_s=30)
            return await client.health(), await client.health("nst.v1.StyleTransfer"), await client.model_info()
    status, service_status, info = asyncio.run(run())
    assert status == service_status == "SERVING"
    with NSTClient(server.target) as client:
        assert info == client.model_info()
    assert (info.max_running_jobs, info.max_queued_jobs) == (N_RUNNING, N_QUEUED) and info.heartbeat_s == 0.5


def test_an_unreachable_server_is_an_nst_error():
    async def run():
        async with AsyncNSTClient("127.0.0.1:1") as client:
            with pytest.raises(NSTError) as health:
                await client.health(timeout_s=2)
            with pytest.raises(NSTError) as waited:
                await client.wait_until_serving(timeout_s=0.5)
            return health.value, waited.value
    health, waited = asyncio.run(run())
    assert health.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert waited.code == grpc.StatusCode.DEADLINE_EXCEEDED and "not SERVING" in waited.details


def test_the_deadline_covers_the_job(server, small_images):
    async def run() -> NSTError:
        await _eventually(lambda: _idle(server))
        async with AsyncNSTClient(server.target) as client:
            with pytest.raises(NSTError) as error:
                await client.stylize(*small_images, LONG, timeout_s=1.0)
            await _eventually(lambda: _idle(server))        # the server stopped the job when the deadline passed
            return error.value
    # LONG's 2000 iterations run until cancelled: the call ends by its deadline, not by the job's end.
    assert asyncio.run(run()).code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_refused_job_is_sent_again_and_waiting_jobs_get_heartbeats(server, small_images):
    """N jobs run and Q wait (their heartbeats reach an async on_heartbeat); a further job is refused with
    RESOURCE_EXHAUSTED and, with busy_retry_s, sent again after on_retry (a coroutine) freed the server."""
    content, style = small_images

    async def run():
        await _eventually(lambda: _idle(server))
        heartbeats, retries, blockers = [], [], []

        async def on_heartbeat(heartbeat) -> None:
            heartbeats.append(heartbeat)

        async def on_retry(retry) -> None:
            retries.append(retry)
            for task in blockers:
                task.cancel()
            await asyncio.gather(*blockers, return_exceptions=True)

        async with AsyncNSTClient(server.target, timeout_s=120, busy_retry_s=60) as client:
            for _ in range(N_RUNNING + N_QUEUED):
                blockers.append(asyncio.create_task(client.stylize(content, style, LONG,
                                                                   on_heartbeat=on_heartbeat)))
                await asyncio.sleep(0.3)                 # admitted in order
            await _eventually(lambda: server.metric("nst_jobs_running") == N_RUNNING
                              and server.metric("nst_jobs_waiting") == N_QUEUED)
            await _eventually(lambda: any(h.queue_position >= 1 for h in heartbeats))
            result = await client.stylize(content, style, max_side_px=32, iterations=2, on_retry=on_retry)
        return result, retries, heartbeats, blockers
    result, retries, heartbeats, blockers = asyncio.run(run())
    assert result.attempts == len(retries) + 1 >= 2 and result.iterations == 2
    assert retries[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not retries[0].accepted
    assert all(task.cancelled() for task in blockers)
    serving.wait_for(lambda: _idle(server))
