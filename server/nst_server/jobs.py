"""Admission control and the life of one job, apart from gRPC: N running + Q waiting slots, a memory budget
that the running jobs' estimates share, the stop flag the engine polls once per iteration, the iteration meter,
and which failures are out of memory (the error classes, :class:`~nst_server.errors.ServerBusy` among them, live
in :mod:`nst_server.errors`; :class:`MemoryBudgetExceeded` here).

Admission decides when a job runs: :class:`Admission` hands a waiting job to a worker (calls its ``launch``) when
it is first in line, fewer than N jobs hold a worker, and its memory estimate fits beside theirs in the budget
(:mod:`nst_server.memory`); the line is first in, first out, so a large job is not overtaken for ever by small ones,
and one that fits the budget alone runs at the latest when the jobs ahead of it are done. A job that could never fit
is refused at admission.

Threads: :class:`Admission` is used on the event loop only; a :class:`Job` is shared between the event loop
(admission, cancellation) and one worker thread (:meth:`Job.start`, :meth:`Job.should_stop`,
:meth:`Job.finish`), which its lock orders.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nst_server import metrics
from nst_server.errors import ServerBusy
from nst_server.memory import format_bytes

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


class MemoryBudgetExceeded(ServerBusy):
    """A job whose memory estimate is over the server's whole memory budget: it could never run, so it is refused
    at once with RESOURCE_EXHAUSTED (not queued).

    Attributes:
        memory_bytes: the job's estimate; budget_bytes: the server's budget (``--memory-budget``).
        max_side_px: the job's ``max_side_px``; largest_side_px: the largest ``max_side_px`` that would fit (0: none),
            both None when the caller did not say.
    """

    def __init__(self, memory_bytes: int, budget_bytes: int, max_side_px: int | None = None,
                 largest_side_px: int | None = None) -> None:
        self.memory_bytes, self.budget_bytes = memory_bytes, budget_bytes
        self.max_side_px, self.largest_side_px = max_side_px, largest_side_px
        side = f"max_side_px {max_side_px}: " if max_side_px is not None else "max_side_px: "
        if largest_side_px is None:
            hint = "ask for a smaller max_side_px or fewer styles"
        elif largest_side_px > 0:
            hint = f"the largest max_side_px that fits it is {largest_side_px} px"
        else:
            hint = "no max_side_px fits it"
        super().__init__(f"{side}the job's estimated peak memory {format_bytes(memory_bytes)} ({memory_bytes} bytes) "
                         f"is over this server's whole memory budget of {format_bytes(budget_bytes)} ({budget_bytes} "
                         f"bytes, --memory-budget; GetModelInfo.memory_budget_bytes); {hint}")


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
        memory_bytes: the job's estimated peak memory (:func:`nst_server.memory.job_peak_bytes`), reserved in the
            admission's budget from the moment it is handed to a worker until its worker is done.
        reserved: a worker is (or is about to be) given this job: it counts in the N running jobs and its
            ``memory_bytes`` in the budget (event loop side; :class:`Admission`).
        launch: submits the job's work to a worker and returns its future (set by the servicer; the admission calls
            it when the job's turn comes, or at once when the job was stopped while waiting, so that its stream
            ends).
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
    memory_bytes: int = 0
    reserved: bool = False
    launch: Callable[[], asyncio.Future] | None = field(default=None, repr=False)
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

    def abandon(self) -> None:
        """No worker will run this job (released before it was handed one): a waiting job becomes ``abandoned``."""
        with self._lock:
            if self.state == "waiting":
                self.state = "abandoned"
                metrics.WAITING.dec()

    def admitted_before(self, other: "Job") -> bool:
        """Admitted before ``other`` (admission times, then ids for equal times)."""
        return (self.admitted_at, self.job_id) < (other.admitted_at, other.job_id)

    @property
    def holds_worker(self) -> bool:
        """True while a worker thread runs (or is about to run) this job; its slot is freed when that ends."""
        return self.state in ("waiting", "running")


class Admission:
    """At most ``max_running`` jobs run and ``max_queued`` wait; with a ``memory_budget``, the running jobs' memory
    estimates together stay within it. Event-loop thread only.

    A job runs when it is first in line (admission order; jobs stopped while waiting leave the line), fewer than
    ``max_running`` jobs hold a worker, and its ``memory_bytes`` fits beside theirs: :meth:`pump` then marks it
    ``reserved`` and calls its ``launch``. A worker's job keeps its reservation until its future is done (its
    memory handed back to the OS), and every such end, release and stop pumps the line again. A job over the whole
    budget is refused at admission (:class:`MemoryBudgetExceeded`), so the job first in line always fits once the
    running ones are done: nothing waits for ever.

    Attributes:
        memory_budget: bytes the running jobs' estimates may add up to; None: no memory accounting (N alone).
    """

    def __init__(self, max_running: int, max_queued: int, faults: dict[int, str] | None = None,
                 memory_budget: int | None = None) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"need max_running >= 1 and max_queued >= 0, got {max_running}, {max_queued}")
        self.max_running, self.max_queued = max_running, max_queued
        self.faults = faults or {}
        self.jobs: dict[str, Job] = {}
        #: Jobs handed a worker whose worker is not done yet (released ones too: a stopped job still holds its
        #: worker, and its memory, until it leaves the engine).
        self._holding: dict[str, Job] = {}
        self.memory_budget: int | None = None
        self._empty = asyncio.Event()
        self._empty.set()
        #: Called (event loop) after every :meth:`release`: a slot may be free; the job API
        #: (:mod:`nst_server.jobapi`) admits its stored jobs then.
        self.on_release: list[Callable[[], None]] = []
        self.set_memory_budget(memory_budget)

    def set_memory_budget(self, budget: int | None) -> None:
        """Set the memory budget, bytes (None: no memory accounting); jobs waiting that fit now start."""
        if budget is not None and budget < 0:
            raise ValueError(f"the memory budget must be >= 0 bytes or None, got {budget}")
        self.memory_budget = budget
        metrics.MEMORY_BUDGET.set(budget or 0)
        self.pump()

    @property
    def reserved_bytes(self) -> int:
        """The sum of the estimates of the jobs that hold a worker (``nst_memory_reserved_bytes``)."""
        return sum(job.memory_bytes for job in self._holding.values())

    @property
    def holding_workers(self) -> int:
        """Jobs that hold (or are about to take) a worker: at most ``max_running``."""
        return len(self._holding)

    def fits_budget(self, memory_bytes: int) -> bool:
        """Whether a job of ``memory_bytes`` fits the whole budget alone (always, without a budget)."""
        return self.memory_budget is None or memory_bytes <= self.memory_budget

    def admit(self, job_id: str, seed: int | None = None, memory_bytes: int = 0) -> Job:
        """Take a slot for a new job; it is handed to a worker at once when it may run (:meth:`pump`), else it
        waits in line.

        Args:
            memory_bytes: the job's estimated peak memory (:func:`nst_server.memory.job_peak_bytes`).
        Raises:
            MemoryBudgetExceeded: ``memory_bytes`` is over the whole memory budget (the caller, which knows the
                request, may raise its own with ``max_side_px`` and the largest side that fits first).
            ServerBusy: N + Q jobs hold slots already.
        """
        if not self.fits_budget(memory_bytes):
            raise MemoryBudgetExceeded(memory_bytes, self.memory_budget)
        admitted = len(self.jobs)
        if admitted >= self.max_running + self.max_queued:
            raise ServerBusy(f"server busy: {admitted} jobs admitted, limit {self.max_running} running + "
                             f"{self.max_queued} queued; retry later")
        job = Job(job_id, memory_bytes=max(0, int(memory_bytes)),
                  fault=self.faults.get(seed) if seed is not None else None)
        self.jobs[job_id] = job
        self._empty.clear()
        metrics.WAITING.inc()
        self.pump()
        job.queue_position = self.position(job)
        return job

    def start(self, job: Job, launch: Callable[[], asyncio.Future]) -> None:
        """Give ``job`` the function that submits its work to a worker (returning the worker's future); it is
        called at once when the job may run already, else when its turn comes (:meth:`pump`)."""
        job.launch = launch
        self.pump()

    def _in_line(self, job: Job) -> bool:
        """Waiting for a worker, not handed one, not stopped."""
        return job.state == "waiting" and not job.reserved and not job.stop.is_set()

    def pump(self) -> None:
        """Hand waiting jobs to workers, first in line first, while fewer than N hold one and the next one's
        estimate fits beside theirs; launch the jobs handed a worker (and those stopped while waiting, whose work
        does nothing but end their stream). The first job in line that does not fit stops the pass: the ones
        behind it wait too (first in, first out)."""
        holding, reserved = self.holding_workers, self.reserved_bytes
        for job in self.jobs.values():                  # admission order (dicts keep insertion order)
            if not self._in_line(job):
                continue
            fits = self.memory_budget is None or reserved + job.memory_bytes <= self.memory_budget
            if holding >= self.max_running or not fits:
                break
            job.reserved = True
            self._holding[job.job_id] = job
            holding += 1
            reserved += job.memory_bytes
        metrics.MEMORY_RESERVED.set(reserved)
        for job in list(self.jobs.values()):
            if job.launch is not None and job.future is None and (job.reserved or job.stop.is_set()):
                self._launch(job)

    def _launch(self, job: Job) -> None:
        job.future = job.launch()
        job.future.add_done_callback(lambda _future: self._worker_done(job))

    def _worker_done(self, job: Job) -> None:
        """The job's worker is done with it: its reservation ends; the line moves."""
        self._unreserve(job)
        self.pump()

    def _unreserve(self, job: Job) -> None:
        job.reserved = False
        self._holding.pop(job.job_id, None)

    def position(self, job: Job) -> int:
        """The job's place in line now, as ``JobAccepted.queue_position`` counts it at admission: 0 when a worker
        has it or was handed it, k when it is k-th in line (jobs are handed to workers in admission order)."""
        if job.state != "waiting" or job.reserved:
            return 0
        ahead = 0
        for other in self.jobs.values():
            if other is job:
                break
            ahead += self._in_line(other)
        return ahead + 1

    def release(self, job: Job) -> None:
        """Free the job's slot (idempotent); a job never handed to a worker gives its reservation back too."""
        if self.jobs.pop(job.job_id, None) is not None and not self.jobs:
            self._empty.set()
        if job.future is None:                          # never launched: no worker holds it, none ever will
            self._unreserve(job)
            job.abandon()
        self.pump()
        for listener in self.on_release:
            listener()

    def release_when_idle(self, job: Job) -> None:
        """Free the job's slot once no worker thread runs it any more: now, or when its future is done (a
        stopped job leaves the worker within one iteration)."""
        if job.state == "running" and job.future is not None and not job.future.done():   # else "finished" etc.
            job.future.add_done_callback(lambda _future: self.release(job))
        else:
            self.release(job)

    def stop_all(self, reason: str) -> None:
        """Stop every admitted job (shutdown after the grace period); the waiting ones end at once."""
        for job in list(self.jobs.values()):
            job.request_stop(reason)
        self.pump()

    async def wait_empty(self, timeout_s: float) -> bool:
        """Wait until no job holds a slot; False when ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout=max(0.0, timeout_s))
        except asyncio.TimeoutError:
            return False
        return True
