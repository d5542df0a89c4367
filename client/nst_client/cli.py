"""``nst``: the command-line client of the style-transfer server.

    nst stylize CONTENT STYLE -o OUT.png --server HOST:PORT --size 256 --iterations 200
    nst info --server HOST:PORT
    nst health --server HOST:PORT
"""

from __future__ import annotations

import argparse
import json
import sys

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from nst_client.client import OPTIMIZERS, NSTClient, NSTError

DEFAULT_SERVER = "127.0.0.1:50051"


def _add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT of nst-server (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nst", description="Neural style transfer client (gRPC).")
    commands = parser.add_subparsers(dest="command", required=True)

    stylize = commands.add_parser("stylize", help="stylize CONTENT like STYLE and write a PNG")
    stylize.add_argument("content", help="content image file (PNG, JPEG, …)")
    stylize.add_argument("style", help="style image file")
    stylize.add_argument("-o", "--output", required=True, help="PNG file to write")
    _add_server(stylize)
    stylize.add_argument("--size", type=int, default=0, help="longest side of the result, px (server default 256)")
    stylize.add_argument("--iterations", type=int, default=0, help="optimiser iterations (server default 200)")
    stylize.add_argument("--content-weight", type=float, default=None, help="alpha (server default)")
    stylize.add_argument("--style-weight", type=float, default=None, help="beta (server default)")
    stylize.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None, help="server default: lbfgs")
    stylize.add_argument("--learning-rate", type=float, default=None, help="Adam step, pixel levels (0..255)")
    stylize.add_argument("--noise-ratio", type=float, default=None, help="noise share of the initial image, 0..1")
    stylize.add_argument("--seed", type=int, default=None, help="seed of the initial noise")
    stylize.add_argument("--timeout-s", type=float, default=None, help="deadline for the whole job, seconds")
    stylize.add_argument("--quiet", action="store_true", help="no progress bar")

    info = commands.add_parser("info", help="print the server's model information as JSON")
    _add_server(info)
    health = commands.add_parser("health", help="print the server's health status")
    _add_server(health)
    return parser


def _stylize(args: argparse.Namespace, client: NSTClient) -> int:
    bar = None if args.quiet else tqdm(total=args.iterations or None, unit="it", desc="stylize", file=sys.stderr)

    def on_progress(progress) -> None:
        if bar is None:
            return
        bar.update(progress.iteration - bar.n)
        bar.set_postfix(content=f"{progress.costs.content:.3g}", style=f"{progress.costs.style:.3g}",
                        refresh=False)

    try:
        result = client.stylize(
            args.content, args.style, on_progress=on_progress, timeout_s=args.timeout_s,
            max_side_px=args.size, iterations=args.iterations, content_weight=args.content_weight,
            style_weight=args.style_weight, optimizer=args.optimizer, learning_rate=args.learning_rate,
            noise_ratio=args.noise_ratio, seed=args.seed)
    finally:
        if bar is not None:
            bar.close()
    result.save(args.output)
    print(f"wrote {args.output} ({result.width_px}x{result.height_px}) in {result.elapsed_ms / 1000:.1f} s; "
          f"{result.iterations} iterations, stop: {result.stop_reason}")
    print(f"costs of the delivered image: content {result.content_cost:.4g}, style {result.style_cost:.4g}, "
          f"total {result.total_cost:.4g}")
    if result.progress:
        first, last = result.progress[0], result.progress[-1]
        print(f"style cost: iteration {first.iteration} {first.costs.style:.4g} -> iteration {last.iteration} "
              f"{last.costs.style:.4g} (last/first = {last.costs.style / max(first.costs.style, 1e-30):.4f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with NSTClient(args.server) as client:
            if args.command == "stylize":
                return _stylize(args, client)
            if args.command == "info":
                print(json.dumps(MessageToDict(client.model_info()), indent=2))
                return 0
            print(client.health())
            return 0
    except NSTError as exc:
        print(f"nst: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"nst: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
