"""Assemble and run the asyncio gRPC server: StyleTransfer, standard health, reflection, optional TLS and
bearer token, one log line per RPC, Prometheus metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import signal
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nst_proto.jobids import check_replica_name
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc
from nst_server.cpus import CgroupFormatError, cpu_budget
from nst_server.interceptors import BearerTokenInterceptor, RpcLogInterceptor
from nst_server.jobapi import DEFAULT_CHECKPOINT_S, DEFAULT_RESULT_TTL_S, DEFAULT_STATE_BUDGET_BYTES, JobService
from nst_server.jobs import FaultInjection
from nst_server.jobstore import JobStore
from nst_server import memory, metrics
from nst_server.metrics import start_metrics_server
from nst_server import reflection
from nst_server.model import StyleModels, tensorrt_options
from nst_server.precision import default_precision
from nst_server.servicer import ServerLimits, StyleTransferServicer
from nst_server.objective import batch_pass

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StyleTransfer"].full_name  # "nst.v1.StyleTransfer"

#: After the grace period, jobs still running are stopped; this long is left for them to end with
#: UNAVAILABLE (one iteration) before the remaining calls are cut, s.
TERMINATE_WAIT_S = 5.0


@dataclass
class ServerConfig:
    """How to run the server.

    Attributes:
        model_path: the ``.onnx`` file written by ``nst-export``.
        host, port: where to listen (:func:`listen_address`: an IPv4 or IPv6 address, with or without brackets, a
            host name, the wildcards ``0.0.0.0`` and ``::``, or ``unix:PATH``); port 0 picks a free port (the
            bound port is logged and printed). The port must be this server's own: gRPC's default
            ``SO_REUSEPORT`` is off, so a port another process listens on is refused at start.
        providers: execution providers to try in order (default TensorRT, CUDA, CPU).
        limits: per-job and admission limits.
        max_receive_message_bytes: gRPC receive limit for requests, bytes.
        grace_s: on SIGTERM/SIGINT, running and waiting jobs get this long to finish, s; then they end with
            UNAVAILABLE.
        tls_cert_path, tls_key_path: PEM certificate (chain) and private key; both set: TLS only, no
            plaintext port.
        auth_token: when set, every call must carry ``authorization: Bearer <auth_token>`` metadata, else
            UNAUTHENTICATED.
        auth_health: also require the token for ``grpc.health.v1.Health`` (open by default).
        require_cuda: refuse to start (ValueError) unless the replica, which runs the whole optimisation, is on a
            CUDA device; a session without a GPU provider is then logged as a warning, not refused (the GPU
            machine's image has onnxruntime for the CPU only).
        metrics_host, metrics_port: Prometheus ``/metrics`` over HTTP; ``metrics_port`` None: off, 0: a free
            port (printed).
        fault_injection: test hook, see :func:`nst_server.jobs.parse_fault_injection`; empty in production.
        threads: intra-op threads of torch and onnxruntime; None: the CPUs this process may use
            (:func:`nst_server.cpus.cpu_budget`: affinity and cgroup CPU quota).
        keepalive_time_s: the server pings a connection that was quiet this long, s (``grpc.keepalive_time_ms``).
        keepalive_timeout_s: and closes it when the ping is not answered within this, s
            (``grpc.keepalive_timeout_ms``).
        min_ping_interval_s: clients may ping this often, with or without calls in flight, s
            (``grpc.http2.min_ping_interval_without_data_ms``); more often is a ping strike, and after 2 strikes
            gRPC closes the connection with GOAWAY ``too_many_pings``. gRPC's default is 300 s.
        max_connection_age_s: a connection older than this (±10 % jitter) gets GOAWAY, so that clients
            reconnect and re-resolve (DNS, load balancers) and the load spreads over new replicas, s; 0: never
            (``grpc.max_connection_age_ms``).
        max_connection_age_grace_s: calls still open on such a connection get this long to end, s; longer than
            the longest job, waiting included, so that no job is cut (``grpc.max_connection_age_grace_ms``).
        state_dir: the job API's folder (:mod:`nst_server.jobstore`: a SQLite database and the result PNGs); jobs
            in it survive a restart. None: a temporary folder, removed when the server stops (nothing survives).
        result_ttl_s: finished jobs of the job API are removed this long after they finished, s (> 0).
        state_budget_bytes: while ``state_dir`` holds more than this, SubmitJob is refused with
            RESOURCE_EXHAUSTED naming the budget (stored jobs stay readable), bytes; 0: no budget.
        checkpoint_s: a running job of the job API writes a checkpoint to ``state_dir`` at most this often (a
            restart repeats at most this long of its work), s; 0: no checkpoints.
        replica_name: this replica's name (a DNS label: the pod's name of a StatefulSet), put before the job ids
            it makes (``nst-0.3f9c…``) so that clients of a fleet route a job's calls to it (:mod:`nst_proto.jobids`);
            empty: ids without a prefix (one server).

    Sources for the keepalive settings: gRPC's "Keepalive User Guide for gRPC Core", gRFC A8 (client-side
    keepalive) and A9 (server-side connection management).
    """

    model_path: str
    host: str = "127.0.0.1"
    port: int = 50051
    providers: list[str] | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    max_receive_message_bytes: int = 64 * 1024 * 1024
    grace_s: float = 10.0
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    auth_token: str | None = None
    auth_health: bool = False
    require_cuda: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    fault_injection: FaultInjection = field(default_factory=FaultInjection)
    threads: int | None = None
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 20.0
    min_ping_interval_s: float = 5.0
    max_connection_age_s: float = 600.0
    max_connection_age_grace_s: float = 86400.0
    state_dir: str | None = None
    result_ttl_s: float = DEFAULT_RESULT_TTL_S
    state_budget_bytes: int = DEFAULT_STATE_BUDGET_BYTES
    checkpoint_s: float = DEFAULT_CHECKPOINT_S
    replica_name: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be between 0 and 65535, got {self.metrics_port}")
        listen_address(self.host, self.port)                     # raises ValueError naming --host
        listen_address(self.metrics_host, self.metrics_port or 0, flag="--metrics-host", unix=False)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        for flag, value in (("--keepalive-time-s", self.keepalive_time_s),
                            ("--keepalive-timeout-s", self.keepalive_timeout_s),
                            ("--min-ping-interval-s", self.min_ping_interval_s)):
            if not 0.001 <= value <= MAX_DURATION_S:
                raise ValueError(f"{flag} must be between 0.001 and {MAX_DURATION_S:g} s, got {value}")
        if not 0 < self.result_ttl_s <= MAX_DURATION_S * 1000:
            raise ValueError(f"--result-ttl-s must be > 0 s, got {self.result_ttl_s}")
        check_replica_name(self.replica_name)                   # raises ValueError naming --replica-name
        if self.state_budget_bytes < 0:
            raise ValueError(f"--state-budget must be >= 0 bytes (0: none), got {self.state_budget_bytes}")
        if not 0 <= self.checkpoint_s <= MAX_DURATION_S:
            raise ValueError(f"--checkpoint-s must be between 0 (none) and {MAX_DURATION_S:g} s, got "
                             f"{self.checkpoint_s}")
        for flag, value in (("--max-connection-age-s", self.max_connection_age_s),
                            ("--max-connection-age-grace-s", self.max_connection_age_grace_s)):
            if not 0 <= value <= MAX_DURATION_S:
                raise ValueError(f"{flag} must be between 0 and {MAX_DURATION_S:g} s, got {value}")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The server's gRPC channel arguments: message limits, keepalive and connection age."""
        options = [
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.http2.max_pings_without_data", 0),       # our own keepalive pings go on over quiet streams
            # gRPC sets SO_REUSEPORT by default: a second server on a taken port then "binds" and the kernel
            # splits the connections between the two. Off: a port that is not ours fails at start.
            ("grpc.so_reuseport", 0),
        ]
        if self.max_connection_age_s > 0:
            options += [("grpc.max_connection_age_ms", _ms(self.max_connection_age_s)),
                        ("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace_s))]
        return options


#: Longest duration a time flag accepts, s (gRPC takes int32 milliseconds: about 24.8 days).
MAX_DURATION_S = (2**31 - 1) / 1000.0


#: A host name (RFC 1123 labels: letters, digits, hyphens; dots between; an optional final dot).
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")

#: What ``--host`` accepts, for error messages.
HOST_FORMS = ("an IPv4 address (127.0.0.1; 0.0.0.0: every IPv4 interface), an IPv6 address with or without brackets "
              "(::1 or [::1]; :: every interface), a host name (localhost), or unix:PATH; the port goes in --port")


def listen_address(host: str, port: int, flag: str = "--host", unix: bool = True) -> str:
    """The gRPC listening address of ``host`` and ``port``: ``HOST:PORT``, ``[IPv6]:PORT`` (bracketed, as gRPC
    needs; an IPv6 zone ``fe80::1%eth0`` is kept), or ``unix:PATH`` / ``unix-abstract:NAME`` as given (no port).

    Raises:
        ValueError: naming ``flag``, ``host`` and the forms accepted (:data:`HOST_FORMS`): an empty host, one with
            a port or a scheme in it (``127.0.0.1:50051``, ``dns:///x``), brackets around something other than
            an IPv6 address, or characters no host name has.
    """
    text = host.strip()
    if unix and text.startswith(("unix:", "unix-abstract:")) and text.partition(":")[2]:
        return text
    bracketed = text.startswith("[") and text.endswith("]")
    literal = text[1:-1] if bracketed else text
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        address = None
    if address is not None and address.version == 6:
        return f"[{literal}]:{port}"
    if address is not None and not bracketed:
        return f"{literal}:{port}"
    if not bracketed and _HOST_NAME.fullmatch(text):
        return f"{text}:{port}"
    raise ValueError(f"{flag} {host!r} is not an address to listen on: expected {HOST_FORMS}")


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000.0))


