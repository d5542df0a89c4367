"""Checkpoints: the engine's (a job resumed from a checkpoint goes on numbering its iterations and delivers a valid
result; checkpointing alone changes nothing), the store's (written then renamed, replaced, removed), and the job
API's restarts from them through real nst-server processes on one --state-dir (SIGKILL after a checkpoint, SIGTERM
with a running job). Jobs are tiny (48-64 px, tens of iterations, one thread): the machine has two cores."""

from __future__ import annotations

import contextlib
import io
import math
import re
import signal
import sqlite3
import uuid

import numpy as np
import pytest
from PIL import Image

import serving
from nst_client import NSTClient
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_server import engine
from nst_server.errors import CheckpointMismatch
from nst_server.events import STOP_CANCELLED, STOP_ITERATIONS, Checkpoint, JobInputs, Progress, Result
from nst_server.settings import StyleTransferSettings

#: Two scales (4 + 4 iterations at 48 and 64 px), fp32, so that a resume crosses a scale and lands in the final one.
TWO_SCALES = {"max_side_px": 64, "iterations": 8, "scales": 2, "start_side_px": 48, "pyramid_levels": 1,
              "precision": "fp32", "seed": 3}


def _inputs(small_images) -> JobInputs:
    content, style = (Image.open(io.BytesIO(data)).convert("RGB") for data in small_images)
    return JobInputs(content=content, styles=[(style, 1.0)])


def _run(models, small_images, settings: dict, **kwargs) -> list:
    return list(engine.stylize(models, _inputs(small_images), StyleTransferSettings(**settings), **kwargs))


