"""The input stage: paths in, one stream of ``Record``/``Invalid`` items out, each with its
``seq``, ``source`` and ``identity`` (see ``bulksend.record``).

Every path is opened and checked when ``Inputs`` is built, so an unusable input stops the
run (``InputOpenError``) before a single record is sent. After that, bad input is data: a
malformed line, bad UTF-8, an over-long line or a gzip file corrupt midway each become one
``Invalid`` and the stream goes on; a CSV quoted field that is never closed costs only the
line it opens on (``_CsvFeed``). Each input is read exactly once, front to back, so a
pipe, a FIFO or ``/dev/stdin`` gives all its records.

Reading is streamed in 1 MiB binary chunks split on ``\\n`` here, not through a text file:
no decoding of valid lines (orjson takes bytes), a handful of C calls per chunk instead of
several Python calls per line, and peak memory of about one chunk plus the longest line
whatever the input's size. ``parse`` decides what each line means.

A ``.json`` file whose first non-space byte is ``[`` holds one JSON array of records, read
by ``json_array`` (memory: one chunk plus the longest element). Any other ``.json`` file is
JSONL. Identities come from ``identity.input_keys`` over the paths given.

A ``Span`` reads one byte range of a plain JSONL file and numbers its records as a read of
the whole file would: a shard reads only its share (``bulksend.spans.split_jsonl`` cuts
a file into spans at line starts).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import stat
import sys
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from types import TracebackType
from typing import Any, BinaryIO, Final

from bulksend.errors import ConfigError, InputOpenError
from bulksend.identity import canonical_input, input_key, input_keys
from bulksend.json_array import ArrayReader, first_byte
from bulksend.parse import (
    CsvHeader,
    decode_raw,
    parse_jsonl,
    parse_jsonl_line,
    record_from_obj,
)
from bulksend.record import Invalid, Item, Record

__all__ = [
    "FORMATS",
    "MAX_LINE_BYTES",
    "Inputs",
    "Span",
    "canonical_input",
    "format_for",
    "input_key",
    "input_keys",
    "parse_jsonl_line",
    "record_from_obj",
]

FORMATS: Final = ("jsonl", "csv")
_EXTENSIONS: Final = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}

#: Bytes asked of the file per read (decompressed bytes for .gz).
CHUNK_BYTES: Final = 1 << 20
#: A longer line is one Invalid, so a file without newlines cannot exhaust memory. Twice
#: DMS RocketMQ's 4 MiB message limit leaves room for JSON escaping. Also the longest
#: element of a JSON array file, in characters.
MAX_LINE_BYTES: Final = 8 << 20
#: Longest CSV field, in characters (the csv module's default, 128 Ki, is below a message).
#: Also the most bytes of lines after its first that a row may hold: past that, a quoted
#: field is taken to be one that is never closed (see ``_CsvFeed``).
MAX_CSV_FIELD: Final = 4 << 20
_BOM: Final = b"\xef\xbb\xbf"
_GZIP_MAGIC: Final = b"\x1f\x8b"
#: Kept of an over-long line for its Invalid's ``raw``.
_RAW_PREFIX: Final = 1024
#: Stands in for an over-long line, or for the unreadable rest of a file (then
#: ``_Input.broken`` says why). Compared by identity, so no real line can be mistaken for it.
_MARK: Final = b"\0bulksend-mark\0"
#: Added to the error of a line that holds several CR line ends.
_CR_HINT: Final = "the file's lines end in CR only (a classic Mac export): convert them to LF"


def format_for(path: str, fmt: str | None) -> str:
    """The format of ``path``: ``fmt`` if given, else from the extension once ``.gz`` is
    stripped (stdin defaults to jsonl). Raises InputOpenError when it cannot tell."""
    if fmt is not None:
        return fmt
    if path == "-":
        return "jsonl"
    found = _EXTENSIONS.get(_extension(path))
    if found is None:
        raise InputOpenError(
            f"{path}: unknown input format (use a .jsonl, .ndjson, .json or .csv name, "
            "optionally .gz, or give --format jsonl|csv)"
        )
    return found


def _extension(path: str) -> str:
    stem = path[:-3] if path.lower().endswith(".gz") else path
    return os.path.splitext(stem)[1].lower()


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes ``start``..``end`` (end exclusive; None: to the end) of a plain JSONL regular
    file, ``start`` being a line start: one shard's share of an input.

    ``first_line`` is the physical line number of the line at ``start`` and ``first_seq``
    the seq of the span's first record, so the span's records get the same ``seq``,
    ``source`` and ``identity`` as in a read of the whole file. ``key`` is the input's key
    (default ``input_key(path)``: the file's first reading in a run). ``records``, when
    known (``split_jsonl`` counts them), is how many seqs the span holds.
    """

    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1
    first_seq: int = 0
    records: int | None = None
    key: str | None = None


