"""The durable state of the job API: jobs, their events and their result PNGs under one folder (``--state-dir``).

Layout of the folder::

    jobs.sqlite3 (+ -wal, -shm)   the jobs and their events (SQLite from the standard library, WAL mode); a job's
                                  request (its images) until it finishes, then only its sha256
    results/JOB_ID.png            each SUCCEEDED job's result (written to a temporary name, then renamed)
    checkpoints/JOB_ID.N.npz      the last checkpoint of an unfinished job, after iteration N (written to a
                                  temporary name, fsynced, renamed; named by the job's row in ``checkpoints``,
                                  which is changed after the rename; the previous file removed after that)

Every change is one SQLite transaction, so a process killed at any moment (SIGKILL, power loss with
``synchronous=NORMAL``: at most the last transactions are lost) leaves the database as it was before or after a
change, never in between; a result file is renamed into place before the transaction that marks its job
SUCCEEDED commits, so a SUCCEEDED job always has its file. A result file without a SUCCEEDED job (killed in
between) is removed at the next start (:meth:`JobStore.remove_orphan_files`). A checkpoint file is renamed into
place before the transaction that names it commits, and the file it replaces is removed only after that, so the
row always names a whole file: the new one, or (killed in between) the previous one.

Threads: one connection shared by the event loop and the worker threads, every use under one lock (the
statements are short: a row or a page of rows). Sources: SQLite's "Write-Ahead Logging" and "Atomic Commit"
documents; Cog's prediction lifecycle for the shape of a job (docs/http.md).
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from nst_server.events import Checkpoint

#: ``jobs.state`` values (the names of ``nst.v1.JobState`` without the prefix).
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)

DATABASE_NAME = "jobs.sqlite3"
RESULTS_DIR = "results"
CHECKPOINTS_DIR = "checkpoints"
#: Version of the checkpoint files' layout (:func:`write_checkpoint_file`); a file of another version is not used.
CHECKPOINT_FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- submission order
    job_id TEXT NOT NULL UNIQUE,
    request_id TEXT UNIQUE,                     -- NULL when the caller gave none
    request_sha256 TEXT NOT NULL,
    request BLOB NOT NULL,                      -- the serialized nst.v1.StylizeRequest (emptied once finished)
    state TEXT NOT NULL,
    max_iterations INTEGER NOT NULL DEFAULT 0,
    iterations INTEGER NOT NULL DEFAULT 0,
    scale INTEGER NOT NULL DEFAULT 0,
    scales INTEGER NOT NULL DEFAULT 0,
    costs BLOB,                                 -- the serialized nst.v1.Costs of the last Progress or the Result
    submitted_s REAL NOT NULL,
    started_s REAL NOT NULL DEFAULT 0,
    finished_s REAL NOT NULL DEFAULT 0,
    error_code INTEGER NOT NULL DEFAULT 0,
    error_message TEXT NOT NULL DEFAULT '',
    result_width_px INTEGER NOT NULL DEFAULT 0,
    result_height_px INTEGER NOT NULL DEFAULT 0,
    result_bytes INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    number INTEGER NOT NULL,                    -- 1, 2, 3 … per job
    message BLOB NOT NULL,                      -- the serialized nst.v1.JobEvent, without its number
    file_offset INTEGER NOT NULL DEFAULT -1,    -- >= 0: bytes of the job's result file go into the message
    file_length INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, number)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (        -- the last checkpoint of an unfinished job (one at most)
    job_id TEXT PRIMARY KEY REFERENCES jobs (job_id) ON DELETE CASCADE,
    file TEXT NOT NULL,                         -- its file's name under checkpoints/
    file_bytes INTEGER NOT NULL,
    scale INTEGER NOT NULL,                     -- 1-based scale of the schedule
    iteration INTEGER NOT NULL,                 -- iterations done, all scales
    written_s REAL NOT NULL                     -- Unix seconds
) WITHOUT ROWID;
"""

#: Columns of a :class:`JobRow`, in order.
_COLUMNS = ("seq", "job_id", "request_id", "request_sha256", "state", "max_iterations", "iterations", "scale",
            "scales", "costs", "submitted_s", "started_s", "finished_s", "error_code", "error_message",
            "result_width_px", "result_height_px", "result_bytes", "runs")


