"""The input stage: paths in, one stream of ``Record``/``Invalid`` items out, each with its
``seq`` and ``source`` (see ``bulksend.record``).

Every path is opened and checked when ``Inputs`` is built, so an unusable input stops the
run (``InputOpenError``) before a single record is sent. After that, bad input is data: a
malformed line, bad UTF-8, an over-long line or a gzip file corrupt midway each become one
``Invalid`` and the stream goes on.

Reading is streamed in 1 MiB binary chunks split on ``\\n`` here, not through a text file:
no decoding of valid lines (orjson takes bytes), a handful of C calls per chunk instead of
several Python calls per line, and peak memory of about one chunk plus the longest line
whatever the input's size. ``parse`` decides what each line means.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import stat
import sys
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from types import TracebackType
from typing import BinaryIO, Final

from bulksend.errors import ConfigError, InputOpenError
from bulksend.parse import CsvHeader, decode_raw, parse_jsonl, parse_jsonl_line, record_from_obj
from bulksend.record import Invalid, Item

__all__ = [
    "FORMATS",
    "MAX_LINE_BYTES",
    "Inputs",
    "fingerprint",
    "format_for",
    "parse_jsonl_line",
    "record_from_obj",
]

FORMATS: Final = ("jsonl", "csv")
_EXTENSIONS: Final = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}

#: Bytes asked of the file per read (decompressed bytes for .gz).
CHUNK_BYTES: Final = 1 << 20
#: A longer line is one Invalid, so a file without newlines cannot exhaust memory. Twice
#: DMS RocketMQ's 4 MiB message limit leaves room for JSON escaping.
MAX_LINE_BYTES: Final = 8 << 20
#: Longest CSV field, in characters (the csv module's default, 128 Ki, is below a message).
MAX_CSV_FIELD: Final = 4 << 20
_BOM: Final = b"\xef\xbb\xbf"
_GZIP_MAGIC: Final = b"\x1f\x8b"
#: Kept of an over-long line for its Invalid's ``raw``.
_RAW_PREFIX: Final = 1024
#: Stands in for an over-long line, or for the unreadable rest of a file (then
#: ``_Input.broken`` says why). Compared by identity, so no real line can be mistaken for it.
_MARK: Final = b"\0bulksend-mark\0"


def format_for(path: str, fmt: str | None) -> str:
    """The format of ``path``: ``fmt`` if given, else from the extension once ``.gz`` is
    stripped (stdin defaults to jsonl). Raises InputOpenError when it cannot tell."""
    if fmt is not None:
        return fmt
    if path == "-":
        return "jsonl"
    stem = path[:-3] if path.lower().endswith(".gz") else path
    found = _EXTENSIONS.get(os.path.splitext(stem)[1].lower())
    if found is None:
        raise InputOpenError(
            f"{path}: unknown input format (use a .jsonl, .ndjson, .json or .csv name, "
            "optionally .gz, or give --format jsonl|csv)"
        )
    return found


@dataclass(eq=False)
class _Input:
    """One opened input and what its reader learns about it."""

    name: str  # as given on the command line; "-" for stdin
    fmt: str
    read: Callable[[int], bytes]
    size: int | None  # on disk; None for stdin, pipes and devices
    gz_raw: BinaryIO | None = None  # the compressed file under a GzipFile (for bytes_read)
    owned: list[io.IOBase] = field(default_factory=list)  # to close
    broken: str | None = None  # why the rest of the file could not be read
    tail: bytes = b""  # the partial line before the break, or an over-long line's start

    def close(self) -> None:
        for f in reversed(self.owned):
            f.close()
        self.owned.clear()


def _open(path: str, fmt: str | None, stdin: BinaryIO | None) -> _Input:
    if path == "-":
        src = stdin if stdin is not None else sys.stdin.buffer
        # read1 returns what a pipe has now instead of waiting for a full chunk.
        return _Input("-", format_for(path, fmt), getattr(src, "read1", src.read), None)
    try:
        raw = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by _Input.close
    except OSError as exc:
        raise InputOpenError(f"cannot open input {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(raw.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise InputOpenError(f"cannot open input {path}: Is a directory")
        fmt = format_for(path, fmt)
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        if not path.lower().endswith(".gz"):
            return _Input(path, fmt, raw.read, size, owned=[raw])
        # Checked now, so a mislabelled file stops the run before anything is sent.
        if size and os.pread(raw.fileno(), 2, 0) != _GZIP_MAGIC:
            raise InputOpenError(f"cannot open input {path}: not a gzip file")
        gz = gzip.GzipFile(fileobj=raw, mode="rb")
        # read1 inflates one compressed block per call, so every line before a corrupt
        # spot is delivered; read would drop the whole chunk it was filling.
        return _Input(path, fmt, gz.read1, size, gz_raw=raw, owned=[raw, gz])
    except OSError as exc:
        raw.close()
        raise InputOpenError(f"cannot read input {path}: {exc.strerror or exc}") from None
    except BaseException:
        raw.close()
        raise


class Inputs:
    """The records of ``paths``, in order, as one stream of Items.

    ``paths``: files as given on the command line; ``-`` is ``stdin`` (default
    ``sys.stdin.buffer``, never closed here), at most once. ``.gz`` files are decompressed.
    ``fmt``: ``"jsonl"`` or ``"csv"`` for every input; default: by extension, stdin jsonl.
    ``default_topic``: the topic of records that name none.

    All paths are opened here: InputOpenError (missing, a directory, unreadable, not gzip,
    unknown format) or ConfigError (bad ``fmt`` or topic) is raised before anything is read.
    Iterate once (``for item in inputs`` or ``inputs.batches(n)``); use as a context manager
    or call ``close()``.
    """

    bytes_total: int | None
    """Sum of the inputs' sizes on disk (compressed for .gz); None if one is not a file."""
    bytes_read: int
    """Bytes of the inputs consumed so far, as counted by ``bytes_total``; moves a chunk
    at a time, which is cheap enough to poll for a progress bar."""

    def __init__(
        self,
        paths: Sequence[str],
        *,
        fmt: str | None = None,
        default_topic: str | None = None,
        stdin: BinaryIO | None = None,
    ) -> None:
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(f"unknown input format {fmt!r} (expected jsonl or csv)")
        if default_topic == "":
            raise ConfigError("the default topic (--topic) is empty")
        if isinstance(paths, str):
            raise TypeError("paths is a sequence of paths, not one str")
        if list(paths).count("-") > 1:
            raise InputOpenError("stdin (-) is given more than once")
        self._default_topic = default_topic
        self._inputs: list[_Input] = []
        self._started = False
        try:
            for path in paths:
                self._inputs.append(_open(path, fmt, stdin))
        except BaseException:
            self.close()
            raise
        sizes = [i.size for i in self._inputs]
        self.bytes_total = None if None in sizes else sum(s or 0 for s in sizes)
        self.bytes_read = 0

    def __enter__(self) -> Inputs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every file this opened (not stdin). Idempotent."""
        for inp in self._inputs:
            inp.close()

    def __iter__(self) -> Iterator[Item]:
        """Every input's items in order: Records and Invalids, ``seq`` counting both."""
        if self._started:
            raise RuntimeError("Inputs can be iterated only once")
        self._started = True
        return self._items()

    def batches(self, n: int) -> Iterator[list[Item]]:
        """The same stream as ``iter(self)``, ``n`` items at a time (the last may be short)."""
        if n < 1:
            raise ValueError(f"batch size must be at least 1, not {n}")
        items = iter(self)
        while batch := list(islice(items, n)):
            yield batch

    def _items(self) -> Iterator[Item]:
        seq = 0
        for inp in self._inputs:
            base = self.bytes_read
            try:
                if inp.fmt == "csv":
                    seq = yield from self._csv_items(inp, seq)
                else:
                    seq = yield from self._jsonl_items(inp, seq)
            finally:
                inp.close()
            if inp.size is not None:
                self.bytes_read = base + inp.size

    # --- JSONL ---------------------------------------------------------------------------

    def _jsonl_items(self, inp: _Input, seq: int) -> Generator[Item, None, int]:
        name = inp.name
        topic = self._default_topic
        lineno = 0
        for line in self._lines(inp):
            lineno += 1
            if line is _MARK:
                yield self._marked(inp, seq, f"{name}:{lineno}")
            else:
                item = parse_jsonl(line, seq, f"{name}:{lineno}", topic)
                if item is None:  # blank: no seq
                    continue
                yield item
            seq += 1
        return seq

    @staticmethod
    def _marked(inp: _Input, seq: int, source: str) -> Invalid:
        raw = decode_raw(inp.tail)
        if inp.broken is not None:
            return Invalid(seq, source, raw, inp.broken)
        return Invalid(seq, source, raw, f"line is longer than {MAX_LINE_BYTES >> 20} MiB")

    # --- reading -------------------------------------------------------------------------

    def _chunks(self, inp: _Input) -> Iterator[bytes]:
        """The input's bytes, BOM dropped; sets ``inp.broken`` if reading fails midway."""
        read, gz_raw, base = inp.read, inp.gz_raw, self.bytes_read
        done = 0  # bytes read from a plain file or stdin
        try:
            chunk = read(CHUNK_BYTES)
            eof = not chunk  # then never read again: a terminal would wait for a 2nd ^D
            # A pipe may hand out fewer bytes than a BOM: gather enough to look.
            while not eof and len(chunk) < len(_BOM):
                more = read(CHUNK_BYTES)
                chunk, eof = chunk + more, not more
            if chunk.startswith(_BOM):
                done, chunk = len(_BOM), chunk[len(_BOM) :]
            while not eof or chunk:
                if chunk:
                    done += len(chunk)
                    self.bytes_read = base + (done if gz_raw is None else gz_raw.tell())
                    yield chunk
                if eof:
                    break
                chunk = read(CHUNK_BYTES)
                eof = not chunk
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            what = "gzip data is corrupt" if gz_raw is not None else "read failed"
            inp.broken = f"{what} ({exc}); the rest of this file is skipped"

    def _lines(self, inp: _Input) -> Iterator[bytes]:
        """The input's physical lines without their ``\\n``, ``\\r`` kept. An over-long line,
        and the unreadable rest of a broken file (always last), come as ``_MARK`` with
        ``inp.tail``/``inp.broken`` set."""
        parts: list[bytes] = []  # the unfinished line, in pieces
        pending = 0  # len of the pieces
        overlong = False  # inside an over-long line: drop bytes up to its end
        for chunk in self._chunks(inp):
            lines = chunk.split(b"\n")
            if len(lines) == 1:
                if not overlong:
                    parts.append(chunk)
                    pending += len(chunk)
                    if pending > MAX_LINE_BYTES:
                        inp.tail, parts, pending, overlong = parts[0][:_RAW_PREFIX], [], 0, True
                continue
            last = lines.pop()
            if overlong:
                lines[0], overlong = _MARK, False
            elif parts:
                parts.append(lines[0])
                lines[0] = b"".join(parts)
                if len(lines[0]) > MAX_LINE_BYTES:
                    inp.tail, lines[0] = lines[0][:_RAW_PREFIX], _MARK
            yield from lines
            parts, pending = ([last], len(last)) if last else ([], 0)
        if inp.broken is not None:
            inp.tail = b"".join(parts)[:_RAW_PREFIX]
            yield _MARK
        elif overlong:
            yield _MARK
        elif parts:
            yield b"".join(parts)

    # --- CSV -----------------------------------------------------------------------------

    def _csv_items(self, inp: _Input, seq: int) -> Generator[Item, None, int]:
        """Rows through the csv module (quoted fields may span lines), fed line by line so
        each row's first physical line, raw text and problems are known."""
        # Process-wide, and only ever raised: a message body may be up to 4 MiB.
        if csv.field_size_limit() < MAX_CSV_FIELD:
            csv.field_size_limit(MAX_CSV_FIELD)
        feed = _CsvFeed(self._lines(inp), inp)
        reader = csv.reader(feed, strict=True)
        header: CsvHeader | None = None
        while True:
            feed.start_record()
            try:
                row: list[str] | None = next(reader)
                error = feed.problem
            except StopIteration:
                row, error = None, None
            except csv.Error as exc:
                row, error = [], feed.problem or f"malformed CSV: {exc}"
            if inp.broken is not None:  # the broken tail swallows the unfinished row
                raw = "\n".join([*feed.raw, decode_raw(inp.tail)])
                yield Invalid(seq, f"{inp.name}:{feed.first}", raw, inp.broken)
                return seq + 1
            if row is None:
                return seq
            if error is None and not feed.nonblank:
                continue
            source, raw = f"{inp.name}:{feed.first}", "\n".join(feed.raw)
            if error is not None:
                yield Invalid(
                    seq, source, raw, f"CSV header row: {error}" if header is None else error
                )
            elif header is None:
                header = CsvHeader(row)
                continue
            else:
                yield header.item(
                    row, seq=seq, source=source, raw=raw, default_topic=self._default_topic
                )
            seq += 1