def intra_op_threads(config: ServerConfig) -> tuple[int, str]:
    """Threads for torch's and onnxruntime's intra-op pools and where the number comes from: ``--threads``, else
    the CPUs this process may use (:func:`nst_server.cpus.cpu_budget`; a malformed cgroup file is logged and
    the affinity mask used alone)."""
    if config.threads is not None:
        return config.threads, f"--threads {config.threads}"
    try:
        budget = cpu_budget()
    except CgroupFormatError as exc:
        log.warning("cannot read the cgroup CPU quota (%s); sizing threads from the CPU affinity alone", exc)
        budget = cpu_budget(proc_cgroup=Path("/nonexistent"))
    return budget.cpus, budget.source


def memory_budget(config: ServerConfig, rss_bytes: int | None = None) -> tuple[int | None, str]:
    """The jobs' memory budget, bytes (None: no memory accounting), and where it comes from: ``--memory-budget``
    when given (0: none), else :func:`nst_server.memory.default_budget` with the resident memory now, once the
    model is loaded and warmed up (a cgroup or /proc file that cannot be read leaves MemTotal, or no accounting,
    with a warning)."""
    given = config.limits.memory_budget_bytes
    if given == 0:
        return None, "off: --memory-budget none"
    if given is not None:
        return given, f"--memory-budget {memory.format_bytes(given)}"
    try:
        return memory.default_budget(rss_bytes)
    except memory.MemoryFileError as exc:
        log.warning("cannot size the memory budget (%s); trying MemTotal alone", exc)
    try:
        return memory.default_budget(rss_bytes, root=Path("/nonexistent"), proc_cgroup=Path("/nonexistent"))
    except memory.MemoryFileError as exc:
        log.warning("cannot size the memory budget (%s): no memory accounting; set --memory-budget", exc)
        return None, f"off: {exc}"


