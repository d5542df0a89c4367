"""Generate the Python stubs of proto/nst/v1/*.proto into proto/nst_proto/v1 (needs grpcio-tools).

    python proto/generate.py [OUTPUT_DIR (default proto/nst_proto)]

protoc names modules after the .proto path (``nst.v1.style_transfer_pb2``); the files of ``nst/v1/`` are
written to ``OUTPUT_DIR/v1/`` and the imports inside them rewritten to ``nst_proto.v1``, so that the stubs
live in the neutral package :mod:`nst_proto` (``from nst_proto.v1 import style_transfer_pb2``) and no
top-level ``nst`` package is installed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT / "nst_proto"
PACKAGE = "nst_proto"
#: The .proto package's folder (protoc's module path) and where its stubs go under OUTPUT_DIR.
PROTO_PACKAGE, STUB_PACKAGE = "nst.v1", "v1"


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    target = out_dir / STUB_PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={scratch}",
                            f"--pyi_out={scratch}", f"--grpc_python_out={scratch}", *protos])
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        generated = Path(scratch, *PROTO_PACKAGE.split("."))
        for path in sorted(generated.glob("*_pb2*.py*")):
            if path.suffix not in (".py", ".pyi"):
                continue
            text = path.read_text().replace(f"from {PROTO_PACKAGE} import", f"from {PACKAGE}.{STUB_PACKAGE} import")
            (target / path.name).write_text(text)
            written.append(target / path.name)
    for folder in (out_dir, target):
        (folder / "__init__.py").touch()
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(path)
