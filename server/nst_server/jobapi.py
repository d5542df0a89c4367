"""The job API (``SubmitJob``, ``WatchJob``, ``GetJob``, ``GetJobResult``, ``CancelJob``, ``ListJobs``): jobs that
outlive their connection, stored in a :class:`~nst_server.jobstore.JobStore` under ``--state-dir``.

A submitted job is validated as ``Stylize`` validates its request (:func:`~nst_server.messages.settings_from_request`,
the memory estimate), stored QUEUED with its first event (``JobAccepted``), and put in line. The line is the
servicer's :class:`~nst_server.jobs.Admission`, shared with ``Stylize`` calls (first in, first out, N running + Q
waiting, the memory budget); stored jobs beyond N + Q wait here, in submission order, and are admitted as slots
free (``Admission.on_release``). A worker thread runs the job through the servicer's one path to the engine
(:meth:`~nst_server.servicer.StyleTransferServicer.engine_events`) and appends every event to the store, then
wakes the job's watchers (an ``asyncio.Event`` per job, set from the worker through the event loop: watchers wait
on it, never poll the database). ``WatchJob`` replays the stored events after ``after`` and then follows the live
ones; leaving it never stops the job; ``CancelJob`` sets the job's stop flag (the engine polls it once per
iteration), as a Stylize client's cancel does.

Checkpoints (``--checkpoint-s``, default :data:`DEFAULT_CHECKPOINT_S`; 0: none): a running job's engine hands over a
:class:`~nst_server.events.Checkpoint` at most every ``checkpoint_s`` seconds (its image, scale, iteration count and
best iterate; the optimiser's state is not kept), which the store writes to a file (written, fsynced, renamed)
named by the job's ``checkpoints`` row, replacing the one before; a finished job's checkpoint is removed.

Restart: jobs found QUEUED or RUNNING at start run again in submission order; one with a checkpoint goes on from it
(its Progress numbering continues after the checkpoint's iteration; the iterations run after the checkpoint and
before the process ended are done again: at most one checkpoint period's), one without from its first iteration;
each gets a new ``JobAccepted`` event naming this process, and its event numbers go on from the last stored one.
Shutdown (SIGTERM): jobs not started stay QUEUED; running jobs write a checkpoint after their current iteration,
then run on through the grace period; a job still running when it ends writes one more checkpoint as it stops
and goes back to QUEUED.

Expiry: finished jobs are removed ``--result-ttl-s`` after they finished (rows, events, result file); the folder's
size is checked against ``--state-budget`` at each submission (over it: RESOURCE_EXHAUSTED naming the budget; the
jobs stored stay readable).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import sqlite3
import time
from collections import deque
from dataclasses import dataclass

import grpc

from nst_proto.jobids import new_job_id
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_server import metrics
from nst_server.errors import CheckpointMismatch, FieldError, NSTServerError, ServerBusy
from nst_server.events import STOP_CANCELLED, Checkpoint, Progress, Result
from nst_server.jobs import STOP_CLIENT, STOP_SHUTDOWN, Job
from nst_server.jobstore import (CANCELLED, FAILED, FINISHED, QUEUED, RUNNING, SUCCEEDED, JobRow, JobStore,
                                 StoredEvent)
from nst_server.memory import format_bytes
from nst_server.messages import settings_from_request, to_proto
from nst_server.model import release_free_memory
from nst_server.settings import StyleTransferSettings

log = logging.getLogger(__name__)

#: Store state name <-> ``nst.v1.JobState``.
STATES = {QUEUED: pb.JOB_STATE_QUEUED, RUNNING: pb.JOB_STATE_RUNNING, SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
          FAILED: pb.JOB_STATE_FAILED, CANCELLED: pb.JOB_STATE_CANCELLED}
STATE_NAMES = {number: name for name, number in STATES.items()}

#: Longest ``SubmitJobRequest.request_id``, characters.
MAX_REQUEST_ID_CHARS = 128
#: ``ListJobsRequest.page_size``: 0 means this many; at most :data:`MAX_PAGE_SIZE`.
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 1000
#: Default ``--result-ttl-s`` (a day) and ``--state-budget`` (10 GiB).
DEFAULT_RESULT_TTL_S = 86400.0
DEFAULT_STATE_BUDGET_BYTES = 10 * 1024**3
#: Default ``--checkpoint-s``: a restart repeats at most this many seconds of a running job's work.
DEFAULT_CHECKPOINT_S = 30.0


class StateBudgetExceeded(NSTServerError):
    """The state folder holds more than its budget: new jobs are refused (RESOURCE_EXHAUSTED)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class JobNotFound(NSTServerError):
    """No job with that id on this server (never submitted here, or expired): NOT_FOUND."""

    status = grpc.StatusCode.NOT_FOUND

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} on this server (unknown, or removed --result-ttl-s after it finished)")


