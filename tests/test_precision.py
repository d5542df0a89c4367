"""precision auto: bf16 where the hardware runs it natively, fp32 elsewhere; the choice is reported."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from nst_server import engine, precision
from nst_server.events import JobInputs
from nst_server.settings import StyleTransferSettings


@pytest.fixture()
def fake_cpu(monkeypatch):
    """Fakes the CPU's /proc/cpuinfo flags (this machine's own are whatever it has)."""
    def fake(flags: set[str]) -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    return fake


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "fp32"),
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"avx2", "amx_tile", "amx_bf16"}, "bf16"),
    (set(), "fp32"),
])
def test_default_precision_follows_the_cpus_flags(fake_cpu, flags, expected):
    fake_cpu(flags)
    chosen, why = precision.default_precision("cpu")
    assert chosen == expected
    assert ("bf16" in why) and (("neither" in why) == (expected == "fp32"))


def test_cuda_needs_compute_capability_8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert precision.default_precision("cuda:0")[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    chosen, why = precision.default_precision("cuda:0")
    assert chosen == "bf16" and "9.0" in why


def test_cpu_flags_reads_proc_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    precision.cpu_flags.cache_clear()
    try:
        assert precision.cpu_flags() == {"fpu", "sse2", "avx2", "avx512_bf16"}
        monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
        precision.cpu_flags.cache_clear()
        assert precision.cpu_flags() == frozenset()
    finally:
        precision.cpu_flags.cache_clear()


@pytest.mark.parametrize("flags, expected", [({"avx2"}, "fp32"), ({"avx512_bf16"}, "bf16")])
def test_an_auto_job_runs_and_reports_the_chosen_precision(models, small_images, fake_cpu, flags, expected):
    fake_cpu(flags)
    content, style = (Image.open(io.BytesIO(b)).convert("RGB") for b in small_images)
    result = list(engine.stylize(models, JobInputs(content=content, styles=[(style, 1.0)]),
                                 StyleTransferSettings(max_side_px=32, iterations=2)))[-1]
    assert result.precision == expected
    explicit = list(engine.stylize(models, JobInputs(content=content, styles=[(style, 1.0)]),
                                   StyleTransferSettings(max_side_px=32, iterations=2, precision="fp32")))
    assert explicit[-1].precision == "fp32"


def test_the_server_reports_the_precision_of_each_job(client, small_images):
    default = client.stylize(*small_images, max_side_px=32, iterations=2)
    assert default.precision == client.model_info().precision == precision.default_precision("cpu")[0]
    assert client.stylize(*small_images, max_side_px=32, iterations=2, precision="fp32").precision == "fp32"