def _kinds(events: list, kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def test_checkpoints_change_nothing_and_a_resume_goes_on_numbering_to_a_valid_result(models, small_images):
    plain = _run(models, small_images, TWO_SCALES)
    every = _run(models, small_images, TWO_SCALES, checkpoint_now=lambda: True)      # one after every iteration
    checkpoints = _kinds(every, Checkpoint)
    assert [c.iteration for c in checkpoints] == list(range(1, 8))      # but the last: its Result follows
    assert [c.scale for c in checkpoints] == [1, 1, 1, 1, 2, 2, 2]
    # Checkpointing only copies: the same Progress costs and the same bytes as the job without it.
    assert [p.costs for p in _kinds(every, Progress)] == [p.costs for p in _kinds(plain, Progress)]
    assert every[-1].png == plain[-1].png
    first = checkpoints[2]                                            # after iteration 3, at the 48 px scale
    assert first.pixels.shape == (1, 3, 36, 48) and first.pixels.dtype == np.float32
    assert first.best_pixels is None and first.history and len(first.history) == 3
    final = checkpoints[5]                                            # after iteration 6, at the final 64 px scale
    assert final.pixels.shape == (1, 3, 48, 64) and final.best_pixels.shape == (1, 3, 48, 64)
    assert math.isfinite(final.best_total) and 4 <= final.best_iteration <= 6
    for checkpoint in (first, final):
        resumed = _run(models, small_images, TWO_SCALES, resume=checkpoint)
        progress, result = _kinds(resumed, Progress), resumed[-1]
        assert [p.iteration for p in progress] == list(range(checkpoint.iteration + 1, 9))
        assert [p.scale for p in progress] == [1 if i <= 4 else 2 for i in range(checkpoint.iteration + 1, 9)]
        assert progress[0].elapsed_ms >= checkpoint.elapsed_ms                   # the job's time goes on
        assert isinstance(result, Result) and result.stop_reason == STOP_ITERATIONS and result.iterations == 8
        assert Image.open(io.BytesIO(result.png)).size == (64, 48) and result.image.shape == (48, 64, 3)
        assert result.best_iteration >= (checkpoint.best_iteration if checkpoint.best_pixels is not None else 4)
        assert all(math.isfinite(v) for v in (result.costs.content, result.costs.style, result.costs.total))
        # As good as the uninterrupted job (the optimiser's state is rebuilt, so not the same bytes).
        assert result.costs.total < 1.5 * plain[-1].costs.total
        print(f"resumed after iteration {checkpoint.iteration}: J {result.costs.total:.4g}, uninterrupted "
              f"{plain[-1].costs.total:.4g}")


def test_a_stopped_job_checkpoints_the_state_it_stopped_in_and_the_timer_paces_them(models, small_images):
    polls = []

    def stop_after_five() -> bool:
        polls.append(1)
        return len(polls) > 5
    events = _run(models, small_images, TWO_SCALES, should_stop=stop_after_five, checkpoint_s=3600.0)
    assert [type(e).__name__ for e in events[-2:]] == ["Checkpoint", "Result"]
    assert events[-2].iteration == 5 and events[-2].scale == 2 and events[-1].stop_reason == STOP_CANCELLED
    assert len(_kinds(events, Checkpoint)) == 1                  # the hour never passed: only the stop's
    resumed = _run(models, small_images, TWO_SCALES, resume=events[-2])
    assert [p.iteration for p in _kinds(resumed, Progress)] == [6, 7, 8] and resumed[-1].iterations == 8
    paced = _run(models, small_images, TWO_SCALES, checkpoint_s=1e-6)
    assert [c.iteration for c in _kinds(paced, Checkpoint)] == list(range(1, 8))
    assert not _kinds(_run(models, small_images, TWO_SCALES, should_stop=lambda: False), Checkpoint)


def test_adam_resumes_and_a_checkpoint_of_another_schedule_is_refused_before_any_iteration(models, small_images):
    adam = {**TWO_SCALES, "optimizer": "adam", "learning_rate": 4.0}
    checkpoint = _kinds(_run(models, small_images, adam, checkpoint_s=1e-6), Checkpoint)[4]
    resumed = _run(models, small_images, adam, resume=checkpoint)
    assert [p.iteration for p in _kinds(resumed, Progress)] == [6, 7, 8] and resumed[-1].iterations == 8
    for other, message in (({**adam, "scales": 1}, "scales"), ({**adam, "iterations": 4}, "outside its scale"),
                           ({**adam, "max_side_px": 56}, "image is")):
        stream = engine.stylize(models, _inputs(small_images), StyleTransferSettings(**other), resume=checkpoint)
        with pytest.raises(CheckpointMismatch, match=message):
            next(stream)


def test_the_store_writes_replaces_and_removes_checkpoints(tmp_path):
    from nst_server.jobstore import FAILED, JobStore
    store = JobStore(tmp_path)
    store.insert("a" * 32, None, b"request", "digest", 10, b"first")
    pixels = np.random.default_rng(1).random((1, 3, 6, 8), dtype=np.float32) * 255
    one = Checkpoint(scale=1, scales=2, iteration=3, pixels=pixels, history=(3.0, 2.0, 1.5), elapsed_ms=120.0)
    size = store.write_checkpoint("a" * 32, one)
    assert size == (tmp_path / "checkpoints" / f"{'a' * 32}.3.npz").stat().st_size
    two = Checkpoint(scale=2, scales=2, iteration=7, pixels=pixels + 1, best_pixels=pixels, best_total=1.25,
                     best_iteration=6)
    store.write_checkpoint("a" * 32, two)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"{'a' * 32}.7.npz"]   # replaced
    read = store.checkpoint("a" * 32)
    assert (read.scale, read.scales, read.iteration, read.best_total, read.best_iteration) == (2, 2, 7, 1.25, 6)
    assert np.array_equal(read.pixels, pixels + 1) and np.array_equal(read.best_pixels, pixels)
    assert store.checkpoint_row("a" * 32).iteration == 7 and store.checkpoint_count() == 1
    (tmp_path / "checkpoints" / "stray.npz.partial").write_bytes(b"x")          # a write cut short by a kill
    assert store.remove_orphan_files() == 1 and store.checkpoint("a" * 32).iteration == 7
    kept = (tmp_path / "checkpoints" / f"{'a' * 32}.7.npz").read_bytes()
    (tmp_path / "checkpoints" / f"{'a' * 32}.7.npz").write_bytes(kept[:100])    # damaged: refused, not misread
    with pytest.raises(ValueError, match="not a checkpoint"):
        store.checkpoint("a" * 32)
    (tmp_path / "checkpoints" / f"{'a' * 32}.7.npz").write_bytes(kept)
    store.finish("a" * 32, FAILED, 13, "failed")                                  # a finished job keeps none
    assert store.checkpoint("a" * 32) is None and not list((tmp_path / "checkpoints").iterdir())
    store.write_checkpoint("a" * 32, one)                                        # nor gets one afterwards
    assert store.checkpoint("a" * 32) is None and not list((tmp_path / "checkpoints").iterdir())
    store.close()


#: A small job at 48 px on one thread (12-20 ms an iteration on a 2-core EPYC, up to 0.2 s on slower machines); the
#: tests that need it to outlast checkpoints or a shutdown's grace give it more iterations.
JOB = {"max_side_px": 48, "iterations": 60, "seed": 5, "scales": 1, "pyramid_levels": 1}
SERVER_ARGS = ["--threads", "1", "--max-running-jobs", "1", "--max-queued-jobs", "4", "--heartbeat-s", "1"]


