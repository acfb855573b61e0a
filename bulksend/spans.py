"""Cutting a plain JSONL file into byte ranges, one per shard: ``split_jsonl(path, n)``.

Each ``Span`` starts at a line start and knows the line number and the seq of its first
record, so ``Inputs([span])`` gives exactly the items a read of the whole file gives for
those lines: same ``seq``, ``source`` and ``identity``. A shard then reads only its share.

One pre-pass over the file finds them: the split points are the first line starts at or
after ``size * k / n``, and the pass counts the physical lines and the records (non-blank
lines, by the reader's own rules: a line of ASCII whitespace is blank unless it is over
``MAX_LINE_BYTES``, a UTF-8 BOM at the file's start is not part of line 1) before each.
It reads 1 MiB at a time and counts with C-level ``bytes.count`` and a regex, so memory
stays at one chunk and the pass runs at disk speed, whatever the size of the file or of
its lines.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
from dataclasses import dataclass
from typing import BinaryIO, Final

from bulksend import sources
from bulksend.errors import InputOpenError
from bulksend.identity import input_key
from bulksend.sources import Span, format_for

__all__ = ["split_jsonl"]

_BOM: Final = b"\xef\xbb\xbf"
#: A byte that makes a line not blank (``bytes.strip`` drops the others).
_NOT_SPACE: Final = re.compile(rb"[^ \t\n\r\x0b\x0c]")
#: A whole blank line, newline included.
_BLANK_LINE: Final = re.compile(rb"(?m)^[ \t\r\x0b\x0c]*\n")


@dataclass(slots=True)
class _Count:
    """Lines and records seen so far, and the unfinished line."""

    lines: int = 0  # complete physical lines
    seq: int = 0  # records among them (the next record's seq)
    line_start: int = 0  # file offset of the unfinished line
    pending: int = 0  # its bytes so far
    blank: bool = True  # whether they are all whitespace

    def feed(self, buf: bytes, start: int, end: int, base: int) -> None:
        """Count ``buf[start:end]``, which sits at file offset ``base + start``."""
        first = buf.find(b"\n", start, end)
        if first < 0:
            self.pending += end - start
            if self.blank and _NOT_SPACE.search(buf, start, end):
                self.blank = False
            return
        self.end_line(
            self.pending + first - start, self.blank and not _NOT_SPACE.search(buf, start, first)
        )
        last = buf.rfind(b"\n", first, end)
        if last > first:
            lines = buf.count(b"\n", first + 1, last + 1)
            blank = sum(
                1
                for m in _BLANK_LINE.finditer(buf, first + 1, last + 1)
                if m.end() - m.start() - 1 <= sources.MAX_LINE_BYTES
            )
            self.lines += lines
            self.seq += lines - blank
        self.line_start = base + last + 1
        self.pending = end - last - 1
        self.blank = not _NOT_SPACE.search(buf, last + 1, end)

    def end_line(self, length: int, blank: bool) -> None:
        self.lines += 1
        if not blank or length > sources.MAX_LINE_BYTES:
            self.seq += 1


def split_jsonl(
    path: str, n: int, *, first_seq: int = 0, key: str | None = None, fmt: str | None = None
) -> list[Span]:
    """``n`` spans covering the plain JSONL regular file ``path`` in order, cut at line
    starts near ``size * k / n`` (a span may be empty: a file of fewer lines than ``n``, or
    one long line). ``first_seq``: the seq of the file's first record (the records of the
    inputs before it); the next file's starts at ``spans[-1].first_seq +
    spans[-1].records``. ``key``: the input's key (default ``input_key(path)``).

    Raises InputOpenError when the file cannot be read, or cannot be split: gzip, CSV, not
    a regular file, or a JSON array (read those whole).
    """
    if n < 1:
        raise ValueError(f"the number of spans must be at least 1, not {n}")
    if format_for(path, fmt) != "jsonl" or path.lower().endswith(".gz"):
        raise InputOpenError(f"{path}: only a plain (not gzip) JSONL file can be split")
    key = key or input_key(path)
    try:
        # Looked at before opening: opening a FIFO would wait for a writer.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputOpenError(f"{path}: only a regular file can be split")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            bounds = _bounds(fh, path, size, n, first_seq)
    except OSError as exc:
        raise InputOpenError(f"cannot read input {path}: {exc.strerror or exc}") from None
    return [
        Span(path, start, end, line, seq, end_seq - seq, key)
        for (start, line, seq), (end, _, end_seq) in itertools.pairwise(bounds)
    ]


def _bounds(
    fh: BinaryIO, path: str, size: int, n: int, first_seq: int
) -> list[tuple[int, int, int]]:
    """(offset, first line, first seq) of each span's start, and of the end of the file."""
    read = fh.read
    targets = [size * k // n for k in range(1, n)]
    bounds = [(0, 1, first_seq)]
    count = _Count(seq=first_seq)
    pos = 0  # file offset of chunk[0]
    first = True
    while chunk := read(sources.CHUNK_BYTES):
        cursor = 0
        if first:
            first = False
            if path.lower().endswith(".json") and chunk.lstrip(b" \t\n\r")[:1] == b"[":
                raise InputOpenError(f"{path}: a JSON array cannot be split; read it whole")
            while len(chunk) < len(_BOM) and (more := read(sources.CHUNK_BYTES)):
                chunk += more
            if chunk.startswith(_BOM):
                cursor = len(_BOM)  # the reader drops it: not part of line 1
        while len(bounds) <= len(targets):
            target = targets[len(bounds) - 1]
            if target <= count.line_start:
                bounds.append((count.line_start, count.lines + 1, count.seq))
                continue
            nl = chunk.find(b"\n", max(cursor, target - 1 - pos))
            if nl < 0:
                break
            count.feed(chunk, cursor, nl + 1, pos)
            cursor = nl + 1
            bounds.append((count.line_start, count.lines + 1, count.seq))
        count.feed(chunk, cursor, len(chunk), pos)
        pos += len(chunk)
    if count.pending:  # a last line without a newline
        count.end_line(count.pending, count.blank)
        count.line_start = pos
    while len(bounds) <= len(targets):
        bounds.append((pos, count.lines + 1, count.seq))
    bounds.append((pos, count.lines + 1, count.seq))
    return bounds