def warm_up(models: StyleModels) -> None:
    """One session pass and one replica forward/backward at 32 px in the default job's precision, so the first
    job does not pay for set-up."""
    image = torch.rand(1, 3, 32, 32, device=models.device, requires_grad=True)
    models.features(image)
    key = (tuple(image.shape), models.replica.pooling, default_precision(models.device)[0])
    sum(out.float().sum() for out in batch_pass(models)(image, key)).backward()


class ClosedCallFilter(logging.Filter):
    """On gRPC's asyncio server logger (``grpc._cython.cygrpc``): calls that end because a side closed them are
    logged by gRPC at ERROR with a traceback, though nothing failed: a message in flight when its client closed
    the call (cancelled, went away, or never read it and then left) fails with ``ExecuteBatchError`` whenever
    the client's close has not reached gRPC yet (a race), and a stream still open when ``server.stop`` ends the
    grace cancels with ``CancelledError`` ("Exception not handled by _handle_exceptions"). Such a record becomes
    one INFO line without the traceback; every other record passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (type(exc).__name__ == "ExecuteBatchError" or isinstance(exc, asyncio.CancelledError)):
            why = ("the client closed the call while a message was in flight" if type(exc).__name__ ==
                   "ExecuteBatchError" else "the call was cancelled")
            record.msg, record.args = f"%s ({why})", (record.getMessage(),)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class HealthServicer(health.aio.HealthServicer):
    """grpcio-health-checking's asyncio servicer, whose ``Watch`` streams can be ended cleanly: after
    :meth:`end_watches` each open and new watch ends with UNAVAILABLE "shutting down" (its client has seen
    NOT_SERVING first, from ``enter_graceful_shutdown``), instead of being cancelled by ``server.stop``."""

    def __init__(self) -> None:
        super().__init__()
        self._ending = asyncio.Event()

    def end_watches(self) -> None:
        self._ending.set()

    async def Watch(self, request, context) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self._ending.wait())
        try:
            await asyncio.wait({watch, ending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ending.cancel()
            if not watch.done():
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        if watch.done() and not watch.cancelled() and watch.exception() is not None:
            raise watch.exception()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")


def require_cuda(models: StyleModels) -> None:
    """``--require-cuda``'s check of the loaded models.

    Raises:
        ValueError: the replica is not on a CUDA device (the message names the device and the providers).
    """
    if models.device.type != "cuda":
        raise ValueError(f"--require-cuda: the replica is on {models.device}, not on a CUDA device; not serving")
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(models.providers):
        log.warning("--require-cuda: the replica is on %s, but the onnxruntime session runs on %s (this "
                    "onnxruntime has no GPU provider that loads): targets and costs are computed on the CPU",
                    models.device, models.providers)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls_cert_path``/``tls_key_path``, or None for plaintext.

    Raises:
        ValueError: only one of the two is set. OSError: a file cannot be read.
    """
    if not config.tls_cert_path and not config.tls_key_path:
        return None
    if not (config.tls_cert_path and config.tls_key_path):
        raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
    key, chain = Path(config.tls_key_path).read_bytes(), Path(config.tls_cert_path).read_bytes()
    return grpc.ssl_server_credentials([(key, chain)])


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    """Load the model, warm it up, serve until SIGTERM/SIGINT, then shut down gracefully.

    Health (``grpc.health.v1``) is NOT_SERVING until the model is loaded and warmed up, and again from the
    moment a shutdown signal arrives. Shutdown: new jobs are refused with UNAVAILABLE at once; running and
    waiting jobs get ``grace_s`` seconds, then they are stopped (within one iteration) and end with
    UNAVAILABLE; then the server stops. A second signal cuts the grace short.

    Raises:
        ValueError, OSError: bad TLS settings or files. RuntimeError: the address cannot be bound.
        nst_server.errors.ModelFileError: the model file is missing or invalid.
    """
    credentials = server_credentials(config)
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, ClosedCallFilter) for f in grpc_log.filters):
        grpc_log.addFilter(ClosedCallFilter())
    interceptors: list[grpc.aio.ServerInterceptor] = [RpcLogInterceptor()]
    if config.auth_token:
        interceptors.append(BearerTokenInterceptor(config.auth_token, protect_health=config.auth_health))
        if credentials is None:
            log.warning("a bearer token without TLS travels in clear text; use --tls-cert/--tls-key off localhost")
    server = grpc.aio.server(interceptors=interceptors, options=config.grpc_options())
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    # UNAVAILABLE until loaded
    servicer = StyleTransferServicer(None, config.limits, faults=config.fault_injection.by_seed)
    servicer.replica_name = config.replica_name
    threads, threads_source = intra_op_threads(config)
    servicer.intra_op_threads, servicer.threads_source = threads, threads_source
    log.info("%d intra-op threads for torch and onnxruntime (%s)", threads, threads_source)
    metrics.MAX_RUNNING.set(config.limits.max_running_jobs)
    metrics.MAX_QUEUED.set(config.limits.max_queued_jobs)
    servicer.jobs = open_job_service(servicer, config)
    try:
        await _serve(config, server, servicer, health_servicer, credentials, ready)
    finally:
        await servicer.jobs.close()


