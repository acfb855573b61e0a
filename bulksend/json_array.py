"""A JSON array of records (a ``.json`` file whose first non-space byte is ``[``), streamed
element by element: ``ArrayReader(chunks, ...).items(seq)``.

Each element gets ``source`` ``path:line:column`` and ``identity`` ``key:line:column`` of its
first character (a one-line array, as ``json.dump`` writes it, holds every record on line
1), and its own bytes go through ``parse.parse_jsonl`` as a JSONL line would: the same
record rules, exact numbers included.
"""

from __future__ import annotations

import codecs
import itertools
from collections.abc import Callable, Generator, Iterator
from json import JSONDecodeError

from bulksend.parse import decode_raw, parse_jsonl, scan_json_value, skip_json_space
from bulksend.record import Invalid, Item

__all__ = ["ArrayReader", "first_byte"]


def first_byte(chunks: Iterator[bytes]) -> tuple[bytes, Iterator[bytes]]:
    """The first non-space byte of a stream (b"" if none), and the whole stream again."""
    seen: list[bytes] = []
    for chunk in chunks:
        seen.append(chunk)
        text = chunk.lstrip(b" \t\n\r")  # JSON's whitespace
        if text:
            return text[:1], itertools.chain(seen, chunks)
    return b"", iter(seen)


class _Broken(Exception):
    """Internal: the array's own text is malformed at ``pos`` (``msg`` says how), in what
    begins at ``start`` (an element, or the text after one)."""

    def __init__(self, msg: str, start: int, pos: int) -> None:
        super().__init__(msg)
        self.msg, self.start, self.pos = msg, start, pos


class ArrayReader:
    """One JSON array of records, streamed element by element.

    The text is decoded incrementally (bad UTF-8 kept as surrogate escapes, so it comes
    back byte for byte and the element is reported by ``parse`` as for a JSONL line). The
    stdlib's C scanner finds where each element ends; the element's own bytes then go
    through ``parse_jsonl`` as a JSONL line would, exact numbers included. The buffer holds
    the undecided text only: about one chunk plus the longest element.

    An element that is not a valid record is one Invalid; a break in the array's own
    syntax (or the unreadable rest of a gzip file) is one Invalid for the rest of the file,
    since no next element can be found with certainty after it.
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        *,
        name: str,
        key: str,
        topic: str | None,
        broken: Callable[[], str | None],
        max_element: int,
        keep: int,
        raw_prefix: int,
    ) -> None:
        """``chunks``: the input's bytes, a leading BOM dropped. ``name``/``key``: the
        input's name as given and its identity key. ``broken``: why the input stopped
        early, once ``chunks`` is done (None if it did not). ``max_element``: longest
        element, in characters; ``keep``: characters of text read before the buffer is
        trimmed; ``raw_prefix``: characters kept of unreadable text for its Invalid."""
        self.chunks = chunks
        self.name, self.key, self.topic = name, key, topic
        self.why_broken = broken
        self.max_element, self.keep, self.raw_prefix = max_element, keep, raw_prefix
        self.decode = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode
        self.buf = ""
        self.eof = False
        self.base = 0  # file offset (characters) of buf[0]
        self.line = 1  # the line holding offset counted_to
        self.line_start = 0  # offset where that line starts
        self.counted_to = 0  # offset up to which newlines are counted

    def more(self) -> bool:
        """Append the next chunk's text; False at the end of the input."""
        if self.eof:
            return False
        chunk = next(self.chunks, None)
        if chunk is None:
            self.eof = True
            self.buf += self.decode(b"", final=True)
            return False
        self.buf += self.decode(chunk)
        return True

    def where(self, at: int) -> tuple[int, int]:
        """(line, column) of buf[at], both 1-based; column in characters."""
        rel = self.counted_to - self.base
        newlines = self.buf.count("\n", rel, at)
        if newlines:
            self.line += newlines
            self.line_start = self.base + self.buf.rindex("\n", rel, at) + 1
        self.counted_to = self.base + at
        return self.line, self.base + at - self.line_start + 1

    def space(self, at: int) -> int:
        """Past the whitespace at buf[at], reading on as needed."""
        while True:
            at = skip_json_space(self.buf, at)
            if at < len(self.buf) or not self.more():
                return at

    def value(self, at: int) -> int:
        """The end of the JSON value at buf[at], reading on as needed. A value that ends
        where the buffer does may go on (a number): read on before trusting it."""
        while True:
            problem: tuple[str, int] | None = None
            try:
                end = scan_json_value(self.buf, at)
            except StopIteration:
                end, problem = None, ("Expecting value", at)
            except JSONDecodeError as exc:
                end, problem = None, (exc.msg, exc.pos)
            except RecursionError:
                end, problem = None, ("Nested too deeply", at)
            except ValueError as exc:
                end, problem = None, (str(exc), at)
            if end is not None and (end < len(self.buf) or self.eof):
                return end
            if problem is not None and self.eof:
                raise _Broken(problem[0], at, problem[1])
            if len(self.buf) - at > self.max_element:
                raise _Broken(f"Element longer than {self.max_element >> 20} MiB", at, at)
            self.more()

    def char(self, at: int) -> str:
        """buf[at], or "" past the end of the input."""
        return self.buf[at] if at < len(self.buf) else ""

    def trim(self, at: int) -> int:
        """Drop the text before buf[at] once it is a chunk's worth; the new ``at``."""
        if at < self.keep:
            return at
        self.where(at)
        self.buf = self.buf[at:]
        self.base += at
        return 0

    def items(self, seq: int) -> Generator[Item, None, int]:
        key, name = self.key, self.name
        at = self.space(self.space(0) + 1)  # past "["
        try:
            if self.char(at) == "]":
                self.end(at + 1)
                return seq
            while True:
                line, col = self.where(at)
                source, identity = f"{name}:{line}:{col}", f"{key}:{line}:{col}"
                end = self.value(at)
                text = self.buf[at:end].encode("utf-8", "surrogateescape")
                item = parse_jsonl(text, seq, source, self.topic, identity)
                assert item is not None  # a JSON value is never blank
                yield item
                seq += 1
                at = self.space(end)
                if self.char(at) == "]":
                    self.end(at + 1)
                    return seq
                if self.char(at) != ",":
                    raise _Broken("Expecting ',' delimiter or ']'", at, at)
                at = self.trim(self.space(at + 1))
        except _Broken as exc:
            yield self.broken(exc, seq)
            return seq + 1

    def end(self, at: int) -> None:
        """After the closing ``]``: nothing but whitespace may follow."""
        at = self.space(at)
        if at < len(self.buf):
            raise _Broken("Extra data", at, at)
        if self.why_broken() is not None:
            raise _Broken("", at, at)

    def broken(self, exc: _Broken, seq: int) -> Invalid:
        """One Invalid for the rest of the input, from ``exc.start`` on."""
        line, col = self.where(exc.start)
        source, identity = f"{self.name}:{line}:{col}", f"{self.key}:{line}:{col}"
        raw = decode_raw(
            self.buf[exc.start : exc.start + self.raw_prefix].encode("utf-8", "surrogateescape")
        )
        why = self.why_broken()
        if why is not None:
            return Invalid(seq, source, raw, why, None, identity)
        line, col = self.where(exc.pos)
        return Invalid(
            seq,
            source,
            raw,
            f"malformed JSON array: {exc.msg}: line {line} column {col}; "
            "the rest of this file is skipped",
            None,
            identity,
        )
