"""``nst-quality``: the delivered pictures judged by the seed's costs at several sizes, and shown side by side.

For every (content, style) pair and every variant (a set of request options, e.g. the server's defaults
against an older setting), one job runs through a real ``nst-server`` (started here from ``--model``, or the
one at ``--server``) and its delivered PNG is judged at each evaluation size (matching a style only at the size optimised leaves its larger structure out):
content, style and result are each resized with Lanczos so that their longest side is that size, and the seed's
``J_content`` (relu4_2) and ``J_style`` (relu1_1 ... relu5_1, lambda 0.2 each) of the result are computed
against them with the style Gram matrix scaled by ``P_G / P_S`` (:func:`judge`). A style matched only at the
size the job optimised shows up here as a low ``J_style`` at that size and a high one at the smaller sizes.

Writes into the output folder: ``quality.json`` (every figure, with the time of each job), ``quality.md`` (the
table), ``contact_sheet.png`` (one row per pair: content, style, then each variant's result) and every result
PNG. With ``--reference FILE`` (JSON ``{"CONTENT x STYLE": {"SIZE": [J_content, J_style]}}``) each figure is
compared with the reference's and the table marks those above it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from nst_proto.files import atomic_path, atomic_write_text
from nst_server import engine
from nst_server.images import resize_to_max_side, to_tensor
from nst_server.model import StyleModels
from nst_server.objective import evaluate
from nst_server.settings import StyleTransferSettings
from nst_server.targets import compute_targets, features

#: The pairs of the quality issue: (content, style) file names in ``$NST_SHARED_DIR/images``.
DEFAULT_PAIRS = ("tubingen.jpg:starry_night.jpg", "tubingen.jpg:the_scream.jpg", "tubingen.jpg:shipwreck.jpg")
DEFAULT_EVAL_SIZES = (512, 384, 256)
#: Height of one picture in the contact sheet, px.
SHEET_ROW_PX = 256


@dataclass(frozen=True)
class Judgement:
    """The seed's costs of one picture at one evaluation size (longest side ``size_px``)."""

    size_px: int
    content: float          # J_content at relu4_2
    style: float            # J_style, lambda 0.2 on relu1_1 ... relu5_1


def judge(models: StyleModels, content: Image.Image, style: Image.Image, result: Image.Image,
          size_px: int) -> Judgement:
    """The seed's ``J_content`` and ``J_style`` of ``result`` with every image resized to ``size_px``.

    Args:
        models: the session computes every feature (forward passes only).
        content, style, result: 8-bit RGB images of any size; ``result`` normally has the content's aspect.
        size_px: the longest side every image is resized to (Lanczos), px.
    Returns:
        The costs in the seed's units (the same as ``Result.costs`` of a job of that size with the seed's
        layers and no normalisation): the target Gram matrix is scaled by ``P_G / P_S``
        (:func:`nst_server.costs.rescale_gram`).
    Raises:
        ValueError: ``size_px`` gives an image under the network's 16 px minimum.
    """
    settings = StyleTransferSettings(normalization="none", pyramid_levels=1)
    content_t = to_tensor(resize_to_max_side(content, size_px))                # (1, 3, H, W) RGB [0, 1]
    style_t = to_tensor(resize_to_max_side(style, size_px))
    result_t = to_tensor(result.convert("RGB").resize((content_t.shape[3], content_t.shape[2]),
                                                      Image.Resampling.LANCZOS))
    if min(*content_t.shape[2:], *style_t.shape[2:]) < engine.MIN_SIDE_PX:
        raise ValueError(f"size_px {size_px} makes an image smaller than the network's {engine.MIN_SIDE_PX} px "
                         f"minimum")
    with torch.no_grad():
        targets = compute_targets(models, content_t.to(models.device), [(style_t.to(models.device), 1.0)],
                                  settings)
        feats = features(models, result_t.to(models.device), settings.pooling)
        terms = evaluate(feats, result_t * 255.0, targets, settings)
        j_content, j_style = terms.content, terms.style
    return Judgement(size_px=size_px, content=float(j_content[0]), style=float(j_style[0]))


def _shared_images() -> Path:
    return Path(os.environ.get("NST_SHARED_DIR", Path.cwd().parent / "shared")) / "images"


