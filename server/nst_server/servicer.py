"""The gRPC face of the engine: request validation, admission, the worker threads, proto conversion.

Jobs run on a dedicated thread pool of ``max_running_jobs`` threads, never on the asyncio event loop, so
health checks and GetModelInfo answer while jobs run; the model's loading and warm-up run on that pool too
(:meth:`StyleTransferServicer.on_job_thread`). With ``max_batch_size > 1`` running jobs of equal size share
their replica passes (:class:`~nst_server.batching.ReplicaBatcher`). A job's events cross to the event loop
through an ``asyncio.Queue``; when the client cancels, disconnects or passes its deadline, the handler sets the
job's stop flag, which the engine polls once per iteration; the job's slot (:mod:`nst_server.jobs`) is freed
when its worker thread is done with it (after handing its free memory back to the OS). A stream is never quiet
for longer than ``heartbeat_s``: when neither the queue nor the engine gave anything to send for that long, a
``Heartbeat`` goes out (position, time waited). With a memory budget (``--memory-budget``), each job's peak memory
is estimated at admission from its content's size (the image's header), ``max_side_px``, precision and styles
(:mod:`nst_server.memory`), and the job waits in line until its estimate fits beside the running jobs'
(:class:`~nst_server.jobs.Admission`). Failures end the job, never the server: invalid requests and inputs are
INVALID_ARGUMENT (with ``google.rpc.BadRequest`` details), a full queue, a job over the whole memory budget or out
of memory RESOURCE_EXHAUSTED, a job stopped by the shutdown UNAVAILABLE, anything else INTERNAL
(:func:`abort_for`, from the errors of :mod:`nst_server.errors`). The interceptors
(:mod:`nst_server.interceptors`) write one log line per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import io
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import onnxruntime
import torch
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from nst_proto.v1 import style_transfer_pb2 as pb
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc
from nst_export.vgg import MIN_SIDE_PX, OUTPUT_LAYERS
from nst_server import engine, memory, metrics
from nst_server.batching import ReplicaBatcher
from nst_server.errors import NSTServerError
from nst_server.interceptors import annotate, deadline_passed
from nst_server.jobs import (STOP_CLIENT, STOP_DEADLINE, STOP_SEND_TIMEOUT, STOP_SHUTDOWN, Admission, Job,
                             MemoryBudgetExceeded, is_out_of_memory)
from nst_server.messages import DEFAULT_RESULT_CHUNK_BYTES, decode_inputs, settings_from_request, to_proto
from nst_server.model import StyleModels, release_free_memory
from nst_server.precision import default_precision
from nst_server.events import Progress, Result, STOP_CANCELLED
from nst_server.objective import batch_pass
from nst_server.settings import PRECISIONS, StyleTransferSettings

log = logging.getLogger(__name__)


#: The longest ``--batch-wait-ms`` accepted (an hour; ``threading`` refuses waits beyond ``TIMEOUT_MAX``).
MAX_BATCH_WAIT_MS = 3_600_000.0

#: Range of ``--heartbeat-s``, s: at least 10 ms (a stream of heartbeats), at most an hour.
HEARTBEAT_S_RANGE = (0.01, 3600.0)

#: Range of ``--send-timeout-s``, s: at least 10 ms, at most a day.
SEND_TIMEOUT_S_RANGE = (0.01, 86400.0)

#: A job's events wait in a queue for its stream; with this many there already (the client reads slower than
#: the job runs), a Progress goes in without its preview, so that what a slow reader holds stays bounded.
MAX_QUEUED_EVENTS_WITH_PREVIEWS = 16


@dataclass(frozen=True)
class ServerLimits:
    """Per-server limits (configuration, not per request).

    Attributes:
        max_side_px: largest ``max_side_px`` a job may ask for (4096 by default: what the memory budget protects
            against is a job that cannot fit, which is refused by the budget, not by this limit).
        max_iterations: largest ``iterations`` a job may ask for.
        max_input_pixels: pixel budget of each encoded input image, checked before decoding.
        max_running_jobs: N, jobs optimised at once (one worker thread each).
        max_queued_jobs: Q, jobs admitted to wait for a worker; beyond N + Q, RESOURCE_EXHAUSTED at once.
        result_chunk_bytes: a result PNG larger than this goes out as ImageChunk messages of this size.
        max_batch_size: B; running jobs of equal size, pooling and precision share one replica pass, up to B
            at a time (:mod:`nst_server.batching`); 1 runs every job alone. At most ``max_running_jobs``.
        batch_wait_ms: the longest a job waits for the others of its batch each iteration, ms (at most
            :data:`MAX_BATCH_WAIT_MS`).
        heartbeat_s: the longest a Stylize stream stays quiet, s: a ``Heartbeat`` goes out whenever nothing else
            was sent for this long, while the job waits and while it runs (:data:`HEARTBEAT_S_RANGE`).
        send_timeout_s: the longest one Stylize message may wait for the client to take it (HTTP/2 flow
            control: a client that stopped reading), s; then the job is stopped, its slot freed, and the call ends
            with DEADLINE_EXCEEDED (:data:`SEND_TIMEOUT_S_RANGE`).
        memory_budget_bytes: bytes the running jobs' memory estimates may add up to (``--memory-budget``); 0: no
            memory accounting; None: :func:`nst_server.memory.default_budget`, measured by the app once the model is
            loaded (a servicer built without the app has no memory accounting until
            :meth:`StyleTransferServicer.set_memory_budget`).
    Raises:
        ValueError: ``max_batch_size``, ``batch_wait_ms``, ``heartbeat_s`` or ``send_timeout_s`` out of range (the
            message names the flag).
    """

    max_side_px: int = 4096
    max_iterations: int = 2000
    max_input_pixels: int = 40_000_000
    max_running_jobs: int = 1
    max_queued_jobs: int = 4
    result_chunk_bytes: int = DEFAULT_RESULT_CHUNK_BYTES
    max_batch_size: int = 1
    batch_wait_ms: float = 20.0
    heartbeat_s: float = 10.0
    send_timeout_s: float = 30.0
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        for flag, value, low in (("--max-side-px", self.max_side_px, MIN_SIDE_PX),
                                 ("--max-iterations", self.max_iterations, 1),
                                 ("--max-input-pixels", self.max_input_pixels, MIN_SIDE_PX * MIN_SIDE_PX),
                                 ("--max-running-jobs", self.max_running_jobs, 1),
                                 ("--max-queued-jobs", self.max_queued_jobs, 0),
                                 ("--result-chunk-bytes", self.result_chunk_bytes, 1)):
            if value < low:     # result chunks of 0 bytes failed every job at its end, after all its work
                raise ValueError(f"{flag} must be at least {low}, got {value}")
        if not 1 <= self.max_batch_size <= max(1, self.max_running_jobs):
            raise ValueError(f"--max-batch-size must be between 1 and --max-running-jobs ({self.max_running_jobs}): "
                             f"a batch is made of running jobs; got {self.max_batch_size}")
        if not 0 <= self.batch_wait_ms <= MAX_BATCH_WAIT_MS:
            raise ValueError(f"--batch-wait-ms must be between 0 and {MAX_BATCH_WAIT_MS:g} ms, "
                             f"got {self.batch_wait_ms}")
        low, high = HEARTBEAT_S_RANGE
        if not low <= self.heartbeat_s <= high:
            raise ValueError(f"--heartbeat-s must be between {low:g} and {high:g} s, got {self.heartbeat_s}")
        low, high = SEND_TIMEOUT_S_RANGE
        if not low <= self.send_timeout_s <= high:
            raise ValueError(f"--send-timeout-s must be between {low:g} and {high:g} s, got {self.send_timeout_s}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 0:
            raise ValueError(f"--memory-budget must be >= 0 bytes (0: no memory accounting), "
                             f"got {self.memory_budget_bytes}")


_DONE = object()

try:
    _NST_VERSION = importlib.metadata.version("nst-inference")
except importlib.metadata.PackageNotFoundError:          # running from a source tree without an install
    _NST_VERSION = "unknown"


class StyleTransferServicer(pb_grpc.StyleTransferServicer):
    """Implements ``nst.v1.StyleTransfer`` over one :class:`StyleModels`."""

    def __init__(self, models: StyleModels | None, limits: ServerLimits | None = None,
                 faults: dict[int, str] | None = None) -> None:
        """``models`` None: jobs get UNAVAILABLE until it is set. ``faults``: the test-only fault-injection
        hook (:func:`nst_server.jobs.parse_fault_injection`)."""
        self.models = models
        self.limits = limits or ServerLimits()
        self._executor = ThreadPoolExecutor(max_workers=self.limits.max_running_jobs, thread_name_prefix="nst-job")
        self.admission = Admission(self.limits.max_running_jobs, self.limits.max_queued_jobs, faults)
        #: Where the memory budget comes from (``ModelInfo.memory_budget_source``).
        self.memory_budget_source = "off: no memory accounting"
        if self.limits.memory_budget_bytes:
            self.set_memory_budget(self.limits.memory_budget_bytes,
                                   f"--memory-budget {memory.format_bytes(self.limits.memory_budget_bytes)}")
        elif self.limits.memory_budget_bytes == 0:
            self.memory_budget_source = "off: --memory-budget none"
        self.accepting = True
        #: This server process in JobAccepted and ModelInfo: HOSTNAME/PID (the pod's name in Kubernetes).
        self.replica = f"{socket.gethostname()}/{os.getpid()}"
        #: ``--replica-name``: the prefix of the job ids this server makes (:mod:`nst_proto.jobids`); empty: none.
        self.replica_name = ""
        #: Intra-op threads of torch and onnxruntime and where the number comes from (set by the app).
        self.intra_op_threads, self.threads_source = 0, ""
        self._batcher: ReplicaBatcher | None = None
        self._batcher_lock = threading.Lock()
        #: The job API (:class:`nst_server.jobapi.JobService`), set by the app; None: its RPCs are UNAVAILABLE.
        self.jobs = None

    @property
    def batcher(self) -> ReplicaBatcher | None:
        """The jobs' shared :class:`ReplicaBatcher` when ``max_batch_size > 1`` (built once the models are loaded)."""
        with self._batcher_lock:                    # worker threads ask for it
            if self._batcher is None and self.limits.max_batch_size > 1 and self.models is not None:
                self._batcher = ReplicaBatcher(batch_pass(self.models), self.limits.max_batch_size,
                                               self.limits.batch_wait_ms / 1000.0)
            return self._batcher

    def set_memory_budget(self, budget: int | None, source: str) -> None:
        """Admit jobs by memory within ``budget`` bytes (None: no memory accounting); ``source`` says where the
        number comes from (the log, ``ModelInfo.memory_budget_source``)."""
        self.admission.set_memory_budget(budget)
        self.memory_budget_source = source

    def _resolved(self, settings: StyleTransferSettings) -> StyleTransferSettings:
        """``settings`` with ``precision="auto"`` resolved for the replica's device, as the engine resolves it."""
        if settings.precision == "auto" and self.models is not None:
            return settings.replace(precision=default_precision(self.models.device)[0])
        return settings

    def largest_output_side(self) -> int:
        """The largest ``max_side_px`` a default job (4:3, one style, the default precision) fits in the memory
        budget with, at most ``--max-side-px`` (``ModelInfo.largest_output_side_px``)."""
        return memory.largest_side(self.admission.memory_budget, self._resolved(StyleTransferSettings()),
                                   self.limits.max_side_px)

    def estimate(self, request: pb.StylizeRequest, settings: StyleTransferSettings) -> tuple[int, tuple[int, int], int]:
        """A job's memory estimate before it runs: ``(bytes, (content width, content height), styles)``.

        The content's size comes from its header (Pillow opens lazily: no pixel is decoded here); a content whose
        header cannot be read counts as a square, the largest output any aspect gives at ``max_side_px`` (its
        decoding refuses it with INVALID_ARGUMENT when the job runs).
        """
        try:
            with Image.open(io.BytesIO(request.content_image)) as image:
                size = image.size
        except Exception:  # noqa: BLE001 - any header Pillow cannot read; the worker's decoding names the problem
            size = (1, 1)
        if min(size) < 1:
            size = (1, 1)
        styles = max(1, len(request.styles) + (1 if request.style_image else 0))
        height, width = memory.output_size(*size, settings.max_side_px)
        return memory.job_peak_bytes(height, width, self._resolved(settings), styles), size, styles

    def _over_budget(self, memory_bytes: int, size: tuple[int, int], styles: int,
                     settings: StyleTransferSettings) -> MemoryBudgetExceeded:
        """The refusal of a job whose estimate is over the whole budget, with the largest ``max_side_px`` that
        would fit this job (its aspect, precision and styles)."""
        budget = self.admission.memory_budget
        largest = memory.largest_side(budget, self._resolved(settings), self.limits.max_side_px, styles, size)
        return MemoryBudgetExceeded(memory_bytes, budget, settings.max_side_px, largest)

    @property
    def admitted(self) -> int:
        """Jobs holding a slot (running or waiting)."""
        return len(self.admission.jobs)

    def terminate(self) -> None:
        """Stop every admitted job (shutdown after the grace period); each ends with UNAVAILABLE."""
        self.admission.stop_all(STOP_SHUTDOWN)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def on_job_thread(self, function, *args):
        """Run ``function(*args)`` on the jobs' thread pool and return its result (model loading, warm-up).

        PyTorch's CPU kernels run in OpenMP parallel regions, and GNU OpenMP keeps one thread team per
        thread that starts a region. Once a process holds more OpenMP threads than CPUs, every team waits
        at its barriers by sleeping after a short spin instead of spinning (libgomp's throttled spin count),
        which was seen here to add hundreds of futex sleeps and about 3 % to each iteration. Loading and warming
        up on a job thread (the pool reuses an idle thread first) keeps one team for a server with one running
        job instead of three.
        """
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        if self.models is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        meta = self.models.metadata
        precision, precision_reason = default_precision(self.models.device)
        return pb.ModelInfo(
            output_layers=list(OUTPUT_LAYERS),
            input_contract_json=meta.get("nst.input_contract", ""),
            weights_source=meta.get("nst.weights_source", ""),
            weights_sha256=meta.get("nst.weights_sha256", ""),
            weights_input_contract_json=meta.get("nst.weights_input_contract", ""),
            execution_providers=self.models.providers,
            replica_device=str(self.models.device),
            pooling=meta.get("nst.pooling", ""),
            versions={"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                      "grpcio": grpc.__version__, "nst": _NST_VERSION},
            min_side_px=MIN_SIDE_PX,
            max_side_px=self.limits.max_side_px,
            precision=precision,
            precision_reason=precision_reason,
            supported_precisions=["auto", *PRECISIONS],
            max_iterations=self.limits.max_iterations,
            max_running_jobs=self.limits.max_running_jobs,
            max_queued_jobs=self.limits.max_queued_jobs,
            max_batch_size=self.limits.max_batch_size,
            intra_op_threads=self.intra_op_threads,
            threads_source=self.threads_source,
            heartbeat_s=self.limits.heartbeat_s,
            replica=self.replica,
            memory_budget_bytes=self.admission.memory_budget or 0,
            memory_budget_source=self.memory_budget_source,
            largest_output_side_px=self.largest_output_side(),
        )

    async def Stylize(self, request: pb.StylizeRequest, context):
        job_id = uuid.uuid4().hex[:12]
        annotate(job=job_id)
        job: Job | None = None
        outcome: str | None = "failed"
        peer = context.peer()
        loop = asyncio.get_running_loop()
        try:
            if not self.accepting:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            if self.models is None:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; watch grpc.health.v1")
            try:
                settings = settings_from_request(request, self.limits)          # FieldError
                memory_bytes, size, styles = self.estimate(request, settings)
                if not self.admission.fits_budget(memory_bytes):
                    raise self._over_budget(memory_bytes, size, styles, settings)
                job = self.admission.admit(job_id, request.seed if request.HasField("seed") else None,
                                           memory_bytes=memory_bytes)                    # ServerBusy
            except NSTServerError as exc:
                refusal = abort_for(exc)
                if isinstance(exc, MemoryBudgetExceeded):
                    refusal.outcome = "refused_memory"
                raise refusal from None
            async with contextlib.aclosing(self._run(job, request, settings)) as messages:
                async for message in messages:
                    # A yield returns once gRPC has handed the message to the transport, which waits for the
                    # client's flow-control window: a client that stopped reading holds it here.
                    timer = loop.call_later(self.limits.send_timeout_s, self._undeliverable, job, peer)
                    try:
                        yield message
                    finally:
                        timer.cancel()
                    if job.undeliverable:
                        raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     f"job {job_id}: the server could not deliver a message for "
                                     f"{self.limits.send_timeout_s:g} s (--send-timeout-s): the client stopped "
                                     f"reading; the job was stopped after {job.iterations} iterations")
            outcome = "completed"
        except _Abort as exc:
            outcome = exc.outcome or _outcome(exc.code, admitted=job is not None)
            if job is None:             # counted before the status is sent, so a client that reads the metrics
                metrics.JOBS.labels(outcome).inc()        # after its refusal sees the refusal counted
                outcome = None
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:         # with google.rpc.BadRequest details
                await context.abort_with_status(exc.rpc_status())
            await context.abort(exc.code, exc.message)
        except (asyncio.CancelledError, GeneratorExit):    # the client cancelled, went away, or its deadline passed
            reason = STOP_DEADLINE if deadline_passed(context) else STOP_CLIENT
            outcome = "deadline_exceeded" if reason == STOP_DEADLINE else "cancelled"
            if job is not None and job.result_sent:    # the client left after the Result: the job is done
                outcome = "completed"
                annotate(result="sent")
            elif job is not None:
                job.request_stop(reason)
            raise
        finally:
            if outcome is not None and (job is None or not job.undeliverable):  # else counted already
                metrics.JOBS.labels(outcome).inc()
            if job is not None:
                job.stop.set()                          # whatever ended the call, the worker stops too
                annotate(iterations=job.iterations, queue_position=job.queue_position)
                self.admission.release_when_idle(job)

    # -- the job API: thin methods over nst_server.jobapi.JobService (self.jobs, set by the app) ---------------

    async def _job_abort(self, context, exc: Exception) -> None:
        """End a job-API call for ``exc`` (:func:`abort_for`: a domain error's status; INVALID_ARGUMENT with its
        ``google.rpc.BadRequest`` field violation)."""
        if not isinstance(exc, (NSTServerError, _Abort)):
            log.error("job API call failed", exc_info=exc)
        refusal = exc if isinstance(exc, _Abort) else abort_for(exc)
        if refusal.code == grpc.StatusCode.INVALID_ARGUMENT:
            await context.abort_with_status(refusal.rpc_status())
        await context.abort(refusal.code, refusal.message)

    def _job_service(self, submitting: bool = False):
        """The job service. Raises _Abort UNAVAILABLE: none (a servicer built without the app), or, for a
        submission, the server is loading or shutting down."""
        if self.jobs is None:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the job API is not set up on this server (no state store)")
        if submitting and (not self.accepting or not self.jobs.accepting):
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if submitting and (self.models is None or not self.jobs.started):
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; watch grpc.health.v1")
        return self.jobs

    async def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.SubmitJobResponse:
        annotate(request_id=request.request_id or "-")
        try:
            reply = await self._job_service(submitting=True).submit(request)
        except Exception as exc:
            await self._job_abort(context, exc)
        annotate(job=reply.job_id, created=reply.created)
        return reply

    async def WatchJob(self, request: pb.WatchJobRequest, context):
        annotate(job=request.job_id or "-", after=request.after)
        try:
            async for event in self._job_service().watch(request):
                yield event
        except Exception as exc:
            await self._job_abort(context, exc)

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.JobStatus:
        annotate(job=request.job_id or "-")
        try:
            return await self._job_service().status(request.job_id)
        except Exception as exc:
            await self._job_abort(context, exc)

    async def GetJobResult(self, request: pb.GetJobResultRequest, context):
        annotate(job=request.job_id or "-")
        try:
            async for chunk in self._job_service().result(request.job_id):
                yield chunk
        except Exception as exc:
            await self._job_abort(context, exc)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.JobStatus:
        annotate(job=request.job_id or "-")
        try:
            return await self._job_service().cancel(request.job_id)
        except Exception as exc:
            await self._job_abort(context, exc)

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        try:
            return await self._job_service().list(request)
        except Exception as exc:
            await self._job_abort(context, exc)

    def _undeliverable(self, job: Job, peer: str) -> None:
        """Event loop, ``send_timeout_s`` after a message of ``job`` was handed to gRPC and not taken by the client:
        stop the job and free its slot now (the call itself ends when the client reads again or goes away: gRPC's
        asyncio server cannot cancel a call whose message is still in flight)."""
        job.undeliverable = True
        job.request_stop(STOP_SEND_TIMEOUT)
        self.admission.release_when_idle(job)
        metrics.JOBS.labels("send_timeout").inc()
        annotate(send_timeout="true")
        log.warning("job %s could not deliver a message to peer=%s for %g s (--send-timeout-s): the client stopped "
                    "reading; the job is being stopped (%d iterations done; it ends within one more) and its slot "
                    "is freed", job.job_id, peer, self.limits.send_timeout_s, job.iterations)

    async def _run(self, job: Job, request: pb.StylizeRequest, settings: StyleTransferSettings):
        """Run ``job`` on a worker thread; yield its stream messages, ``JobAccepted`` first (once the work is
        submitted, so that a client slow to take it delays nothing).

        Raises:
            _Abort: INVALID_ARGUMENT (inputs), RESOURCE_EXHAUSTED (out of memory), INTERNAL (any other
                failure), UNAVAILABLE (stopped by the shutdown). The server lives on in every case.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job_id = job.job_id

        def put(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            if not job.start():                   # stopped while waiting for a worker
                put(_DONE)
                return
            try:
                for event in self.engine_events(job, request, settings):
                    if (isinstance(event, Progress) and event.preview_png
                            and queue.qsize() >= MAX_QUEUED_EVENTS_WITH_PREVIEWS):
                        event = dataclasses.replace(event, preview_png=b"")     # a slow reader: skip this preview
                    put(event)
                    if job.stop.is_set():         # nobody waits for the rest; skip the final costing
                        break
            except BaseException as exc:  # reported to the handler, which maps it to a status
                put(_failure(job, exc))
            finally:
                release_free_memory()             # the job's activations and L-BFGS history, back to the OS,
                job.finish()                      # before the job counts as finished (the soak test reads it)
                put(_DONE)

        # The admission hands the work to a worker when the job's turn comes: at once when a worker is free and its
        # memory estimate fits, else when the jobs ahead of it are done (heartbeats meanwhile).
        self.admission.start(job, lambda: loop.run_in_executor(self._executor, work))
        yield pb.StylizeResponse(accepted=pb.JobAccepted(job_id=job_id, queue_position=job.queue_position,
                                                         replica=self.replica, memory_bytes=job.memory_bytes))
        delivered = False
        heartbeat_s = self.limits.heartbeat_s
        last_sent = time.perf_counter()              # JobAccepted went out just before
        getter: asyncio.Future | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                quiet_s = last_sent + heartbeat_s - time.perf_counter()
                done, _ = await asyncio.wait({getter}, timeout=max(0.0, quiet_s))
                if not done:                         # quiet for heartbeat_s: waiting, or a long iteration
                    yield self._heartbeat(job)
                    last_sent = time.perf_counter()
                    continue
                item, getter = getter.result(), None
                if item is _DONE:
                    break
                for message in self._messages(job, item):
                    yield message
                    last_sent = time.perf_counter()
                delivered = job.result_sent
        finally:
            if getter is not None:
                getter.cancel()
        if not delivered and job.stopped_by == STOP_SHUTDOWN:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"the server is shutting down; job {job_id} "
                         f"was stopped after {job.iterations} iterations when the grace period ended")
        if not delivered:
            raise _Abort(grpc.StatusCode.INTERNAL, f"job {job_id} ended without a result")
        # Whatever ends this loop, Stylize sets the job's stop flag (with the reason, for the cancel counter).

    def engine_events(self, job: Job, request: pb.StylizeRequest, settings: StyleTransferSettings,
                      **checkpoints):
        """Worker thread: decode the request's images and run the engine on them for ``job``; yield its events
        (:class:`~nst_server.events.Progress`, then one :class:`~nst_server.events.Result`), counting its
        iterations. The one path from a request to the engine, for Stylize and for the job API
        (:mod:`nst_server.jobapi`). ``checkpoints``: the engine's ``checkpoint_s``, ``checkpoint_now`` and
        ``resume`` (:func:`nst_server.engine.stylize`), the job API's only: with them,
        :class:`~nst_server.events.Checkpoint` events come too (Stylize passes none, so none reaches its stream).

        Raises:
            ImageInputError: an image cannot be used (INVALID_ARGUMENT). Anything the engine raises
                (:func:`abort_for` maps it); CheckpointMismatch for a ``resume`` of another schedule.
        """
        inputs = decode_inputs(request, self.limits.max_input_pixels)
        for event in engine.stylize(self.models, inputs, settings, should_stop=job.should_stop, batcher=self.batcher,
                                    **checkpoints):
            job.count_iterations(event.iterations if isinstance(event, Result) else event.iteration)
            yield event

    def _heartbeat(self, job: Job) -> pb.StylizeResponse:
        """A Heartbeat: the job's place in line now, time waited (to now, or to its start), time since admission
        and iterations done."""
        now = time.perf_counter()
        started = job.started_at if job.started_at is not None else now
        return pb.StylizeResponse(heartbeat=pb.Heartbeat(
            queue_position=self.admission.position(job), waited_ms=(started - job.admitted_at) * 1000.0,
            elapsed_ms=(now - job.admitted_at) * 1000.0, iterations=job.iterations))

    def _messages(self, job: Job, item) -> list[pb.StylizeResponse]:
        """The stream messages of one item from the worker (an engine event; a Result marks the job
        ``result_sent``).

        Raises:
            _Abort: the item is a failure (:func:`abort_for`): INVALID_ARGUMENT (inputs), RESOURCE_EXHAUSTED (out of
                memory), INTERNAL.
        """
        if isinstance(item, BaseException):
            raise abort_for(item, job)
        if (isinstance(item, Result) and item.stop_reason == STOP_CANCELLED
                and job.stopped_by == STOP_SHUTDOWN):
            return []                                # _DONE follows: UNAVAILABLE
        if isinstance(item, Result):
            job.result_sent = True
        return to_proto(item, self.limits.result_chunk_bytes)


def _outcome(code: grpc.StatusCode, admitted: bool) -> str:
    """``nst_jobs_total`` outcome of a call that ended with ``code`` (before or after admission)."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return "shutdown" if admitted else "refused_unavailable"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "out_of_memory" if admitted else "refused_busy"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return "invalid_argument"
    return "failed"


