"""The compute precision a job gets when it asks for ``auto``: bf16 where the replica's device runs bf16
matrix products natively, fp32 elsewhere.

Native bf16 means: on a CPU, the ``avx512_bf16`` or ``amx_bf16`` instruction set as the kernel reports it
(``/proc/cpuinfo`` flags; oneDNN uses them for bf16 convolutions and matrix products, and emulates bf16 at a
small fraction of fp32's speed without them: 0.025x measured on an AVX2-only EPYC); on a CUDA GPU, compute
capability 8.0 (Ampere) or later. Sources: Intel's and AMD's ISA references for the flags, the Linux
kernel's ``arch/x86/include/asm/cpufeatures.h`` for their names, NVIDIA's CUDA C programming guide (bf16
Tensor Core support by compute capability), oneDNN's "Data types" page.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

#: CPU flags (as ``/proc/cpuinfo`` names them) of native bf16 arithmetic, in order of preference.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read, e.g. off Linux)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, and why, in words (for logs and ``GetModelInfo``)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = major >= 8
        return native, (f"CUDA compute capability {major}.{minor} "
                        f"({'>=' if native else '<'} 8.0: bf16 Tensor Cores {'present' if native else 'absent'})")
    if device.type == "cpu":
        found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
        if found:
            return True, f"CPU reports {', '.join(found)}"
        return False, "CPU reports neither avx512_bf16 nor amx_bf16 (bf16 would be emulated)"
    return False, f"no native bf16 known for device type {device.type!r}"


def default_precision(device: torch.device | str) -> tuple[str, str]:
    """``(precision, reason)`` of a job that asks for ``auto`` on ``device``: ``"bf16"`` where
    :func:`native_bf16` holds, ``"fp32"`` otherwise."""
    native, why = native_bf16(device)
    return ("bf16" if native else "fp32"), why