def _resolve(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (_shared_images() / name, _shared_images() / f"{name}.jpg"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"image not found: {name} (looked here and in {_shared_images()})")


def parse_pair(text: str) -> tuple[Path, Path]:
    """``CONTENT:STYLE`` (paths, or names in ``$NST_SHARED_DIR/images``) -> two existing paths."""
    if text.count(":") != 1:
        raise argparse.ArgumentTypeError(f"a pair is CONTENT:STYLE, got {text!r}")
    content, style = text.split(":")
    try:
        return _resolve(content), _resolve(style)
    except FileNotFoundError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:option=value,option=value`` -> (name, build_request options); values are ints,
    floats or enum names (``precision=fp32``), checked against ``nst_client.StylizeOptions``."""
    name, _, spec = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"a variant needs a name: {text!r}")
    options = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"variant option {item!r} is not OPTION=VALUE")
        options[key.strip().replace("-", "_")] = _value(value.strip())
    from nst_client.options import StylizeOptions
    try:       # a misspelt or ill-typed option is a usage error naming it, before any server starts
        StylizeOptions().replace(**options)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"variant {name!r}: {error}") from None
    return name, options


def pair_name(content: Path, style: Path) -> str:
    return f"{content.stem} x {style.stem}"


def contact_sheet(rows: list[tuple[str, list[tuple[str, Image.Image]]]], row_px: int = SHEET_ROW_PX) -> Image.Image:
    """One row per pair: each ``(label, image)`` scaled to ``row_px`` high, labelled above, side by side."""
    label_px = 14
    scaled = [[(label, image.convert("RGB").resize((max(1, round(image.width * row_px / image.height)), row_px),
                                                   Image.Resampling.LANCZOS)) for label, image in cells]
              for _, cells in rows]
    width = max(sum(image.width for _, image in cells) + 4 * (len(cells) - 1) for cells in scaled)
    sheet = Image.new("RGB", (width, len(rows) * (row_px + label_px + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, cells in enumerate(scaled):
        x, y = 0, index * (row_px + label_px + 4)
        for label, image in cells:
            draw.text((x + 2, y + 1), label, fill="black")
            sheet.paste(image, (x, y + label_px))
            x += image.width + 4
    return sheet


def _markdown(report: dict, reference: dict) -> str:
    """The table: one row per job (pair, variant), a reference row after each pair that has one; a figure
    above the reference's is marked with ``>``."""
    sizes = report["eval_sizes"]
    lines = ["| pair | variant | job s | " + " | ".join(f"{s} px Jc / Js" for s in sizes) + " |",
             "|" + "---|" * (3 + len(sizes))]
    pairs = list(dict.fromkeys(job["pair"] for job in report["jobs"]))
    for pair in pairs:
        ref = reference.get(pair, {})
        for job in (job for job in report["jobs"] if job["pair"] == pair):
            cells = []
            for j in job["judged"]:
                rc, rs = ref.get(str(j["size_px"]), (float("inf"), float("inf")))
                cells.append(f"{'>' if j['content'] > rc else ''}{j['content']:.3g} / "
                             f"{'>' if j['style'] > rs else ''}{j['style']:.3g}")
            lines.append(f"| {pair} | {job['variant']} | {job['job_s']:.1f} | " + " | ".join(cells) + " |")
        if ref:
            cells = [" / ".join(f"{v:.3g}" for v in ref[str(s)]) if str(s) in ref else "-" for s in sizes]
            lines.append(f"| {pair} | reference | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nst-quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder for quality.json, quality.md, contact_sheet.png (created)")
    parser.add_argument("--pair", dest="pairs", action="append", type=parse_pair, metavar="CONTENT:STYLE",
                        help="image paths or names in $NST_SHARED_DIR/images, repeatable "
                             f"(default: {', '.join(DEFAULT_PAIRS)})")
    parser.add_argument("--variant", dest="variants", action="append", type=parse_variant,
                        metavar="NAME[:OPTION=VALUE,...]",
                        help="request options of one column, repeatable (default: 'defaults', no option set); "
                             "e.g. 'v1:normalization=none,style_weight=1e-4,scales=1,pyramid_levels=1,precision=fp32'")
    parser.add_argument("--size", type=int, default=512, help="max_side_px of every job (default: %(default)s)")
    parser.add_argument("--eval-sizes", default=",".join(map(str, DEFAULT_EVAL_SIZES)),
                        help="longest sides the results are judged at, px (default: %(default)s)")
    parser.add_argument("--reference", default=None, metavar="JSON",
                        help='figures to compare with: {"CONTENT x STYLE": {"SIZE": [J_content, J_style]}}')
    parser.add_argument("--model", default=os.environ.get("NST_MODEL", "models/vgg19_nst.onnx"),
                        help="ONNX file: the judge's network, and the server's when --server is not given")
    parser.add_argument("--server", default=None, metavar="HOST:PORT", help="use this server instead of starting one")
    parser.add_argument("--variant-server", dest="variant_servers", action="append", default=[],
                        metavar="NAME=HOST:PORT",
                        help="run variant NAME on another server (e.g. an older release, to compare in one run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from nst_client import NSTClient
    from nst_proto.console import tolerate_console
    from nst_tools.demo import start_server, stop_server

    tolerate_console()      # a closed or full stdout/stderr does not stop the run

    parser = build_parser()
    args = parser.parse_args(argv)
    try:       # what argparse does not check itself: a usage error naming the option, not a traceback
        pairs = args.pairs or [parse_pair(text) for text in DEFAULT_PAIRS]
    except argparse.ArgumentTypeError as exc:
        parser.error(f"default --pair: {exc}; name pairs with --pair or set NST_SHARED_DIR")
    variants = args.variants or [("defaults", {})]
    try:
        eval_sizes = [int(size) for size in args.eval_sizes.split(",")]
    except ValueError:
        parser.error(f"argument --eval-sizes: sizes are integers separated by commas, got {args.eval_sizes!r}")
    try:
        reference = json.loads(Path(args.reference).read_text()) if args.reference else {}
    except (OSError, ValueError) as exc:
        parser.error(f"argument --reference: {exc}")
    if not isinstance(reference, dict):
        parser.error("argument --reference: not a JSON object")
    reference = {key: value for key, value in reference.items() if not key.startswith("_")}
    variant_servers = dict(item.split("=", 1) for item in args.variant_servers)
    unknown = set(variant_servers) - {name for name, _ in variants}
    if unknown:
        raise SystemExit(f"nst-quality: --variant-server names no variant: {', '.join(sorted(unknown))}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    models = StyleModels.load(args.model)
    process = None
    target = args.server
    if target is None:
        process, target = start_server(Path(args.model), ["--max-running-jobs", "1"])
    report = {"size_px": args.size, "eval_sizes": eval_sizes, "variants": [name for name, _ in variants],
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "avx512_bf16": _cpu_flag("avx512_bf16")}, "jobs": []}
    sheet_rows = []
    try:
        clients = {name: NSTClient(variant_servers.get(name, target)) for name, _ in variants}
        with contextlib.ExitStack() as stack:
            for client in clients.values():
                stack.enter_context(client)
            for content_path, style_path in pairs:
                content, style = Image.open(content_path).convert("RGB"), Image.open(style_path).convert("RGB")
                name = pair_name(content_path, style_path)
                cells = [("content", content), ("style", style)]
                for variant, options in variants:
                    print(f"{name}, {variant}: running", file=sys.stderr, flush=True)
                    started = time.perf_counter()
                    result = clients[variant].stylize(content_path, style_path, max_side_px=args.size,
                                                      **options)
                    job_s = time.perf_counter() - started
                    image = Image.open(io.BytesIO(result.image_png)).convert("RGB")
                    with atomic_path(out / f"{content_path.stem}_{style_path.stem}_{variant}.png") as temporary:
                        image.save(temporary, format="PNG")
                    judged = [judge(models, content, style, image, size) for size in eval_sizes]
                    report["jobs"].append({"pair": name, "variant": variant, "options": options, "job_s": job_s,
                                           "server": variant_servers.get(variant, target),
                                           "precision": result.precision,
                                           "server_elapsed_s": result.elapsed_ms / 1000.0,
                                           "iterations": result.iterations,
                                           "result_costs": {"content": result.content_cost,
                                                            "style": result.style_cost,
                                                            "total": result.total_cost},
                                           "judged": [asdict(j) for j in judged]})
                    cells.append((f"{variant}: {job_s:.0f} s", image))
                    print(f"{name}, {variant}: {job_s:.1f} s; " + "; ".join(
                        f"{j.size_px} px Jc {j.content:.3g} Js {j.style:.3g}" for j in judged),
                        file=sys.stderr, flush=True)
                sheet_rows.append((name, cells))
    finally:
        if process is not None:
            stop_server(process)
    atomic_write_text(out / "quality.json", json.dumps(report, indent=2))
    table = _markdown(report, reference)
    atomic_write_text(out / "quality.md", table)
    with atomic_path(out / "contact_sheet.png") as temporary:
        contact_sheet(sheet_rows).save(temporary, format="PNG")
    print(table)
    return 0


def _cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