def _checkpoint_row(state, job_id: str):
    """(iteration, scale, file, file_bytes) of the job's stored checkpoint, read by another process; None: none."""
    with contextlib.closing(sqlite3.connect(state / "jobs.sqlite3", timeout=10)) as db:
        return db.execute("SELECT iteration, scale, file, file_bytes FROM checkpoints WHERE job_id = ?",
                          (job_id,)).fetchone()


def _runs(events: list[pb.JobEvent]) -> list[list[pb.Progress]]:
    """The Progress messages of each run of a job (a run starts at each JobAccepted)."""
    runs = []
    for event in events:
        kind = event.response.WhichOneof("event")
        if kind == "accepted":
            runs.append([])
        elif kind == "progress":
            runs[-1].append(event.response.progress)
    return runs


def _check_resumed(events: list[pb.JobEvent], resumed_from: int, total: int) -> tuple[int, float]:
    """Every event number once; the second run's Progress goes on from ``resumed_from + 1`` to ``total``. Returns
    the iterations done twice and the time they had taken in the first run, ms."""
    numbers = [e.number for e in events]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    first, second = _runs(events)
    assert [p.iteration for p in first] == list(range(1, len(first) + 1))
    assert [p.iteration for p in second] == list(range(resumed_from + 1, total + 1))
    done_before = first[-1].iteration
    assert done_before >= resumed_from
    by_iteration = {p.iteration: p.elapsed_ms for p in first}
    span_ms = by_iteration[done_before] - by_iteration.get(resumed_from, by_iteration[done_before])
    assert second[0].elapsed_ms >= by_iteration.get(resumed_from, 0.0)             # the job's clock goes on
    return done_before - resumed_from, span_ms


def test_sigkill_after_a_checkpoint_then_restart_repeats_at_most_one_checkpoint_period(onnx_path, tmp_path,
                                                                                    small_images):
    state = tmp_path / "state"
    # A checkpoint every 0.25 s and 200 iterations: JOB's 60 iterations with one a second took 0.72 s on a 2-core
    # EPYC (12 ms an iteration), so the job finished before its first checkpoint and nothing was left to resume.
    checkpoint_s = 0.25
    job_options = {**JOB, "iterations": 200}
    args = [*SERVER_ARGS, "--state-dir", str(state), "--checkpoint-s", str(checkpoint_s)]
    server = serving.start(onnx_path, tmp_path / "first.log", args)
    try:
        with NSTClient(server.target) as client:
            job = client.submit(*small_images, request_id=f"kill-{uuid.uuid4()}", **job_options)
            seen, went_on = [], False
            for event in client.watch(job.job_id):
                seen.append(event)
                if event.response.WhichOneof("event") == "progress":
                    row = _checkpoint_row(state, job.job_id)
                    if row is not None and event.response.progress.iteration >= row[0] + 3:
                        went_on = True
                        break                         # a checkpoint is stored and the job went on past it
            assert went_on, "the job ended before a checkpoint and three more iterations"
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    finally:
        server.stop()
    iteration, scale, name, size = _checkpoint_row(state, job.job_id)        # what the restart goes on from
    assert scale == 1 and 0 < iteration < job_options["iterations"]
    assert (state / "checkpoints" / name).stat().st_size == size
    server = serving.start(onnx_path, tmp_path / "second.log", args)
    try:
        with NSTClient(server.target) as client:
            after = max(e.number for e in seen)
            rest = [e for e in client.watch(job.job_id, after=after) if e.number]    # the watcher reattaches
            events = [e for e in seen if e.number] + rest
            repeated, span_ms = _check_resumed(events, iteration, job_options["iterations"])
            iteration_ms = _slowest_iteration_ms(_runs(events)[0])
            print(f"SIGKILL with --checkpoint-s {checkpoint_s:g}: resumed after iteration {iteration}, iterations "
                  f"done twice: {repeated} ({span_ms:.0f} ms of the first run; one iteration took up to "
                  f"{iteration_ms:.0f} ms)")
            # Only the work after the newest stored checkpoint is done twice: the restart goes on from a checkpoint
            # at least as new as the last one the first run logged (logged after it is stored). The timer's pacing
            # is tested in-process, without a clock (test_a_stopped_job_checkpoints_...); the times are printed.
            logged = [int(n) for n in re.findall(r"checkpoint after iteration (\d+)",
                                                 (tmp_path / "first.log").read_text(errors="replace"))]
            assert logged and iteration >= max(logged), (iteration, logged)
            assert rest[-1].state == pb.JOB_STATE_SUCCEEDED
            assert rest[-1].response.result.iterations == job_options["iterations"]
            status = client.job(job.job_id)
            assert (status.state, status.iterations, status.runs) == (pb.JOB_STATE_SUCCEEDED,
                                                                      job_options["iterations"], 2)
            assert Image.open(io.BytesIO(client.result(job.job_id))).size == (48, 36)
            assert server.metric("nst_jobs_resumed_from_checkpoint_total") == 1
            assert server.metric("nst_jobs_resumed_total") == 1
            assert f"from its checkpoint after iteration {iteration} of {job_options['iterations']}" in server.log()
        assert _checkpoint_row(state, job.job_id) is None and not list((state / "checkpoints").iterdir())
    finally:
        server.stop()


