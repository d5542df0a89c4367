"""Console streams that a closed or full terminal, pipe or file cannot stop: :func:`tolerate_console`.

``nst-server … | head -1`` closes the server's stdout after one line; ``nst … > /dev/full`` fills it at the
first flush. Python raises ``BrokenPipeError`` (EPIPE) or ``OSError`` (ENOSPC, EIO) from the next ``print`` or
flush, and from the flush at exit (exit code 120), so a server stopped serving and a CLI that had written its
picture said it failed. Every console script (``[project.scripts]``) calls :func:`tolerate_console` first thing
in its ``main``: what it writes to stdout/stderr is then a report, never a reason to stop.

Needs only the standard library (:mod:`nst_proto`, and so the client, is importable without torch).
"""

from __future__ import annotations

import errno
import os
import sys

#: Errors of a write or flush that mean the stream is gone or full, not that the program did something wrong.
DROPPED_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO,
                            errno.EBADF})


class TolerantStream:
    """A text stream (``sys.stdout``/``sys.stderr``) whose ``write`` and ``flush`` drop what a closed or full
    stream refuses (:data:`DROPPED_ERRNOS`). At the first such error the file descriptor is pointed at
    ``os.devnull`` (``os.dup2``), as Python's documentation on SIGPIPE recommends, so that later writes and the
    interpreter's flush at exit succeed. Everything else is the wrapped stream's (``getattr`` passes through)."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.dropped = False          # True once a write or flush failed and the stream went to os.devnull

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def _drop(self, error: OSError) -> None:
        if error.errno not in DROPPED_ERRNOS:
            raise error
        if not self.dropped:
            self.dropped = True
            try:
                fd = self._stream.fileno()
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, fd)
                finally:
                    os.close(devnull)
            except (OSError, ValueError, AttributeError):
                return
        try:
            self._stream.flush()      # what the failed flush left in the buffer goes to os.devnull now
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            self._drop(error)
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            self._drop(error)


def tolerate_console() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` tolerant (:class:`TolerantStream`) and have them escape characters
    their encoding cannot hold (``errors="backslashreplace"``: a file name with undecodable bytes, printed under
    ``PYTHONIOENCODING=utf-8:strict``, shows ``\\udcff`` instead of raising UnicodeEncodeError). Call it before
    ``logging.basicConfig``, whose handler keeps the stream it finds. Idempotent; streams that are None (no
    console) are left alone."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, TolerantStream):
            continue
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (OSError, ValueError, TypeError):
                pass
        setattr(sys, name, TolerantStream(stream))