class _CsvFeed:
    """Lines for csv.reader, as text with a ``\\n``, noting what the current row spans."""

    def __init__(self, lines: Iterator[bytes], inp: _Input) -> None:
        self._lines = lines
        self._inp = inp
        self.count = 0  # physical lines handed out so far
        self.first = 1  # the current row's first line
        self.raw: list[str] = []  # the current row's lines, decoded
        self.problem: str | None = None  # what is wrong with the current row's bytes
        self.nonblank = False  # whether any of its lines has more than whitespace

    def start_record(self) -> None:
        self.first = self.count + 1
        self.raw = []
        self.problem = None
        self.nonblank = False

    def __iter__(self) -> _CsvFeed:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.count += 1
        if line is _MARK:
            if self._inp.broken is not None:
                raise StopIteration
            self.raw.append(decode_raw(self._inp.tail))
            self.problem = (
                self.problem or f"line {self.count} is longer than {MAX_LINE_BYTES >> 20} MiB"
            )
            return "\n"
        if not self.nonblank and line.strip():
            self.nonblank = True
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = line.decode("utf-8", "replace")
            self.problem = (
                self.problem or f"invalid UTF-8 at line {self.count}, byte {exc.start + 1}"
            )
        self.raw.append(text.rstrip("\r"))
        return text + "\n"