def open_job_service(servicer: StyleTransferServicer, config: ServerConfig) -> JobService:
    """The job API over ``config.state_dir`` (made if need be), or over a temporary folder removed at the end.

    Raises:
        ValueError: the folder cannot be made or its database opened (the message names --state-dir).
    """
    owned = None
    state_dir = config.state_dir
    if state_dir is None:
        owned = state_dir = tempfile.mkdtemp(prefix="nst-state-")
    try:
        store = JobStore(state_dir)
    except (OSError, sqlite3.Error) as exc:
        raise ValueError(f"--state-dir {state_dir}: cannot open the job store there ({exc})") from None
    log.info("job store in %s (%s; results kept %g s, --result-ttl-s; budget %s, --state-budget)", state_dir,
             "temporary, removed at exit" if owned else "--state-dir", config.result_ttl_s,
             memory.format_bytes(config.state_budget_bytes) if config.state_budget_bytes else "none")
    log.info("job checkpoints: %s (--checkpoint-s)", f"at most every {config.checkpoint_s:g} s"
             if config.checkpoint_s else "off, a restart runs a job again from its first iteration")
    return JobService(servicer, store, config.result_ttl_s, config.state_budget_bytes, owned_dir=owned,
                      checkpoint_s=config.checkpoint_s)


