"""Prometheus metrics of the server (prometheus-client), served by ``nst-server --metrics-port PORT``.

All metrics live in prometheus-client's default registry, next to its process collector
(``process_resident_memory_bytes`` …). Names and units:

- ``nst_jobs_total{outcome}``: Stylize calls by outcome (:data:`OUTCOMES`), refused ones included.
- ``nst_job_queue_seconds``: time from admission to a worker picking the job up, s.
- ``nst_iteration_seconds``: duration of one optimiser iteration, s.
- ``nst_iterations_total``: optimiser iterations done, all jobs together; it stops growing within one
  iteration of a cancel.
- ``nst_jobs_running``, ``nst_jobs_waiting``: jobs on a worker now, jobs admitted and waiting for one.
- ``nst_max_running_jobs``, ``nst_max_queued_jobs``: the server's N and Q (``--max-running-jobs``,
  ``--max-queued-jobs``). ``(nst_jobs_running + nst_jobs_waiting) / nst_max_running_jobs`` is a replica's load
  (1: every worker busy, nothing waiting), the per-pod metric the HorizontalPodAutoscaler of ``deploy/k8s``
  scales on.
- ``nst_memory_budget_bytes``: the memory the jobs may use together (``--memory-budget``; 0: no memory
  accounting); ``nst_memory_reserved_bytes``: the sum of the memory estimates of the jobs that hold a worker now
  (:mod:`nst_server.memory`). A job waits while its estimate does not fit beside theirs.
- ``nst_job_cancels_total{reason}``: jobs stopped before their end: ``client`` (cancel or dropped connection),
  ``deadline`` (the client's deadline passed), ``shutdown`` (still running when the shutdown grace ended),
  ``send_timeout`` (the client stopped reading: a message waited longer than ``--send-timeout-s``; such calls
  count as ``nst_jobs_total{outcome="send_timeout"}`` at that moment).
- ``nst_replica_batch_jobs``: jobs served by each replica pass of the batcher (``--max-batch-size`` > 1);
  its ``_count`` is the passes, its ``_sum`` the job iterations they served.
- ``nst_rpcs_total{method,code}``: every RPC (health and reflection included) by final status code.
- The job API (:mod:`nst_server.jobapi`): ``nst_stored_jobs{state}``, jobs in the state folder by state
  (``queued``, ``running``, ``succeeded``, ``failed``, ``cancelled``), refreshed by the expiry sweep;
  ``nst_state_bytes``, the state folder's size, bytes (the database, its WAL and the result files; compare with
  ``--state-budget``); ``nst_stored_job_events_total{event}``, jobs ``submitted``, ``succeeded``, ``failed``,
  ``cancelled``; ``nst_jobs_resumed_total``, jobs found QUEUED or RUNNING at start and put back in line;
  ``nst_job_checkpoints_total``, checkpoints written (``--checkpoint-s``; a shutdown's included);
  ``nst_jobs_resumed_from_checkpoint_total``, jobs that went on from a stored checkpoint (not from iteration 1).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

#: ``outcome`` label values of ``nst_jobs_total``.
OUTCOMES = ("completed", "cancelled", "deadline_exceeded", "refused_busy", "refused_memory", "refused_unavailable",
            "invalid_argument", "out_of_memory", "failed", "shutdown", "send_timeout")

JOBS = Counter("nst_jobs", "Stylize calls by outcome", ["outcome"])
QUEUE_SECONDS = Histogram("nst_job_queue_seconds", "Time from admission to a worker picking the job up, s",
                          buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
ITERATION_SECONDS = Histogram("nst_iteration_seconds", "Duration of one optimiser iteration, s",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
ITERATIONS = Counter("nst_iterations", "Optimiser iterations done, all jobs together")
RUNNING = Gauge("nst_jobs_running", "Jobs on a worker thread now")
WAITING = Gauge("nst_jobs_waiting", "Jobs admitted and waiting for a worker thread")
MAX_RUNNING = Gauge("nst_max_running_jobs", "N: jobs this server runs at once (--max-running-jobs)")
MAX_QUEUED = Gauge("nst_max_queued_jobs", "Q: jobs this server admits to wait (--max-queued-jobs)")
MEMORY_BUDGET = Gauge("nst_memory_budget_bytes", "Memory the jobs may use together, bytes (--memory-budget; "
                      "0: no memory accounting)")
MEMORY_RESERVED = Gauge("nst_memory_reserved_bytes", "Sum of the memory estimates of the jobs holding a worker, bytes")
CANCELS = Counter("nst_job_cancels", "Jobs stopped before their end, by reason", ["reason"])
BATCH_JOBS = Histogram("nst_replica_batch_jobs", "Jobs served by each batched replica pass",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
RPCS = Counter("nst_rpcs", "RPCs by method and final status code", ["method", "code"])
JOBS_BY_STATE = Gauge("nst_stored_jobs", "Jobs of the job API in the state folder, by state", ["state"])
STATE_BYTES = Gauge("nst_state_bytes", "Size of the state folder (--state-dir), bytes")
STORED_JOBS = Counter("nst_stored_job_events", "Job API jobs submitted, succeeded, failed, cancelled", ["event"])
JOBS_RESUMED = Counter("nst_jobs_resumed", "Job API jobs found queued or running at start and put back in line")
CHECKPOINTS = Counter("nst_job_checkpoints", "Checkpoints of job API jobs written to the state folder")
RESUMED_FROM_CHECKPOINT = Counter("nst_jobs_resumed_from_checkpoint",
                                  "Job API jobs that went on from a stored checkpoint instead of their first iteration")

for _outcome in OUTCOMES:                     # export zeros, so that rates exist before the first event
    JOBS.labels(_outcome)
for _reason in ("client", "deadline", "shutdown", "send_timeout"):
    CANCELS.labels(_reason)
for _state in ("queued", "running", "succeeded", "failed", "cancelled"):
    JOBS_BY_STATE.labels(_state)
for _event in ("submitted", "succeeded", "failed", "cancelled"):
    STORED_JOBS.labels(_event)


def start_metrics_server(host: str, port: int) -> int:
    """Serve ``/metrics`` over HTTP on a daemon thread; return the bound port (``port`` 0 picks a free one).

    Raises:
        OSError: the address cannot be bound.
    """
    server, _thread = start_http_server(port, addr=host)
    return server.server_port
