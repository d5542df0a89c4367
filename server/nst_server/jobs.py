"""Admission control and the life of one job, apart from gRPC: N running + Q waiting slots, the stop flag
the engine polls once per iteration, the iteration meter, and which failures are out of memory (the error
classes, :class:`~nst_server.errors.ServerBusy` among them, live in :mod:`nst_server.errors`).

Threads: :class:`Admission` is used on the event loop only; a :class:`Job` is shared between the event loop
(admission, cancellation) and one worker thread (:meth:`Job.start`, :meth:`Job.should_stop`,
:meth:`Job.finish`), which its lock orders.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import torch

from nst_server import metrics
from nst_server.errors import ServerBusy

#: Values of ``Job.stopped_by``; ``send_timeout``: the client stopped reading (``--send-timeout-s``).
STOP_CLIENT, STOP_DEADLINE, STOP_SHUTDOWN, STOP_SEND_TIMEOUT = "client", "deadline", "shutdown", "send_timeout"

#: Environment variable of the fault-injection hook (tests only; see :func:`parse_fault_injection`).
FAULT_INJECT_ENV = "NST_FAULT_INJECT"
FAULT_KINDS = ("oom", "error")


@dataclass(frozen=True)
class FaultInjection:
    """Faults to inject (tests only). ``by_seed``: request seed -> ``oom`` or ``error``; ``slow_warm_up_s``:
    extra seconds before the warm-up pass, so that tests can see the server NOT_SERVING while it loads."""

    by_seed: dict[int, str] = field(default_factory=dict)
    slow_warm_up_s: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.by_seed) or self.slow_warm_up_s > 0


def parse_fault_injection(text: str | None) -> FaultInjection:
    """Parse ``$NST_FAULT_INJECT``: comma-separated ``SEED:oom``, ``SEED:error`` and ``warmup:SECONDS``.

    A fault-injection hook for tests of failure isolation and start-up: a job whose request sets ``seed`` =
    SEED fails inside the engine's optimisation loop, when its second iteration starts, with
    ``torch.OutOfMemoryError`` (``oom``) or ``RuntimeError`` (``error``); ``warmup:SECONDS`` delays the
    warm-up pass. Unset or empty: no faults (the production setting).

    Raises:
        ValueError: malformed text or an unknown kind.
    """
    by_seed: dict[int, str] = {}
    slow_warm_up_s = 0.0
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        key, _, value = entry.strip().partition(":")
        try:
            if key == "warmup":
                slow_warm_up_s = float(value)
                continue
            if value in FAULT_KINDS:
                by_seed[int(key)] = value
                continue
        except ValueError:
            pass
        raise ValueError(f"{FAULT_INJECT_ENV}: expected SEED:oom, SEED:error or warmup:SECONDS, got {entry!r}")
    return FaultInjection(by_seed, slow_warm_up_s)


#: Words of an allocation failure in onnxruntime's exceptions (its BFC arena's "Failed to allocate memory for
#: requested buffer", CUDA's "out of memory", cuDNN's and cuBLAS's ALLOC_FAILED statuses).
_ORT_OUT_OF_MEMORY = ("failed to allocate memory", "out of memory", "alloc_failed", "bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (CUDA), ``MemoryError``, the CPU allocator's failure, which PyTorch
    raises as a plain ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory"), and onnxruntime's
    allocation failures, raised as its own exception classes (``RuntimeException``, ``Fail`` …, not
    ``RuntimeError``s) with an allocation message (:data:`_ORT_OUT_OF_MEMORY`)."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text):
        return True
    return type(exc).__module__.startswith("onnxruntime") and any(words in text for words in _ORT_OUT_OF_MEMORY)


@dataclass(eq=False)
class Job:
    """One admitted Stylize call.

    Attributes:
        job_id: the id sent in ``JobAccepted``.
        queue_position: 0 when a worker was free at admission, else the number of jobs ahead of it plus one.
        admitted_at: ``time.perf_counter()`` at admission, s.
        started_at: ``time.perf_counter()`` when a worker started it, s; None before.
        stop: set to stop the job; the engine polls it once per iteration.
        stopped_by: why it was stopped (:data:`STOP_CLIENT`, :data:`STOP_DEADLINE`, :data:`STOP_SHUTDOWN`), or None.
        iterations: iterations completed so far (the worker's count).
        state: ``waiting`` → ``running`` → ``finished``; or ``waiting`` → ``abandoned`` (stopped before a
            worker picked it up).
        fault: injected fault kind (``oom``, ``error``) or None; see :func:`parse_fault_injection`.
        future: the worker's future (event loop side), once submitted.
        result_sent: the Result message has been handed to gRPC (a cancel after that still counts as completed).
        undeliverable: a message waited longer than ``--send-timeout-s`` for the client to take it; the job is
            stopped and its slot freed.
    """

    job_id: str
    queue_position: int = 0
    admitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    stopped_by: str | None = None
    iterations: int = 0
    state: str = "waiting"
    fault: str | None = None
    future: asyncio.Future | None = None
    result_sent: bool = False
    undeliverable: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _last_poll: float | None = field(default=None, repr=False)
    _polls: int = field(default=0, repr=False)

    def start(self) -> bool:
        """Worker thread, before any work: False when the job was stopped while waiting (do nothing then)."""
        with self._lock:
            if self.state != "waiting" or self.stop.is_set():
                if self.state == "waiting":
                    self.state = "abandoned"
                    metrics.WAITING.dec()
                return False
            self.state = "running"
            self.started_at = time.perf_counter()
            metrics.WAITING.dec()
            metrics.RUNNING.inc()
        metrics.QUEUE_SECONDS.observe(time.perf_counter() - self.admitted_at)
        return True

    def should_stop(self) -> bool:
        """The engine's ``should_stop``: polled once per iteration, before it starts.

        Counts the iteration that just ended (``nst_iterations_total``, ``nst_iteration_seconds``).

        Raises:
            torch.OutOfMemoryError, RuntimeError: only with an injected fault (:func:`parse_fault_injection`).
        """
        now = time.perf_counter()
        self._polls += 1
        if self._last_poll is not None:
            metrics.ITERATION_SECONDS.observe(now - self._last_poll)
        self._last_poll = now
        self.count_iterations(self._polls - 1)
        if self.fault is not None and self._polls == 2:
            message = f"injected by {FAULT_INJECT_ENV} for job {self.job_id}"
            raise torch.OutOfMemoryError(message) if self.fault == "oom" else RuntimeError(message)
        return self.stop.is_set()

    def count_iterations(self, total: int) -> None:
        """Worker thread: ``total`` iterations are done (known from a poll, a Progress message's iteration or
        a Result's iterations); add the ones not counted yet to ``nst_iterations_total``."""
        if total > self.iterations:
            metrics.ITERATIONS.inc(total - self.iterations)
            self.iterations = total

    def finish(self) -> None:
        """Worker thread, after the work (or the exception) whatever happened."""
        with self._lock:
            if self.state == "running":
                self.state = "finished"
                metrics.RUNNING.dec()

    def request_stop(self, reason: str) -> None:
        """Stop the job (any thread); the first reason wins and counts in ``nst_job_cancels_total``.

        A job that has finished already is left alone.
        """
        with self._lock:
            if self.stopped_by is not None or self.state in ("finished", "abandoned"):
                return
            self.stopped_by = reason
            self.stop.set()
            if self.state == "waiting":                # no worker will ever run it: free the slot now
                self.state = "abandoned"
                metrics.WAITING.dec()
        metrics.CANCELS.labels(reason).inc()

    def admitted_before(self, other: "Job") -> bool:
        """Admitted before ``other`` (admission times, then ids for equal times)."""
        return (self.admitted_at, self.job_id) < (other.admitted_at, other.job_id)

    @property
    def holds_worker(self) -> bool:
        """True while a worker thread runs (or is about to run) this job; its slot is freed when that ends."""
        return self.state in ("waiting", "running")


class Admission:
    """At most ``max_running`` jobs run and ``max_queued`` wait; event-loop thread only."""

    def __init__(self, max_running: int, max_queued: int, faults: dict[int, str] | None = None) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"need max_running >= 1 and max_queued >= 0, got {max_running}, {max_queued}")
        self.max_running, self.max_queued = max_running, max_queued
        self.faults = faults or {}
        self.jobs: dict[str, Job] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def admit(self, job_id: str, seed: int | None = None) -> Job:
        """Take a slot for a new job.

        Raises:
            ServerBusy: N + Q jobs hold slots already.
        """
        admitted = len(self.jobs)
        if admitted >= self.max_running + self.max_queued:
            raise ServerBusy(f"server busy: {admitted} jobs admitted, limit {self.max_running} running + "
                             f"{self.max_queued} queued; retry later")
        job = Job(job_id, queue_position=max(0, admitted - self.max_running + 1),
                  fault=self.faults.get(seed) if seed is not None else None)
        self.jobs[job_id] = job
        self._empty.clear()
        metrics.WAITING.inc()
        return job

    def position(self, job: Job) -> int:
        """The job's place in line now, as ``JobAccepted.queue_position`` counts it at admission: 0 when a worker
        has it or is free for it, k when it is k-th in line (the workers take waiting jobs in admission order)."""
        if job.state != "waiting":
            return 0
        ahead = running = 0
        for other in self.jobs.values():
            running += other.state == "running"
            if other is job:
                continue
            ahead += other.state == "waiting" and other.admitted_before(job)
        return max(0, ahead + 1 - (self.max_running - running))

    def release(self, job: Job) -> None:
        """Free the job's slot (idempotent)."""
        if self.jobs.pop(job.job_id, None) is not None and not self.jobs:
            self._empty.set()

    def release_when_idle(self, job: Job) -> None:
        """Free the job's slot once no worker thread runs it any more: now, or when its future is done (a
        stopped job leaves the worker within one iteration)."""
        if job.state == "running" and job.future is not None and not job.future.done():   # else "finished" etc.
            job.future.add_done_callback(lambda _future: self.release(job))
        else:
            self.release(job)

    def stop_all(self, reason: str) -> None:
        """Stop every admitted job (shutdown after the grace period)."""
        for job in list(self.jobs.values()):
            job.request_stop(reason)

    async def wait_empty(self, timeout_s: float) -> bool:
        """Wait until no job holds a slot; False when ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout=max(0.0, timeout_s))
        except asyncio.TimeoutError:
            return False
        return True