@dataclass(eq=False)
class _Input:
    """One opened input and what its reader learns about it."""

    name: str  # as given on the command line; "-" for stdin
    fmt: str
    read: Callable[[int], bytes]
    size: int | None  # bytes it will read from disk; None for stdin, pipes and devices
    key: str = ""  # the identity's input part
    gz_raw: BinaryIO | None = None  # the compressed file under a GzipFile (for bytes_read)
    owned: list[io.IOBase] = field(default_factory=list)  # to close
    broken: str | None = None  # why the rest of the file could not be read
    tail: bytes = b""  # the partial line before the break, or an over-long line's start
    # A stream's last whole line from what it has handed over so far is being read: the
    # next one may wait for its writer (``Inputs.batches`` ends its batch there).
    drained: bool = False
    line0: int = 0  # physical lines before the first one read (a Span's first_line - 1)
    seq0: int | None = None  # the first record's seq (a Span's); None: carry on
    bom: bool = True  # at the file's start: a UTF-8 BOM there is dropped
    array: bool = False  # may be a JSON array (a .json name): look at the first byte
    cr_only: bool = False  # the over-long line in ``tail`` holds CR line ends

    def close(self) -> None:
        for f in reversed(self.owned):
            f.close()
        self.owned.clear()


def _open(spec: str | Span, fmt: str | None, stdin: BinaryIO | None, key: str) -> _Input:
    if isinstance(spec, Span):
        return _open_span(spec, fmt, key)
    path = spec
    if path == "-":
        src = stdin if stdin is not None else sys.stdin.buffer
        # read1 returns what a pipe has now instead of waiting for a full chunk.
        return _Input("-", format_for(path, fmt), getattr(src, "read1", src.read), None, key)
    if "://" in path:
        return _open_url(path, fmt, key)
    raw = _open_file(path)
    try:
        info = os.fstat(raw.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise InputOpenError(f"cannot open input {path}: Is a directory")
        fmt = format_for(path, fmt)
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        array = fmt == "jsonl" and _extension(path) == ".json"
        if not path.lower().endswith(".gz"):
            return _Input(path, fmt, raw.read, size, key, owned=[raw], array=array)
        # Checked now, so a mislabelled file stops the run before anything is sent.
        if size and os.pread(raw.fileno(), 2, 0) != _GZIP_MAGIC:
            raise InputOpenError(f"cannot open input {path}: not a gzip file")
        gz = gzip.GzipFile(fileobj=raw, mode="rb")
        # read1 inflates one compressed block per call, so every line before a corrupt
        # spot is delivered; read would drop the whole chunk it was filling.
        return _Input(path, fmt, gz.read1, size, key, gz_raw=raw, owned=[raw, gz], array=array)
    except OSError as exc:
        raw.close()
        raise InputOpenError(f"cannot read input {path}: {exc.strerror or exc}") from None
    except BaseException:
        raw.close()
        raise


def _open_url(path: str, fmt: str | None, key: str) -> _Input:
    """An fsspec URL (``s3://bucket/key`` for OBS or any S3 store, with the optional
    ``s3fs``; the store's endpoint and keys as fsspec and botocore take them, e.g.
    ``FSSPEC_S3_ENDPOINT_URL`` and ``AWS_ACCESS_KEY_ID``): read as a file is, through
    fsspec's buffered reader. fsspec comes with Dask; a protocol's own package may not."""
    import fsspec

    fmt = format_for(path, fmt)
    try:
        fh = fsspec.open(path, "rb").open()
    except ImportError as exc:
        raise InputOpenError(
            f"cannot open input {path}: {exc} (for s3://: pip install 'bulksend[s3]')"
        ) from None
    except Exception as exc:
        # A store's client raises its own exceptions (botocore's, aiohttp's), not only
        # OSError: no route, no credentials, a refused connection are all one line.
        raise InputOpenError(f"cannot open input {path}: {exc}") from None
    size = getattr(fh, "size", None)
    array = fmt == "jsonl" and _extension(path) == ".json"
    store = _StoreReader(fh)
    if not path.lower().endswith(".gz"):
        return _Input(path, fmt, store.read, size, key, owned=[fh], array=array)
    gz = gzip.GzipFile(fileobj=store, mode="rb")
    return _Input(path, fmt, gz.read1, size, key, gz_raw=fh, owned=[fh, gz], array=array)


class _StoreReader:
    """An fsspec file whose reads fail as a local file's do: with OSError, so that a store
    lost mid-read ends the input as a broken file (its unread rest one invalid result),
    not the run with a traceback."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def read(self, n: int = -1, /) -> bytes:
        try:
            data: bytes = self.fh.read(n)
        except OSError:
            raise
        except Exception as exc:
            raise OSError(f"the store failed: {type(exc).__name__}: {exc}") from None
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        position: int = self.fh.seek(offset, whence)
        return position


def _open_file(path: str) -> io.FileIO:
    try:
        return open(path, "rb", buffering=0)
    except OSError as exc:
        raise InputOpenError(f"cannot open input {path}: {exc.strerror or exc}") from None


def _open_span(span: Span, fmt: str | None, key: str) -> _Input:
    path = span.path
    if format_for(path, fmt) != "jsonl" or path.lower().endswith(".gz"):
        raise InputOpenError(
            f"{path}: only a plain (not gzip) JSONL file can be read by byte range"
        )
    # Looked at before opening: opening a FIFO would wait for a writer.
    with contextlib.suppress(OSError):  # a missing file: _open_file says so
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputOpenError(f"{path}: only a regular file can be read by byte range")
    if "://" in path:
        return _open_url(path, fmt, key)
    raw = _open_file(path)
    try:
        info = os.fstat(raw.fileno())
        end = info.st_size if span.end is None else span.end
        if not 0 <= span.start <= end <= info.st_size or span.first_line < 1 or span.first_seq < 0:
            raise InputOpenError(
                f"{path}: span {span.start}..{end} does not fit the file ({info.st_size} bytes)"
            )
        # An empty span at the end of a file whose last line has no newline is fine.
        if 0 < span.start < end and os.pread(raw.fileno(), 1, span.start - 1) != b"\n":
            raise InputOpenError(f"{path}: span start {span.start} is not at a line start")
        raw.seek(span.start)
        left = end - span.start

        def read(n: int) -> bytes:
            nonlocal left
            data = raw.read(min(n, left)) if left > 0 else b""
            left -= len(data)
            return data

        return _Input(
            path,
            "jsonl",
            read,
            end - span.start,
            key,
            owned=[raw],
            line0=span.first_line - 1,
            seq0=span.first_seq,
            bom=span.start == 0,
        )
    except OSError as exc:
        raw.close()
        raise InputOpenError(f"cannot read input {path}: {exc.strerror or exc}") from None
    except BaseException:
        raw.close()
        raise


class Inputs:
    """The records of ``paths``, in order, as one stream of Items.

    ``paths``: files as given on the command line; ``-`` is ``stdin`` (default
    ``sys.stdin.buffer``, never closed here), at most once; a ``Span`` is a byte range of a
    plain JSONL file, its records numbered from the span's ``first_seq`` (a path after it
    carries on from there). ``.gz`` files are decompressed.
    ``fmt``: ``"jsonl"`` or ``"csv"`` for every input; default: by extension, stdin jsonl.
    ``default_topic``: the topic of records that name none.

    All paths are opened here: InputOpenError (missing, a directory, unreadable, not gzip,
    unknown format, a span that does not fit) or ConfigError (bad ``fmt`` or topic) is
    raised before anything is read. Iterate once (``for item in inputs`` or
    ``inputs.batches(n)``); use as a context manager or call ``close()``.
    """

    bytes_total: int | None
    """Sum of the inputs' sizes on disk (compressed for .gz; a span's length); None if one
    is not a file."""
    bytes_read: int
    """Bytes of the inputs consumed so far, as counted by ``bytes_total``; moves a chunk
    at a time, which is cheap enough to poll for a progress bar."""

    def __init__(
        self,
        paths: Sequence[str | Span],
        *,
        fmt: str | None = None,
        default_topic: str | None = None,
        stdin: BinaryIO | None = None,
    ) -> None:
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(f"unknown input format {fmt!r} (expected jsonl or csv)")
        if default_topic == "":
            raise ConfigError("the default topic (--topic) is empty")
        if isinstance(paths, str | Span):
            raise TypeError("paths is a sequence of paths, not one path")
        if list(paths).count("-") > 1:
            raise InputOpenError("stdin (-) is given more than once")
        self._default_topic = default_topic
        self._inputs: list[_Input] = []
        self._current: _Input | None = None  # the input being read
        self._started = False
        # A span is part of its file's first reading; plain paths count their repeats.
        keys = iter(input_keys(p for p in paths if isinstance(p, str)))
        try:
            for spec in paths:
                if isinstance(spec, str):
                    self._inputs.append(_open(spec, fmt, stdin, next(keys)))
                else:
                    self._inputs.append(_open(spec, fmt, stdin, spec.key or input_key(spec.path)))
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
        """The same stream as ``iter(self)``, ``n`` items at a time (the last may be short).
        From stdin or a pipe a batch also ends with the last record its writer has handed
        over so far: ``tail -f log | bulksend send -`` sends each record as it comes, not
        when enough others have come to fill a batch."""
        if n < 1:
            raise ValueError(f"batch size must be at least 1, not {n}")
        items = iter(self)
        if all(inp.size is not None for inp in self._inputs):
            while batch := list(islice(items, n)):
                yield batch
            return
        batch = []
        for item in items:
            batch.append(item)
            if len(batch) >= n or (self._current is not None and self._current.drained):
                yield batch
                batch = []
        if batch:
            yield batch

    def _items(self) -> Iterator[Item]:
        seq = 0
        for inp in self._inputs:
            self._current = inp
            base = self.bytes_read
            if inp.seq0 is not None:
                seq = inp.seq0
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
        chunks = self._chunks(inp)
        if inp.array:
            first, chunks = first_byte(chunks)
            if first == b"[":
                reader = ArrayReader(
                    chunks,
                    name=inp.name,
                    key=inp.key,
                    topic=self._default_topic,
                    broken=lambda: inp.broken,
                    max_element=MAX_LINE_BYTES,
                    keep=CHUNK_BYTES,
                    raw_prefix=_RAW_PREFIX,
                )
                return (yield from reader.items(seq))
        # "path:" and "key:" joined with the line's digits, made once: the cheapest way to
        # the two strings each line needs (two f-strings format the number twice).
        name, key = f"{inp.name}:", f"{inp.key}:"
        topic = self._default_topic
        lineno = inp.line0
        for line in self._lines(inp, chunks):
            lineno += 1
            digits = str(lineno)
            if line is _MARK:
                yield self._marked(inp, seq, name + digits, key + digits)
            else:
                item = parse_jsonl(line, seq, name + digits, topic, key + digits)
                # One test on the normal path, as the blank-line test alone was.
                if item.__class__ is not Record:
                    if item is None:  # blank: no seq
                        continue
                    if isinstance(item, Invalid) and _cr_only(line):
                        item = replace(item, error=f"{item.error}; {_CR_HINT}")
                yield item
            seq += 1
        return seq

    @staticmethod
    def _marked(inp: _Input, seq: int, source: str, identity: str) -> Invalid:
        raw = decode_raw(inp.tail)
        if inp.broken is not None:
            return Invalid(seq, source, raw, inp.broken, None, identity)
        return Invalid(seq, source, raw, f"line {_overlong_error(inp.cr_only)}", None, identity)

    # --- reading -------------------------------------------------------------------------

    def _chunks(self, inp: _Input) -> Iterator[bytes]:
        """The input's bytes, a leading BOM dropped; sets ``inp.broken`` if reading fails
        midway."""
        read, gz_raw, base = inp.read, inp.gz_raw, self.bytes_read
        done = 0  # bytes read from a plain file or stdin
        try:
            chunk = read(CHUNK_BYTES)
            eof = not chunk  # then never read again: a terminal would wait for a 2nd ^D
            # A pipe may hand out fewer bytes than a BOM: gather enough to look.
            while inp.bom and not eof and len(chunk) < len(_BOM):
                more = read(CHUNK_BYTES)
                chunk, eof = chunk + more, not more
            if inp.bom and chunk.startswith(_BOM):
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

    def _lines(self, inp: _Input, chunks: Iterable[bytes] | None = None) -> Iterator[bytes]:
        """The input's physical lines without their ``\\n``, ``\\r`` kept. An over-long line,
        and the unreadable rest of a broken file (always last), come as ``_MARK`` with
        ``inp.tail``/``inp.broken`` set."""
        parts: list[bytes] = []  # the unfinished line, in pieces
        pending = 0  # len of the pieces
        overlong = False  # inside an over-long line: drop bytes up to its end
        for chunk in self._chunks(inp) if chunks is None else chunks:
            lines = chunk.split(b"\n")
            if len(lines) == 1:
                if not overlong:
                    parts.append(chunk)
                    pending += len(chunk)
                    if pending > MAX_LINE_BYTES:
                        # The line's start, however the reads cut it.
                        head = b"".join(parts)
                        inp.tail, inp.cr_only = head[:_RAW_PREFIX], _cr_only(head)
                        parts, pending, overlong = [], 0, True
                continue
            last = lines.pop()
            if overlong:
                lines[0], overlong = _MARK, False
            elif parts:
                parts.append(lines[0])
                lines[0] = b"".join(parts)
                if len(lines[0]) > MAX_LINE_BYTES:
                    inp.tail, inp.cr_only = lines[0][:_RAW_PREFIX], _cr_only(lines[0])
                    lines[0] = _MARK
            if inp.size is None:
                # From the last line with a record on it (blank lines after it hold none).
                k = len(lines) - 1
                while k and not lines[k].strip():
                    k -= 1
                yield from lines[:k]
                inp.drained = True
                yield from lines[k:]
                inp.drained = False
            else:
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
                row, error = [], None
                if inp.broken is None:  # else the broken tail swallows the row, below
                    # csv's advice on opening a file in Python is no use to a user.
                    what = str(exc).partition(" - do you need to open the file")[0]
                    error = feed.unclosed(what) or feed.problem or f"malformed CSV: {what}"
                    if feed.cr_only():
                        error = f"{error}; {_CR_HINT}"
            first = feed.first
            if inp.broken is not None:  # the broken tail swallows the unfinished row
                raw = decode_raw(inp.tail)
                if feed.kept:
                    raw = f"{feed.raw()}\n{raw}"
                yield Invalid(
                    seq, f"{inp.name}:{first}", raw, inp.broken, None, f"{inp.key}:{first}"
                )
                return seq + 1
            if row is None:
                return seq
            if error is None and not feed.nonblank:
                continue
            source, identity = f"{inp.name}:{first}", f"{inp.key}:{first}"
            raw = feed.raw()
            if error is not None:
                message = f"CSV header row: {error}" if header is None else error
                yield Invalid(seq, source, raw, message, None, identity)
            elif header is None:
                header = CsvHeader(row)
                continue
            else:
                yield header.item(
                    row,
                    seq=seq,
                    source=source,
                    raw=raw,
                    default_topic=self._default_topic,
                    identity=identity,
                )
            seq += 1


@dataclass(frozen=True, slots=True)
class _Overlong:
    """An over-long line inside a CSV row, kept to be read again: its start and whether it
    holds CR line ends."""

    tail: bytes
    cr_only: bool


class _CsvFeed:
    """Lines for csv.reader, as text with a ``\\n``, noting what the current row spans.

    Subtleness ahead: a quoted field that is never closed (one stray ``"``) would swallow
    every line after it into one row, to the end of the file or to the field limit. So the
    current row's lines are kept, as bytes, and when its quoted field reaches the end of the
    input or holds more than ``MAX_CSV_FIELD`` bytes of further lines, ``unclosed`` makes
    the row its first line alone and hands the later lines out again, numbered as before:
    each is read as if that first line had not been there, with the line number, and so
    the identity, it has in the file. Memory: the kept lines are at most the field limit
    plus one line (the csv module's own limit, in characters, usually trips first)."""

    def __init__(self, lines: Iterator[bytes], inp: _Input) -> None:
        self._lines = lines
        self._inp = inp
        self._again: deque[bytes | _Overlong] = deque()  # lines to hand out again, in order
        # Where the next line comes from: the input, or ``_replaying`` while ``_again``
        # holds lines (swapped, so that the normal path pays no test for it).
        self._source: Iterator[bytes] = lines
        self.count = 0  # physical lines handed out so far
        self.first = 1  # the current row's first line
        self.kept: list[bytes | _Overlong] = []  # the current row's lines
        self.problem: str | None = None  # what is wrong with the current row's bytes
        self.nonblank = False  # whether any of its lines has more than whitespace
        self._text = ""  # the last line handed out, as text
        self._spilled = 0  # bytes of the current row's lines after its first
        self._cut = False  # the row passed MAX_CSV_FIELD: csv was told the input ended

    def start_record(self) -> None:
        self.first = self.count + 1
        self.kept = []
        self.problem = None
        self.nonblank = False

    def raw(self) -> str:
        """The current row's lines as text, line ends dropped."""
        if len(self.kept) == 1:  # nearly every row
            return self._text.rstrip("\r")
        return "\n".join(_text(line) for line in self.kept)

    def unclosed(self, error: str) -> str | None:
        """The message for a row whose quoted field is never closed (csv's ``error``, its
        end of data or field limit, says so), after putting the row's later lines back to
        be read again; None for any other csv error."""
        kept = self.kept
        if self._cut or (error.startswith("field larger than") and len(kept) > 1):
            where = f"is not closed within {_size(MAX_CSV_FIELD)}"
        elif error == "unexpected end of data":  # strict mode: the input ended in quotes
            where = "is never closed"
        else:
            return None
        self._cut = False
        message = f"malformed CSV: a quoted field opened at line {self.first} {where}"
        n = len(kept) - 1
        if n:
            self._again.extendleft(reversed(kept[1:]))
            if self._source is self._lines:
                self._source = self._replaying()
            self.count -= n
            del kept[1:]
            self._text = _text(kept[0])
            rows = (
                "are read again as rows of their own"
                if n > 1
                else "is read again as a row of its own"
            )
            message += f"; the {n:,} line{'s' if n > 1 else ''} after it {rows}"
        return message

    def cr_only(self) -> bool:
        """Whether the current row looks like many lines joined by CR-only line ends."""
        return any(
            line.cr_only if isinstance(line, _Overlong) else _cr_only(line) for line in self.kept
        )

    def __iter__(self) -> _CsvFeed:
        return self

    def __next__(self) -> str:
        line = next(self._source)
        if line is _MARK:
            if self._inp.broken is not None:
                raise StopIteration
            return self._overlong(_Overlong(self._inp.tail, self._inp.cr_only))
        self.count += 1
        kept = self.kept
        if kept:  # a quoted field holds a line end: the row goes on
            kept.append(line)
            self._spill(len(line) + 1)
        else:
            kept.append(line)
        if not self.nonblank and line.strip():
            self.nonblank = True
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = line.decode("utf-8", "replace")
            self.problem = (
                self.problem or f"invalid UTF-8 at line {self.count}, byte {exc.start + 1}"
            )
        self._text = text
        return text + "\n"

    def _replaying(self) -> Iterator[bytes]:
        """The lines of ``_again`` (it may grow meanwhile), then the input's next line, by
        when ``_source`` is the input again."""
        again = self._again
        while again:
            line = again.popleft()
            if isinstance(line, _Overlong):  # handed out as the input's reader hands one out
                self._inp.tail, self._inp.cr_only = line.tail, line.cr_only
                yield _MARK
            else:
                yield line
        self._source = self._lines
        # Not ``yield from``: closing this generator would close the input's.
        for line in self._lines:
            yield line
            return

    def _overlong(self, line: _Overlong) -> str:
        self.count += 1
        self.kept.append(line)
        self._text = _text(line)
        self.problem = self.problem or f"line {self.count} {_overlong_error(line.cr_only)}"
        if len(self.kept) > 1:
            self._spill(MAX_LINE_BYTES)
        return "\n"

    def _spill(self, n: int) -> None:
        """Count the ``n`` bytes of the line just kept, a line after the row's first; past
        MAX_CSV_FIELD, end the row as the end of the input would: csv raises "unexpected
        end of data" and ``unclosed`` hands the lines out again."""
        self._spilled = n if len(self.kept) == 2 else self._spilled + n
        if self._spilled > MAX_CSV_FIELD:
            self._cut = True
            raise StopIteration


def _text(line: bytes | _Overlong) -> str:
    """A kept line as ``Invalid.raw`` shows it."""
    return decode_raw(line.tail if isinstance(line, _Overlong) else line)


def _overlong_error(cr_only: bool) -> str:
    error = f"is longer than {MAX_LINE_BYTES >> 20} MiB"
    return f"{error}; {_CR_HINT}" if cr_only else error


def _cr_only(line: bytes) -> bool:
    """Whether a line that failed looks like lines joined by CR-only line ends: two CRs or
    more before its end (three lines or more), so that a stray CR inside a line of a CRLF
    file is not taken for that. Only ever called on a line that failed: the normal path
    pays nothing."""
    return line.rstrip(b"\r\t ").count(b"\r") >= 2


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n:,} bytes"