# --- change detection ---------------------------------------------------------------------

_FINGERPRINT_SPAN: Final = 1 << 20


def fingerprint(path: str) -> str:
    """A cheap fingerprint of an input file's content, for ``--resume`` to notice that an
    input changed since the results ledger was written.

    ``v1:<size>:<mtime_ns>:<sha256 of the first and the last MiB>`` (the whole file when
    it is at most 2 MiB): at most 2 MiB read whatever the file's size. Size and the tail
    catch appends and truncation, the head catches a different file, mtime catches an edit
    in the middle. A ``touch`` or a copy without ``-p`` also counts as a change: the safe
    side, --resume refuses rather than skipping the wrong records. The .gz file itself is
    fingerprinted, not its content. Raises InputOpenError if ``path`` is ``-`` or cannot
    be read.
    """
    if path == "-":
        raise InputOpenError("stdin (-) has no fingerprint: --resume needs input files")
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            digest = hashlib.sha256()
            if info.st_size <= 2 * _FINGERPRINT_SPAN:
                digest.update(f.read())
            else:
                digest.update(f.read(_FINGERPRINT_SPAN))
                f.seek(-_FINGERPRINT_SPAN, os.SEEK_END)
                digest.update(f.read(_FINGERPRINT_SPAN))
    except OSError as exc:
        raise InputOpenError(f"cannot read input {path}: {exc.strerror or exc}") from None
    return f"v1:{info.st_size}:{info.st_mtime_ns}:{digest.hexdigest()}"
