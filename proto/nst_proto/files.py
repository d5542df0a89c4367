"""Files written whole or not at all: every file the product writes goes through here.

The data goes to a temporary file in the target's own folder (``.NAME.XXXXXXXX.tmpSUFFIX``: hidden, and the same
suffix, so a library that infers the format from the name still does), is flushed and ``os.fsync``-ed, gets
the permission bits of the file it replaces (or, for a new file, ``0o666`` less the umask, as ``open`` would
give), and is renamed over the target with ``os.replace``. A reader sees the old file or the new one, never
part of one. On any failure (an ``OSError`` such as ``ENOSPC``/``EFBIG`` part way, an exception of the
writing library, ``KeyboardInterrupt``) the temporary file is removed, the old file is left as it was and the
exception propagates.

A symbolic link at the target is followed: the file it points to is replaced, the link stays.

Standard library only: :mod:`nst_proto` (and so the client) must import without torch or numpy.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where it is there (setting it to read it back, the
    fallback, is process-wide and briefly wrong for other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target(path: str | os.PathLike) -> Path:
    """``path``, or the file a symbolic link there points to."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows (best effort: not every file system opens folders)."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def _replacing(path: str | os.PathLike, synced: bool) -> Iterator[Path]:
    target = _target(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    handle, name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, mode)
        if not synced:
            handle = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _fsync_folder(folder)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder for a library that writes a file itself (``PIL.Image.save``,
    ``savefig``, ``onnx.save``); when the ``with`` block ends normally the file there is fsync-ed and renamed
    over ``path``. The temporary name keeps ``path``'s suffix.

    Raises:
        OSError: the folder is missing or not writable, or the fsync or the rename fail (the temporary file is
            then removed and ``path`` left as it was). Whatever the block raises is re-raised after the same
            clean-up.
    """
    with _replacing(path, synced=False) as temporary:
        yield temporary


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` for writing (``mode`` ``"w"`` or ``"wb"``) whose file replaces ``path``
    only once the ``with`` block has ended normally and the data is flushed and fsync-ed.

    Raises:
        ValueError: another ``mode``.
        OSError: as :func:`atomic_path`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', not {mode!r}")
    with _replacing(path, synced=True) as temporary:
        with open(temporary, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``Path(path).write_bytes(data)``, atomically (see the module). Returns ``Path(path)``.

    Raises:
        OSError: nothing was written (``path``, if it existed, is unchanged and no temporary file is left).
    """
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", newline: str | None = None
                      ) -> Path:
    """``Path(path).write_text(text, encoding)``, atomically (see the module). Returns ``Path(path)``.

    Raises:
        OSError: as :func:`atomic_write_bytes`. UnicodeEncodeError: ``text`` does not fit ``encoding`` (nothing
            written).
    """
    with atomic_open(path, "w", encoding=encoding, newline=newline) as handle:
        handle.write(text)
    return Path(path)
