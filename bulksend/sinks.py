"""Where results go: the results ledger (``--out``), the ``--failed`` file, the stats JSON.

Each ledger line is written whole (one ``os.write`` of whole lines, O_APPEND) and handed to
the kernel as its record completes: the results that complete in one event-loop turn are
joined and written once, at the end of that turn (``loop.call_soon``), not on a timer. A
kill -9 therefore loses at most the lines of the requests then in flight, and a torn last
line can only come from a crash inside that one write (``--resume`` ignores it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import orjson

from bulksend.errors import SinkError
from bulksend.record import Invalid, Item
from bulksend.result import Result


class LineWriter:
    """Appends whole lines to a file, one write per event-loop turn."""

    def __init__(self, path: str, *, append: bool = False) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        try:
            self._fd: int | None = os.open(path, flags, 0o644)
        except OSError as exc:
            raise SinkError(f"cannot open {path} for writing: {exc.strerror or exc}") from None
        self._pending: list[bytes] = []
        #: Resolved when the pending lines are written; None when nothing is pending.
        self._flushed: asyncio.Future[None] | None = None
        #: A write that failed in a loop callback, raised at the next write or close.
        self._error: SinkError | None = None

    def write(self, line: bytes) -> asyncio.Future[None] | None:
        """Queue one whole line (ending in a newline); it is written at the end of this
        loop turn, together with every other line queued in the turn. Returns a future
        that resolves once it is written (None without a running loop: written now)."""
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

    def _flush_soon(self) -> None:
        flushed, self._flushed = self._flushed, None
        # A loop callback's exception would only reach the loop's handler: keep it, and
        # raise it to the writer's caller instead (a full disk stops the run, exit 2).
        try:
            self.flush()
        except SinkError as exc:
            self._error = exc
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
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._error is not None:
            raise self._error
        self.flush()
        if self._fd is not None:
            with contextlib.suppress(OSError):  # not every file can fsync (a pipe, /dev/stdout)
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


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


def write_json(path: str, obj: Any) -> None:
    """Write a JSON document whole (via a temporary file and rename)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
            fh.write(b"\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise SinkError(f"cannot write {path}: {exc.strerror or exc}") from None