def _slowest_iteration_ms(progress: list[pb.Progress]) -> float:
    return max(b.elapsed_ms - a.elapsed_ms for a, b in zip(progress, progress[1:]))


def test_sigterm_checkpoints_a_running_job_which_goes_on_from_there_after_the_restart(onnx_path, tmp_path,
                                                                                    small_images):
    state = tmp_path / "state"
    # No checkpoint on the timer within the test: the ones stored come from the shutdown.
    args = [*SERVER_ARGS, "--state-dir", str(state), "--checkpoint-s", "3600", "--grace-s", "1"]
    # Far more iterations than the 1 s grace holds (about 20 ms an iteration at 48 px on a 2-core EPYC: JOB's 60
    # left a margin of 0.2 s after iteration 5, and a job that finishes inside the grace leaves no checkpoint).
    job_options = {**JOB, "iterations": 200}
    server = serving.start(onnx_path, tmp_path / "first.log", args)
    with NSTClient(server.target) as client:
        job = client.submit(*small_images, **job_options)
        for event in client.watch(job.job_id):
            if event.response.WhichOneof("event") == "progress" and event.response.progress.iteration >= 5:
                break
    assert server.stop() == 0                                                      # SIGTERM, grace 1 s
    log = server.log()
    assert "stopped by the shutdown after" in log and "checkpoint after iteration" in log
    iteration, _, name, _ = _checkpoint_row(state, job.job_id)
    with contextlib.closing(sqlite3.connect(state / "jobs.sqlite3")) as db:
        assert db.execute("SELECT state FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone() == ("QUEUED",)
    server = serving.start(onnx_path, tmp_path / "second.log", args)
    try:
        with NSTClient(server.target) as client:
            events = [e for e in client.watch(job.job_id) if e.number]
            repeated, _ = _check_resumed(events, iteration, job_options["iterations"])
            print(f"SIGTERM: checkpoint after iteration {iteration}, iterations done twice: {repeated}")
            assert repeated <= 1                           # the checkpoint is taken as the job stops
            assert events[-1].state == pb.JOB_STATE_SUCCEEDED
            assert client.job(job.job_id).runs == 2 and client.job(job.job_id).iterations == job_options["iterations"]
            assert server.metric("nst_jobs_resumed_from_checkpoint_total") == 1
        assert not (state / "checkpoints" / name).exists()
    finally:
        server.stop()


def test_a_checkpoint_that_does_not_fit_the_job_is_dropped_and_the_job_runs_from_its_first_iteration(
        onnx_path, tmp_path, small_images):
    from nst_server.jobstore import write_checkpoint_file
    state = tmp_path / "state"
    args = [*SERVER_ARGS, "--state-dir", str(state), "--checkpoint-s", "3600", "--grace-s", "0.2"]
    # Long enough not to finish within the 0.2 s grace (12 iterations did, on a 2-core EPYC: the job succeeded,
    # its checkpoint was dropped, and the test found none); about 20 ms an iteration at 48 px there.
    job_options = {**JOB, "iterations": 200}
    server = serving.start(onnx_path, tmp_path / "first.log", args)
    with NSTClient(server.target) as client:
        job = client.submit(*small_images, **job_options)
        for event in client.watch(job.job_id):
            if event.response.WhichOneof("event") == "progress" and event.response.progress.iteration >= 2:
                break
    assert server.stop() == 0                                                      # SIGTERM: a checkpoint is stored
    iteration, _, name, _ = _checkpoint_row(state, job.job_id)
    foreign = Checkpoint(scale=1, scales=3, iteration=iteration, pixels=np.zeros((1, 3, 36, 48), np.float32))
    with open(state / "checkpoints" / name, "wb") as file:                       # as if the schedule had changed
        write_checkpoint_file(file, foreign)
    server = serving.start(onnx_path, tmp_path / "second.log", args)
    try:
        with NSTClient(server.target) as client:
            events = [e for e in client.watch(job.job_id) if e.number]
            assert [p.iteration for p in _runs(events)[1]] == list(range(1, 201))         # from its first iteration
            assert events[-1].state == pb.JOB_STATE_SUCCEEDED
            assert server.metric("nst_jobs_resumed_from_checkpoint_total") == 0
        assert "does not fit its schedule" in server.log()
    finally:
        server.stop()
