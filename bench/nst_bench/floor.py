"""The right yardstick for the engine: the bare VGG-19 network's own forward + backward, measured in the same run.

An engine iteration cannot be cheaper than one forward pass of the network to the deepest layer it uses plus the
backward pass to the input: that is the *floor*. The matmul reference of :func:`nst_bench.measure.matmul_flops_per_s`
says what the chip can do on one large product; the floor says what PyTorch and oneDNN (or cuDNN) can do on this
network at this image size, so ``engine / floor`` is the part of an iteration the engine itself can still remove
(the costs, the Gram matrices and their gradients, L-BFGS, autocast casts, layout reorders, the Python around them).

The floor here is plain ``nn.Conv2d`` / ``nn.ReLU`` / ``nn.MaxPool2d(2)`` modules holding the replica's convolution
weights in the job's dtype (no autocast: the weights are already in that dtype, which is cheaper than any autocast),
in the engine's memory layout, with frozen weights. The profile table (:func:`engine_profile`) says where an
engine iteration's time goes, by operator.

Sources: torch.profiler's documentation (``key_averages``, self times); nanoGPT's bench.py for warm-up and
device synchronisation.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from nst_export.vgg import CONV_LAYERS, CONV_NAMES
from nst_server import engine, objective
from nst_server.events import JobInputs, Progress
from nst_server.images import resize_to_max_side
from nst_server.model import StyleModels
from nst_server.precision import default_precision
from nst_server.settings import PRECISIONS, StyleTransferSettings

from nst_bench.measure import iteration_flops, matmul_flops_per_s, run_engine, sync

#: Rows of the profile table before the "other" row.
PROFILE_TOP = 12


def _memory_format() -> torch.memory_format:
    """The engine's layout (:data:`nst_server.objective.CHANNELS_LAST`, read at call time so that a switched lever
    switches the floor too)."""
    return torch.channels_last if objective.CHANNELS_LAST else torch.contiguous_format


def bare_network(models: StyleModels, dtype: torch.dtype, deepest: str = "conv5_1") -> nn.Sequential:
    """The replica's VGG-19 convolutions up to and including ``deepest`` and its ReLU, as a plain ``nn.Sequential``.

    ``Conv2d(3x3, padding 1) -> ReLU`` per layer of :data:`nst_export.vgg.CONV_LAYERS`, a ``MaxPool2d(2)`` before
    the first convolution of each block after the first; weights and biases copied from ``models.replica`` and
    stored in ``dtype`` (no autocast), in the engine's layout (channels_last when
    :data:`nst_server.objective.CHANNELS_LAST`, as :func:`nst_server.objective.replica_input`), frozen
    (``requires_grad`` False), in eval mode, on ``models.device``. The replica's ``input_mean`` subtraction is left
    out (one elementwise op): the network's input is the replica's input minus ``models.replica.input_mean``.

    Input: ``(B, 3, H, W)`` in ``dtype``, ``H, W >= 16`` for conv5_1. Output: ``(B, C, H / s, W / s)`` (floor
    division at each pool), for conv5_1 ``(B, 512, H // 16, W // 16)``: the replica's relu5_1.

    Raises:
        ValueError: ``deepest`` is not a convolution name of :data:`nst_export.vgg.CONV_NAMES`.
    """
    if deepest not in CONV_NAMES:
        raise ValueError(f"deepest must be one of {CONV_NAMES}, got {deepest!r}")
    layers: list[nn.Module] = []
    block = 1
    for name, c_in, c_out in CONV_LAYERS[:CONV_NAMES.index(deepest) + 1]:
        if int(name[4]) > block:                           # conv{block}_{n}: a 2x2 pooling starts each new block
            layers.append(nn.MaxPool2d(2))
            block = int(name[4])
        source = getattr(models.replica, name)
        conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(source.weight)
            conv.bias.copy_(source.bias)
        layers += [conv, nn.ReLU()]
    net = nn.Sequential(*layers).to(device=models.device, dtype=dtype, memory_format=_memory_format())
    return net.eval().requires_grad_(False)


def floor_pass_s(net: nn.Module, height: int, width: int, dtype: torch.dtype, device: torch.device | str,
                 repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of one forward pass of ``net`` (e.g. :func:`bare_network`, to relu5_1) plus the gradient
    with respect to its input (``backward`` of the output with a ones gradient), after ``warmup`` untimed passes
    (oneDNN and cuDNN pick their kernels per shape). The input is ``(1, 3, height, width)`` uniform in ``[0, 1)``,
    in ``dtype`` and the engine's layout; the device is synchronised before each clock read.

    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    pixels = torch.rand(1, 3, height, width, device=device).to(dtype).contiguous(memory_format=_memory_format())
    times = []
    for index in range(warmup + repeats):
        x = pixels.detach().requires_grad_(True)           # (1, 3, H, W) dtype
        sync(device)
        start = time.perf_counter()
        out = net(x)                                       # (1, 512, H // 16, W // 16) for conv5_1
        out.backward(torch.ones_like(out))
        sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _self_time_us(event, device: torch.device) -> float:
    """Self time of one ``key_averages`` row in microseconds: device time on CUDA, CPU time elsewhere."""
    if device.type == "cuda":
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))
    return float(event.self_cpu_time_total)


def engine_profile(models: StyleModels, inputs: JobInputs, settings: StyleTransferSettings, start: int = 3,
                   count: int = 6) -> list[dict]:
    """Where an engine iteration's time goes: :func:`nst_server.engine.stylize` under ``torch.profiler`` over
    iterations ``start + 1 .. start + count`` (the profiler starts when Progress number ``start`` arrives, or at
    the job's start when ``start`` is 0, and stops when Progress ``start + count`` arrives).

    The job runs ``settings`` with ``iterations = start + count`` and a Progress each iteration. Rows are
    ``key_averages`` entries by self time (self CPU time; on CUDA self device time, so the rows are mostly kernel
    names), largest first: the top :data:`PROFILE_TOP` and an ``"other"`` row of the rest.

    Returns:
        ``[{"op": str, "share": float, "ms_per_iteration": float}, ...]``: ``share`` of the profiled self time
        (the shares sum to 1), ``ms_per_iteration`` its self time in ms over the iterations profiled.
    Raises:
        ValueError: ``start < 0`` or ``count < 1``.
        RuntimeError: the job ended before any profiled iteration, or nothing was recorded.
    """
    if start < 0 or count < 1:
        raise ValueError(f"start must be >= 0 and count >= 1, got start={start}, count={count}")
    device = models.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    job = settings.replace(iterations=start + count, progress_every=1)
    profiled = 0
    running = False
    events = engine.stylize(models, inputs, job)
    try:
        if start == 0:
            profiler.start()
            running = True
        for event in events:
            if not isinstance(event, Progress):
                continue
            if running:
                profiled += 1
                if event.iteration >= start + count:
                    break
            elif event.iteration == start:
                sync(device)
                profiler.start()
                running = True
    finally:
        events.close()
        if running:
            sync(device)
            profiler.stop()
    if not profiled:
        raise RuntimeError(f"the job ended before iteration {start + 1}: nothing profiled")
    rows = [(event.key, _self_time_us(event, device)) for event in profiler.key_averages()]
    rows = sorted((row for row in rows if row[1] > 0), key=lambda row: row[1], reverse=True)
    total = sum(us for _, us in rows)
    if total <= 0:
        raise RuntimeError("the profiler recorded no self time")
    table = [{"op": op, "share": us / total, "ms_per_iteration": us / 1000.0 / profiled}
             for op, us in rows[:PROFILE_TOP]]
    rest = sum(us for _, us in rows[PROFILE_TOP:])
    table.append({"op": "other", "share": rest / total, "ms_per_iteration": rest / 1000.0 / profiled})
    return table


def floor_precisions(device: torch.device | str) -> list[str]:
    """``["fp32"]``, plus the precision ``auto`` picks on ``device`` when that is not fp32
    (:func:`nst_server.precision.default_precision`)."""
    auto = default_precision(device)[0]
    return ["fp32"] + ([auto] if auto != "fp32" else [])


def floor_stage(models: StyleModels, inputs: JobInputs, size: int, iterations: int = 12,
                profile_iterations: int = 6, repeats: int = 2, warmup: int = 3, matmul_n: int = 4096,
                floor_repeats: int = 5, precisions: list[str] | None = None) -> dict:
    """The engine against the bare network's floor, per precision, in one run.

    For each precision (default :func:`floor_precisions`): the engine's per-iteration time (the ``classic``
    preset at ``size`` px: one scale, one pyramid level, autocast in that precision; ``iterations`` iterations,
    the median after ``warmup``), the floor (:func:`floor_pass_s` of :func:`bare_network` in that dtype at the
    engine's image size, ``floor_repeats`` timed passes), ``engine / floor``, the FLOP/s of an ``matmul_n``-side
    matmul in that dtype and the FLOP/s of the engine and of the floor (:func:`nst_bench.measure.iteration_flops`:
    the floor counts the forward and backward convolutions, the engine also the Gram products) with their
    fraction of that matmul, and the engine's profile table (:func:`engine_profile`, ``profile_iterations``
    iterations after ``warmup``). Engine and floor are interleaved (engine, floor, engine, floor: ``repeats``
    rounds, each one's best median kept) so that another process's load weighs on both alike.

    Returns:
        ``{"size_px": [width, height], "iterations", "repeats", "precisions": {p: {"engine_per_iteration_s",
        "floor_pass_s", "engine_over_floor", "engine_runs_s", "floor_runs_s", "matmul_flop_per_s",
        "engine_flop_per_s", "floor_flop_per_s", "engine_fraction_of_matmul", "floor_fraction_of_matmul",
        "profile", "profiled_per_iteration_s"}}}``; times in seconds.
    Raises:
        ValueError: an unknown precision, ``iterations <= warmup + 1`` (no per-iteration median) or a settings
            error of the preset at ``size`` (:meth:`StyleTransferSettings.validate`).
    """
    precisions = precisions or floor_precisions(models.device)
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {p!r}")
    if iterations <= warmup + 1:
        raise ValueError(f"iterations ({iterations}) must exceed warmup + 1 ({warmup + 1})")
    settings = {p: StyleTransferSettings.preset("classic", max_side_px=size, iterations=iterations, precision=p)
                for p in precisions}
    for s in settings.values():
        s.validate()
    width, height = resize_to_max_side(inputs.content, size).size
    dtypes = {p: PRECISIONS[p] or torch.float32 for p in precisions}
    nets = {p: bare_network(models, dtypes[p]) for p in precisions}
    engine_runs: dict[str, list[float]] = {p: [] for p in precisions}
    floor_runs: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(max(1, repeats)):
        for p in precisions:
            engine_runs[p].append(run_engine(models, inputs, settings[p], name=f"engine_{p}").per_iteration_s(warmup))
            floor_runs[p].append(floor_pass_s(nets[p], height, width, dtypes[p], models.device,
                                              repeats=floor_repeats))
    s0 = settings[precisions[0]]
    flops = iteration_flops(height, width, s0.content_layers, s0.style_layers)
    floor_flops = flops["forward"] + flops["backward"]
    figures = {}
    for p in precisions:
        engine_s, floor_s = min(engine_runs[p]), min(floor_runs[p])
        matmul = matmul_flops_per_s(matmul_n, repeats=3, device=models.device, dtype=dtypes[p])
        engine_flop_per_s = flops["total"] / engine_s
        floor_flop_per_s = floor_flops / floor_s
        profile = engine_profile(models, inputs, settings[p], start=warmup, count=profile_iterations)
        figures[p] = {
            "engine_per_iteration_s": engine_s, "floor_pass_s": floor_s, "engine_over_floor": engine_s / floor_s,
            "engine_runs_s": engine_runs[p], "floor_runs_s": floor_runs[p],
            "matmul_n": matmul_n, "matmul_flop_per_s": matmul,
            "engine_flop_per_s": engine_flop_per_s, "floor_flop_per_s": floor_flop_per_s,
            "engine_fraction_of_matmul": engine_flop_per_s / matmul,
            "floor_fraction_of_matmul": floor_flop_per_s / matmul,
            "profile": profile,
            # Self times add up to the profiled thread's time: the profiled iterations' own pace, beside the
            # unprofiled median (profiler overhead, or another process's load at that moment, shows as a gap).
            "profiled_per_iteration_s": sum(row["ms_per_iteration"] for row in profile) / 1000.0,
        }
    return {"size_px": [width, height], "iterations": iterations, "warmup_iterations": warmup,
            "repeats": max(1, repeats), "iteration_flops": flops, "floor_flops": floor_flops,
            "precisions": figures}