@dataclass(frozen=True)
class JobRow:
    """One job as stored (without its request bytes: :meth:`JobStore.request`). Times are Unix seconds (0: not
    yet); ``costs`` is a serialized ``nst.v1.Costs`` (None: none yet); ``error_code`` a numeric gRPC status."""

    seq: int
    job_id: str
    request_id: str | None
    request_sha256: str
    state: str
    max_iterations: int
    iterations: int
    scale: int
    scales: int
    costs: bytes | None
    submitted_s: float
    started_s: float
    finished_s: float
    error_code: int
    error_message: str
    result_width_px: int
    result_height_px: int
    result_bytes: int
    runs: int


@dataclass(frozen=True)
class CheckpointRow:
    """The stored checkpoint of a job: its file under ``checkpoints/``, the file's size (bytes), the scale and the
    iterations done when it was taken, when it was written (Unix seconds)."""

    job_id: str
    file: str
    file_bytes: int
    scale: int
    iteration: int
    written_s: float


@dataclass(frozen=True)
class StoredEvent:
    """One stored event: its number, the serialized ``nst.v1.JobEvent`` (number unset) and, when
    ``file_length`` > 0, the slice ``[file_offset, file_offset + file_length)`` of the job's result file that
    belongs in it (``ImageChunk.data`` or ``Result.image_png``; the PNG is stored once, as a file)."""

    number: int
    message: bytes
    file_offset: int
    file_length: int


