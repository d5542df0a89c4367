"""The committed stubs (proto/nst_proto/v1) are what proto/generate.py makes from proto/nst (the .proto is the
source of truth)."""

import importlib.util

from conftest import REPO


def test_committed_stubs_match_the_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in generate.generate(tmp_path)}
    assert sorted(map(str, fresh)) == ["v1/style_transfer_pb2.py", "v1/style_transfer_pb2.pyi",
                                       "v1/style_transfer_pb2_grpc.py"]
    committed_root = REPO / "proto" / "nst_proto"
    for relative, text in fresh.items():
        assert (committed_root / relative).read_text() == text, f"{relative} is stale: run proto/generate.py"
