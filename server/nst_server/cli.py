"""``nst-server``: serve neural style transfer over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from nst_proto.argtypes import integer, number
from nst_proto.console import tolerate_console
from nst_export.onnx_export import DEFAULT_MODEL_PATH
from nst_export.vgg import MIN_SIDE_PX
from nst_server import memory
from nst_server.app import MAX_DURATION_S, ServerConfig, serve
from nst_server.errors import ModelFileError
from nst_server.jobapi import DEFAULT_CHECKPOINT_S, DEFAULT_RESULT_TTL_S, DEFAULT_STATE_BUDGET_BYTES
from nst_server.jobs import FAULT_INJECT_ENV, parse_fault_injection
from nst_server.servicer import HEARTBEAT_S_RANGE, MAX_BATCH_WAIT_MS, SEND_TIMEOUT_S_RANGE, ServerLimits

#: Ranges of the flags (argparse refuses the rest with a usage error naming the flag): ports; gRPC's integer
#: channel arguments (message sizes, int32); intra-op threads.
PORT = integer(0, 65535)
INT32_BYTES = integer(1, 2**31 - 1, " bytes")
MAX_THREADS = 1024


def memory_budget(text: str) -> int | None:
    """argparse type of ``--memory-budget``: bytes with an optional unit (``6GiB``, ``512MiB``, ``8GB``), 0 for
    ``0``/``none``/``off`` (no memory accounting), None for ``auto`` (the default, measured at start)."""
    try:
        return memory.parse_budget_flag(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or none (no memory accounting) or auto") from None


memory_budget.__name__ = "memory budget"


def state_budget(text: str) -> int:
    """argparse type of ``--state-budget``: bytes with an optional unit (``10GiB``, ``500MB``), 0 for
    ``0``/``none``/``off`` (no budget)."""
    try:
        value = memory.parse_budget_flag(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or none (no budget)") from None
    if value is None:
        raise argparse.ArgumentTypeError(f"expected bytes (10GiB) or none, got {text!r}")
    return value


state_budget.__name__ = "state budget"


def build_parser() -> argparse.ArgumentParser:
    limits = ServerLimits()
    parser = argparse.ArgumentParser(prog="nst-server", description=__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH), help="ONNX file from nst-export "
                        "(default: %(default)s, or $NST_MODEL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=PORT, default=50051,
                        help="port, 0..65535; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated execution providers to try in order "
                             "(default: TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider)")
    parser.add_argument("--max-side-px", type=integer(MIN_SIDE_PX), default=limits.max_side_px,
                        help="largest output side a job may ask for, px; a job whose memory estimate is over "
                             "--memory-budget is refused whatever its side (default: %(default)s)")
    parser.add_argument("--memory-budget", type=memory_budget, default=None, metavar="BYTES",
                        help="memory the running jobs may use together, bytes with an optional unit (6GiB, 512MiB, "
                             "8GB); a job runs when its estimated peak fits beside the running jobs' and waits "
                             "otherwise; one over the whole budget is refused with RESOURCE_EXHAUSTED; 0 or none: no "
                             "memory accounting (default: auto: the cgroup's memory limit or MemTotal, less 10%% "
                             "(at least 512 MiB) and less the server's resident memory after loading)")
    parser.add_argument("--max-iterations", type=integer(1), default=limits.max_iterations,
                        help="most iterations a job may ask for; more is refused with INVALID_ARGUMENT "
                             "(default: %(default)s)")
    parser.add_argument("--max-running-jobs", type=integer(1), default=limits.max_running_jobs,
                        help="N: jobs optimised at once (default: %(default)s)")
    parser.add_argument("--max-queued-jobs", type=integer(0), default=limits.max_queued_jobs,
                        help="Q: jobs waiting; beyond N+Q new jobs get RESOURCE_EXHAUSTED (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=integer(1), default=limits.max_batch_size,
                        help="B: running jobs of equal size, pooling and precision share one replica pass, up to B "
                             "at a time; needs --max-running-jobs >= 2 (default: %(default)s, every job alone)")
    parser.add_argument("--batch-wait-ms", type=number(0, MAX_BATCH_WAIT_MS, " ms"), default=limits.batch_wait_ms,
                        help="the longest a job waits each iteration for the others of its batch, "
                             f"0..{MAX_BATCH_WAIT_MS:.10g} ms (default: %(default)s)")
    parser.add_argument("--max-input-pixels", type=integer(MIN_SIDE_PX * MIN_SIDE_PX),
                        default=limits.max_input_pixels,
                        help="pixel budget of each input image, checked before decoding (default: %(default)s)")
    parser.add_argument("--max-receive-message-bytes", type=INT32_BYTES, default=64 * 1024 * 1024,
                        help="largest request, 1..2147483647 bytes (default: %(default)s)")
    parser.add_argument("--result-chunk-bytes", type=INT32_BYTES, default=limits.result_chunk_bytes,
                        help="result PNGs larger than this are streamed as ImageChunk messages of this size, "
                             "bytes (default: %(default)s; keep it under the clients' 4 MiB receive limit)")
    parser.add_argument("--grace-s", type=number(0, MAX_DURATION_S, " s"), default=10.0,
                        help=f"on SIGTERM/SIGINT, running and waiting jobs get this long, 0..{MAX_DURATION_S:.10g} s; "
                             "then they end with UNAVAILABLE (default: %(default)s)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate (chain) of the server; with --tls-key: TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--auth-token", default=os.environ.get("NST_AUTH_TOKEN") or None,
                        help="require 'authorization: Bearer TOKEN' metadata on every call, else UNAUTHENTICATED "
                             "(default: $NST_AUTH_TOKEN; prefer the variable, a command line is visible in ps)")
    parser.add_argument("--require-cuda", action="store_true",
                        help="exit 2 at start unless the replica (the optimisation) runs on a CUDA device, instead "
                             "of serving on the CPU (a session without a GPU provider is logged as a warning)")
    parser.add_argument("--auth-health", action="store_true",
                        help="also require the token for grpc.health.v1.Health (by default health stays open)")
    parser.add_argument("--metrics-port", type=PORT, default=None,
                        help="serve Prometheus /metrics over HTTP on this port, 0..65535; 0 picks a free one "
                             "(default: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics (default: %(default)s)")
    parser.add_argument("--threads", type=integer(1, MAX_THREADS), default=None,
                        help=f"intra-op threads of torch and onnxruntime, 1..{MAX_THREADS} (default: the CPUs this "
                             "process may use: "
                             "its CPU affinity, lowered to its cgroup CPU quota rounded down)")
    parser.add_argument("--heartbeat-s", type=number(*HEARTBEAT_S_RANGE, " s"), default=limits.heartbeat_s,
                        help="a Stylize stream is never quiet longer than this: a Heartbeat (queue position, time "
                             "waited) goes out while the job waits and between sparse Progress messages, s "
                             "(default: %(default)s; keep it under proxies' idle timeouts)")
    parser.add_argument("--send-timeout-s", type=number(*SEND_TIMEOUT_S_RANGE, " s"), default=limits.send_timeout_s,
                        help="a Stylize message the client does not take for this long (it stopped reading) stops "
                             "the job and frees its slot; the call ends with DEADLINE_EXCEEDED when the client reads "
                             "again (CANCELLED when it goes away), s (default: %(default)s)")
    config = ServerConfig(model_path="")
    keepalive = number(0.001, MAX_DURATION_S, " s")         # gRPC's int32 milliseconds
    age = number(0, MAX_DURATION_S, " s")
    parser.add_argument("--keepalive-time-s", type=keepalive, default=config.keepalive_time_s,
                        help="ping a connection that was quiet this long, s (default: %(default)s)")
    parser.add_argument("--keepalive-timeout-s", type=keepalive, default=config.keepalive_timeout_s,
                        help="close a connection whose ping is not answered within this, s (default: %(default)s)")
    parser.add_argument("--min-ping-interval-s", type=keepalive, default=config.min_ping_interval_s,
                        help="clients may send keepalive pings this often, also without calls; more often gets "
                             "GOAWAY too_many_pings, s (default: %(default)s; gRPC's own default is 300)")
    parser.add_argument("--max-connection-age-s", type=age, default=config.max_connection_age_s,
                        help="send GOAWAY to connections older than this (+-10%%) so that clients reconnect and "
                             "spread over new replicas, s; 0: never (default: %(default)s)")
    parser.add_argument("--max-connection-age-grace-s", type=age, default=config.max_connection_age_grace_s,
                        help="calls open on such a connection get this long to end; make it longer than the "
                             "longest job, waiting included, s (default: %(default)s)")
    parser.add_argument("--state-dir", default=None, metavar="DIR",
                        help="folder of the job API's state (SubmitJob …): a SQLite database and the result PNGs; "
                             "jobs in it survive a restart: queued and running ones run again in submission order, "
                             "from their last checkpoint (--checkpoint-s) or their first iteration (default: a "
                             "temporary folder removed at exit)")
    parser.add_argument("--result-ttl-s", type=number(0.001, MAX_DURATION_S * 1000, " s"),
                        default=DEFAULT_RESULT_TTL_S,
                        help="finished jobs of the job API, with their events and results, are removed this long "
                             "after they finished, s (default: %(default)s, a day)")
    parser.add_argument("--state-budget", type=state_budget, default=DEFAULT_STATE_BUDGET_BYTES, metavar="BYTES",
                        help="while --state-dir holds more than this, SubmitJob is refused with RESOURCE_EXHAUSTED "
                             "naming the budget (stored jobs stay readable); bytes with an optional unit (10GiB, "
                             "500MB); 0 or none: no budget (default: 10GiB)")
    parser.add_argument("--checkpoint-s", type=number(0, MAX_DURATION_S, " s"), default=DEFAULT_CHECKPOINT_S,
                        help="a running job of the job API writes a checkpoint (its image, scale and iteration) to "
                             "--state-dir at most this often; after a restart it goes on from there, so at most this "
                             "long of its work is done again; SIGTERM checkpoints running jobs too; 0: no "
                             "checkpoints (default: %(default)s)")
    parser.add_argument("--replica-name", default=os.environ.get("NST_REPLICA_NAME", ""), metavar="NAME",
                        help="this replica's name, put before the ids of the jobs it makes (NAME.32-hex-digits) so "
                             "that clients of a fleet route a job's calls to the replica that holds it: the pod's "
                             "name in a StatefulSet; a DNS label (default: $NST_REPLICA_NAME, else none)")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"), help="(default: %(default)s)")
    return parser


def build_config(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` of parsed command-line arguments (fault injection from ``$NST_FAULT_INJECT``).

    Raises:
        ValueError: a value out of range (the message names the flag).
    """
    config = ServerConfig(
        model_path=args.model, host=args.host, port=args.port,
        providers=args.providers.split(",") if args.providers else None,
        limits=ServerLimits(max_side_px=args.max_side_px, max_iterations=args.max_iterations,
                            max_input_pixels=args.max_input_pixels, max_running_jobs=args.max_running_jobs,
                            max_queued_jobs=args.max_queued_jobs, result_chunk_bytes=args.result_chunk_bytes,
                            max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                            heartbeat_s=args.heartbeat_s, send_timeout_s=args.send_timeout_s,
                            memory_budget_bytes=args.memory_budget),
        max_receive_message_bytes=args.max_receive_message_bytes, grace_s=args.grace_s,
        tls_cert_path=args.tls_cert, tls_key_path=args.tls_key, auth_token=args.auth_token,
        auth_health=args.auth_health, metrics_host=args.metrics_host, metrics_port=args.metrics_port,
        threads=args.threads, require_cuda=args.require_cuda, keepalive_time_s=args.keepalive_time_s,
        keepalive_timeout_s=args.keepalive_timeout_s, min_ping_interval_s=args.min_ping_interval_s,
        max_connection_age_s=args.max_connection_age_s,
        max_connection_age_grace_s=args.max_connection_age_grace_s, state_dir=args.state_dir,
        result_ttl_s=args.result_ttl_s, state_budget_bytes=args.state_budget, replica_name=args.replica_name,
        checkpoint_s=args.checkpoint_s)
    config.fault_injection = parse_fault_injection(os.environ.get(FAULT_INJECT_ENV))
    return config


def main(argv: list[str] | None = None) -> int:
    tolerate_console()      # `nst-server | head -1` or a full log disk never stops serving (before basicConfig)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(build_config(args)))
    except (ModelFileError, ValueError, OSError) as exc:
        print(f"nst-server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
