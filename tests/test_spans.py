"""Byte-range reading for shards: the spans ``split_jsonl`` cuts, read one by one, give
exactly the items of a read of the whole file (seq, source, identity, everything)."""

from __future__ import annotations

import gzip
import itertools
import os
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulksend.errors import InputOpenError
from bulksend.record import Item
from bulksend.sources import Inputs, Span, input_keys
from bulksend.spans import split_jsonl

FUZZ = settings(max_examples=150, deadline=None, database=None)

#: Small enough that lines straddle reads and some lines are over-long.
CHUNK, MAX_LINE = 16, 48

line_kinds = st.sampled_from(
    [
        b'{"topic":"t","body":"a"}',
        b'{"topic":"t","body":{"n":1E2},"id":123456789012345678901234567890}',
        b'{"body":"no topic"}',
        b"",
        b"   ",
        b" \t\x0b\x0c ",
        b"\r",
        b"{bad",
        b"\xef\xbb\xbf{}",
        b"\xff\xfe",
        b"[1]",
        b" " * 60,  # blank but over-long: an Invalid, so it takes a seq
        b'{"topic":"t","body":"' + b"x" * 60 + b'"}',  # over-long
    ]
)


def read(*specs: str | Span) -> list[Item]:
    with Inputs(list(specs), default_topic="d") as inputs:
        return list(inputs)


def shards(path: str, n: int, **kw: object) -> list[Span]:
    spans = split_jsonl(path, n, **kw)  # type: ignore[arg-type]
    assert len(spans) == n
    assert spans[0].start == 0 and spans[-1].end == os.path.getsize(path)
    for a, b in itertools.pairwise(spans):
        assert a.end == b.start and a.first_seq + (a.records or 0) == b.first_seq
    return spans


@FUZZ
@given(
    st.lists(line_kinds, max_size=40),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
    st.booleans(),
    st.integers(1, 7),
)
def test_union_of_spans_is_the_whole_file_item_by_item(
    lines: list[bytes], end: bytes, bom: bool, final_newline: bool, n: int
) -> None:
    data = (b"\xef\xbb\xbf" if bom else b"") + end.join(lines) + (end if final_newline else b"")
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch("bulksend.sources.CHUNK_BYTES", CHUNK),
        mock.patch("bulksend.sources.MAX_LINE_BYTES", MAX_LINE),
        mock.patch("bulksend.sources._RAW_PREFIX", 8),  # below MAX_LINE, as in real use
    ):
        path = os.path.join(tmp, "in.jsonl")
        Path(path).write_bytes(data)
        whole = read(path)
        spans = shards(path, n)
        parts = [read(span) for span in spans]
        assert [item for part in parts for item in part] == whole
        assert [len(part) for part in parts] == [span.records for span in spans]
        assert read(*spans) == whole  # several spans in one Inputs, too


def test_spans_of_the_later_inputs_of_a_run(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b'{"topic":"t","body":"a1"}\n\n{"topic":"t","body":"a2"}\n')
    b.write_bytes(b"".join(b'{"topic":"t","body":"b%d"}\n' % i for i in range(1000)))
    paths = [str(a), str(b), str(a)]  # a twice: its second reading is another input
    whole = read(*paths)
    keys = input_keys(paths)
    seq = 0
    got: list[Item] = []
    for path, key in zip(paths, keys, strict=True):
        spans = shards(path, 3, first_seq=seq, key=key)
        for span in spans:
            got += read(span)
        seq = spans[-1].first_seq + (spans[-1].records or 0)
    assert got == whole
    assert len({item.identity for item in got}) == len(got) == 1004


def test_a_span_reads_only_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b'{"topic":"t","body":"m%d"}\n' % i for i in range(100)))
    spans = shards(str(path), 4)
    expected = [read(span) for span in spans]
    with path.open("ab") as f:  # appended after the split: not part of any span
        f.write(b'{"topic":"t","body":"late"}\n')
    for span, items in zip(spans, expected, strict=True):
        with Inputs([span]) as inputs:
            assert inputs.bytes_total == (span.end or 0) - span.start
            assert list(inputs) == items
            assert inputs.bytes_read == inputs.bytes_total


def test_more_spans_than_lines_leaves_some_empty(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"topic":"t","body":"' + b"x" * 1000 + b'"}\n{"topic":"t","body":"y"}')
    spans = shards(str(path), 6)
    assert [s.records for s in spans].count(0) >= 4
    assert [item for span in spans for item in read(span)] == read(str(path))


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        # mtime=0: a gzip header holds the time it was written, and pytest-xdist refuses a run
        # whose workers collect different test ids (each worker collects in its own second).
        ("in.jsonl.gz", gzip.compress(b"{}\n", mtime=0), r"only a plain \(not gzip\) JSONL file"),
        ("in.csv", b"body\nx\n", r"only a plain \(not gzip\) JSONL file"),
        ("in.json", b'  [{"body":"x"}]', "a JSON array cannot be split"),
    ],
    ids=["gzip", "csv", "json-array"],
)
def test_what_cannot_be_split_says_why(
    tmp_path: Path, name: str, data: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputOpenError, match=message):
        split_jsonl(str(path), 2)


def test_bad_spans_are_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"topic":"t","body":"a"}\n{"topic":"t","body":"b"}\n')
    fifo = tmp_path / "p.jsonl"
    os.mkfifo(fifo)
    for span, message in [
        (Span(str(path), 5, None), "not at a line start"),
        (Span(str(path), 0, 1000), "does not fit the file"),
        (Span(str(path), 30, 20), "does not fit the file"),
        (Span(str(tmp_path / "in.jsonl.gz")), "only a plain"),
    ]:
        with pytest.raises(InputOpenError, match=message):
            Inputs([span])
    # A FIFO is refused by its stat: opening it would wait for a writer that never comes.
    with pytest.raises(InputOpenError, match="only a regular file can be split"):
        split_jsonl(str(fifo), 2)
    with pytest.raises(InputOpenError, match="only a regular file can be read by byte range"):
        Inputs([Span(str(fifo))])
