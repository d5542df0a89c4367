"""``nst bench``: throughput and latency of a running server over a sweep of concurrency levels.

In the manner of Triton's ``perf_analyzer``: for each concurrency level ``c`` the benchmark keeps ``c`` jobs in
flight (``c`` client threads, each starting its next job when the previous one ends) until ``jobs_per_level``
jobs have ended, after ``warmup_jobs`` jobs whose figures are discarded. Each job is one ``Stylize`` stream;
its clock starts just before the call and reads

* time to first progress: the first ``Progress`` message received (queueing, decoding, targets, one
  iteration);
* time to result: the ``Result`` message received (the whole job, as the user waits for it).

Per level: jobs/s and iterations/s (jobs that delivered a result, over the level's wall time), and the
p50/p90/p95/p99 of both times (``statistics.quantiles``, inclusive method: linear interpolation between
order statistics, as ``numpy.percentile``'s default). Failed jobs are counted by status code, never raised.

Only the client's own dependencies are needed (grpcio, protobuf, Pillow); the plot needs matplotlib
(``pip install nst-inference[bench]``), imported only when ``--plot`` is given.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nst_proto.files import atomic_open, atomic_path, atomic_write_text
from nst_proto.argtypes import integer, timeout
from nst_client.client import NSTClient, NSTError, build_request

#: Percentiles reported for each latency, in percent.
PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class JobTiming:
    """One job as the client saw it. Times in seconds since the call started; ``None`` when never received."""

    first_progress_s: float | None
    result_s: float | None
    iterations: int
    error: str = ""              # the status code's name when the job failed, else ""


@dataclass
class LevelReport:
    """The figures of one concurrency level (jobs that delivered a result; failures counted apart)."""

    concurrency: int
    jobs: int
    completed: int
    errors: dict[str, int]
    wall_s: float
    jobs_per_s: float
    iterations_per_s: float
    time_to_first_progress_s: dict[str, float]
    time_to_result_s: dict[str, float]
    timings: list[JobTiming] = field(default_factory=list, repr=False)


def percentiles(values: list[float]) -> dict[str, float]:
    """``{"p50", "p90", "p95", "p99", "mean", "min", "max"}`` of ``values`` in their unit; NaN for none.

    Percentiles by ``statistics.quantiles(values, n=100, method="inclusive")`` (linear interpolation,
    the same as ``numpy.percentile``'s default); one value is every percentile of itself.
    """
    keys = [f"p{p}" for p in PERCENTILES] + ["mean", "min", "max"]
    if not values:
        return dict.fromkeys(keys, math.nan)
    if len(values) == 1:
        return dict.fromkeys(keys, float(values[0]))
    cuts = statistics.quantiles(values, n=100, method="inclusive")     # 99 cut points: cuts[p - 1] is p-th
    out = {f"p{p}": cuts[p - 1] for p in PERCENTILES}
    out.update(mean=statistics.fmean(values), min=min(values), max=max(values))
    return out


def run_job(client: NSTClient, request, timeout_s: float | None = None) -> JobTiming:
    """Stream one job to its end and time it (``time.perf_counter``). Never raises :class:`NSTError`."""
    started = time.perf_counter()
    first = result = None
    iterations = 0
    try:
        for message in client.stream(request, timeout_s=timeout_s):
            kind = message.WhichOneof("event")
            if kind == "progress" and first is None:
                first = time.perf_counter() - started
            elif kind == "result":
                result = time.perf_counter() - started
                iterations = message.result.iterations
    except NSTError as exc:
        return JobTiming(first, None, 0, exc.code.name)
    if result is None:
        return JobTiming(first, None, 0, "NO_RESULT")
    return JobTiming(first, result, iterations)


def run_level(client: NSTClient, request, concurrency: int, jobs: int, warmup_jobs: int = 0,
              timeout_s: float | None = None) -> LevelReport:
    """Keep ``concurrency`` jobs in flight until ``warmup_jobs`` then ``jobs`` jobs have ended.

    The level's wall time runs from the first measured job's start to the last one's end; warm-up jobs
    run (at the same concurrency) before it starts.

    Raises:
        ValueError: ``concurrency`` or ``jobs`` under 1.
    """
    if concurrency < 1 or jobs < 1:
        raise ValueError(f"concurrency and jobs must be at least 1, got {concurrency} and {jobs}")

    def batch(count: int) -> tuple[list[JobTiming], float]:
        left, lock, timings = [count], threading.Lock(), []

        def worker() -> None:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                timing = run_job(client, request, timeout_s)
                with lock:
                    timings.append(timing)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="nst-bench") as pool:
            for future in [pool.submit(worker) for _ in range(min(concurrency, count))]:
                future.result()
        return timings, time.perf_counter() - started

    if warmup_jobs:
        batch(warmup_jobs)
    timings, wall_s = batch(jobs)
    done = [t for t in timings if not t.error]
    return LevelReport(
        concurrency=concurrency, jobs=jobs, completed=len(done),
        errors=dict(Counter(t.error for t in timings if t.error)), wall_s=wall_s,
        jobs_per_s=len(done) / wall_s, iterations_per_s=sum(t.iterations for t in done) / wall_s,
        time_to_first_progress_s=percentiles([t.first_progress_s for t in done if t.first_progress_s is not None]),
        time_to_result_s=percentiles([t.result_s for t in done]), timings=timings)


def synthetic_pair(side_px: int = 256) -> tuple[bytes, bytes]:
    """A content (colour gradients with a disc, ``side_px`` x ``3/4 side_px``) and a style (diagonal stripes,
    ``side_px`` square) as PNG bytes, drawn with Pillow alone."""
    from PIL import Image, ImageDraw

    width, height = side_px, max(16, side_px * 3 // 4)
    gradient = Image.linear_gradient("L")                                       # 256x256, 0..255 top to bottom
    red = gradient.resize((width, height))
    green = gradient.rotate(90).resize((width, height))
    blue = Image.radial_gradient("L").resize((width, height))
    content = Image.merge("RGB", (red, green, blue))
    ImageDraw.Draw(content).ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=(220, 60, 40))
    style = Image.new("RGB", (side_px, side_px), (30, 40, 120))
    draw = ImageDraw.Draw(style)
    step = max(4, side_px // 12)
    for offset in range(-side_px, side_px, step):
        draw.line((offset, 0, offset + side_px, side_px), fill=(240, 200, 40), width=max(1, step // 3))
    images = []
    for image in (content, style):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images[0], images[1]


def parse_levels(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``. Raises ValueError on anything but positive integers."""
    try:
        levels = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--concurrency: expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency: levels must be integers >= 1, got {text!r}")
    return levels


def report_dict(levels: list[LevelReport], meta: dict) -> dict:
    """The JSON document: ``meta`` (server, settings, model info) and one entry per level (times in s)."""
    rows = []
    for level in levels:
        row = asdict(level)
        row["timings"] = [asdict(t) for t in level.timings]
        rows.append(row)
    return {**meta, "levels": rows}


CSV_COLUMNS = ("concurrency", "jobs", "completed", "errors", "wall_s", "jobs_per_s", "iterations_per_s",
               *(f"{kind}_{p}_s" for kind in ("first_progress", "result") for p in
                 [f"p{q}" for q in PERCENTILES] + ["mean"]))


def write_csv(levels: list[LevelReport], path: str | Path) -> None:
    """One row per level; ``errors`` as ``CODE:count;…``; times in seconds. Written atomically (a temporary file
    renamed over ``path``: an older file survives a failed write).

    Raises:
        OSError: the file could not be written (``path`` unchanged).
    """
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for level in levels:
            stats = [level.time_to_first_progress_s, level.time_to_result_s]
            writer.writerow([level.concurrency, level.jobs, level.completed,
                             ";".join(f"{k}:{v}" for k, v in sorted(level.errors.items())),
                             f"{level.wall_s:.4f}", f"{level.jobs_per_s:.4f}", f"{level.iterations_per_s:.4f}",
                             *(f"{s[key]:.4f}" for s in stats for key in [f"p{q}" for q in PERCENTILES] + ["mean"])])


def write_plot(levels: list[LevelReport], path: str | Path, title: str = "") -> None:
    """PNG: throughput (jobs/s, iterations/s) and latency percentiles (s) against concurrency, written
    atomically (a temporary file renamed over ``path``: an older file survives a failed write).

    Raises:
        RuntimeError: matplotlib is not installed (``pip install nst-inference[bench]``).
        OSError: the file could not be written (``path`` unchanged).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'nst-inference[bench]'") from None
    x = [level.concurrency for level in levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    left.plot(x, [level.jobs_per_s for level in levels], "o-", color="tab:blue", label="jobs/s")
    left.set_xlabel("concurrency (jobs in flight)")
    left.set_ylabel("jobs/s", color="tab:blue")
    twin = left.twinx()
    twin.plot(x, [level.iterations_per_s for level in levels], "s--", color="tab:orange", label="iterations/s")
    twin.set_ylabel("iterations/s", color="tab:orange")
    left.set_title("throughput")
    left.set_xticks(x)
    left.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    for key, style in (("p50", "o-"), ("p90", "^-"), ("p99", "v-")):
        right.plot(x, [level.time_to_result_s[key] for level in levels], style, label=f"result {key}")
        right.plot(x, [level.time_to_first_progress_s[key] for level in levels], style.replace("-", ":"),
                   label=f"first progress {key}")
    right.set_xlabel("concurrency (jobs in flight)")
    right.set_ylabel("latency, s")
    right.set_title("latency")
    right.set_xticks(x)
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=110)
    finally:
        plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``nst bench`` options (the server/TLS/token ones are added by the CLI)."""
    parser.add_argument("--content", default=None, help="content image file (default: a synthetic one)")
    parser.add_argument("--style", default=None, help="style image file (default: a synthetic one)")
    uint32 = integer(0, 2**32 - 1)                       # the request fields' proto type
    parser.add_argument("--size", dest="max_side_px", type=uint32, default=256,
                        help="max_side_px, px (default: %(default)s)")
    parser.add_argument("--iterations", type=uint32, default=20, help="iterations per job (default: %(default)s)")
    parser.add_argument("--precision", default=None, help="fp32, bf16 or fp16 (default: the server's)")
    parser.add_argument("--concurrency", default="1,2,4", help="levels, comma-separated (default: %(default)s)")
    parser.add_argument("--jobs-per-level", type=integer(0), default=0,
                        help="measured jobs per level (default: 2 x concurrency, at least 4)")
    parser.add_argument("--warmup-jobs", type=integer(0), default=1,
                        help="jobs run once before the sweep, not measured (default: %(default)s)")
    parser.add_argument("--timeout-s", type=timeout, default=None,
                        help="deadline of each job, s, > 0; inf (or more than 1e9): none (default: none)")
    parser.add_argument("--output-json", default=None, metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--output-csv", default=None, metavar="FILE", help="write one CSV row per level")
    parser.add_argument("--plot", default=None, metavar="PNG", help="plot throughput and latency (matplotlib)")


def run(args: argparse.Namespace, client: NSTClient) -> int:
    """``nst bench``: sweep, print a table, write the requested files. Returns the exit code (0; 1 when no
    job of some level delivered a result).

    Raises:
        NSTError: the server is not reachable. ValueError, OSError: bad options or unreadable files.
    """
    levels = parse_levels(args.concurrency)
    content, style = args.content, args.style
    if content is None or style is None:
        synthetic = synthetic_pair(max(args.max_side_px, 16))
        content = synthetic[0] if content is None else content
        style = synthetic[1] if style is None else style
    request = build_request(content, style, max_side_px=args.max_side_px, iterations=args.iterations,
                            precision=args.precision)
    info = client.model_info()
    if args.warmup_jobs:
        for _ in range(args.warmup_jobs):
            run_job(client, request, args.timeout_s)
    reports = []
    print(f"{'conc':>4} {'jobs':>4} {'ok':>4} {'jobs/s':>8} {'it/s':>8} {'first p50':>9} {'p99':>7} "
          f"{'result p50':>10} {'p90':>7} {'p95':>7} {'p99':>7}  errors")
    for concurrency in levels:
        jobs = args.jobs_per_level or max(4, 2 * concurrency)
        level = run_level(client, request, concurrency, jobs, timeout_s=args.timeout_s)
        reports.append(level)
        first, result = level.time_to_first_progress_s, level.time_to_result_s
        print(f"{concurrency:>4} {jobs:>4} {level.completed:>4} {level.jobs_per_s:>8.3f} "
              f"{level.iterations_per_s:>8.2f} {first['p50']:>9.3f} {first['p99']:>7.3f} {result['p50']:>10.3f} "
              f"{result['p90']:>7.3f} {result['p95']:>7.3f} {result['p99']:>7.3f}  "
              f"{level.errors or ''}", flush=True)
    meta = {
        "server": args.server,
        "settings": {"max_side_px": args.max_side_px, "iterations": args.iterations, "precision": args.precision,
                     "content": str(args.content or "synthetic"), "style": str(args.style or "synthetic"),
                     "warmup_jobs": args.warmup_jobs},
        "model": {"execution_providers": list(info.execution_providers), "replica_device": info.replica_device,
                  "weights_sha256": info.weights_sha256, "versions": dict(info.versions)},
        "time_unit": "s",
    }
    if args.output_json:
        atomic_write_text(args.output_json, json.dumps(report_dict(reports, meta), indent=2))
    if args.output_csv:
        write_csv(reports, args.output_csv)
    if args.plot:
        write_plot(reports, args.plot, title=f"nst bench: {args.max_side_px} px, {args.iterations} iterations, "
                   f"{info.replica_device}")
    return 0 if all(level.completed for level in reports) else 1
