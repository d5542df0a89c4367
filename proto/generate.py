"""Generate the Python stubs of proto/nst/v1/*.proto into client/nst_client/_proto (needs grpcio-tools).

    python proto/generate.py [OUTPUT_DIR]

protoc names modules after the .proto path (``nst.v1.style_transfer_pb2``); the imports inside the generated
files are rewritten to ``nst_client._proto.nst.v1`` so that the stubs live inside the client package and no
top-level ``nst`` package is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "client" / "nst_client" / "_proto"
PACKAGE = "nst_client._proto"


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
                        f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    written = []
    for path in sorted(out_dir.rglob("*_pb2*.py*")):
        if path.suffix not in (".py", ".pyi") or "__pycache__" in path.parts:
            continue
        text = path.read_text()
        path.write_text(text.replace("from nst.v1 import", f"from {PACKAGE}.nst.v1 import"))
        written.append(path)
    for folder in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        (folder / "__init__.py").touch()
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT):
        print(path)
