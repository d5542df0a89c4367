"""The committed stubs are what proto/generate.py makes from proto/ (the .proto is the source of truth)."""

import importlib.util

from conftest import REPO


def test_committed_stubs_match_the_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in generate.generate(tmp_path)}
    committed_root = REPO / "client" / "nst_client" / "_proto"
    for relative, text in fresh.items():
        assert (committed_root / relative).read_text() == text, f"{relative} is stale: run proto/generate.py"
