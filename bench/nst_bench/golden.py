"""Golden jobs: a fixed set of small jobs covering every request control, run against a real ``nst-server``, and
their outcomes recorded (result PNG digest, every reported cost as the exact double, iterations, stop reason,
preview digests) together with the status, field and message of a set of refused requests.

A refactor that claims to change no result records the set before and compares after::

    python -m nst_bench.golden record before.json
    # ... the change ...
    python -m nst_bench.golden compare before.json

``compare`` exits 1 and lists every job whose outcome differs in any bit. The jobs are small (48-80 px, a few
iterations; about a minute on 2 CPU cores) and run one at a time (``--max-running-jobs 1``: no shared batches),
on the CPU execution provider with fp32 and bf16 replicas both exercised where the CPU runs bf16.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from nst_proto.v1 import style_transfer_pb2 as pb
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _images() -> dict[str, bytes]:
    """Deterministic inputs made here (no files needed): a content with structure, two "styles", an RGBA content."""
    y, x = np.mgrid[0:72, 0:96]
    content = np.stack([(x * 2.6) % 256, (y * 3.5) % 256, ((x + y) * 1.3) % 256], -1).astype(np.uint8)
    stripes = np.stack([((x // 6) % 2) * 230, ((y // 9) % 2) * 200, ((x + y) // 7 % 2) * 180], -1).astype(np.uint8)
    rng = np.random.default_rng(7)
    blobs = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    blobs = np.asarray(Image.fromarray(blobs).resize((80, 60), Image.Resampling.BICUBIC))
    alpha = ((x - 48) ** 2 + (y - 36) ** 2 < 30 ** 2).astype(np.uint8) * 255
    rgba = np.concatenate([content, alpha[..., None]], -1)
    return {"content": _png(Image.fromarray(content)), "stripes": _png(Image.fromarray(stripes)),
            "blobs": _png(Image.fromarray(blobs)), "rgba": _png(Image.fromarray(rgba, "RGBA")),
            "init": _png(Image.fromarray(255 - content))}


def _jobs(images: dict[str, bytes]) -> dict[str, dict]:
    """name -> StylizeRequest fields (besides content/style images): every control at a non-default value once."""
    base = dict(max_side_px=64, iterations=6)
    L = pb.LayerWeight
    return {
        "default": {},
        "single_scale": dict(scales=1),
        "seed_7": dict(seed=7),
        "weights": dict(content_weight=2.5, style_weight=40.0, tv_weight=0.01),
        "adam": dict(optimizer=pb.OPTIMIZER_ADAM, learning_rate=3.0),
        "lbfgs_history": dict(lbfgs_history=3, iterations=8),
        "noise_ratio": dict(noise_ratio=0.2),
        "init_content": dict(init=pb.INIT_CONTENT),
        "init_random": dict(init=pb.INIT_RANDOM),
        "init_image": dict(init=pb.INIT_IMAGE, init_image=images["init"]),
        "layers": dict(content_layers=[L(layer="relu3_1", weight=0.5), L(layer="relu4_2", weight=1.0)],
                       style_layers=[L(layer="relu1_1", weight=1.0), L(layer="relu3_1", weight=0.3)]),
        "avg_pool": dict(pooling=pb.POOLING_AVG),
        "luminance": dict(color_control=pb.COLOR_CONTROL_LUMINANCE),
        "match_colors": dict(color_control=pb.COLOR_CONTROL_MATCH_STYLE_COLORS),
        "scales_start": dict(scales=2, start_side_px=40, max_side_px=80),
        "fp32": dict(precision=pb.PRECISION_FP32),
        "bf16": dict(precision=pb.PRECISION_BF16),
        "norm_none": dict(normalization=pb.NORMALIZATION_NONE, style_weight=1e-3),
        "pyramid_1": dict(pyramid_levels=1),
        "pyramid_4": dict(pyramid_levels=4, max_side_px=80),
        "style_scale": dict(style_scale=1.5),
        "previews": dict(preview_every=2, preview_max_side_px=40, progress_every=2),
        "converge": dict(convergence_tolerance=0.5, iterations=30, scales=1),
        "preset_seed": dict(preset=pb.PRESET_SEED, iterations=6),
        "preset_classic": dict(preset=pb.PRESET_CLASSIC, iterations=6),
        "blend": dict(styles=[pb.StyleImage(image=images["blobs"], blend_weight=2.0)]),
        "blend_only": dict(style_image=b"", styles=[pb.StyleImage(image=images["stripes"], blend_weight=1.0),
                                                    pb.StyleImage(image=images["blobs"], blend_weight=3.0)]),
        "alpha": dict(content_image=images["rgba"], keep_content_alpha=True),
        "alpha_dropped": dict(content_image=images["rgba"]),
        "largest_weights": dict(normalization=pb.NORMALIZATION_NONE, content_weight=1e12, style_weight=1e12),
    } | {"_base": base}


def _refused(images: dict[str, bytes]) -> dict[str, dict]:
    """name -> request fields of a request the server must refuse."""
    L = pb.LayerWeight
    return {
        "max_side_px_big": dict(max_side_px=100000),
        "max_side_px_small": dict(max_side_px=8),
        "iterations_big": dict(iterations=10 ** 9),
        "weight_negative": dict(content_weight=-1.0),
        "weight_nan": dict(style_weight=float("nan")),
        "weight_huge": dict(tv_weight=1e30),
        "lr_zero": dict(learning_rate=0.0),
        "lr_big": dict(learning_rate=300.0),
        "noise_ratio_big": dict(noise_ratio=1.5),
        "tolerance_big": dict(convergence_tolerance=2.0),
        "style_scale_zero": dict(style_scale=0.0),
        "style_scale_big": dict(style_scale=1000.0),
        "style_scale_small": dict(style_scale=0.01),
        "layer_unknown": dict(style_layers=[L(layer="conv9_9", weight=1.0)]),
        "layer_twice": dict(content_layers=[L(layer="relu4_2", weight=1.0), L(layer="relu4_2", weight=2.0)]),
        "layer_weight_negative": dict(style_layers=[L(layer="relu1_1", weight=-1.0)]),
        "optimizer_unknown": dict(optimizer=99),
        "init_unknown": dict(init=42),
        "pooling_unknown": dict(pooling=7),
        "color_unknown": dict(color_control=9),
        "precision_unknown": dict(precision=11),
        "normalization_unknown": dict(normalization=5),
        "preset_unknown": dict(preset=8),
        "init_image_missing": dict(init=pb.INIT_IMAGE),
        "scales_zero": dict(scales=0),
        "scales_big": dict(scales=99),
        "pyramid_zero": dict(pyramid_levels=0),
        "pyramid_big": dict(pyramid_levels=40),
        "start_side_big": dict(start_side_px=500),
        "lbfgs_history_big": dict(lbfgs_history=1000),
        "blend_negative": dict(styles=[pb.StyleImage(image=images["blobs"], blend_weight=-1.0)]),
        "too_many_styles": dict(styles=[pb.StyleImage(image=images["blobs"], blend_weight=1.0)] * 20),
        "no_style": dict(style_image=b""),
        "bad_content": dict(content_image=b"not an image"),
        "bad_style": dict(style_image=b"\x89PNG\r\n\x1a\nbroken"),
        "bad_blend_image": dict(styles=[pb.StyleImage(image=b"junk", blend_weight=1.0)]),
        "bad_init": dict(init=pb.INIT_IMAGE, init_image=b"junk"),
        "narrow_content": dict(content_image=_png(Image.new("RGB", (400, 10), (9, 90, 200))), max_side_px=64),
    }


def _request(images: dict[str, bytes], fields: dict, base: dict) -> pb.StylizeRequest:
    values = {"content_image": images["content"], "style_image": images["stripes"], **base, **fields}
    return pb.StylizeRequest(**values)


def _outcome(stub, request: pb.StylizeRequest) -> dict:
    progress, result, chunks = [], None, []
    try:
        for message in stub.Stylize(request, timeout=600):
            kind = message.WhichOneof("event")
            if kind == "progress":
                p = message.progress
                progress.append([p.iteration, p.scale, p.width_px, p.height_px, repr(p.costs.content),
                                 repr(p.costs.style), repr(p.costs.total), repr(p.costs.total_variation),
                                 hashlib.sha256(p.preview_png).hexdigest()[:16] if p.preview_png else ""])
            elif kind == "image_chunk":
                chunks.append(message.image_chunk.data)
            elif kind == "result":
                result = message.result
    except grpc.RpcError as exc:
        return {"status": exc.code().name, "message": exc.details(), "field": _violation_field(exc)}
    png = result.image_png or b"".join(chunks)
    return {"png_sha256": hashlib.sha256(png).hexdigest(), "size": [result.width_px, result.height_px],
            "costs": [repr(result.costs.content), repr(result.costs.style), repr(result.costs.total),
                      repr(result.costs.total_variation)],
            "iterations": result.iterations, "best_iteration": result.best_iteration,
            "stop_reason": pb.StopReason.Name(result.stop_reason), "precision": result.precision,
            "progress": progress}


def _violation_field(exc: grpc.RpcError) -> str | None:
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2
    status = rpc_status.from_call(exc)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return ",".join(v.field for v in bad.field_violations)
    return None


def run_all(model: str) -> dict:
    """Start a server on 127.0.0.1:0, run every golden job and refused request; ``{name: outcome}``."""
    command = [sys.executable, "-m", "nst_server.cli", "--model", model, "--port", "0", "--max-running-jobs", "1",
               "--max-side-px", "1024", "--max-iterations", "1000", "--log-level", "WARNING"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        target = None
        for line in server.stdout:
            if "bound to" in line:
                target = line.split("bound to ", 1)[1].split(";", 1)[0]
            if "listening on" in line:
                break
        if target is None:
            raise SystemExit(f"nst-server exited with code {server.wait()}")
        images = _images()
        jobs = _jobs(images)
        base = jobs.pop("_base")
        outcomes = {}
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            stub = pb_grpc.StyleTransferStub(channel)
            for name, fields in jobs.items():
                outcomes[f"job/{name}"] = _outcome(stub, _request(images, fields, base))
                print(f"job/{name}: {outcomes[f'job/{name}'].get('stop_reason') or outcomes[f'job/{name}']}",
                      file=sys.stderr)
            for name, fields in _refused(images).items():
                outcomes[f"refused/{name}"] = _outcome(stub, _request(images, fields, base))
        return outcomes
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nst_bench.golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("path", help="the recorded outcomes (JSON)")
    parser.add_argument("--model", default=os.environ.get("NST_MODEL", "models/vgg19_nst.onnx"))
    args = parser.parse_args(argv)
    outcomes = run_all(args.model)
    if args.action == "record":
        Path(args.path).write_text(json.dumps(outcomes, indent=1, sort_keys=True))
        print(f"{len(outcomes)} outcomes recorded in {args.path}")
        return 0
    before = json.loads(Path(args.path).read_text())
    differ = sorted(name for name in before.keys() | outcomes.keys() if before.get(name) != outcomes.get(name))
    for name in differ:
        print(f"DIFFERS {name}:\n  before {json.dumps(before.get(name))[:600]}\n  after  "
              f"{json.dumps(outcomes.get(name))[:600]}")
    jobs = sum(1 for name in outcomes if name.startswith("job/"))
    print(f"{len(outcomes) - len(differ)} of {len(outcomes)} outcomes identical ({jobs} jobs, "
          f"{len(outcomes) - jobs} refused requests)")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
