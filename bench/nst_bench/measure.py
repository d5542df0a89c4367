"""The measurements of ``nst-benchmark``: FLOPs and the matmul reference, thread CPU times, one trace (a clock and a
total cost per iteration) of the engine in-process and of the server through gRPC, the lever ablation, the
batching figures and the peak memory of one job in a fresh process.

The tutorial's loop, the third thing measured, is :mod:`nst_bench.tutorial`; the figures are assembled into
``benchmark.json`` by :mod:`nst_bench.report`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from nst_export.vgg import CONV_LAYERS, OUTPUT_LAYERS
from nst_server import costs, engine, objective as objective_room, targets as targets_room
from nst_server.batching import ReplicaBatcher
from nst_server.images import resize_to_max_side
from nst_server.model import StyleModels

from nst_bench.inputs import load_image
from nst_server.events import JobInputs, Progress
from nst_server.objective import batch_pass, evaluate, replica_input
from nst_server.settings import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS, PRECISIONS, StyleTransferSettings
from nst_server.targets import LevelTargets, Targets, layer_positions

#: The convolution whose ReLU output each layer is, and the pool count before it.
_LAYER_CONV = {"relu1_1": "conv1_1", "relu2_1": "conv2_1", "relu3_1": "conv3_1", "relu4_1": "conv4_1",
               "relu4_2": "conv4_2", "relu5_1": "conv5_1"}


# ---------------------------------------------------------------------------------------------------------
# FLOPs and the matmul reference
# ---------------------------------------------------------------------------------------------------------

def iteration_flops(height: int, width: int, content_layers: dict[str, float] | None = None,
                    style_layers: dict[str, float] | None = None) -> dict[str, float]:
    """FLOPs of one iteration at ``height x width`` px (2 per multiply-add; convolutions and Gram products only).

    Counted: the forward pass through every convolution up to the deepest layer used; the backward pass to
    the input (the weights are frozen, so each convolution's input gradient only: as many FLOPs as its
    forward); each style layer's Gram matrix ``A A^T`` (``2 C^2 P`` with ``P = n_H n_W``) and its gradient
    ``(dG + dG^T) A`` (``2 C^2 P``). Elementwise work (ReLU, pooling, the costs) is left out.

    Returns:
        ``{"forward", "backward", "gram", "total"}`` in FLOPs.
    """
    content_layers = content_layers if content_layers is not None else DEFAULT_CONTENT_LAYERS
    style_layers = style_layers if style_layers is not None else DEFAULT_STYLE_LAYERS
    names = [name for name, _, _ in CONV_LAYERS]
    deepest = max(names.index(_LAYER_CONV[layer]) for layer in {*content_layers, *style_layers})
    forward = 0.0
    h, w, block = height, width, 1
    for name, c_in, c_out in CONV_LAYERS[:deepest + 1]:
        conv_block = int(name[4])
        while block < conv_block:                     # a 2x2 pooling floors each side
            h, w, block = h // 2, w // 2, block + 1
        forward += 2.0 * h * w * c_in * c_out * 9
    gram = 0.0
    for layer in style_layers:
        channels = CONV_LAYERS[names.index(_LAYER_CONV[layer])][2]
        gram += 2 * (2.0 * channels**2 * layer_positions(height, width, layer))
    return {"forward": forward, "backward": forward, "gram": gram, "total": 2 * forward + gram}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read next times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(n: int = 4096, repeats: int = 3, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul (``2 n^3`` FLOPs), best of ``repeats`` after one warm-up."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """CPU time so far of each thread of process ``pid``: ``{tid: (name, user + system seconds)}``.

    Read from ``/proc/PID/task/TID/stat`` and ``comm`` (proc(5): fields 14 and 15, in clock ticks); empty where
    there is no ``/proc`` (not Linux). Threads that end while it reads are left out.
    """
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    threads: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            except (FileNotFoundError, ProcessLookupError):
                continue
            fields = stat.rsplit(")", 1)[1].split()          # after "pid (comm)": state is field 3
            threads[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return threads


def voluntary_switches(pid: int) -> dict[int, int]:
    """``{tid: voluntary context switches so far}`` of each live thread of process ``pid`` (proc(5): the
    ``voluntary_ctxt_switches`` line of ``/proc/PID/task/TID/status``: how often the thread slept, e.g. in a
    futex at an OpenMP barrier); empty where there is no ``/proc``. Threads that end while it reads are left out."""
    switches: dict[int, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            switches[int(tid)] = next(int(line.split()[1]) for line in status.splitlines()
                                      if line.startswith("voluntary_ctxt_switches"))
    return switches


def compute_thread_sleeps(pid: int, cpu_before: dict[int, tuple[str, float]], cpu_after: dict[int, tuple[str, float]],
                          switches_before: dict[int, int], switches_after: dict[int, int], threads: int,
                          iterations: int) -> list[float]:
    """Voluntary context switches per iteration of a job's compute threads (the ``threads`` threads of ``pid``
    that used the most CPU between the two readings: the job's thread and its OpenMP team), most CPU first.

    A figure of the machine, not a contract: how often the team's threads sleep at barriers depends on the CPU
    (AMX kernels finish a layer sooner than AVX-512 ones, so threads meet at more barriers per second), the
    OpenMP runtime and the kernels oneDNN picks. Seen: 38 per iteration at 96 px on a 2-core Xeon with AMX;
    several hundred when loading ran on another thread than the jobs (docs/benchmarks.md)."""
    used = sorted(cpu_after, key=lambda tid: cpu_after[tid][1] - cpu_before.get(tid, ("", 0.0))[1], reverse=True)
    return [(switches_after.get(tid, 0) - switches_before.get(tid, 0)) / max(1, iterations)
            for tid in used[:threads]]


def serving_cpu_s(pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> float:
    """CPU seconds the server spent serving rather than computing between two :func:`thread_cpu_s` readings.

    Serving threads: the main thread (``tid == pid``: the asyncio event loop with the gRPC handlers, the
    protobuf messages and the queue between the worker and the stream) and every thread whose name differs
    from the main thread's (gRPC's C-core threads name themselves, e.g. ``event_engine``). The job's worker
    thread and the intra-op threads of PyTorch and onnxruntime keep the process's name and are left out.
    """
    main_name = after.get(pid, before.get(pid, ("", 0.0)))[0]
    return sum(seconds - before.get(tid, (name, 0.0))[1] for tid, (name, seconds) in after.items()
               if tid == pid or name != main_name)


# ---------------------------------------------------------------------------------------------------------
# Traces: one clock and one total cost per iteration
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Trace:
    """One run: ``times_s[i]`` is the wall time from the job's start to the end of iteration ``i + 1``;
    ``totals[i]`` the total cost J of the image that iteration evaluated."""

    name: str
    times_s: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    final_scale_from: int = 0             # index of the first iteration at the output size (coarse-to-fine)
    job_s: float = math.nan               # start to the delivered result (or to the last iteration)
    final_costs: dict | None = None
    stopped_at_target: bool = False

    def per_iteration_s(self, warmup: int) -> float:
        """Median time of one iteration, the first ``warmup`` iterations excluded."""
        steps = [b - a for a, b in zip(self.times_s, self.times_s[1:])][max(0, warmup - 1):]
        return statistics.median(steps) if steps else math.nan

    def time_to(self, target: float) -> float:
        """Wall time at which the total cost first reached ``target`` at the output size; NaN when it never did
        (costs at the coarser scales of a coarse-to-fine schedule are of other sizes and do not count)."""
        for seconds, total in zip(self.times_s[self.final_scale_from:], self.totals[self.final_scale_from:]):
            if total <= target:
                return seconds
        return math.nan

    def summary(self, warmup: int) -> dict:
        return {"iterations": len(self.times_s), "per_iteration_s": self.per_iteration_s(warmup),
                "job_s": self.job_s, "first_total": self.totals[0] if self.totals else math.nan,
                "last_total": self.totals[-1] if self.totals else math.nan, "final_costs": self.final_costs}


def run_engine(models: StyleModels, inputs: JobInputs, settings: StyleTransferSettings,
               target: float | None = None, name: str = "engine") -> Trace:
    """:func:`engine.stylize` in this process; with ``target``, stop at the first iteration whose J <= target.

    ``times_s`` are the Progress messages' ``elapsed_ms`` (each sent after its iteration's step); ``totals``
    their total cost (of the iterate that step started from).
    """
    trace = Trace(name)
    started = time.perf_counter()
    final_size = resize_to_max_side(inputs.content, settings.max_side_px).size
    for event in engine.stylize(models, inputs, settings.replace(progress_every=1)):
        if isinstance(event, Progress):
            if event.size != final_size:
                trace.final_scale_from = len(trace.times_s) + 1
            trace.times_s.append(event.elapsed_ms / 1000.0)
            trace.totals.append(event.costs.total)
            if target is not None and event.size == final_size and event.costs.total <= target:
                trace.stopped_at_target = True
                break
        else:
            trace.final_costs = asdict(event.costs)
    trace.job_s = time.perf_counter() - started
    return trace


def request_options(settings: StyleTransferSettings):
    """The ``StylizeOptions`` of a request for the same job as ``settings`` on the engine: every option the API has
    set from the field of that name (weights, normalisation, pyramid levels, optimiser … as well as size and
    iterations), so that the server's J and its time per iteration compare with the engine's. (Until 2026-12-04
    only size, iterations, precision, seed, scales and init were sent: the server ran its defaults, normalised
    costs and 3 pyramid levels, against the engine's ``classic`` preset.)"""
    import dataclasses

    from nst_client import StylizeOptions

    names = [field.name for field in dataclasses.fields(StylizeOptions)
             if field.name not in ("preset", "keep_content_alpha") and hasattr(settings, field.name)]
    return StylizeOptions(**{name: getattr(settings, name) for name in names})


def run_server(target_address: str, content: bytes, style: bytes, settings: StyleTransferSettings,
               target: float | None = None) -> Trace:
    """One job through gRPC (client library stream); clocks read on the client as messages arrive. With
    ``target``, the stream is closed (the job cancelled) at the first Progress whose J <= target."""
    from nst_client import NSTClient, build_request

    trace = Trace("server")
    request = build_request(content, style, request_options(settings))
    with NSTClient(target_address) as client:
        started = time.perf_counter()
        stream = client.stream(request)
        for message in stream:
            kind = message.WhichOneof("event")
            if kind == "progress":
                trace.times_s.append(time.perf_counter() - started)
                trace.totals.append(message.progress.costs.total)
                if target is not None and message.progress.costs.total <= target:
                    trace.stopped_at_target = True
                    stream.close()
                    break
            elif kind == "result":
                costs_ = message.result.costs
                trace.final_costs = {"content": costs_.content, "style": costs_.style, "total": costs_.total}
        trace.job_s = time.perf_counter() - started
    return trace


def lever_ablation(models: StyleModels, inputs: JobInputs, settings: StyleTransferSettings,
                   repeats: int, warmup: int) -> dict:
    """Each speed lever of the engine switched off in turn against all of them on, in one process.

    Per-iteration time of ``settings.iterations``-iteration engine jobs (the configurations interleaved,
    ``repeats`` rounds, each configuration's best median kept), and the time to the first progress of a
    3-iteration job with the style Gram cache warm against no cache (the style image's forward pass saved).

    Returns:
        ``{"per_iteration_s": {config: s}, "gain_over_off": {lever: off / on}, "first_progress_s": {...}}``.
    """
    levers = {"channels_last": (objective_room, "CHANNELS_LAST", False),
              "packed_weights": (objective_room, "PACKED_WEIGHTS", False),
              "fast_style_gradient": (costs, "FAST_STYLE_GRADIENT", False)}

    @contextlib.contextmanager
    def switched(module, name, value):
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, saved)

    configs = {"all_on": None, **{f"{lever}_off": spec for lever, spec in levers.items()}}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(max(1, repeats)):
        for name, spec in configs.items():
            with switched(*spec) if spec else contextlib.nullcontext():
                times[name].append(run_engine(models, inputs, settings, name=name).per_iteration_s(warmup))
    per_iteration = {name: min(values) for name, values in times.items()}
    short = settings.replace(iterations=3)
    first: dict[str, list[float]] = {"style_cache_warm": [], "style_cache_off": []}
    run_engine(models, inputs, short)                                        # fills the cache
    for _ in range(max(1, repeats)):
        first["style_cache_warm"].append(run_engine(models, inputs, short).times_s[0])
        with switched(targets_room, "STYLE_CACHE_ENTRIES", 0):
            first["style_cache_off"].append(run_engine(models, inputs, short).times_s[0])
    first_progress = {name: min(values) for name, values in first.items()}
    return {"per_iteration_s": per_iteration, "runs_per_iteration_s": times,
            "gain_over_off": {lever: per_iteration[f"{lever}_off"] / per_iteration["all_on"] for lever in levers},
            "first_progress_s": first_progress,
            "style_cache_first_progress_gain": first_progress["style_cache_off"] / first_progress["style_cache_warm"]}