def _failure(job: Job, exc: BaseException) -> BaseException:
    """Worker thread: log a job's exception (with its traceback) and return it stripped of the traceback,
    whose frames would otherwise keep the job's tensors alive while the handler reports it. A domain error (a field
    out of range, an unusable image) is the caller's, not logged."""
    if isinstance(exc, NSTServerError):
        return exc
    if is_out_of_memory(exc):
        log.error("job %s ran out of memory after %d iterations: %s: %s", job.job_id, job.iterations,
                  type(exc).__name__, exc)
    else:
        log.error("job %s failed after %d iterations", job.job_id, job.iterations, exc_info=exc)
    traceback.clear_frames(exc.__traceback__)
    exc = exc.with_traceback(None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return exc


#: Longest status message sent, characters. Messages may quote the request (a layer name, the blend weights, an
#: exception's text); message and BadRequest details travel in the trailers, which gRPC caps at 16 KiB by default,
#: so a longer one would reach the client as RESOURCE_EXHAUSTED "Stream removed" without the field's name.
MAX_STATUS_MESSAGE_CHARS = 1000


def shorten(text: str, limit: int = MAX_STATUS_MESSAGE_CHARS) -> str:
    """``text``, cut to at most ``limit`` characters with a note of its full length when longer."""
    if len(text) <= limit:
        return text
    note = f"… ({len(text)} characters, shortened)"
    return text[:limit - len(note)] + note


class _Abort(Exception):
    """End the call with ``code`` and ``message``. With INVALID_ARGUMENT, ``field`` and ``reason`` are its
    ``google.rpc.BadRequest`` field violation: the request field to fix ("" for the request as a whole) and what is
    wrong with it (None: the message). Built from a failure by :func:`abort_for`."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "", reason: str | None = None) -> None:
        message = shorten(message)
        super().__init__(message)
        self.code, self.message, self.field = code, message, field
        #: ``nst_jobs_total`` outcome when it is not the code's (:func:`_outcome`), e.g. ``refused_memory``.
        self.outcome: str | None = None
        self.reason = message if reason is None else shorten(reason)

    def rpc_status(self) -> grpc.Status:
        """The status with one ``google.rpc.BadRequest`` field violation (field, description) in its details
        (grpcio-status; clients read it with ``grpc_status.rpc_status.from_call``)."""
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.reason)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message,
                                                      details=[detail]))


def abort_for(exc: BaseException, job: Job | None = None) -> _Abort:
    """The status a call ends with for a failure: the one place where errors become gRPC statuses.

    - a domain error (:class:`~nst_server.errors.NSTServerError`): its ``status``; its message; for a
      :class:`~nst_server.errors.FieldError` (an unusable image too) the ``BadRequest`` violation's field and
      description are its ``field`` and ``reason``;
    - out of memory (:func:`~nst_server.jobs.is_out_of_memory`): RESOURCE_EXHAUSTED, naming the job and what to
      lower;
    - any other ``ValueError``: INVALID_ARGUMENT with field "" (the request as a whole). Every range check of the
      server and the engine raises a FieldError, so this is a check that lost its field;
    - anything else: INTERNAL, with the exception's type and text.

    Args:
        job: the job that failed (its id and iterations go in the message); None before admission.
    """
    if isinstance(exc, NSTServerError):
        return _Abort(exc.status, str(exc), getattr(exc, "field", ""), getattr(exc, "reason", None))
    where = "the request" if job is None else f"job {job.job_id}"
    after = "" if job is None else f" after {job.iterations} iterations"
    if is_out_of_memory(exc):
        return _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"{where} ran out of memory{after} ({type(exc).__name__}: {exc}); try a smaller max_side_px or "
                      f"fewer styles")
    if isinstance(exc, ValueError):
        return _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    return _Abort(grpc.StatusCode.INTERNAL, f"{where} failed{after}: {type(exc).__name__}: {exc}")