class JobConflict(NSTServerError):
    """A ``request_id`` that names a job of another request: ALREADY_EXISTS."""

    status = grpc.StatusCode.ALREADY_EXISTS


class NoResult(NSTServerError):
    """``GetJobResult`` of a job that has no result (not SUCCEEDED): FAILED_PRECONDITION."""

    status = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class _Pending:
    """A stored job not admitted yet: what admission and the worker need, parsed once."""

    job_id: str
    request: pb.StylizeRequest
    settings: StyleTransferSettings
    memory_bytes: int


class JobService:
    """The job API of one servicer (:class:`~nst_server.servicer.StyleTransferServicer`), over ``store``.

    Args:
        servicer: its admission, worker pool, limits and models are the jobs' too.
        store: where jobs live (:class:`~nst_server.jobstore.JobStore`).
        result_ttl_s: finished jobs are removed this long after they finished, s (> 0).
        state_budget_bytes: new jobs are refused while the folder holds more than this, bytes; 0: no budget.
        owned_dir: a temporary ``--state-dir`` made for this process, removed by :meth:`close`; None: the
            caller's folder, kept.
        checkpoint_s: a running job writes a checkpoint at most this often, s; 0: none (a restart runs a job
            again from its first iteration, unless a checkpoint of an earlier process is stored).
    Raises:
        ValueError: ``result_ttl_s`` <= 0, ``state_budget_bytes`` < 0 or ``checkpoint_s`` < 0 (the message names
            the flag).
    """

    def __init__(self, servicer, store: JobStore, result_ttl_s: float = DEFAULT_RESULT_TTL_S,
                 state_budget_bytes: int = DEFAULT_STATE_BUDGET_BYTES, owned_dir: str | None = None,
                 checkpoint_s: float = DEFAULT_CHECKPOINT_S) -> None:
        if not result_ttl_s > 0:
            raise ValueError(f"--result-ttl-s must be > 0 s, got {result_ttl_s}")
        if state_budget_bytes < 0:
            raise ValueError(f"--state-budget must be >= 0 bytes (0: none), got {state_budget_bytes}")
        if not checkpoint_s >= 0:
            raise ValueError(f"--checkpoint-s must be >= 0 s (0: no checkpoints), got {checkpoint_s}")
        self.servicer, self.store = servicer, store
        self.result_ttl_s, self.state_budget_bytes = result_ttl_s, state_budget_bytes
        self.checkpoint_s = checkpoint_s
        #: Ids of running jobs asked for a checkpoint after their current iteration (the shutdown began).
        self._checkpoint_wanted: set[str] = set()
        self.owned_dir = owned_dir
        self._pending: deque[_Pending] = deque()
        self._live: dict[str, Job] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task | None = None
        self.accepting = True
        #: :meth:`start` is done: the jobs a previous process left are in line (new ones go behind them).
        self.started = False
        servicer.admission.on_release.append(self._pump)

    # -- life of the service ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Once the model is loaded: remove what expired and stray files, put the jobs a previous process left
        QUEUED or RUNNING back in line (submission order), start the expiry sweeper."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.store.remove_orphan_files)
        await asyncio.to_thread(self.store.expire, self.result_ttl_s)
        resumed = 0
        for row in await asyncio.to_thread(self.store.unfinished):
            try:
                request = pb.StylizeRequest.FromString(await asyncio.to_thread(self.store.request, row.job_id))
                settings = settings_from_request(request, self.servicer.limits)
                memory_bytes = self.servicer.estimate(request, settings)[0]
            except (NSTServerError, ValueError) as exc:      # limits lowered since it was accepted
                message = f"job {row.job_id} cannot run again on this server: {exc}"
                self._finish(row.job_id, FAILED, grpc.StatusCode.INVALID_ARGUMENT, message)
                continue
            await asyncio.to_thread(self.store.set_queued, row.job_id)
            accepted = pb.JobAccepted(job_id=row.job_id, queue_position=len(self._pending) + 1,
                                      replica=self.servicer.replica, memory_bytes=memory_bytes)
            await asyncio.to_thread(self.store.append, row.job_id, _event(QUEUED, accepted=accepted))
            self._pending.append(_Pending(row.job_id, request, settings, memory_bytes))
            checkpoint = await asyncio.to_thread(self.store.checkpoint_row, row.job_id)
            log.info("job %s: %s when the server stopped, queued again (run %d next, %s)", row.job_id, row.state,
                     row.runs + 1, "from its first iteration" if checkpoint is None else
                     f"from its checkpoint after iteration {checkpoint.iteration} of {row.max_iterations}")
            resumed += 1
        metrics.JOBS_RESUMED.inc(resumed)
        self.started = True
        self._pump()
        self._sweeper = asyncio.ensure_future(self._sweep())

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new jobs; jobs not started stay QUEUED in the store (the next start runs them)."""
        self.accepting = False
        for job in list(self._live.values()):
            if job.state == "waiting":
                job.request_stop(STOP_SHUTDOWN)
            elif job.state == "running" and self.checkpoint_s:   # a checkpoint after its current iteration
                self._checkpoint_wanted.add(job.job_id)
        self._pending.clear()
        self.servicer.admission.pump()          # the stopped ones end at once and free their slots

    async def close(self) -> None:
        """Stop the sweeper, close the database (its WAL checkpointed), remove a temporary state folder."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        self.store.close()
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)

    async def _sweep(self) -> None:
        """Every ``min(10, max(0.5, ttl / 4))`` s: remove expired jobs, give free pages back (finished jobs'
        requests), refresh the store's metrics."""
        period_s = min(10.0, max(0.5, self.result_ttl_s / 4))
        while True:
            try:
                expired = await asyncio.to_thread(self.store.expire, self.result_ttl_s)
                if expired:
                    log.info("removed %d jobs finished more than %g s ago (--result-ttl-s): %s", len(expired),
                             self.result_ttl_s, ", ".join(expired[:10]) + (" …" if len(expired) > 10 else ""))
                counts = await asyncio.to_thread(self.store.count_by_state)
                for state, count in counts.items():
                    metrics.JOBS_BY_STATE.labels(state.lower()).set(count)
                metrics.STATE_BYTES.set(await asyncio.to_thread(self.store.size_bytes))
            except sqlite3.Error as exc:
                log.warning("job store sweep failed: %s", exc)
            await asyncio.sleep(period_s)

    # -- admission ----------------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Event loop: admit stored jobs, first submitted first, while the admission takes them."""
        admission = self.servicer.admission
        while self._pending and self.accepting:
            pending = self._pending[0]
            try:
                job = admission.admit(pending.job_id, pending.request.seed if pending.request.HasField("seed")
                                      else None, memory_bytes=pending.memory_bytes)
            except ServerBusy:                 # full: the next release pumps again
                return
            self._pending.popleft()
            self._live[job.job_id] = job
            admission.start(job, self._launcher(job, pending))

    def _launcher(self, job: Job, pending: _Pending):
        loop = asyncio.get_running_loop()

        def launch() -> asyncio.Future:
            future = loop.run_in_executor(self.servicer._executor, self._work, job, pending)
            future.add_done_callback(lambda _future: self._worker_done(job))
            return future
        return launch

    def _worker_done(self, job: Job) -> None:
        self._live.pop(job.job_id, None)
        self.servicer.admission.release(job)        # pumps the line (and this service's, on_release)
        self._notify(job.job_id)

    def _notify(self, job_id: str) -> None:
        """Event loop: wake the job's watchers."""
        event = self._wake.pop(job_id, None)
        if event is not None:
            event.set()

    def _notify_threadsafe(self, job_id: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._notify, job_id)

    def queue_position(self, job_id: str) -> int:
        """0: running (or not in line); k: k-th in line, stored jobs not yet admitted counted after the
        admission's waiting ones."""
        admission = self.servicer.admission
        job = self._live.get(job_id)
        if job is not None:
            return admission.position(job)
        for index, pending in enumerate(self._pending):
            if pending.job_id == job_id:
                waiting = sum(1 for other in admission.jobs.values() if admission.position(other) > 0)
                return waiting + index + 1
        return 0

    # -- the worker ---------------------------------------------------------------------------------------------

    def _work(self, job: Job, pending: _Pending) -> None:
        """Worker thread: run the job, store each event, wake the watchers after each; store how it ended."""
        from nst_server.servicer import _failure, abort_for      # the servicer imports this module's users
        job_id, store = job.job_id, self.store
        if not job.start():                     # stopped while waiting: a cancel, or the shutdown
            if job.stopped_by != STOP_SHUTDOWN:
                self._finish(job_id, CANCELLED, grpc.StatusCode.CANCELLED, f"job {job_id} was cancelled (CancelJob) "
                             "before it started")
            return
        chunk_bytes = self.servicer.limits.result_chunk_bytes
        try:
            resume = self._stored_checkpoint(job_id)
            log.info("job %s started%s", job_id, "" if resume is None else
                     f" from its checkpoint after iteration {resume.iteration} (scale {resume.scale} of "
                     f"{resume.scales})")
            store.set_running(job_id, iterations=resume.iteration if resume else 0,
                              scale=resume.scale if resume else 0)
            if resume is not None:
                job.iterations = resume.iteration     # counted (nst_iterations_total) by the run that did them
            self._notify_threadsafe(job_id)
            for event in self._engine_events(job, pending, resume):
                if isinstance(event, Checkpoint):
                    self._write_checkpoint(job, event)
                    continue
                if isinstance(event, Progress):
                    message = to_proto(event)[0]
                    number = store.progress(job_id, event.iteration, event.scale, event.scales,
                                            message.progress.costs.SerializeToString(),
                                            pb.JobEvent(response=message, state=pb.JOB_STATE_RUNNING)
                                            .SerializeToString())
                    if number:
                        self._notify_threadsafe(job_id)
                    continue
                if not isinstance(event, Result):
                    continue
                if event.stop_reason == STOP_CANCELLED and job.stopped_by == STOP_SHUTDOWN:
                    store.set_queued(job_id)
                    log.info("job %s stopped by the shutdown after %d iterations; it runs again at the next start",
                             job_id, job.iterations)
                elif event.stop_reason == STOP_CANCELLED:
                    self._finish(job_id, CANCELLED, grpc.StatusCode.CANCELLED,
                                 f"job {job_id} was cancelled (CancelJob) after {job.iterations} iterations")
                else:
                    self._succeed(job_id, event, chunk_bytes)
                break
            else:                                # the engine ended without a Result: stopped before its end
                if job.stopped_by == STOP_SHUTDOWN:
                    store.set_queued(job_id)
                elif job.stopped_by == STOP_CLIENT:
                    self._finish(job_id, CANCELLED, grpc.StatusCode.CANCELLED, f"job {job_id} was cancelled")
                else:
                    self._finish(job_id, FAILED, grpc.StatusCode.INTERNAL, f"job {job_id} ended without a result")
        except BaseException as exc:  # noqa: BLE001 - the job fails, the server lives on
            failure = abort_for(_failure(job, exc), job)
            self._finish(job_id, FAILED, failure.code, failure.message)
        finally:
            self._checkpoint_wanted.discard(job_id)
            release_free_memory()
            job.finish()

    def _engine_events(self, job: Job, pending: _Pending, resume: Checkpoint | None):
        """Worker thread: the engine's events for the job (:meth:`~nst_server.servicer.StyleTransferServicer.
        engine_events`), with checkpoints when ``--checkpoint-s`` asks for them, going on from ``resume`` when it
        fits the job's schedule (else, said in the log, from the first iteration)."""
        options = {}
        if self.checkpoint_s:
            options = {"checkpoint_s": self.checkpoint_s, "checkpoint_now": lambda: self._checkpoint_asked(job.job_id)}
        if resume is not None:
            events = self.servicer.engine_events(job, pending.request, pending.settings, resume=resume, **options)
            try:
                first = next(events, None)
            except CheckpointMismatch as exc:        # raised before the first iteration
                log.warning("job %s: its checkpoint after iteration %d does not fit its schedule on this server "
                            "(%s); it runs from its first iteration", job.job_id, resume.iteration, exc)
                self.store.drop_checkpoint(job.job_id)
                job.iterations = 0
            else:
                metrics.RESUMED_FROM_CHECKPOINT.inc()
                if first is not None:
                    yield first
                    yield from events
                return
        yield from self.servicer.engine_events(job, pending.request, pending.settings, **options)

    def _checkpoint_asked(self, job_id: str) -> bool:
        """The engine's ``checkpoint_now`` (worker thread): True once after the shutdown asked for a checkpoint."""
        if job_id in self._checkpoint_wanted:
            self._checkpoint_wanted.discard(job_id)
            return True
        return False

    def _stored_checkpoint(self, job_id: str) -> Checkpoint | None:
        """Worker thread: the job's stored checkpoint, or None (none, or unreadable: dropped, said in the log)."""
        try:
            return self.store.checkpoint(job_id)
        except (OSError, ValueError) as exc:
            log.warning("job %s: its checkpoint cannot be read (%s); it runs from its first iteration", job_id, exc)
            self.store.drop_checkpoint(job_id)
            return None

    def _write_checkpoint(self, job: Job, checkpoint: Checkpoint) -> None:
        """Worker thread (the engine waits meanwhile): store the checkpoint, unless the job was cancelled (no later
        run needs it). A failed write (a full disk) leaves the previous checkpoint and the job goes on."""
        if job.stopped_by not in (None, STOP_SHUTDOWN):
            return
        started = time.perf_counter()
        try:
            size = self.store.write_checkpoint(job.job_id, checkpoint)
        except (OSError, sqlite3.Error) as exc:
            log.warning("job %s: checkpoint after iteration %d not written (%s); the previous one stays",
                        job.job_id, checkpoint.iteration, exc)
            return
        metrics.CHECKPOINTS.inc()
        log.info("job %s: checkpoint after iteration %d (scale %d of %d%s), %d bytes in %.0f ms", job.job_id,
                 checkpoint.iteration, checkpoint.scale, checkpoint.scales,
                 ", stopped by the shutdown" if job.stopped_by == STOP_SHUTDOWN else "", size,
                 (time.perf_counter() - started) * 1000.0)

    def _succeed(self, job_id: str, result: Result, chunk_bytes: int) -> None:
        """Worker thread: store the result PNG once (a file) and its events (ImageChunk pieces, then the Result),
        whose bytes the store reads back from the file."""
        messages = to_proto(result, chunk_bytes)
        events = []
        for message in messages:
            offset, length = -1, 0
            if message.HasField("image_chunk"):
                offset, length = message.image_chunk.offset, len(message.image_chunk.data)
                message.image_chunk.data = b""
            elif message.result.image_png:
                offset, length = 0, len(message.result.image_png)
                message.result.image_png = b""
            state = pb.JOB_STATE_SUCCEEDED if message.HasField("result") else pb.JOB_STATE_RUNNING
            events.append((pb.JobEvent(response=message, state=state).SerializeToString(), offset, length))
        height, width = result.image.shape[:2]
        self.store.succeed(job_id, result.png, width, height, messages[-1].result.costs.SerializeToString(), events)
        metrics.STORED_JOBS.labels("succeeded").inc()
        log.info("job %s succeeded: %d iterations, %dx%d px, %d bytes", job_id, result.iterations, width, height,
                 len(result.png))
        self._notify_threadsafe(job_id)

    def _finish(self, job_id: str, state: str, code: grpc.StatusCode, message: str) -> None:
        """Any thread: end the job FAILED or CANCELLED with its last event; wake its watchers."""
        event = _event(state, error_code=code.value[0], error_message=message)
        if self.store.finish(job_id, state, code.value[0], message, event):
            metrics.STORED_JOBS.labels(state.lower()).inc()
            log.info("job %s %s: %s", job_id, state.lower(), message)
        self._notify_threadsafe(job_id)

    # -- the RPCs -----------------------------------------------------------------------------------------------

    async def submit(self, request: pb.SubmitJobRequest) -> pb.SubmitJobResponse:
        """``SubmitJob``.

        Raises:
            FieldError: a field out of range (INVALID_ARGUMENT, naming it; ``request_id`` too long).
            MemoryBudgetExceeded, ServerBusy, StateBudgetExceeded: RESOURCE_EXHAUSTED.
            JobConflict: the ``request_id`` names a job of another request (ALREADY_EXISTS).
        """
        servicer = self.servicer
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise FieldError("request_id", f"is {len(request.request_id)} characters, at most "
                                           f"{MAX_REQUEST_ID_CHARS}")
        settings = settings_from_request(request.request, servicer.limits)
        memory_bytes, size, styles = servicer.estimate(request.request, settings)
        if not servicer.admission.fits_budget(memory_bytes):
            raise servicer._over_budget(memory_bytes, size, styles, settings)
        body = request.request.SerializeToString(deterministic=True)
        digest = hashlib.sha256(body).hexdigest()
        request_id = request.request_id or None
        if request_id is not None:
            row = await asyncio.to_thread(self.store.by_request_id, request_id)
            if row is not None:
                return self._known(row, digest)
        if self.state_budget_bytes:
            used = await asyncio.to_thread(self.store.size_bytes)
            if used > self.state_budget_bytes:
                raise StateBudgetExceeded(
                    f"the state folder holds {format_bytes(used)} ({used} bytes), over its budget of "
                    f"{format_bytes(self.state_budget_bytes)} ({self.state_budget_bytes} bytes, --state-budget); "
                    f"new jobs are refused until finished ones expire (--result-ttl-s {self.result_ttl_s:g}); "
                    f"the jobs stored stay readable")
        admission = servicer.admission
        limit = admission.max_running + admission.max_queued
        if len(admission.jobs) + len(self._pending) >= limit:
            raise ServerBusy(f"server busy: {len(admission.jobs) + len(self._pending)} jobs admitted or stored, "
                             f"limit {admission.max_running} running + {admission.max_queued} queued; retry later")
        job_id = new_job_id(getattr(servicer, "replica_name", ""))   # [NAME.]32 hex digits: 128 random bits
        accepted = pb.JobAccepted(job_id=job_id, queue_position=self._predicted_position(memory_bytes),
                                  replica=servicer.replica, memory_bytes=memory_bytes)
        try:
            row, created = await asyncio.to_thread(self.store.insert, job_id, request_id, body, digest,
                                                   settings.iterations, _event(QUEUED, accepted=accepted))
        except sqlite3.OperationalError as exc:               # "database or disk is full"
            raise StateBudgetExceeded(f"the state folder cannot store the job ({exc}); the disk may be full "
                                      f"(--state-dir {self.store.state_dir}, --state-budget)") from None
        if not created:                                       # a concurrent submission of the same request_id
            return self._known(row, digest)
        self._pending.append(_Pending(job_id, request.request, settings, memory_bytes))
        self._pump()
        position = self.queue_position(job_id)
        self._notify(job_id)
        metrics.STORED_JOBS.labels("submitted").inc()
        log.info("job %s submitted (request_id %r, queue position %d)", job_id, request.request_id, position)
        row = await asyncio.to_thread(self.store.get, job_id)
        return pb.SubmitJobResponse(job_id=job_id, queue_position=position, state=STATES[row.state], created=True,
                                    replica=servicer.replica)

    def _predicted_position(self, memory_bytes: int) -> int:
        """The queue position a job submitted now gets (its ``JobAccepted``, stored before it is put in line):
        0 when nothing waits and a worker and the memory for it are free, else the jobs waiting plus one."""
        admission = self.servicer.admission
        waiting = sum(1 for job in admission.jobs.values() if admission.position(job) > 0) + len(self._pending)
        budget = admission.memory_budget
        free = (admission.holding_workers < admission.max_running
                and (budget is None or admission.reserved_bytes + memory_bytes <= budget))
        return 0 if waiting == 0 and free else waiting + 1

    def _known(self, row: JobRow, digest: str) -> pb.SubmitJobResponse:
        if row.request_sha256 != digest:
            raise JobConflict(f"request_id {row.request_id!r} names job {row.job_id}, submitted with another "
                              "request; use a new request_id for a new job")
        return pb.SubmitJobResponse(job_id=row.job_id, queue_position=self.queue_position(row.job_id),
                                    state=STATES[row.state], created=False, replica=self.servicer.replica)

    async def _row(self, job_id: str) -> JobRow:
        row = await asyncio.to_thread(self.store.get, job_id) if job_id else None
        if row is None:
            raise JobNotFound(job_id)
        return row

    async def status(self, job_id: str) -> pb.JobStatus:
        """``GetJob``. Raises JobNotFound."""
        return await self._status(await self._row(job_id))

    async def _status(self, row: JobRow) -> pb.JobStatus:
        last = await asyncio.to_thread(self.store.last_event, row.job_id)
        costs = pb.Costs.FromString(row.costs) if row.costs else None
        return pb.JobStatus(
            job_id=row.job_id, request_id=row.request_id or "", state=STATES[row.state],
            queue_position=self.queue_position(row.job_id) if row.state == QUEUED else 0,
            iterations=row.iterations, max_iterations=row.max_iterations, scale=row.scale, scales=row.scales,
            costs=costs, submitted_unix_s=row.submitted_s, started_unix_s=row.started_s,
            finished_unix_s=row.finished_s,
            expires_unix_s=row.finished_s + self.result_ttl_s if row.state in FINISHED else 0.0,
            error_code=row.error_code, error_message=row.error_message, events=last,
            result_width_px=row.result_width_px, result_height_px=row.result_height_px,
            result_bytes=row.result_bytes, runs=row.runs, replica=self.servicer.replica)

    async def watch(self, request: pb.WatchJobRequest):
        """``WatchJob``: an async generator of ``JobEvent``. Raises JobNotFound (also when the job expires while
        watched)."""
        job_id, after = request.job_id, request.after
        await self._row(job_id)
        heartbeat_s = self.servicer.limits.heartbeat_s
        while True:
            wake = self._wake.setdefault(job_id, asyncio.Event())   # before reading: no wake-up is missed
            row = await self._row(job_id)                # before the events: a finished row has all its events
            stored = await asyncio.to_thread(self.store.events, job_id, after)
            for item in stored:
                yield await asyncio.to_thread(self._replayed, job_id, item)
                after = item.number
            if stored:
                continue
            if row.state in FINISHED:
                self._wake.pop(job_id, None)            # nothing will wake it again
                return
            try:
                await asyncio.wait_for(wake.wait(), timeout=heartbeat_s)
            except asyncio.TimeoutError:
                yield self._heartbeat(row)

    def _replayed(self, job_id: str, item: StoredEvent) -> pb.JobEvent:
        event = pb.JobEvent.FromString(item.message)
        event.number = item.number
        if item.file_length > 0:
            data = self.store.read_result(job_id, item.file_offset, item.file_length)
            if event.response.HasField("image_chunk"):
                event.response.image_chunk.data = data
            else:
                event.response.result.image_png = data
        return event

    def _heartbeat(self, row: JobRow) -> pb.JobEvent:
        job = self._live.get(row.job_id)
        if job is not None:
            beat = self.servicer._heartbeat(job)
        else:
            waited_ms = (time.time() - row.submitted_s) * 1000.0
            beat = pb.StylizeResponse(heartbeat=pb.Heartbeat(queue_position=self.queue_position(row.job_id),
                                                             waited_ms=waited_ms, elapsed_ms=waited_ms,
                                                             iterations=row.iterations))
        return pb.JobEvent(number=0, response=beat, state=STATES[row.state])

    async def result(self, job_id: str):
        """``GetJobResult``: an async generator of ``ImageChunk``. Raises JobNotFound, NoResult."""
        row = await self._row(job_id)
        if row.state != SUCCEEDED:
            raise NoResult(f"job {job_id} has no result: it is {row.state}"
                           + (f" ({row.error_message})" if row.error_message else ""))
        chunk_bytes = self.servicer.limits.result_chunk_bytes
        for offset in range(0, row.result_bytes, chunk_bytes):
            try:
                data = await asyncio.to_thread(self.store.read_result, job_id, offset, chunk_bytes)
            except FileNotFoundError:
                raise JobNotFound(job_id) from None
            yield pb.ImageChunk(data=data, offset=offset, total_bytes=row.result_bytes)

    async def cancel(self, job_id: str) -> pb.JobStatus:
        """``CancelJob``. Raises JobNotFound."""
        row = await self._row(job_id)
        if row.state not in FINISHED:
            job = self._live.get(job_id)
            if job is not None:
                job.request_stop(STOP_CLIENT)           # a running job: its worker stores CANCELLED within one
                self.servicer.admission.pump()          # iteration; a waiting one leaves the line now
            if job is None or job.state == "abandoned":
                for pending in list(self._pending):
                    if pending.job_id == job_id:
                        self._pending.remove(pending)
                await asyncio.to_thread(self._finish, job_id, CANCELLED, grpc.StatusCode.CANCELLED,
                                        f"job {job_id} was cancelled (CancelJob) while queued")
            row = await self._row(job_id)
        return await self._status(row)

    async def list(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        """``ListJobs``. Raises FieldError for a bad ``page_token``, ``page_size`` or ``state``."""
        size = request.page_size or DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise FieldError("page_size", f"must be at most {MAX_PAGE_SIZE}, got {request.page_size}")
        after = 0
        if request.page_token:
            try:
                after = int(request.page_token, 16)
            except ValueError:
                raise FieldError("page_token", "is not a next_page_token of ListJobs") from None
        if request.state and request.state not in STATE_NAMES:
            raise FieldError("state", f"unknown value {request.state}")
        state = STATE_NAMES.get(request.state)
        rows = await asyncio.to_thread(self.store.page, after, size + 1, state)
        more = len(rows) > size
        rows = rows[:size]
        jobs = [await self._status(row) for row in rows]
        return pb.ListJobsResponse(jobs=jobs, next_page_token=f"{rows[-1].seq:x}" if more else "")


def _event(state: str, accepted: pb.JobAccepted | None = None, error_code: int = 0,
           error_message: str = "") -> bytes:
    """A serialized ``JobEvent`` (number unset: the store numbers it)."""
    event = pb.JobEvent(state=STATES[state], error_code=error_code, error_message=error_message)
    if accepted is not None:
        event.response.accepted.CopyFrom(accepted)
    return event.SerializeToString()


__all__ = ["JobService", "JobNotFound", "JobConflict", "NoResult", "StateBudgetExceeded"]