# ---------------------------------------------------------------------------------------------------------
# Batching and memory
# ---------------------------------------------------------------------------------------------------------

def replica_pass_s(models: StyleModels, batch: int, height: int, width: int, repeats: int = 5,
                   precision: str = "fp32", warmup: int = 2) -> float:
    """Median seconds of one replica forward + backward (to the input) of the default layers' costs at one pyramid
    level (no normalisers), batch ``batch`` of ``(3, height, width)`` images, after ``warmup`` passes (oneDNN
    creates its primitives per shape), with the engine's levers as they are set (:func:`replica_input`).
    ``precision``: autocast dtype name of :data:`PRECISIONS` (costs and Gram matrices stay fp32)."""
    device = models.device
    settings = StyleTransferSettings()
    pixels = torch.rand(batch, 3, height, width, device=device) * 255.0
    with torch.no_grad():
        feats = dict(zip(OUTPUT_LAYERS, models.replica(pixels[:1] / 255.0)))
    targets = Targets(levels=[LevelTargets(
        size=(height, width), content={k: feats[k] for k in settings.content_layers},
        style_grams={k: costs.gram_matrix(feats[k]) for k in settings.style_layers})])
    times = []
    dtype = PRECISIONS[precision]
    for index in range(warmup + repeats):
        x = pixels.clone().requires_grad_(True)
        start = time.perf_counter()
        image = replica_input(models, x / 255.0)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            feats = models.replica(image)
        total = evaluate(feats, x, targets, settings).total
        total.sum().backward()
        sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def batched_jobs(models: StyleModels, content: Image.Image, style: Image.Image, jobs: int, side: int,
                 iterations: int, repeats: int = 2, wait_ms: float = 20.0) -> dict:
    """Wall time of ``jobs`` jobs (seeds 0..jobs-1, ``iterations`` each, ``side`` px) run one after another,
    and run at once in threads sharing a :class:`~nst_server.batching.ReplicaBatcher` of ``max_batch=jobs``
    (``wait_ms``: its wait, the server's ``--batch-wait-ms``), best of ``repeats`` interleaved rounds; the
    delivered costs of both ways, for the check that batching changes only rounding."""
    inputs = JobInputs(content=content, styles=[(style, 1.0)])
    settings = [StyleTransferSettings(max_side_px=side, iterations=iterations, seed=seed)
                for seed in range(jobs)]
    sequential, together, stats = [], [], []
    costs_sequential: list[float] = []
    costs_together: list[float] = [0.0] * jobs
    for _ in range(repeats):
        start = time.perf_counter()
        costs_sequential = [list(engine.stylize(models, inputs, s))[-1].costs.total for s in settings]
        sequential.append(time.perf_counter() - start)
        batcher = ReplicaBatcher(batch_pass(models), max_batch=jobs, max_wait_s=wait_ms / 1000.0)

        def job(index: int) -> None:
            events = list(engine.stylize(models, inputs, settings[index], batcher=batcher))
            costs_together[index] = events[-1].costs.total

        threads = [threading.Thread(target=job, args=(i,)) for i in range(jobs)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        together.append(time.perf_counter() - start)
        stats.append(batcher.stats.mean_batch)
    return {"jobs": jobs, "iterations": iterations, "side_px": side, "wait_ms": wait_ms, "sequential_s": sequential,
            "batched_s": together, "mean_batch": statistics.mean(stats),
            "throughput_gain": min(sequential) / min(together),
            "costs_sequential": costs_sequential, "costs_batched": costs_together}


def _high_water_kib() -> tuple[int, int]:
    """``(VmHWM, ru_maxrss)`` of this process in KiB. VmHWM (``/proc/self/status``) belongs to this address space
    and starts afresh at ``execve``; Linux carries ``ru_maxrss`` over from the parent through fork and exec, so
    a child of a large process reports at least the parent's peak. VmHWM is -1 where /proc is absent."""
    hwm = -1
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        hwm = int(line.split()[1])
    return hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_job(model: str, content: str, style: str, size: int, iterations: int, device: str | None) -> None:
    """Child process: load the model, run one job, print the high-water marks (KiB) after loading and after
    the job (see :func:`_high_water_kib`)."""
    models = StyleModels.load(model, device=device)
    loaded = _high_water_kib()
    inputs = JobInputs(content=load_image(content, size), styles=[(load_image(style, size), 1.0)])
    for _ in engine.stylize(models, inputs, StyleTransferSettings(max_side_px=size, iterations=iterations)):
        pass
    peak = _high_water_kib()
    cuda_peak = torch.cuda.max_memory_allocated() if models.device.type == "cuda" else 0
    print(json.dumps({"loaded_kib": loaded[0], "peak_kib": peak[0], "ru_maxrss_kib": peak[1],
                      "cuda_peak_bytes": cuda_peak}))


def peak_rss(model: str, content: str, style: str, size: int, iterations: int, device: str | None,
             timeout_s: float = 600.0) -> dict:
    """Peak resident memory of one job in a fresh process (Linux VmHWM; ``ru_maxrss`` beside it, see
    :func:`_high_water_kib`).

    Returns:
        ``{"size_px", "iterations", "loaded_gib"`` (peak after loading the model), ``"peak_gib"``, ``"job_gib"``
        (the difference), ``"ru_maxrss_gib"``, ``"cuda_peak_gib"}``.
    Raises:
        RuntimeError: the child process failed.
    """
    code = (f"from nst_bench.measure import _rss_job; _rss_job({model!r}, {content!r}, {style!r}, {size}, "
            f"{iterations}, {device!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"peak RSS child failed: {done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 1024.0**2
    return {"size_px": size, "iterations": iterations, "loaded_gib": figures["loaded_kib"] / gib,
            "peak_gib": figures["peak_kib"] / gib, "job_gib": (figures["peak_kib"] - figures["loaded_kib"]) / gib,
            "ru_maxrss_gib": figures["ru_maxrss_kib"] / gib, "cuda_peak_gib": figures["cuda_peak_bytes"] / 1024.0**3}
