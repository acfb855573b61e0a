"""Where results go: the results ledger (``--out``), the ``--failed`` file, the per-second
series, whole documents (``--stats``, ``--html``), and the lock that keeps one run per ledger.

Each ledger line is written whole (one ``os.write`` of whole lines, O_APPEND) and handed to
the kernel as its record completes: the results that complete in one event-loop turn are
joined and written once, at the end of that turn (``loop.call_soon``), not on a timer. A
kill -9 therefore loses at most the lines of the requests then in flight, and a torn last
line can only come from a crash inside that one write (``--resume`` ignores it). A write
that fails fails the future of every line it held, so no worker goes on as if its line
were safe.

Where an output goes (``locate``): ``-`` is stdout; a path is followed through symlinks; a
regular file (or none yet) is written at its real path, a document through a temporary
file beside it and a rename, so it is whole or absent; anything else (``/dev/stdout``, a
FIFO, a device) is written in place, never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from bulksend.errors import LedgerError, SinkError
from bulksend.record import Invalid, Item
from bulksend.result import Result

#: The path that means stdout.
STDOUT = "-"
_STDOUT_FD = 1

#: Which of fd 0-2 were closed when the process started (``reopen_closed_std``).
_closed_at_start: set[int] = set()


def reopen_closed_std() -> None:
    """Point each of fd 0-2 that is closed (``>&-``, ``2>&-``, ``<&-``, as cron and daemons
    may start a process) at /dev/null, first thing. Otherwise the first socket or file
    opened takes the number, output meant for stderr lands in it, and the event loop aborts
    the process (exit 134) when it closes an fd it takes for a standard stream, whatever
    the run did. What writes its main output to stdout asks ``stdout_closed``: a ledger or a
    report must not vanish unread."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd, the lower are open
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        _closed_at_start.add(fd)
        if getattr(sys, name) is None:  # Python sets it so when the fd was closed at start
            setattr(sys, name, open(fd, mode, encoding="utf-8", closefd=False))  # noqa: SIM115


def stdout_closed() -> SinkError | None:
    """The error for an output meant for stdout when stdout was closed at start, else None."""
    if _STDOUT_FD in _closed_at_start:
        return SinkError("stdout is closed: give a file instead of - (or open stdout)")
    return None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


@dataclass(frozen=True, slots=True)
class Place:
    """Where an output path leads. ``kind``: ``"stdout"``; ``"file"``, a regular file or
    none yet, at ``real`` (symlinks resolved); ``"special"``, a FIFO, device or the like,
    written in place at ``path``. ``size`` and ``ino`` of what exists (``ino`` 0: nothing)."""

    path: str
    kind: str
    real: str
    size: int = 0
    dev: int = 0
    ino: int = 0

    @property
    def regular(self) -> bool:
        return self.kind == "file"


