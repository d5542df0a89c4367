"""``nst``: the command-line client of the style-transfer server.

    nst stylize CONTENT STYLE -o OUT.png --server HOST:PORT --size 256 --iterations 200
    nst info --server HOST:PORT
    nst health --server HOST:PORT
    nst bench --server HOST:PORT --size 256 --iterations 20 --concurrency 1,2,4 --output-json B.json --plot B.png

``--server`` takes any gRPC target: several replicas as ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` or
``dns:///nst-headless.NAMESPACE.svc:50051`` are balanced round robin, refusals are retried on another replica,
and a job whose replica is lost mid-stream is sent again (``--max-resubmits``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from nst_client import bench as bench_module
from nst_client import output
from nst_proto.argtypes import finite, integer, seconds, timeout
from nst_proto.console import tolerate_console
from nst_client.client import CHOICES, NSTClient, NSTError, check_target

DEFAULT_SERVER = "127.0.0.1:50051"


def _unsigned(bits: int):
    """argparse type: an integer in [0, 2^bits - 1] (a uint32 or uint64 request field), else an error naming
    the flag (protobuf's own is "Value out of range: -5")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not 0 <= value < 1 << bits:
            raise argparse.ArgumentTypeError(f"must be between 0 and {(1 << bits) - 1}, got {value}")
        return value
    parse.__name__ = f"uint{bits}"
    return parse


UINT32, UINT64 = _unsigned(32), _unsigned(64)


def server_target(text: str) -> str:
    """argparse type of ``--server``: a gRPC target in a form the client connects to as meant
    (:func:`nst_client.client.check_target`: ``[::1]:50051``, not ``::1:50051``; a port always)."""
    try:
        return check_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


server_target.__name__ = "target"


def _add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, type=server_target,
                        help="gRPC target of nst-server: HOST:PORT (IPv6 as [::1]:50051), or replicas as "
                             "ipv4:HOST:PORT,HOST:PORT,… or dns:///NAME:PORT, balanced round robin with retries; "
                             "loopback targets never go through $http_proxy & co. (default: %(default)s)")
    parser.add_argument("--balance", action="store_true", default=None,
                        help="round robin and retries for a plain HOST:PORT too (a name with several addresses)")
    parser.add_argument("--max-resubmits", type=integer(0), default=2,
                        help="send a job again at most this many times when its replica is lost mid-stream "
                             "(default: %(default)s)")
    parser.add_argument("--busy-retry-s", type=seconds, default=0.0,
                        help="keep sending a job that every replica refuses (busy, loading, draining) for up to "
                             "this long, s; inf: until --timeout-s (default: %(default)s: fail at once)")
    parser.add_argument("--tls", action="store_true",
                        help="connect with TLS, verifying the server against the system's root certificates")
    parser.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="connect with TLS, verifying the server against this CA (or self-signed) certificate")
    parser.add_argument("--token", default=os.environ.get("NST_AUTH_TOKEN") or None,
                        help="bearer token for servers started with --auth-token (default: $NST_AUTH_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nst", description="Neural style transfer client (gRPC).")
    commands = parser.add_subparsers(dest="command", required=True)

    stylize = commands.add_parser("stylize", help="stylize CONTENT like STYLE and write a PNG")
    stylize.add_argument("content", help="content image file (PNG, JPEG, …)")
    stylize.add_argument("style", help="style image file")
    stylize.add_argument("-o", "--output", required=True,
                         help="picture to write; its suffix picks the format: .png, .jpg/.jpeg, .webp, .tif/.tiff "
                              "(checked, with its folder, before the job is sent)")
    stylize.add_argument("--quality", type=int, default=None, metavar="1-100",
                         help=f"JPEG/WebP quality (default {output.DEFAULT_QUALITY})")
    _add_server(stylize)
    stylize.add_argument("--style", dest="styles", action="append", default=[], metavar="FILE[:WEIGHT]",
                         help="one more style image with an optional blend weight (repeatable)")
    stylize.add_argument("--size", dest="max_side_px", type=UINT32, default=0,
                         help="longest side of the result, px (0: the server's default, 256; nst-server accepts "
                              "16 up to its --max-side-px, 1024 by default)")
    stylize.add_argument("--iterations", type=UINT32, default=0,
                         help="optimiser iterations (0: the server's default, 200)")
    stylize.add_argument("--preset", choices=CHOICES["preset"], default=None,
                         help="seed: the seed's course recipe (Adam, alpha 10, beta 40, its costs as they are); "
                              "classic: this service's defaults before normalised multi-scale costs")
    stylize.add_argument("--content-weight", type=finite, default=None, help="alpha (server default 1)")
    stylize.add_argument("--style-weight", type=finite, default=None,
                         help="beta (server default 15, on normalised costs: see --normalization)")
    stylize.add_argument("--normalization", choices=CHOICES["normalization"], default=None,
                         help="target: alpha and beta weigh relative errors (server default); none: the seed's "
                              "J = alpha J_content + beta J_style as it is")
    stylize.add_argument("--pyramid-levels", type=UINT32, default=None,
                         help="costs at this many sizes of the image, half an octave apart (server default 3)")
    stylize.add_argument("--tv-weight", type=finite, default=None, help="total variation weight")
    stylize.add_argument("--content-layers", default=None, metavar="LAYER:W,…", help="e.g. relu4_2:1")
    stylize.add_argument("--style-layers", default=None, metavar="LAYER:W,…",
                         help="e.g. relu1_1:0.2,relu2_1:0.2,relu3_1:0.2,relu4_1:0.2,relu5_1:0.2")
    stylize.add_argument("--style-scale", type=finite, default=None, help="style size relative to the output")
    stylize.add_argument("--pooling", choices=CHOICES["pooling"], default=None)
    stylize.add_argument("--optimizer", choices=CHOICES["optimizer"], default=None, help="server default: lbfgs")
    stylize.add_argument("--learning-rate", type=finite, default=None, help="Adam step, pixel levels (0..255)")
    stylize.add_argument("--lbfgs-history", type=UINT32, default=0)
    stylize.add_argument("--init", choices=CHOICES["init"], default=None)
    stylize.add_argument("--init-image", default=None, help="initial image file (with --init image)")
    stylize.add_argument("--noise-ratio", type=finite, default=None, help="noise share of the initial image, 0..1")
    stylize.add_argument("--color-control", choices=CHOICES["color_control"], default=None,
                         help="keep the content's colours: luminance or match_style_colors")
    stylize.add_argument("--scales", type=UINT32, default=None,
                         help="coarse-to-fine scales (server default 3; 1: single scale)")
    stylize.add_argument("--start-side-px", type=UINT32, default=0, help="longest side at the first scale, px")
    stylize.add_argument("--precision", choices=CHOICES["precision"], default=None,
                         help="auto (server default): bf16 where the hardware runs it natively, else fp32")
    stylize.add_argument("--keep-content-alpha", action="store_true",
                         help="RGBA result carrying the content's transparency")
    stylize.add_argument("--convergence-tolerance", type=finite, default=None)
    stylize.add_argument("--seed", type=UINT64, default=None, help="seed of the initial noise")
    stylize.add_argument("--preview-every", type=UINT32, default=0, metavar="N",
                         help="save a preview every N iterations next to OUTPUT (OUTPUT.previewNNNN.SUFFIX)")
    stylize.add_argument("--timeout-s", type=timeout, default=None,
                         help="deadline for the whole job, s, > 0; inf (or more than 1e9): none (default: none)")
    stylize.add_argument("--quiet", action="store_true", help="no progress bar")

    info = commands.add_parser("info", help="print the server's model information as JSON")
    _add_server(info)
    health = commands.add_parser("health", help="print the server's health status (grpc.health.v1); exit code 0 "
                                                "when SERVING, 1 otherwise (a container HEALTHCHECK)")
    _add_server(health)
    bench = commands.add_parser("bench", help="throughput and latency over a sweep of concurrency levels")
    _add_server(bench)
    bench_module.add_arguments(bench)
    return parser