class JobStore:
    """The jobs of one server process in ``state_dir`` (created if need be).

    Args:
        state_dir: the folder (``--state-dir``).
    Raises:
        OSError: the folder cannot be created or written. sqlite3.DatabaseError: ``jobs.sqlite3`` there is not a
            database.
    """

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.state_dir = Path(state_dir)
        self.results_dir = self.state_dir / RESULTS_DIR
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints_dir = self.state_dir / CHECKPOINTS_DIR
        self.checkpoints_dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.state_dir / DATABASE_NAME, check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect in a new database: freed pages can
        self._db.execute("PRAGMA journal_mode=WAL")          # go back to the file system after an expiry
        self._db.execute("PRAGMA journal_size_limit=8388608")  # the WAL is cut back to 8 MiB after checkpoints
        self._db.execute("PRAGMA synchronous=NORMAL")     # WAL + NORMAL: durable across a killed process
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    # -- plumbing -------------------------------------------------------------------------------------------------

    class _Tx:
        def __init__(self, store: "JobStore") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, kind, exc, tb) -> None:
            try:
                self.store._db.execute("COMMIT" if kind is None else "ROLLBACK")
            finally:
                self.store._lock.release()

    def _transaction(self) -> "JobStore._Tx":
        """``with store._transaction() as db:`` one write transaction (rolled back on an exception)."""
        return JobStore._Tx(self)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close (idempotent)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
            except sqlite3.ProgrammingError:             # closed already
                pass

    def result_path(self, job_id: str) -> Path:
        return self.results_dir / f"{job_id}.png"

    # -- jobs -----------------------------------------------------------------------------------------------------

    def insert(self, job_id: str, request_id: str | None, request: bytes, request_sha256: str,
               max_iterations: int, first_event: bytes, now_s: float | None = None) -> tuple[JobRow, bool]:
        """Store a new QUEUED job with its ``first_event`` (number 1); with a ``request_id`` that names a job
        already, that job instead (nothing stored).

        Returns:
            ``(the job, True)`` when it was created, ``(the existing job, False)`` for a known ``request_id`` (the
            UNIQUE constraint decides under concurrent submissions, not a read before the write).
        Raises:
            sqlite3.OperationalError: the disk is full (``database or disk is full``) or the database is locked.
        """
        now_s = time.time() if now_s is None else now_s
        with self._transaction() as db:
            try:
                db.execute("INSERT INTO jobs (job_id, request_id, request_sha256, request, state, max_iterations, "
                           "submitted_s) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (job_id, request_id, request_sha256, request, QUEUED, max_iterations, now_s))
                self._append(db, job_id, first_event)
                created = True
            except sqlite3.IntegrityError:
                if request_id is None:
                    raise
                created = False
            where, key = ("job_id", job_id) if created else ("request_id", request_id)
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE {where} = ?", (key,)).fetchone()
        return JobRow(*row), created

    def get(self, job_id: str) -> JobRow | None:
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,))
        return JobRow(*rows[0]) if rows else None

    def by_request_id(self, request_id: str) -> JobRow | None:
        """The job submitted with ``request_id``, or None."""
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE request_id = ?", (request_id,))
        return JobRow(*rows[0]) if rows else None

    def request(self, job_id: str) -> bytes:
        """The job's serialized ``StylizeRequest`` (b"" once the job finished: its images are not kept, only its
        sha256 for ``request_id`` checks). Raises KeyError for an unknown job."""
        rows = self._query("SELECT request FROM jobs WHERE job_id = ?", (job_id,))
        if not rows:
            raise KeyError(job_id)
        return rows[0][0]

    def page(self, after_seq: int, limit: int, state: str | None = None) -> list[JobRow]:
        """Up to ``limit`` jobs submitted after ``after_seq`` (submission order), only those in ``state`` if given."""
        where, args = "seq > ?", [after_seq]
        if state is not None:
            where, args = where + " AND state = ?", [*args, state]
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE {where} ORDER BY seq LIMIT ?",
                           (*args, limit))
        return [JobRow(*row) for row in rows]

    def unfinished(self) -> list[JobRow]:
        """QUEUED and RUNNING jobs, submission order (what a restart runs again)."""
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE state IN (?, ?) ORDER BY seq",
                           (QUEUED, RUNNING))
        return [JobRow(*row) for row in rows]

    def set_running(self, job_id: str, now_s: float | None = None, iterations: int = 0, scale: int = 0) -> None:
        """A worker started the job: RUNNING, ``started_s``, one more run; progress set back to ``iterations`` done
        at ``scale`` (a resumed checkpoint's; 0: from the start)."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state = ?, started_s = ?, runs = runs + 1, iterations = ?, scale = ? "
                       "WHERE job_id = ?", (RUNNING, time.time() if now_s is None else now_s, iterations, scale,
                                            job_id))

    def set_queued(self, job_id: str) -> None:
        """Back in line (stopped by a shutdown, or found RUNNING at start)."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state = ? WHERE job_id = ? AND state IN (?, ?)",
                       (QUEUED, job_id, QUEUED, RUNNING))

    def finish(self, job_id: str, state: str, error_code: int = 0, error_message: str = "",
               event: bytes | None = None, now_s: float | None = None) -> int:
        """End the job in ``state`` (FAILED or CANCELLED; SUCCEEDED: :meth:`succeed`) with its last ``event``;
        a job finished already is left alone. Returns the event's number (0: none stored)."""
        with self._transaction() as db:
            current = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if current is None or current[0] in FINISHED:
                return 0
            db.execute("UPDATE jobs SET state = ?, finished_s = ?, error_code = ?, error_message = ?, request = x'' "
                       "WHERE job_id = ?", (state, time.time() if now_s is None else now_s, error_code,
                                            error_message, job_id))
            old = self._forget_checkpoint(db, job_id)
            number = self._append(db, job_id, event) if event is not None else 0
        self._remove_checkpoint_file(old)
        return number

    def succeed(self, job_id: str, png: bytes, width_px: int, height_px: int, costs: bytes,
                events: list[tuple[bytes, int, int]], now_s: float | None = None) -> int:
        """Store the result: the PNG as ``results/JOB_ID.png`` (written to a temporary name, fsynced, renamed),
        then in one transaction the job SUCCEEDED and its last ``events`` (message, file offset, file length).
        Returns the last event's number.

        Raises:
            OSError: the file cannot be written (a full disk): the job is left as it was.
        """
        path = self.result_path(job_id)
        partial = path.with_suffix(".png.partial")
        with open(partial, "wb") as file:
            file.write(png)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state = ?, finished_s = ?, result_width_px = ?, result_height_px = ?, "
                       "result_bytes = ?, costs = ?, request = x'' WHERE job_id = ?",
                       (SUCCEEDED, time.time() if now_s is None else now_s, width_px, height_px, len(png), costs,
                        job_id))
            old = self._forget_checkpoint(db, job_id)
            number = 0
            for message, offset, length in events:
                number = self._append(db, job_id, message, offset, length)
        self._remove_checkpoint_file(old)
        return number

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def write_checkpoint(self, job_id: str, checkpoint: Checkpoint, now_s: float | None = None) -> int:
        """Store ``checkpoint`` as the job's last one, replacing the one before: its file written to a temporary
        name, fsynced, renamed to ``checkpoints/JOB_ID.N.npz`` (N: its iteration) and the folder fsynced; then the
        job's ``checkpoints`` row pointed at it (one transaction); then the previous file removed. A job that has
        finished (or is unknown) keeps none: the file is removed again. Returns the file's size, bytes.

        Raises:
            OSError: the file cannot be written (a full disk): the previous checkpoint stays as it was.
        """
        name = f"{job_id}.{checkpoint.iteration}.npz"
        path = self.checkpoints_dir / name
        partial = path.with_name(name + ".partial")
        try:
            with open(partial, "wb") as file:
                write_checkpoint_file(file, checkpoint)
                size = file.tell()
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_folder(self.checkpoints_dir)
        with self._transaction() as db:
            state = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            old = None
            if state is not None and state[0] not in FINISHED:
                old = db.execute("SELECT file FROM checkpoints WHERE job_id = ?", (job_id,)).fetchone()
                db.execute("INSERT OR REPLACE INTO checkpoints (job_id, file, file_bytes, scale, iteration, written_s) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (job_id, name, size, checkpoint.scale,
                                                         checkpoint.iteration, time.time() if now_s is None else now_s))
        if state is None or state[0] in FINISHED:
            path.unlink(missing_ok=True)
        elif old is not None and old[0] != name:
            self._remove_checkpoint_file(old[0])
        return size

    def checkpoint_row(self, job_id: str) -> CheckpointRow | None:
        """The job's stored checkpoint (without its pixels), or None."""
        rows = self._query("SELECT job_id, file, file_bytes, scale, iteration, written_s FROM checkpoints "
                           "WHERE job_id = ?", (job_id,))
        return CheckpointRow(*rows[0]) if rows else None

    def checkpoint(self, job_id: str) -> Checkpoint | None:
        """The job's last checkpoint, read from its file; None when it has none.

        Raises:
            OSError: the file named by its row is missing or unreadable. ValueError: the file is not a checkpoint
                of this format (:func:`read_checkpoint_file`).
        """
        row = self.checkpoint_row(job_id)
        if row is None:
            return None
        with open(self.checkpoints_dir / row.file, "rb") as file:
            return read_checkpoint_file(file)

    def drop_checkpoint(self, job_id: str) -> None:
        """Forget the job's checkpoint (row and file), if it has one."""
        with self._transaction() as db:
            old = self._forget_checkpoint(db, job_id)
        self._remove_checkpoint_file(old)

    @staticmethod
    def _forget_checkpoint(db: sqlite3.Connection, job_id: str) -> str | None:
        """In a transaction: delete the job's checkpoint row; returns its file's name (to remove after the commit)."""
        row = db.execute("SELECT file FROM checkpoints WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        db.execute("DELETE FROM checkpoints WHERE job_id = ?", (job_id,))
        return row[0]

    def _remove_checkpoint_file(self, name: str | None) -> None:
        if name:
            (self.checkpoints_dir / name).unlink(missing_ok=True)

    def checkpoint_count(self) -> int:
        """Checkpoints stored (one per unfinished job at most)."""
        (row,) = self._query("SELECT COUNT(*) FROM checkpoints")
        return row[0]

    def progress(self, job_id: str, iterations: int, scale: int, scales: int, costs: bytes | None,
                 event: bytes | None) -> int:
        """Record a Progress (the job's iterations, scale and costs now) with its event; returns its number."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET iterations = ?, scale = ?, scales = ?, costs = ? WHERE job_id = ?",
                       (iterations, scale, scales, costs, job_id))
            return self._append(db, job_id, event) if event is not None else 0

    def append(self, job_id: str, message: bytes) -> int:
        """Store one event of the job; returns its number (1, 2, 3 …)."""
        with self._transaction() as db:
            return self._append(db, job_id, message)

    @staticmethod
    def _append(db: sqlite3.Connection, job_id: str, message: bytes, offset: int = -1, length: int = 0) -> int:
        (last,) = db.execute("SELECT COALESCE(MAX(number), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()
        db.execute("INSERT INTO events (job_id, number, message, file_offset, file_length) VALUES (?, ?, ?, ?, ?)",
                   (job_id, last + 1, message, offset, length))
        return last + 1

    def events(self, job_id: str, after: int, limit: int = 256) -> list[StoredEvent]:
        """Up to ``limit`` events of the job numbered after ``after``, in order."""
        rows = self._query("SELECT number, message, file_offset, file_length FROM events WHERE job_id = ? AND "
                           "number > ? ORDER BY number LIMIT ?", (job_id, after, limit))
        return [StoredEvent(*row) for row in rows]

    def last_event(self, job_id: str) -> int:
        (row,) = self._query("SELECT COALESCE(MAX(number), 0) FROM events WHERE job_id = ?", (job_id,))
        return row[0]

    def read_result(self, job_id: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of the job's result file. Raises OSError when it is missing (expired)."""
        with open(self.result_path(job_id), "rb") as file:
            file.seek(offset)
            return file.read() if length is None else file.read(length)

    # -- expiry and size ------------------------------------------------------------------------------------------

    def expire(self, ttl_s: float, now_s: float | None = None) -> list[str]:
        """Remove the jobs that finished more than ``ttl_s`` ago: rows and events (one transaction), then their
        result files; then give the database's free pages back to the file system and checkpoint the WAL into the
        database file (both count in the folder's size, :meth:`size_bytes`). Returns their ids."""
        cutoff = (time.time() if now_s is None else now_s) - ttl_s
        with self._transaction() as db:
            ids = [row[0] for row in db.execute(
                "SELECT job_id FROM jobs WHERE state IN (?, ?, ?) AND finished_s <= ?", (*FINISHED, cutoff))]
            for job_id in ids:
                db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM checkpoints WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        for job_id in ids:
            self.result_path(job_id).unlink(missing_ok=True)
        with self._lock:            # pages freed by expired jobs and by finished jobs' requests, back to the disk
            self._db.executescript("PRAGMA incremental_vacuum;")     # sqlite3_exec: every step, every page
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()    # and the WAL into the file
        return ids

    def remove_orphan_files(self) -> int:
        """Remove result files (and partial writes) of no SUCCEEDED job, and checkpoint files no ``checkpoints`` row
        names (partial writes, files replaced or dropped when the process was killed); returns how many."""
        kept = {row[0] for row in self._query("SELECT job_id FROM jobs WHERE state = ?", (SUCCEEDED,))}
        removed = 0
        for path in self.results_dir.iterdir():
            if path.name.split(".", 1)[0] not in kept or not path.name.endswith(".png"):
                path.unlink(missing_ok=True)
                removed += 1
        named = {row[0] for row in self._query("SELECT file FROM checkpoints")}
        for path in self.checkpoints_dir.iterdir():
            if path.name not in named:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def size_bytes(self) -> int:
        """Bytes the folder holds now: the database, its WAL and the result files."""
        return sum(entry.stat().st_size for entry in _files(self.state_dir))

    def count_by_state(self) -> dict[str, int]:
        counts = {state: 0 for state in (QUEUED, RUNNING, *FINISHED)}
        for state, count in self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[state] = count
        return counts


def write_checkpoint_file(file: BinaryIO, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``file`` as an uncompressed NumPy ``.npz`` (no pickled objects): its arrays as they
    are (float32 pixels compress little), its numbers in a float64 ``meta`` array, its costs in ``history``. Written
    straight to the file, so that no second copy of the image is held in memory."""
    arrays = {"meta": np.array([CHECKPOINT_FORMAT, checkpoint.scale, checkpoint.scales, checkpoint.iteration,
                                checkpoint.best_total, checkpoint.best_iteration, checkpoint.elapsed_ms], np.float64),
              "history": np.array(checkpoint.history, np.float64),
              "pixels": np.ascontiguousarray(checkpoint.pixels, np.float32)}
    if checkpoint.best_pixels is not None:
        arrays["best_pixels"] = np.ascontiguousarray(checkpoint.best_pixels, np.float32)
    np.savez(file, **arrays)


def read_checkpoint_file(file: BinaryIO) -> Checkpoint:
    """The :class:`Checkpoint` that :func:`write_checkpoint_file` wrote to ``file``. Raises ValueError for anything
    else (another format version, a truncated or foreign file)."""
    try:
        with np.load(file, allow_pickle=False) as arrays:
            meta = arrays["meta"]
            if meta.shape != (7,) or int(meta[0]) != CHECKPOINT_FORMAT:
                raise ValueError(f"not a checkpoint of format {CHECKPOINT_FORMAT}")
            best = arrays["best_pixels"] if "best_pixels" in arrays.files else None
            return Checkpoint(scale=int(meta[1]), scales=int(meta[2]), iteration=int(meta[3]),
                              pixels=arrays["pixels"].astype(np.float32, copy=False),
                              history=tuple(float(v) for v in arrays["history"]), best_pixels=best,
                              best_total=float(meta[4]) if math.isfinite(meta[4]) else math.inf,
                              best_iteration=int(meta[5]), elapsed_ms=float(meta[6]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:     # truncated, foreign
        raise ValueError(f"not a checkpoint file ({exc})") from None


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: fsync the directory); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _files(folder: Path) -> Iterator[os.DirEntry]:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _files(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                yield entry
        except FileNotFoundError:                           # removed meanwhile (expiry, a partial write)
            continue