def locate(path: str) -> Place:
    """Where ``path`` leads; SinkError (one line) when it cannot be an output at all."""
    if path == STDOUT:
        if (closed := stdout_closed()) is not None:
            raise closed
        return Place(path, "stdout", STDOUT)
    try:
        info = os.stat(path)  # follows symlinks: what a write would reach
    except FileNotFoundError:
        # Nothing there yet, or a dangling symlink: the file will be made where it points.
        return Place(path, "file", os.path.realpath(path))
    except OSError as exc:  # a loop of symlinks, a file where a directory should be
        raise SinkError(f"cannot write {path}: {_reason(exc)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise SinkError(f"cannot write {path}: Is a directory")
    if stat.S_ISREG(info.st_mode):
        return Place(path, "file", os.path.realpath(path), info.st_size, info.st_dev, info.st_ino)
    return Place(path, "special", path, 0, info.st_dev, info.st_ino)


def _tmp_beside(real: str) -> str:
    head, tail = os.path.split(real)
    return os.path.join(head, f".{tail}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


class LineWriter:
    """Appends whole lines to an output, one write per event-loop turn.

    ``path`` ``-`` is stdout (never closed here). ``append`` False truncates a regular file.
    ``fd``: an already open descriptor to adopt (the ledger, opened before its lock)."""

    def __init__(self, path: str, *, append: bool = False, fd: int | None = None) -> None:
        self.path = path
        self._owned = True
        if fd is None and path == STDOUT:
            fd, self._owned = _STDOUT_FD, False
        elif fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            try:
                fd = os.open(path, flags | (0 if append else os.O_TRUNC), 0o644)
            except OSError as exc:
                raise SinkError(f"cannot open {path} for writing: {_reason(exc)}") from None
        self._fd: int | None = fd
        self._pending: list[bytes] = []
        #: Resolved when the pending lines are written; None when nothing is pending.
        self._flushed: asyncio.Future[None] | None = None
        #: A write that failed in a loop callback, raised at the next write or close.
        self._error: SinkError | None = None

    def write(self, line: bytes) -> asyncio.Future[None] | None:
        """Queue one whole line (ending in a newline); it is written at the end of this
        loop turn, together with every other line queued in the turn. Returns a future
        that resolves once it is written, or fails with the SinkError of that write (None
        without a running loop: written now)."""
        if self._error is not None:
            raise self._error
        self._pending.append(line)
        if self._flushed is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: plain synchronous use
                self.flush()
                return None
            self._flushed = loop.create_future()
            loop.call_soon(self._flush_soon)
        return self._flushed

    def write_now(self, line: bytes) -> None:
        """Write one whole line at once, with whatever is pending (SinkError if it fails)."""
        if self._error is not None:
            raise self._error
        self._pending.append(line)
        self.flush()

    def _flush_soon(self) -> None:
        flushed, self._flushed = self._flushed, None
        # A loop callback's exception would only reach the loop's handler: keep it, raise it
        # at the next write or close, and fail the future the lines' workers wait on (a full
        # disk stops the run, exit 2, before a worker sends another record).
        try:
            self.flush()
        except SinkError as exc:
            self._error = exc
            if flushed is not None and not flushed.done():
                flushed.set_exception(exc)
                # Marked as seen: a writer nobody waits on (load's ledger) still raises
                # at its next write; asyncio must not also log it as never retrieved.
                flushed.exception()
            return
        if flushed is not None and not flushed.done():
            flushed.set_result(None)

    def flush(self) -> None:
        if not self._pending or self._fd is None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {_reason(exc)}") from None

    @property
    def failed(self) -> SinkError | None:
        """The error of a write that failed, if one did."""
        return self._error

    def close(self) -> None:
        """Write what is pending and close; raises the error of a failed write (once closed)."""
        try:
            if self._error is None:
                self.flush()
        finally:
            fd, self._fd = self._fd, None
            if fd is not None and self._owned:
                with contextlib.suppress(OSError):  # not every file can fsync (a pipe, a tty)
                    os.fsync(fd)
                os.close(fd)
        if self._error is not None:
            raise self._error


class ResultsWriter(LineWriter):
    """The ``--out`` ledger: one JSON line per input record, in completion order."""

    def add(self, result: Result) -> asyncio.Future[None] | None:
        return self.write(result.to_json_line())


class FailedWriter(LineWriter):
    """The ``--failed`` file: failed records in input JSONL form plus ``_error``, so that
    ``bulksend send FAILED_FILE`` replays them; invalid ones as ``{"_raw", "_error"}``."""

    def add(self, item: Item, result: Result) -> asyncio.Future[None] | None:
        error = (
            f"{result.error_code}: {result.error_msg}"
            if result.error_code
            else (result.error_msg or "")
        )
        if isinstance(item, Invalid):
            obj: dict[str, Any] = {"_raw": item.raw, "_error": item.error, "_source": item.source}
        else:
            obj = {**item.to_input(), "_error": error, "_source": item.source}
        return self.write(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE))


class DocumentWriter:
    """A whole document written once at the end of a run (``--stats``, ``--html``), checked
    when made: a regular file's directory must take a new file (one is made and removed
    now), anything else must be writable in place."""

    def __init__(self, path: str) -> None:
        self.place = place = locate(path)
        if place.kind == "special" and not os.access(path, os.W_OK):
            raise SinkError(f"cannot write {path}: Permission denied")
        if place.kind == "file":
            probe = _tmp_beside(place.real)
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.unlink(probe)
            except OSError as exc:
                raise SinkError(f"cannot write {path}: {_reason(exc)}") from None

    def write(self, data: bytes) -> None:
        """Write the document whole: a regular file via a temporary file beside it and a
        rename (the old document or the new one, never a part; no ``.tmp`` left behind);
        anything else in place."""
        place = self.place
        try:
            if place.kind == "stdout":
                _write_all(_STDOUT_FD, data)
            elif place.kind == "special":
                fd = os.open(place.path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            else:
                self._replace(data)
        except OSError as exc:
            raise SinkError(f"cannot write {place.path}: {_reason(exc)}") from None

    def _replace(self, data: bytes) -> None:
        real = self.place.real
        tmp = _tmp_beside(real)
        try:
            mode = stat.S_IMODE(os.stat(real).st_mode)
        except FileNotFoundError:
            mode = 0o644  # as open() would make it, before the umask
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, real)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def json_document(obj: Any) -> bytes:
    """A JSON document as ``--stats`` writes it (and ``report --json`` prints it)."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n"


def write_json(path: str, obj: Any) -> None:
    """Write a JSON document whole (see ``DocumentWriter.write``)."""
    DocumentWriter(path).write(json_document(obj))


#: How long a run that finds the ledger locked waits for the holder to write its pid: the
#: holder writes it right after taking the lock.
_PID_WAIT_S = 1.0


class LedgerLock:
    """One run per ledger: an exclusive ``flock`` on ``{ledger}.lock`` beside the ledger's
    real path, holding the pid of the run. The kernel drops the lock when the process ends,
    however it ends, so a lock file left by a ``kill -9`` blocks nobody.

    Subtleness ahead! The lock file is removed when the run ends. A run that opened it just
    before may then lock a file no longer in the directory while a third run creates and
    locks a new one: so after locking, the file at the path must still be the one locked,
    else try again.
    """

    def __init__(self, ledger: Place, ledger_fd: int | None = None) -> None:
        self.path = f"{ledger.real}.lock"
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise SinkError(f"cannot lock {ledger.path}: {self.path}: {_reason(exc)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                raise LedgerError(f"{ledger.path} is in use by pid {pid}") from None
            except OSError as exc:
                os.close(fd)
                raise SinkError(f"cannot lock {ledger.path}: {_reason(exc)}") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:  # pragma: no cover - only a storm of runs starting and ending at once
            raise LedgerError(f"{ledger.path} is in use: could not take its lock")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd
        if ledger_fd is not None:
            self._lock_ledger(ledger, ledger_fd)

    def _lock_ledger(self, ledger: Place, fd: int) -> None:
        """The ledger's own open file too (``fd``; held until it is closed): a lock file is
        found by name, and a hard link (a ``cp -al`` snapshot) is the same ledger under
        another name, whose run must be refused as well. Taken after the lock file, so a
        run under the same name is refused naming its pid; under another name the pid is
        in a lock file this run cannot know."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.release()
            if isinstance(exc, BlockingIOError):
                raise LedgerError(
                    f"{ledger.path} is in use by another run, under another name of the same"
                    " file (a hard link)"
                ) from None
            raise SinkError(f"cannot lock {ledger.path}: {_reason(exc)}") from None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: see the class docstring
        os.close(fd)


def _holder(fd: int) -> str:
    deadline = time.monotonic() + _PID_WAIT_S
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text or time.monotonic() > deadline:
            return text or "?"
        time.sleep(0.01)


def _same_file(fd: int, path: str) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