_OPTIONS = ("max_side_px", "iterations", "preset", "content_weight", "style_weight", "tv_weight", "style_scale",
            "pooling", "optimizer", "learning_rate", "lbfgs_history", "init", "noise_ratio", "color_control",
            "scales", "start_side_px", "precision", "convergence_tolerance", "seed", "preview_every",
            "keep_content_alpha", "normalization", "pyramid_levels")


def _file_weight(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` of ``--style``; a suffix that is no number belongs to the file name. Raises ValueError
    for a weight that is not finite (``nan``, ``inf``)."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise ValueError(f"--style {text}: the blend weight must be a finite number, got {weight!r}")
        return path, value
    return text, 1.0


def _layer_weights(text: str | None, option: str) -> dict[str, float] | None:
    if not text:
        return None
    layers = {}
    for item in text.split(","):
        layer, sep, weight = item.partition(":")
        try:
            layers[layer.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not LAYER:WEIGHT") from None
        if not math.isfinite(layers[layer.strip()]):
            raise ValueError(f"{option}: {item!r}: the weight must be a finite number")
    return layers


def _check_stylize_outputs(args: argparse.Namespace) -> str:
    """What can be checked about the files the job will write, before it is sent; returns the format."""
    fmt = output.check_output(args.output, keep_alpha=args.keep_content_alpha)
    if args.quality is not None:
        if not 1 <= args.quality <= 100:
            raise ValueError(f"--quality must be between 1 and 100, got {args.quality}")
        if fmt not in output.LOSSY_FORMATS:
            raise ValueError(f"--quality applies to JPEG and WebP, not to {fmt} ({args.output})")
    return fmt


def _stylize(args: argparse.Namespace, client: NSTClient, fmt: str) -> int:
    bar = None if args.quiet else tqdm(total=args.iterations or None, unit="it", desc="stylize", file=sys.stderr)
    target = Path(args.output)
    quality = args.quality or output.DEFAULT_QUALITY
    preview_failed = []

    def on_heartbeat(heartbeat) -> None:
        if bar is not None and heartbeat.queue_position:
            bar.set_postfix_str(f"waiting: {heartbeat.queue_position} in line, {heartbeat.waited_ms / 1000:.0f} s")

    def on_retry(retry) -> None:
        why = "replica lost" if retry.accepted else "refused"
        line = f"{why} ({retry.error}); sending the job again, attempt {retry.attempt}"
        if bar is None:
            print(f"nst: {line}", file=sys.stderr)
            return
        bar.write(f"nst: {line}", file=sys.stderr)
        if retry.accepted:
            bar.reset()
        bar.set_description(f"stylize (attempt {retry.attempt})")

    def on_progress(progress) -> None:
        if progress.preview_png and not preview_failed:
            preview = target.with_suffix(f".preview{progress.iteration:04d}{target.suffix}")
            try:
                output.atomic_write_bytes(preview, output.encode(progress.preview_png, fmt, quality))
            except OSError as exc:       # a preview is not worth the job: say so once and go on
                preview_failed.append(exc)
                print(f"nst: previews are no longer saved: {exc}", file=sys.stderr)
        if bar is None:
            return
        bar.update(progress.iteration - bar.n)
        bar.set_postfix(content=f"{progress.costs.content:.3g}", style=f"{progress.costs.style:.3g}",
                        refresh=False)

    try:
        options = {name: getattr(args, name) for name in _OPTIONS}
        result = client.stylize(
            args.content, args.style, on_progress=on_progress, on_heartbeat=on_heartbeat, on_retry=on_retry,
            timeout_s=args.timeout_s,
            styles=[_file_weight(item) for item in args.styles], init_image=args.init_image,
            content_layers=_layer_weights(args.content_layers, "--content-layers"),
            style_layers=_layer_weights(args.style_layers, "--style-layers"), **options)
    finally:
        if bar is not None:
            bar.close()
    written, error = output.write_image(result.image_png, target, fmt, quality)
    if error is not None:
        print(f"nst: cannot write {target} ({error}); the result is saved as {written} instead", file=sys.stderr)
    print(f"wrote {written} ({result.width_px}x{result.height_px}) in {result.elapsed_ms / 1000:.1f} s; "
          f"{result.iterations} iterations, stop: {result.stop_reason}, precision {result.precision or '?'}"
          + (f"; {result.attempts} attempts" if result.attempts > 1 else "")
          + (f"; replica {result.replica}" if result.replica else ""))
    print(f"costs of the delivered image: content {result.content_cost:.4g}, style {result.style_cost:.4g}, "
          f"total {result.total_cost:.4g}")
    if result.progress:
        first, last = result.progress[0], result.progress[-1]
        print(f"style cost: iteration {first.iteration} {first.costs.style:.4g} -> iteration {last.iteration} "
              f"{last.costs.style:.4g} (last/first = {last.costs.style / max(first.costs.style, 1e-30):.4f})")
    return 0 if error is None else 2


def main(argv: list[str] | None = None) -> int:
    tolerate_console()      # a closed or full stdout/stderr never fails a job whose picture was written
    args = build_parser().parse_args(argv)
    try:
        fmt = _check_stylize_outputs(args) if args.command == "stylize" else ""
        if args.command == "bench":
            for option in ("output_json", "output_csv", "plot"):
                if getattr(args, option):
                    output.check_writable(getattr(args, option), "--" + option.replace("_", "-"))
        with NSTClient(args.server, tls=args.tls, tls_ca=args.tls_ca, token=args.token, balance=args.balance,
                       max_resubmits=args.max_resubmits, busy_retry_s=args.busy_retry_s) as client:
            if args.command == "stylize":
                return _stylize(args, client, fmt)
            if args.command == "bench":
                return bench_module.run(args, client)
            if args.command == "info":
                print(json.dumps(MessageToDict(client.model_info()), indent=2))
                return 0
            status = client.health()
            print(status)
            return 0 if status == "SERVING" else 1
    except NSTError as exc:
        print(f"nst: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"nst: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:            # Ctrl-C: the call is cancelled as the client closes (see NSTClient)
        print("nst: interrupted; the job was cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
