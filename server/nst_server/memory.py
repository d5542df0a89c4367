"""How much memory the server's jobs may use together (the budget), and how much one job adds (its estimate):
what admission by memory (:class:`nst_server.jobs.Admission`) compares.

The budget (:func:`default_budget`, or ``--memory-budget``) is the memory this process may use, less a margin and
less what the process holds already once the model is loaded and warmed up:

- the memory the process may use is the smallest real limit of its cgroups (v2 ``memory.max``, v1
  ``memory.limit_in_bytes``, the process's own cgroup and its ancestors: a Kubernetes ``limits.memory``, ``docker
  run --memory``) and the machine's ``MemTotal`` (``/proc/meminfo``): a limit at or above ``MemTotal`` (cgroup v1
  writes "no limit" as 2^63 minus a page) is no limit;
- the margin, :data:`MARGIN_FRACTION` of that and at least :data:`MIN_MARGIN_BYTES`, is left for what no estimate
  counts: the allocator's fragmentation, gRPC's buffers, the requests' encoded images, the page cache a cgroup
  also charges, and estimates that come out low;
- the resident memory (``VmRSS`` of ``/proc/self/status``) after loading is the model, the ONNX session, the
  libraries and the warm-up's caches: every job shares it, none adds it again.

The estimate (:func:`job_peak_bytes`) is the peak a job adds over the idle server, from its output size, its
precision and its number of style images: a fixed part per job and a part proportional to the output's pixels.
Its constants are calibrated on measured peaks of the tiled engine (see :data:`BYTES_PER_OUTPUT_PIXEL`); they
are module constants so that a new calibration changes numbers, not code. The estimate is monotonic in the output's pixels, so "the largest side that fits"
(:func:`largest_side`) is well defined.

The output size comes from the engine's own resize rule (:func:`nst_server.images.resize_to_max_side`), applied to
the content's size from its header.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from nst_export.vgg import MIN_SIDE_PX
from nst_server.images import resize_to_max_side

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

#: Peak bytes a job adds over the idle server whatever its size, by the precision of the replica's passes: the
#: tiled replica pass's working set (one tile's activations and their gradients through VGG-19, autocast copies of
#: the weights) and the job's own overhead (its thread's allocator arenas, targets, the optimiser's scalars).
#: bf16 halves the activations; fp16 is counted as fp32 (its autocast keeps fp32 master copies and the
#: convolutions' workspaces are those of fp32 on a CPU). ``"auto"`` counts as fp32, the larger, unless the caller
#: resolved it for the device (:func:`nst_server.precision.default_precision`). Starting values, to be measured.
JOB_FIXED_BYTES: dict[str, int] = {
    "bf16": int(1.2 * GiB),
    "fp32": 2 * GiB,
    "fp16": 2 * GiB,
}

#: Peak bytes a job adds per pixel of its OUTPUT (height x width at ``max_side_px``), one style image: the image,
#: its gradient and the optimiser's state (L-BFGS pairs or Adam's moments), the content targets and the pyramid's
#: downsampled copies, the delivered image and its PNG. Calibrated on the tiled engine (2-core Xeon, bf16,
#: tubingen x starry_night, default settings, in-process, each job in its own process, 2026-12-03): a 512 x 384 job
#: peaked at 1.90 GiB, a 2048 x 1536 one at 2.90 GiB and a 4096 x 3072 one at 5.05 GiB, over 0.85-0.87 GiB after
#: loading: about 1.04, 2.04 and 4.19 GiB added. 350 bytes per pixel over the bf16 fixed part estimates 1.26, 2.23
#: and 5.30 GiB; the margin at 4096 px covers the L-BFGS history's last pairs (the default job's four iterations
#: there keep three of its five pairs: 0.6 GB more for a longer job, :func:`nst_server.optimizers.lbfgs_pairs`).
#: Was 700 (calibrated before the tiles' memory work: a 2048 x 1536 job then added 3.17 GiB).
BYTES_PER_OUTPUT_PIXEL = 350

#: Each style image beyond the first adds this fraction of the per-pixel part: the style images are resized to
#: the output's side times ``style_scale`` and their features computed per scale and pyramid level (the blended
#: Gram targets themselves are small and independent of the size).
EXTRA_STYLE_FRACTION = 0.25

#: The budget leaves this fraction of the memory the process may use unreserved, and at least
#: :data:`MIN_MARGIN_BYTES` (see the module's docstring).
MARGIN_FRACTION = 0.10
MIN_MARGIN_BYTES = 512 * MiB

#: The aspect ratio (width, height) of "a default job" in :func:`largest_side` and
#: ``GetModelInfo.largest_output_side_px``: a 4:3 landscape photograph.
DEFAULT_ASPECT = (4, 3)

#: Where cgroupfs is mounted, the file naming this process's cgroups, the machine's memory, this process's status.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
PROC_MEMINFO = Path("/proc/meminfo")
PROC_SELF_STATUS = Path("/proc/self/status")


class _Size:
    """Something with a Pillow image's ``size`` and ``resize``: runs :func:`resize_to_max_side`'s arithmetic
    without pixels (the content's header gives its size; the pixels are decoded only when the job runs)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def resize(self, size: tuple[int, int], *_args, **_kwargs) -> "_Size":
        return _Size(tuple(size))


def output_size(content_width: int, content_height: int, max_side_px: int) -> tuple[int, int]:
    """``(height, width)`` of the output for a content of ``content_width`` x ``content_height`` px at
    ``max_side_px``: the engine's own rule (:func:`nst_server.images.resize_to_max_side`: the longer side becomes
    ``max_side_px``, the shorter one is rounded, at least 1 px), applied to the size alone.

    The content's EXIF orientation may swap width and height; the number of pixels, which is all the estimate uses,
    is the same either way.
    """
    width, height = resize_to_max_side(_Size((int(content_width), int(content_height))), int(max_side_px)).size
    return height, width


def _precision(settings) -> str:
    precision = getattr(settings, "precision", "auto")
    return precision if precision in JOB_FIXED_BYTES else "fp32"        # "auto" (unresolved): the larger


def job_peak_bytes(height: int, width: int, settings, n_styles: int = 1) -> int:
    """The estimated peak memory one job adds over the idle server, bytes, for an OUTPUT of ``height`` x ``width``
    px::

        JOB_FIXED_BYTES[precision]
            + BYTES_PER_OUTPUT_PIXEL x height x width x (1 + EXTRA_STYLE_FRACTION x (n_styles - 1))

    Args:
        settings: the job's :class:`~nst_server.settings.StyleTransferSettings` (its ``precision``: ``"auto"``
            counts as fp32 unless resolved by the caller).
        n_styles: style images blended (``style_image`` and every ``styles`` entry); at least 1 counts.
    Returns:
        An integer, non-decreasing in ``height x width`` and in ``n_styles``.
    """
    pixels = max(0, int(height)) * max(0, int(width))
    per_pixel = BYTES_PER_OUTPUT_PIXEL * (1.0 + EXTRA_STYLE_FRACTION * (max(1, int(n_styles)) - 1))
    return JOB_FIXED_BYTES[_precision(settings)] + math.ceil(per_pixel * pixels)


def largest_side(budget_bytes: int | None, settings, limit_px: int, n_styles: int = 1,
                 aspect: tuple[int, int] = DEFAULT_ASPECT) -> int:
    """The largest ``max_side_px`` (exact, not rounded to a multiple) at most ``limit_px`` whose job fits
    ``budget_bytes`` alone: a content of ``aspect`` (width, height; default 4:3), ``settings``' precision and
    ``n_styles`` style images. ``budget_bytes`` None (no memory accounting): ``limit_px``. 0 when not even
    :data:`~nst_export.vgg.MIN_SIDE_PX` fits.
    """
    if budget_bytes is None:
        return int(limit_px)
    width, height = aspect

    def fits(side: int) -> bool:
        return job_peak_bytes(*output_size(width, height, side), settings, n_styles) <= budget_bytes

    low, high = MIN_SIDE_PX, int(limit_px)
    if high < low or not fits(low):
        return 0
    while low < high:                         # fits(low) holds; the estimate is monotonic in the side
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


# --- the budget --------------------------------------------------------------------------------------------------

#: A cgroup limit at or above this is "no limit" (cgroup v1 writes none as 2^63 minus a page; v2 writes "max").
_NO_LIMIT = 1 << 60


class MemoryFileError(ValueError):
    """A cgroup or /proc memory file that does not read as the kernel writes it (the message names the file)."""


def parse_cgroup_limit(text: str, name: str = "memory.max") -> int | None:
    """A cgroup memory limit file's bytes: v2 ``memory.max`` (``"max"`` or bytes), v1 ``memory.limit_in_bytes``
    (bytes; 2^63 minus a page for none). None: no limit.

    Raises:
        MemoryFileError: anything else.
    """
    value = text.strip()
    if value == "max":
        return None
    try:
        limit = int(value)
    except ValueError:
        raise MemoryFileError(f"{name}: expected 'max' or a number of bytes, got {value!r}") from None
    if limit < 0:                   # v1 writes -1 when written "no limit" on some kernels
        return None
    return None if limit >= _NO_LIMIT else limit


def _ancestry(mount: Path, cgroup_path: str) -> list[Path]:
    """``mount/a/b``, ``mount/a``, ``mount``: the cgroup and its ancestors that exist under ``mount`` (in a
    container with its own cgroup namespace the path is ``/`` and the mount is the container's own cgroup)."""
    parts = [part for part in cgroup_path.strip().split("/") if part]
    folders = [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return [folder for folder in folders if folder.is_dir()]


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> tuple[int, str] | None:
    """The smallest real memory limit of this process's cgroups, bytes, and the file it comes from; None when
    there is none (or cgroupfs cannot be read).

    Read: v2 ``memory.max`` in ``root`` (a cgroup namespace's own cgroup), in ``root/unified`` (hybrid) and along
    the process's v2 path; v1 ``memory.limit_in_bytes`` in ``root/memory`` and along the process's memory path.

    Args:
        root: where cgroupfs is mounted.
        proc_cgroup: the ``/proc/PID/cgroup`` file (``0::/path`` for v2, ``N:memory:/path`` for v1); missing: only
            the files at ``root`` count.
    Raises:
        MemoryFileError: a limit file that exists but is malformed.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    v2_paths, v1_paths = ["/"], ["/"]
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2_paths.append(path)
        elif "memory" in controllers.split(","):
            v1_paths.append(path)
    candidates: list[Path] = []
    for mount in (root, root / "unified"):
        for path in v2_paths:
            candidates += [folder / "memory.max" for folder in _ancestry(mount, path)]
    for path in v1_paths:
        candidates += [folder / "memory.limit_in_bytes" for folder in _ancestry(root / "memory", path)]
    found: list[tuple[int, str]] = []
    for file in dict.fromkeys(candidates):                     # each file once, in order
        if not file.is_file():
            continue
        try:
            text = file.read_text()
        except OSError:
            continue
        limit = parse_cgroup_limit(text, str(file))
        if limit is not None:
            found.append((limit, str(file)))
    return min(found) if found else None


def _status_kib(path: Path, key: str) -> int | None:
    """``key: N kB`` of a /proc file (``/proc/meminfo``, ``/proc/self/status``), in KiB; None when absent."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            fields = value.split()
            try:
                return int(fields[0])
            except (IndexError, ValueError):
                raise MemoryFileError(f"{path}: cannot read {key} from {line.strip()!r}") from None
    return None


def resident_bytes(status: Path = PROC_SELF_STATUS) -> int:
    """This process's resident memory now (``VmRSS`` of ``/proc/self/status``), bytes; 0 where it cannot be read."""
    kib = _status_kib(status, "VmRSS")
    return 0 if kib is None else kib * KiB


def format_bytes(count: int | float) -> str:
    """``count`` bytes in binary units for people: ``512 MiB``, ``1.2 GiB``, ``300 B``."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(count) >= size:
            value = count / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{int(count)} B"


def default_budget(rss_bytes: int | None = None, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP,
                   meminfo: Path = PROC_MEMINFO, status: Path = PROC_SELF_STATUS) -> tuple[int, str]:
    """The bytes the server's jobs may use together, and where the number comes from (one line, for the log and
    ``GetModelInfo.memory_budget_source``).

    ``min(cgroup memory limit, MemTotal) - max(MARGIN_FRACTION x that, MIN_MARGIN_BYTES) - resident``, at least 0
    (then every job is refused, naming the budget: set ``--memory-budget``). See the module's docstring for why.

    Args:
        rss_bytes: the process's resident memory once the model is loaded and warmed up; None: measured now
            (``VmRSS`` of ``status``).
        root, proc_cgroup: cgroupfs and ``/proc/self/cgroup`` (:func:`cgroup_memory_limit`).
        meminfo: ``/proc/meminfo`` (``MemTotal``).
    Raises:
        MemoryFileError: a malformed cgroup limit or ``/proc`` file; neither ``MemTotal`` nor a cgroup limit found.
    """
    mem_total_kib = _status_kib(meminfo, "MemTotal")
    cgroup = cgroup_memory_limit(root, proc_cgroup)
    choices = []
    if mem_total_kib is not None:
        choices.append((mem_total_kib * KiB, f"MemTotal {format_bytes(mem_total_kib * KiB)} ({meminfo})"))
    if cgroup is not None:
        limit, file = cgroup
        choices.append((limit, f"cgroup memory limit {format_bytes(limit)} ({file})"))
    if not choices:
        raise MemoryFileError(f"no memory size found: no MemTotal in {meminfo} and no cgroup memory limit under "
                              f"{root}; set --memory-budget")
    total, what = min(choices, key=lambda choice: choice[0])        # MemTotal wins a tie: no real limit then
    margin = max(math.ceil(MARGIN_FRACTION * total), MIN_MARGIN_BYTES)
    resident = resident_bytes(status) if rss_bytes is None else int(rss_bytes)
    budget = max(0, total - margin - resident)
    return budget, (f"{what} - margin {format_bytes(margin)} - resident {format_bytes(resident)} after loading "
                    f"= {format_bytes(budget)}")


# --- --memory-budget ---------------------------------------------------------------------------------------------

#: Units of ``--memory-budget`` (case-insensitive): binary (KiB, Ki, K …) and decimal (kB, MB, GB, TB).
_UNITS = {"": 1, "b": 1,
          "k": KiB, "ki": KiB, "kib": KiB, "m": MiB, "mi": MiB, "mib": MiB,
          "g": GiB, "gi": GiB, "gib": GiB, "t": TiB, "ti": TiB, "tib": TiB,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_AMOUNT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")

#: What ``--memory-budget`` says for "no memory accounting" and for "the default".
OFF_WORDS = ("0", "none", "off")
AUTO_WORDS = ("auto", "default")


def parse_bytes(text: str) -> int:
    """An amount of memory: a number with an optional unit, ``6GiB``, ``512MiB``, ``1.5G``, ``8GB``, ``1048576``
    (binary units KiB/Ki/K …, decimal kB/MB/GB/TB; case-insensitive).

    Raises:
        ValueError: anything else, naming the forms accepted.
    """
    match = _AMOUNT.fullmatch(text or "")
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"expected a number of bytes with an optional unit (6GiB, 512MiB, 1.5G, 8GB, 1048576), "
                         f"got {text!r}")
    return math.floor(float(match.group(1)) * _UNITS[unit])


def parse_budget_flag(text: str) -> int | None:
    """``--memory-budget``: bytes (:func:`parse_bytes`), 0 for ``0``/``none``/``off`` (no memory accounting), None
    for ``auto``/``default`` (:func:`default_budget`, measured once the model is loaded).

    Raises:
        ValueError: not an amount nor one of those words.
    """
    word = (text or "").strip().lower()
    if word in OFF_WORDS:
        return 0
    if word in AUTO_WORDS:
        return None
    return parse_bytes(text)