async def _serve(config: ServerConfig, server, servicer: StyleTransferServicer, health_servicer: HealthServicer,
                 credentials, ready: asyncio.Event | None) -> None:
    """:func:`serve` once the servicer and its job store exist: bind, load, serve, shut down."""
    threads, threads_source = servicer.intra_op_threads, servicer.threads_source
    pb_grpc.add_StyleTransferServicer_to_server(servicer, server)
    address = listen_address(config.host, config.port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:          # grpc: "Failed to bind to address …" (taken, unknown host, bad TLS files)
        tls = f"; TLS from --tls-cert {config.tls_cert_path} and --tls-key {config.tls_key_path}" if credentials else ""
        raise ValueError(f"cannot listen on {address} (--host {config.host}, --port {config.port}{tls}): the port "
                         f"is taken by another process, or the host is not an address of this machine ({exc})"
                         ) from None
    bound = address if address.startswith("unix") else f"{address.rsplit(':', 1)[0]}:{port}"
    if config.metrics_port is not None:
        metrics_host = config.metrics_host.strip().removeprefix("[").removesuffix("]")
        try:
            metrics_port = start_metrics_server(metrics_host, config.metrics_port)
        except OSError as exc:
            await server.stop(None)
            raise ValueError(f"cannot serve metrics on {listen_address(metrics_host, config.metrics_port)} "
                             f"(--metrics-host {config.metrics_host}, --metrics-port {config.metrics_port}): "
                             f"{exc.strerror or exc}") from None
        metrics_address = listen_address(metrics_host, metrics_port, unix=False)
        print(f"nst-server metrics on http://{metrics_address}/metrics", flush=True)
    if config.fault_injection:
        log.warning("fault injection is on (NST_FAULT_INJECT): %s", config.fault_injection)
    await server.start()
    print(f"nst-server bound to {bound}; NOT_SERVING until the model is loaded and warmed up", flush=True)

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        # TensorRT (where present): one profile for every input a job can send (content, style and delivered
        # images are at most max_side_px; the session runs one image at a time), engines cached on disk.
        trt = tensorrt_options(max_side_px=config.limits.max_side_px,
                               opt_side_px=min(512, config.limits.max_side_px))
        if config.require_cuda and not torch.cuda.is_available():
            raise ValueError(f"--require-cuda: torch {torch.__version__} sees no CUDA device (CUDA build "
                             f"{torch.version.cuda or 'none'}; check the driver, CUDA_VISIBLE_DEVICES and "
                             f"--gpus); not serving on the CPU")
        # On the jobs' own threads, so that jobs, loading and warm-up share one OpenMP thread team.
        def load() -> StyleModels:
            torch.set_num_threads(threads)           # torch's pool; onnxruntime's through intra_op_threads
            return StyleModels.load(config.model_path, config.providers, intra_op_threads=threads, trt_options=trt)

        torch.set_num_threads(threads)
        models = await servicer.on_job_thread(load)
        if config.require_cuda:
            require_cuda(models)
        await asyncio.sleep(config.fault_injection.slow_warm_up_s)
        await servicer.on_job_thread(warm_up, models)
    except BaseException:
        await server.stop(None)
        raise
    budget, budget_source = memory_budget(config)
    servicer.set_memory_budget(budget, budget_source)
    servicer.models = models
    await servicer.jobs.start()                  # stored jobs left QUEUED or RUNNING go back in line
    largest = servicer.largest_output_side()
    log.info("memory budget for jobs: %s (%s); a default 4:3 job fits up to max_side_px %d (--max-side-px %d)",
             "off" if budget is None else memory.format_bytes(budget), budget_source, largest,
             config.limits.max_side_px)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s (%s, execution providers %s, default precision %s: %s, token %s, %d threads: "
             "%s, heartbeat %g s, keepalive: pings every %g s, client pings allowed every %g s, connection age %g s "
             "+ grace %g s)", SERVICE_NAME, bound, "TLS" if credentials else "plaintext",
             models.providers, *default_precision(models.device), "required" if config.auth_token else "off",
             threads, threads_source, config.limits.heartbeat_s, config.keepalive_time_s, config.min_ping_interval_s,
             config.max_connection_age_s, config.max_connection_age_grace_s)
    print(f"nst-server listening on {bound}", flush=True)
    if ready is not None:
        ready.set()

    await stopping.wait()
    stopping.clear()
    log.info("shutting down: NOT_SERVING, refusing new jobs, %.1f s grace for %d admitted jobs",
             config.grace_s, servicer.admitted)
    servicer.accepting = False
    servicer.jobs.begin_shutdown()               # stored jobs not started stay QUEUED for the next start
    await health_servicer.enter_graceful_shutdown()
    drained = asyncio.ensure_future(servicer.admission.wait_empty(config.grace_s))
    second_signal = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({drained, second_signal}, return_when=asyncio.FIRST_COMPLETED)
    second_signal.cancel()
    if not (drained.done() and drained.result()):
        drained.cancel()
        log.warning("grace over: stopping %d jobs, they end with UNAVAILABLE", servicer.admitted)
        servicer.terminate()
        await servicer.admission.wait_empty(TERMINATE_WAIT_S)
    health_servicer.end_watches()                # watchers saw NOT_SERVING; their streams end with UNAVAILABLE
    await server.stop(1.0)
    servicer.close()
    log.info("stopped")
