"""The report of ``nst-benchmark``: its progress lines on stdout and ``benchmark.json``, the figures computed from
the measurements (:mod:`nst_bench.measure`, :mod:`nst_bench.tutorial`) as the run goes.

``benchmark.json`` is written again after each step, so a run cut short keeps what it measured. Times are in
seconds; ``float`` is the JSON fallback (NaN where a run never reached a figure).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from nst_proto.files import atomic_write_text
from nst_server.precision import cpu_flags, native_bf16

from nst_bench.measure import Trace

#: The file written into the output folder.
REPORT_NAME = "benchmark.json"


def log(message: str) -> None:
    """One progress line on stdout, stamped with the wall clock."""
    print(f"[nst-benchmark {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write(folder: Path, report: dict) -> Path:
    """``report`` as ``folder / benchmark.json`` (indented; NaN and numpy numbers through ``float``), written
    atomically: a temporary file renamed over the last version, which a failed write leaves as it was.

    Raises:
        OSError: the file could not be written.
    """
    path = folder / REPORT_NAME
    atomic_write_text(path, json.dumps(report, indent=2, default=float))
    return path


def machine(device: torch.device) -> dict:
    """What the figures depend on: CPU, core and thread counts, torch, bf16 support, the CUDA device, the load."""
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


def add_speed(report: dict, speed: dict[str, list[Trace]], warmup: int, flops: dict[str, float],
              matmul: float) -> dict[str, float]:
    """``report[name]`` for each of (a), (b), (c) that ran: its best run (lowest per-iteration median) and the
    FLOP/s that makes, over the matmul reference.

    Returns:
        ``{name: seconds per iteration}`` of the best runs.
    """
    per_iteration = {}
    for name, traces in speed.items():
        if not traces:
            continue
        best = min(traces, key=lambda t: t.per_iteration_s(warmup))
        per_iteration[name] = best.per_iteration_s(warmup)
        report[name] = {**best.summary(warmup), "runs_per_iteration_s": [t.per_iteration_s(warmup) for t in traces],
                        "flop_per_s": flops["total"] / per_iteration[name],
                        "fraction_of_matmul": flops["total"] / per_iteration[name] / matmul}
        log(f"{name}: {per_iteration[name]:.4f} s/iteration, "
            f"{report[name]['fraction_of_matmul']:.1%} of matmul FLOP/s, job {best.job_s:.2f} s")
    return per_iteration


def add_matmul_again(report: dict, per_iteration: dict[str, float], matmul_after: float) -> None:
    """The matmul reference measured again after the speed runs: the larger of the two is kept and the
    fractions recomputed over it (a busy moment of another process during one measurement would otherwise
    flatter every fraction)."""
    matmul = report["matmul_fp32_flop_per_s"]
    report["matmul_fp32_flop_per_s_runs"] = [matmul, matmul_after]
    if matmul_after > matmul:
        matmul = report["matmul_fp32_flop_per_s"] = matmul_after
        for name in per_iteration:
            report[name]["fraction_of_matmul"] = report[name]["flop_per_s"] / matmul
        log(f"matmul fp32 measured again: {matmul / 1e9:.1f} GFLOP/s; fractions "
            + ", ".join(f"{name} {report[name]['fraction_of_matmul']:.1%}" for name in per_iteration))


def add_ratios(report: dict, per_iteration: dict[str, float], serving: list[float]) -> None:
    """``report["ratios"]``: tutorial and server per-iteration times over the engine's; with ``serving`` (the
    server's serving threads' CPU seconds per iteration, each run), their median beside them."""
    report["ratios"] = {"tutorial_over_engine_per_iteration": per_iteration["tutorial"] / per_iteration["engine"]}
    if "server" in per_iteration:
        report["ratios"]["server_over_engine_per_iteration"] = per_iteration["server"] / per_iteration["engine"]
        if serving:
            # What gRPC and the event loop cost the server, in CPU rather than wall time (which this
            # VM's drift moves by several % between runs): a bound on what serving can take from the job.
            median = statistics.median(serving)
            report["server"]["serving_cpu_per_iteration_s"] = median
            report["ratios"]["server_serving_cpu_over_engine_iteration"] = median / per_iteration["engine"]
            log(f"server: serving threads {median * 1e3:.2f} ms CPU per iteration, "
                f"{report['ratios']['server_serving_cpu_over_engine_iteration']:.2%} of an engine iteration")


def quality_target(reference: Trace) -> tuple[float, int | None]:
    """The J the other runs must reach: the tutorial's J after its last iteration, or, where its J went NaN or
    infinite on the way (its L-BFGS with lr 1 and no line search diverged: NaN from iteration 64 of 300 on an
    H200 at 512 px, 2026-12-04), the lowest finite J it reached before that.

    Returns ``(target, the 1-based iteration whose J was first not finite, or None)``; ``(nan, 1)`` when no J
    was finite."""
    diverged = next((i + 1 for i, total in enumerate(reference.totals) if not math.isfinite(total)), None)
    if diverged is None:
        return (reference.totals[-1] if reference.totals else math.nan), None
    before = reference.totals[:diverged - 1]
    return (min(before) if before else math.nan), diverged


def time_to_quality(reference: Trace, traces: list[Trace], iterations: int, target: float,
                    diverged_at: int | None = None) -> dict:
    """``report["time_to_quality"]``: for each run (the tutorial's ``reference`` included), the wall time and
    the iterations to the first iteration at the output size whose J <= ``target``, and that time over the
    tutorial's (its J is not monotone: L-BFGS without line search overshoots now and then)."""
    ttq = {"iterations": iterations, "target_total": target, "tutorial_time_at_n_s": reference.times_s[-1],
           "tutorial_diverged_at_iteration": diverged_at}
    reference_s = reference.time_to(target)
    for trace in traces:
        seconds = trace.time_to(target)
        reached = next((i + 1 for i, t in enumerate(trace.totals) if i >= trace.final_scale_from
                        and t <= target), None)
        ttq[trace.name] = {"seconds": seconds, "iterations_to_target": reached,
                           "over_tutorial": seconds / reference_s}
        log(f"{trace.name}: {seconds:.2f} s ({reached} iterations), "
            f"{seconds / reference_s:.3f} of the tutorial's")
    return ttq


def bf16_runs(runs: dict[str, Trace], iterations: int, native: bool, warmup: int) -> dict:
    """``report["bf16"]`` from an fp32 and a bf16 engine run: speed and the delivered image's costs."""
    warm_bf16 = min(warmup, max(0, iterations - 2))
    fp32, bf16 = (runs[p].per_iteration_s(warm_bf16) for p in ("fp32", "bf16"))
    figures = {
        "iterations": iterations, "native_bf16": native,
        "fp32_per_iteration_s": fp32, "bf16_per_iteration_s": bf16, "speedup": fp32 / bf16,
        "fp32_costs": runs["fp32"].final_costs, "bf16_costs": runs["bf16"].final_costs,
        "relative_cost_difference": {k: abs(runs["bf16"].final_costs[k] - v) / abs(v) if v else 0.0
                                     for k, v in runs["fp32"].final_costs.items()},
    }
    log(f"bf16: {fp32 / bf16:.2f}x fp32 speed; costs {figures['relative_cost_difference']}")
    return figures


def bf16_pass(size_px: list[int], fp32: float, bf16: float) -> dict:
    """``report["bf16"]`` where the device has no native bf16: one replica pass of each."""
    log(f"bf16: {fp32 / bf16:.3f}x fp32 speed (emulated)")
    return {"native_bf16": False, "size_px": size_px, "fp32_pass_s": fp32, "bf16_pass_s": bf16,
            "speedup": fp32 / bf16}


def batching(batch: int, size_px: list[int], one: float, batched: float) -> dict:
    """``report["batching"]``: one replica pass of ``batch`` images against ``batch`` passes of one."""
    log(f"batched pass: throughput {batch * one / batched:.2f}x one at a time")
    return {"batch": batch, "size_px": size_px, "one_pass_s": one, "batched_pass_s": batched,
            "throughput_gain": batch * one / batched}
