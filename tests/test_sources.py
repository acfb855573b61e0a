"""The input stage: every kind of bad input is exactly one Invalid at the right path:line
with a clear message; formats, BOM, CRLF, gzip, stdin, seq across inputs; open errors
before anything is yielded."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from pathlib import Path

import pytest

from bulksend.errors import ConfigError, InputOpenError
from bulksend.parse import CsvHeader, parse_jsonl_line, record_from_obj
from bulksend.record import Invalid, Item, Record
from bulksend.sources import MAX_LINE_BYTES, Inputs, format_for, input_key
from tests.cli_helpers import bulksend, read_jsonl


def read(*paths: str | Path, **kw: object) -> list[Item]:
    with Inputs([str(p) for p in paths], **kw) as inputs:  # type: ignore[arg-type]
        return list(inputs)


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def rec(
    seq: int,
    source: str,
    topic: str,
    body: str,
    properties: tuple[tuple[str, str], ...] = (),
    id: str | None = None,
) -> Record:
    """The Record the reader makes: its identity is its input's key and its line."""
    path, _, line = source.rpartition(":")
    return Record(seq, source, topic, body, properties, id, f"{input_key(path)}:{line}")


def only(items: list[Item]) -> Item:
    assert len(items) == 1, items
    return items[0]


# --- JSONL: valid records ------------------------------------------------------------------


def test_jsonl_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.jsonl",
        '{"topic":"t","body":"hello","keys":["k1","k2"],"tags":"tg","id":7,'
        '"property_list":[{"name":"a","value":"1"}],"properties":{"b":"2"},"other":[1]}\n',
    )
    assert only(read(path)) == rec(
        seq=0,
        source=f"{path}:1",
        topic="t",
        body="hello",
        properties=(("a", "1"), ("b", "2"), ("KEYS", "k1 k2"), ("TAGS", "tg")),
        id="7",
    )


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        ('{"a": [1, 2.5, null], "b": {"c": true}}', '{"a":[1,2.5,null],"b":{"c":true}}'),
        ("[1, 2]", "[1,2]"),
        ("42", "42"),
        ("false", "false"),
        ('"text, not re-encoded"', "text, not re-encoded"),
        ('"\\u00e9t\\u00e9"', "été"),
    ],
)
def test_non_string_body_is_sent_as_compact_json(tmp_path: Path, body: str, sent: str) -> None:
    path = write(tmp_path, "m.jsonl", f'{{"topic":"t","body":{body}}}\n')
    item = only(read(path))
    assert isinstance(item, Record)
    assert item.body == sent


def test_keys_string_and_list_joined_with_single_spaces(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.jsonl",
        '{"body":"a","keys":"one"}\n{"body":"b","keys":["x","","y z"]}\n{"body":"c","keys":[]}\n'
        '{"body":"d","keys":"","tags":""}\n',
    )
    items = read(path, default_topic="t")
    assert [i.keys for i in items if isinstance(i, Record)] == ["one", "x y z", None, None]
    assert [i.properties for i in items if isinstance(i, Record)][2:] == [(), ()]


def test_default_topic_and_own_topic(tmp_path: Path) -> None:
    path = write(
        tmp_path, "m.jsonl", '{"body":"a"}\n{"body":"b","topic":"own"}\n{"body":"c","topic":null}\n'
    )
    assert [i.topic for i in read(path, default_topic="dflt") if isinstance(i, Record)] == [
        "dflt",
        "own",
        "dflt",
    ]


def test_id_string_or_number_stored_as_str(tmp_path: Path) -> None:
    path = write(
        tmp_path, "m.jsonl", '{"body":"a","id":"x-1"}\n{"body":"b","id":12}\n{"body":"c"}\n'
    )
    items = read(path, default_topic="t")
    assert [i.id for i in items] == ["x-1", "12", None]
    key = input_key(str(path))
    assert [i.identity for i in items] == [f"{key}:1", f"{key}:2", f"{key}:3"]


# --- JSONL: one Invalid per bad line, right place, clear message -----------------------------

BAD_JSONL = [
    ('{"topic":"t","body":"a",}', "malformed JSON: trailing comma is not allowed at column 24"),
    ('{"topic":"t" "body":"a"}', "malformed JSON: unexpected character"),
    ('{"topic":"t","body":"a"', "malformed JSON: unexpected end of data"),
    ('{"topic":"t","body":"a"} {}', "malformed JSON: unexpected content after document"),
    ("[1,2]", "not a JSON object (got an array)"),
    ('"just a string"', "not a JSON object (got a string)"),
    ("null", "not a JSON object (got null)"),
    ('{"topic":"t"}', "body is missing"),
    ('{"topic":"t","body":null}', "body is null"),
    ('{"topic":"t","body":""}', "body is empty"),
    ('{"body":"a"}', "topic is missing and no default topic (--topic) is given"),
    ('{"topic":"","body":"a"}', "topic is empty"),
    ('{"topic":5,"body":"a"}', "topic is not a string (got a number)"),
    ('{"topic":"t","body":"a","id":true}', "id is not a string or a number (got a boolean)"),
    ('{"topic":"t","body":"a","id":""}', "id is empty"),
    (
        '{"topic":"t","body":"a","keys":5}',
        "keys is not a string or a list of strings (got a number)",
    ),
    ('{"topic":"t","body":"a","keys":["k",1]}', "keys[1] is not a string (got a number)"),
    ('{"topic":"t","body":"a","tags":["x"]}', "tags is not a string (got an array)"),
    ('{"topic":"t","body":"a","properties":[]}', "properties is not an object (got an array)"),
    (
        '{"topic":"t","body":"a","properties":{"n":1}}',
        'properties["n"] is not a string (got a number)',
    ),
    ('{"topic":"t","body":"a","properties":{"":"v"}}', "properties has an empty name"),
    ('{"topic":"t","body":"a","property_list":{}}', "property_list is not a list (got an object)"),
    (
        '{"topic":"t","body":"a","property_list":[{"name":"a","value":"1"},{"name":"b","value":"2"},'
        '{"name":"c","value":3}]}',
        "property_list[2].value is not a string (got a number)",
    ),
    (
        '{"topic":"t","body":"a","property_list":[{"value":"1"}]}',
        "property_list[0].name is missing",
    ),
    (
        '{"topic":"t","body":"a","property_list":[{"name":"","value":"1"}]}',
        "property_list[0].name is empty",
    ),
    (
        '{"topic":"t","body":"a","property_list":["x"]}',
        "property_list[0] is not an object (got a string)",
    ),
    (
        '{"topic":"t","body":"a","keys":"k","properties":{"KEYS":"k2"}}',
        'property "KEYS" is given more than once',
    ),
    ('{"topic":"t","body":"a","properties":{"a\\nb":1}}', 'properties["a\\nb"] is not a string'),
]


@pytest.mark.parametrize(("line", "message"), BAD_JSONL)
def test_bad_jsonl_line_is_one_invalid(tmp_path: Path, line: str, message: str) -> None:
    good = '{"topic":"t","body":"fine"}'
    path = write(tmp_path, "in.jsonl", f"{good}\n{line}\n{good}\n")
    items = read(path)
    assert [type(i) for i in items] == [Record, Invalid, Record]
    bad = items[1]
    assert isinstance(bad, Invalid)
    assert (bad.seq, bad.source, bad.raw) == (1, f"{path}:2", line)
    assert bad.error.startswith(message), bad.error
    assert "\n" not in bad.error


def test_invalid_utf8_names_the_byte(tmp_path: Path) -> None:
    path = write(tmp_path, "in.jsonl", b'{"topic":"t","body":"caf\xc3\xa9 \xff"}\n')
    bad = only(read(path))
    assert isinstance(bad, Invalid)
    assert bad.error == "invalid UTF-8 at byte 28"
    assert bad.raw == '{"topic":"t","body":"café \ufffd"}'


def test_malformed_json_column_counts_characters(tmp_path: Path) -> None:
    path = write(tmp_path, "in.jsonl", '{"body":"éé", x}\n')
    bad = only(read(path, default_topic="t"))
    assert isinstance(bad, Invalid)
    assert bad.error == "malformed JSON: unexpected character, expected a string key at column 15"


def test_invalid_keeps_a_valid_id_for_resume(tmp_path: Path) -> None:
    path = write(tmp_path, "in.jsonl", '{"id":"r-1","body":null}\n{"id":[],"body":null}\n')
    assert [i.id for i in read(path, default_topic="t")] == ["r-1", None]


def test_over_long_line_is_one_invalid_and_reading_goes_on(tmp_path: Path) -> None:
    huge = b'{"topic":"t","body":"' + b"x" * (MAX_LINE_BYTES + 10) + b'"}'
    path = write(tmp_path, "in.jsonl", huge + b'\n{"topic":"t","body":"after"}\n')
    first, second = read(path)
    assert isinstance(first, Invalid)
    assert (first.source, first.error) == (f"{path}:1", "line is longer than 8 MiB")
    assert len(first.raw) <= 1024
    assert isinstance(second, Record)
    assert (second.seq, second.source, second.body) == (1, f"{path}:2", "after")


# --- line handling ---------------------------------------------------------------------------


def test_blank_lines_skipped_without_seq_and_lines_stay_physical(tmp_path: Path) -> None:
    path = write(tmp_path, "in.jsonl", '\n  \n{"body":"a"}\n\t \r\n\n{"body":"b"}\n\n')
    items = read(path, default_topic="t")
    assert [(i.seq, i.source) for i in items] == [(0, f"{path}:3"), (1, f"{path}:6")]


def test_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, "in.jsonl", b'\xef\xbb\xbf{"body":"a"}\r\n{"body":"b"}\r\n{"body":}\r\n')
    items = read(path, default_topic="t")
    assert [i.body for i in items if isinstance(i, Record)] == ["a", "b"]
    bad = items[2]
    assert isinstance(bad, Invalid)
    assert (bad.source, bad.raw) == (f"{path}:3", '{"body":}')


def test_bom_from_a_pipe_that_hands_out_one_byte_at_a_time() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = data

        def readable(self) -> bool:
            return True

        def read1(self, n: int = -1) -> bytes:
            out, self.data = self.data[:1], self.data[1:]
            return out

    stdin = Trickle(b'\xef\xbb\xbf{"body":"a"}\n{"body":"b"}')
    items = read("-", stdin=stdin, default_topic="t")
    assert [(i.source, i.body) for i in items if isinstance(i, Record)] == [
        ("-:1", "a"),
        ("-:2", "b"),
    ]


def test_last_line_without_newline(tmp_path: Path) -> None:
    path = write(tmp_path, "in.jsonl", '{"body":"a"}\n{"body":"b"}')
    assert [i.source for i in read(path, default_topic="t")] == [f"{path}:1", f"{path}:2"]


def test_lines_spanning_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bulksend.sources.CHUNK_BYTES", 7)
    lines = [f'{{"body":"{"y" * n}"}}' for n in (1, 20, 0, 3)]
    path = write(tmp_path, "in.jsonl", "\r\n".join(lines) + "\n")
    items = read(path, default_topic="t")
    assert [(i.source, getattr(i, "body", None)) for i in items] == [
        (f"{path}:1", "y"),
        (f"{path}:2", "y" * 20),
        (f"{path}:3", None),
        (f"{path}:4", "yyy"),
    ]


# --- several inputs, stdin, gzip ---------------------------------------------------------------


def test_seq_runs_across_inputs_and_source_uses_the_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.jsonl", '{"body":"a1"}\n\n{"body":"a2"}\n')
    write(tmp_path, "b.csv", "body\nb1\n")
    stdin = io.BytesIO(b'{"body":"s1"}\n{"body":null}\n')
    with Inputs(["a.jsonl", "-", "./b.csv"], default_topic="t", stdin=stdin) as inputs:
        items = list(inputs)
    assert [(i.seq, i.source) for i in items] == [
        (0, "a.jsonl:1"),
        (1, "a.jsonl:3"),
        (2, "-:1"),
        (3, "-:2"),
        (4, "./b.csv:2"),
    ]
    assert isinstance(items[3], Invalid)


def test_stdin_defaults_to_jsonl_and_fmt_forces_csv() -> None:
    items = read("-", stdin=io.BytesIO(b"body,topic\nhi,t\n"), fmt="csv")
    assert only(items) == rec(0, "-:2", "t", "hi")
    items = read("-", stdin=io.BytesIO(b'{"body":"hi","topic":"t"}\n'))
    assert only(items) == rec(0, "-:1", "t", "hi")


def test_gzip_read_transparently_format_from_inner_extension(tmp_path: Path) -> None:
    data = b"".join(b'{"topic":"t","body":"m%d"}\n' % i for i in range(1000))
    jsonl = write(tmp_path, "m.jsonl.gz", gzip.compress(data))
    csv_gz = write(tmp_path, "m.CSV.GZ", gzip.compress(b"topic,body\r\nt,x\r\n"))
    with Inputs([str(jsonl), str(csv_gz)]) as inputs:
        assert inputs.bytes_total == jsonl.stat().st_size + csv_gz.stat().st_size
        items = list(inputs)
        assert inputs.bytes_read == inputs.bytes_total
    assert len(items) == 1001
    assert all(isinstance(i, Record) for i in items)
    assert (items[999].source, items[1000].source) == (f"{jsonl}:1000", f"{csv_gz}:2")


def test_gzip_corrupt_midway_is_one_invalid_then_next_input(tmp_path: Path) -> None:
    data = b"".join(
        b'{"topic":"t","body":"message %06d %s"}\n' % (i, os.urandom(8).hex().encode())
        for i in range(20000)
    )
    packed = gzip.compress(data)
    broken = write(tmp_path, "broken.jsonl.gz", packed[: len(packed) // 2])
    after = write(tmp_path, "after.jsonl", '{"topic":"t","body":"next"}\n')
    items = read(broken, after)
    bad = [i for i in items if isinstance(i, Invalid)]
    assert len(bad) == 1
    assert bad[0] is items[-2]
    assert "gzip data is corrupt" in bad[0].error
    assert "the rest of this file is skipped" in bad[0].error
    good = items[:-2]
    assert [i.source for i in good] == [f"{broken}:{n}" for n in range(1, len(good) + 1)]
    assert bad[0].source == f"{broken}:{len(good) + 1}"
    assert items[-1] == rec(len(items) - 1, f"{after}:1", "t", "next")


def test_bytes_total_is_none_with_stdin(tmp_path: Path) -> None:
    path = write(tmp_path, "a.jsonl", '{"body":"a"}\n')
    with Inputs([str(path), "-"], stdin=io.BytesIO(b"")) as inputs:
        assert inputs.bytes_total is None
        assert list(inputs)
        assert inputs.bytes_read == path.stat().st_size


def test_batches_is_the_same_stream_n_at_a_time(tmp_path: Path) -> None:
    path = write(tmp_path, "a.jsonl", "".join(f'{{"body":"{n}"}}\n' for n in range(10)))
    with Inputs([str(path)], default_topic="t") as inputs:
        batches = list(inputs.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [i.seq for b in batches for i in b] == list(range(10))


# --- open errors: raised up front, before anything is yielded ----------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.jsonl", "No such file or directory"),
        (lambda p: p, "Is a directory"),
        (lambda p: write(p, "x.txt", "{}"), "unknown input format"),
        (lambda p: write(p, "x.jsonl.gz", "not gzip at all"), "not a gzip file"),
    ],
)
def test_open_error_before_anything_is_yielded(tmp_path: Path, make: object, message: str) -> None:
    good = write(tmp_path, "good.jsonl", '{"topic":"t","body":"a"}\n')
    bad = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(InputOpenError, match=message) as info:
        Inputs([str(good), str(bad)])
    assert "\n" not in str(info.value)


def test_any_os_error_on_open_is_an_open_error(tmp_path: Path) -> None:
    # Permission bits do not stop root (CI runs as root); a file used as a directory
    # fails for everyone, through the same OSError path.
    path = write(tmp_path, "plain.jsonl", "{}")
    with pytest.raises(InputOpenError, match="Not a directory"):
        Inputs([str(path / "inner.jsonl")])


def test_bad_options_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Inputs([], fmt="xml")
    with pytest.raises(ConfigError):
        Inputs([], default_topic="")
    with pytest.raises(InputOpenError, match="more than once"):
        Inputs(["-", "-"])


def test_format_for() -> None:
    assert format_for("a.ndjson.gz", None) == "jsonl"
    assert format_for("a.json", None) == "jsonl"
    assert format_for("a.csv", None) == "csv"
    assert format_for("a.txt", "csv") == "csv"
    assert format_for("-", None) == "jsonl"


def test_empty_gzip_file_is_empty_input(tmp_path: Path) -> None:
    assert read(write(tmp_path, "e.jsonl.gz", b"")) == []


# --- CSV -------------------------------------------------------------------------------------


def test_csv_columns_props_and_empty_cells(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.csv",
        "topic,body,keys,tags,id,prop.color,prop.size,ignored\n"
        "t,hello,k1 k2,tg,42,red,,x\n"
        ",plain,,,,,,\n",
    )
    first, second = read(path, default_topic="dflt")
    assert first == rec(
        0, f"{path}:2", "t", "hello", (("color", "red"), ("KEYS", "k1 k2"), ("TAGS", "tg")), "42"
    )
    assert second == rec(1, f"{path}:3", "dflt", "plain")


def test_csv_quoted_multiline_record_source_is_its_first_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.csv",
        'topic,body\r\nt,"line one\r\n\r\nline ""three"", with comma"\r\nt,next\r\n',
    )
    first, second = read(path)
    assert first == rec(0, f"{path}:2", "t", 'line one\r\n\r\nline "three", with comma')
    assert second == rec(1, f"{path}:5", "t", "next")


BAD_CSV = [
    ("t,a,extra", "CSV row has 3 fields, header has 2"),
    ("t", "CSV row has 1 fields, header has 2"),
    ("t,", "body is empty"),
    (',"x"y', "malformed CSV: ',' expected after '\"'"),
    ("t\r,x", "malformed CSV: new-line character seen in unquoted field"),
]


@pytest.mark.parametrize(("row", "message"), BAD_CSV)
def test_bad_csv_row_is_one_invalid(tmp_path: Path, row: str, message: str) -> None:
    path = write(tmp_path, "in.csv", f"topic,body\nt,fine\n{row}\nt,fine\n")
    items = read(path)
    assert [type(i) for i in items] == [Record, Invalid, Record]
    bad = items[1]
    assert isinstance(bad, Invalid)
    assert (bad.seq, bad.source, bad.raw) == (1, f"{path}:3", row)
    assert bad.error.startswith(message), bad.error
    assert items[2].source == f"{path}:4"


def test_csv_invalid_utf8_blank_lines_and_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "in.csv", b"\xef\xbb\xbf\nbody,topic\n\n  \nok,t\nbad \xff,t\n")
    items = read(path)
    assert [(i.seq, i.source) for i in items] == [(0, f"{path}:5"), (1, f"{path}:6")]
    bad = items[1]
    assert isinstance(bad, Invalid)
    assert bad.error == "invalid UTF-8 at line 6, byte 5"


def test_csv_unterminated_quote_at_end(tmp_path: Path) -> None:
    path = write(tmp_path, "in.csv", 'body,topic\nok,t\n"never closed,t\nmore,t\n')
    items = read(path)
    bad = items[1]
    assert isinstance(bad, Invalid)
    assert bad.source == f"{path}:3"
    assert bad.error == (
        "malformed CSV: a quoted field opened at line 3 is never closed; "
        "the 1 line after it is read again as a row of its own"
    )
    assert bad.raw == '"never closed,t'
    assert items[2] == rec(2, f"{path}:4", "t", "more")
    assert len(items) == 3
    path = write(tmp_path, "last.csv", 'body,topic\nok,t\n"last')
    last = read(path)[1]
    assert isinstance(last, Invalid)
    assert (last.source, last.raw) == (f"{path}:3", '"last')
    assert last.error == "malformed CSV: a quoted field opened at line 3 is never closed"


# --- CSV: one stray quote costs one record -----------------------------------------------


def stray_quote_csv(tmp_path: Path, rows: int, stray: set[int], name: str = "q.csv") -> Path:
    """``topic,body`` and ``rows`` rows ``t,row I``; a row in ``stray`` opens a quote that
    nothing closes. Row I is on line I + 2."""
    lines = ["topic,body", *(f't,"row {i}' if i in stray else f"t,row {i}" for i in range(rows))]
    return write(tmp_path, name, "\n".join(lines) + "\n")


def rows_read_as_if_absent(path: Path, items: list[Item], rows: int, stray: set[int]) -> None:
    """Every row is one item, seq in row order: each stray row Invalid, the others Records
    exactly as if the stray rows had not been there."""
    assert len(items) == rows
    for i, item in enumerate(items):
        if i in stray:
            assert isinstance(item, Invalid), item
            assert (item.seq, item.source, item.raw) == (i, f"{path}:{i + 2}", f't,"row {i}')
            assert item.identity == f"{input_key(str(path))}:{i + 2}"
        else:
            assert item == rec(i, f"{path}:{i + 2}", "t", f"row {i}")


def test_csv_stray_quote_costs_one_record_not_the_rest_of_the_file(tmp_path: Path) -> None:
    path = stray_quote_csv(tmp_path, 2000, {10})
    items = read(path)
    rows_read_as_if_absent(path, items, 2000, {10})
    bad = items[10]
    assert isinstance(bad, Invalid)
    assert bad.error == (
        "malformed CSV: a quoted field opened at line 12 is never closed; "
        "the 1,989 lines after it are read again as rows of their own"
    )


def test_csv_quote_open_past_the_field_limit_is_cut_there_and_its_lines_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 1,000-byte limit: the first stray quote is cut after ~100 lines, which are read
    # again; a second stray quote far below it then runs to the end of the file.
    monkeypatch.setattr("bulksend.sources.MAX_CSV_FIELD", 1000)
    path = stray_quote_csv(tmp_path, 300, {3, 250})
    items = read(path)
    rows_read_as_if_absent(path, items, 300, {3, 250})
    first, second = items[3], items[250]
    assert isinstance(first, Invalid)
    assert isinstance(second, Invalid)
    assert first.error.startswith(
        "malformed CSV: a quoted field opened at line 5 is not closed within 1,000 bytes; the "
    )
    assert second.error == (
        "malformed CSV: a quoted field opened at line 252 is never closed; "
        "the 49 lines after it are read again as rows of their own"
    )


def test_csv_quote_open_past_the_real_field_limit(tmp_path: Path) -> None:
    # Rows of ~100 bytes: the csv module's own limit (4 Mi characters) ends the field
    # after ~42,000 of them, in the middle of a line.
    body = "x" * 90
    rows = 46_000
    lines = ["topic,body", *(f't,"{i} {body}' if i == 7 else f"t,{i} {body}" for i in range(rows))]
    path = write(tmp_path, "big.csv", "\n".join(lines) + "\n")
    items = read(path)
    assert len(items) == rows
    bad = items[7]
    assert isinstance(bad, Invalid)
    assert (bad.source, bad.raw) == (f"{path}:9", f't,"7 {body}')
    assert "opened at line 9 is not closed within 4 MiB" in bad.error
    assert [i for i in items if isinstance(i, Invalid)] == [bad]
    assert [i.body for i in items if isinstance(i, Record)] == [
        f"{i} {body}" for i in range(rows) if i != 7
    ]
    assert [i.source for i in items] == [f"{path}:{i + 2}" for i in range(rows)]


def test_csv_multiline_fields_and_a_closed_field_with_junk_stay_whole_around_a_stray_quote(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "m.csv",
        'topic,body\nt,"one\ntwo"\nt,"bad\nend"junk\nt,plain\nt,"stray\nt,after\n',
    )
    legit, junk, plain, stray, after = read(path)
    assert legit == rec(0, f"{path}:2", "t", "one\ntwo")
    # A field that is closed, then followed by junk, is one invalid row with all its lines.
    assert isinstance(junk, Invalid)
    assert (junk.source, junk.raw) == (f"{path}:4", 't,"bad\nend"junk')
    assert junk.error.startswith("malformed CSV: ',' expected after '\"'")
    assert plain == rec(2, f"{path}:6", "t", "plain")
    assert isinstance(stray, Invalid)
    assert (stray.source, stray.raw) == (f"{path}:7", 't,"stray')
    assert after == rec(4, f"{path}:8", "t", "after")


@pytest.mark.parametrize("field_limit", [50, 10_000])
def test_csv_over_long_line_swallowed_by_a_stray_quote_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field_limit: int
) -> None:
    # With the 50-byte limit the over-long line cuts the open field (as 8 MiB lines
    # always cut a 4 MiB field); with 10,000 the field runs to the end of the file.
    monkeypatch.setattr("bulksend.sources.CHUNK_BYTES", 64)  # lines are checked across reads
    monkeypatch.setattr("bulksend.sources.MAX_LINE_BYTES", 100)
    monkeypatch.setattr("bulksend.sources.MAX_CSV_FIELD", field_limit)
    long = "t," + "x" * 200
    path = write(tmp_path, "o.csv", f'topic,body\nt,"stray\nt,one\n{long}\nt,two\n')
    stray, one, over, two = read(path)
    assert isinstance(stray, Invalid)
    assert (stray.source, stray.raw) == (f"{path}:2", 't,"stray')
    assert one == rec(1, f"{path}:3", "t", "one")
    assert isinstance(over, Invalid)
    assert (over.seq, over.source, over.error) == (2, f"{path}:4", "line 4 is longer than 0 MiB")
    assert long.startswith(over.raw)
    assert two == rec(3, f"{path}:5", "t", "two")


def test_csv_stray_quote_in_the_header_row_then_the_next_line_is_the_header(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "h.csv", 'topic,"body\ntopic,body\nt,a\n')
    header, row = read(path)
    assert isinstance(header, Invalid)
    assert header.source == f"{path}:1"
    assert header.error.startswith("CSV header row: malformed CSV: a quoted field opened at line 1")
    assert row == rec(1, f"{path}:3", "t", "a")


def test_csv_stray_quote_identities_are_the_same_on_every_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bulksend.sources.MAX_CSV_FIELD", 500)
    path = stray_quote_csv(tmp_path, 300, {5, 120})
    first = [(i.seq, i.identity, type(i)) for i in read(path)]
    assert first == [(i.seq, i.identity, type(i)) for i in read(path)]
    assert len({identity for _, identity, _ in first}) == 300


def test_csv_stray_quote_send_and_resume_end_to_end(tmp_path: Path) -> None:
    path = stray_quote_csv(tmp_path, 2000, {10})
    done = bulksend("validate", "q.csv", cwd=str(tmp_path))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "q.csv:12: malformed CSV: a quoted field opened at line 12 is never closed; "
        "the 1,989 lines after it are read again as rows of their own",
        "1 problem in 2,000 records",
    ]
    out = tmp_path / "ledger.jsonl"
    send = ["send", str(path), "--embedded", "--out", str(out)]
    done = bulksend(*send, "--stats", str(tmp_path / "s.json"))
    assert done.returncode == 1, done.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    assert (stats["total"], stats["ok"], stats["invalid"]) == (2000, 1999, 1)
    first = read_jsonl(out)
    key = input_key(str(path))
    ok = {r["identity"] for r in first if r["status"] == "ok"}
    assert ok == {f"{key}:{i + 2}" for i in range(2000) if i != 10}
    # Nothing fixed: the resume skips exactly the rows that were ok and meets the stray
    # row again under the same identity.
    done = bulksend(*send, "--resume")
    assert done.returncode == 1, done.stderr
    again = read_jsonl(out)[len(first) :]
    assert [(r["identity"], r["status"]) for r in again] == [(f"{key}:12", "invalid")]
    assert re.search(r"^ *skipped +1,?999$", done.stderr, re.MULTILINE), done.stderr


# --- a file whose lines end in CR only ---------------------------------------------------

CR_HINT = "the file's lines end in CR only (a classic Mac export): convert them to LF"


def test_jsonl_with_cr_only_line_ends_says_so(tmp_path: Path) -> None:
    lines = "".join(f'{{"topic":"t","body":"cr-{i}"}}\r' for i in range(50))
    path = write(tmp_path, "cr.jsonl", lines)
    bad = only(read(path))
    assert isinstance(bad, Invalid)
    assert bad.error == f"malformed JSON: unexpected content after document at column 29; {CR_HINT}"


def test_over_long_line_with_cr_only_line_ends_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bulksend.sources.MAX_LINE_BYTES", 1000)
    lines = "".join(f'{{"topic":"t","body":"cr-{i}"}}\r' for i in range(500))
    for name, data in (("cr.jsonl", lines), ("cr.csv", "topic,body\r" + lines)):
        bad = only(read(write(tmp_path, name, data)))
        assert isinstance(bad, Invalid)
        assert bad.error.endswith(f"is longer than 0 MiB; {CR_HINT}"), bad.error


def test_csv_with_cr_only_line_ends_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, "cr.csv", "topic,body\r" + "".join(f"t,row {i}\r" for i in range(50)))
    bad = only(read(path))
    assert isinstance(bad, Invalid)
    assert bad.error == (
        f"CSV header row: malformed CSV: new-line character seen in unquoted field; {CR_HINT}"
    )


def test_a_single_stray_cr_is_not_taken_for_cr_line_ends(tmp_path: Path) -> None:
    jsonl = write(tmp_path, "in.jsonl", '{"topic":"t","body":"a\rb"}\r\n{"topic":"t","body":"c"}\n')
    csv = write(tmp_path, "in.csv", "topic,body\nt\r,x\r\n")
    for path in (jsonl, csv):
        bad = read(path)[0]
        assert isinstance(bad, Invalid)
        assert "CR only" not in bad.error


def test_csv_header_without_body_column(tmp_path: Path) -> None:
    path = write(tmp_path, "in.csv", "topic,text\nt,a\nt,b\n")
    assert [i.error for i in read(path) if isinstance(i, Invalid)] == [
        "body is missing: the CSV header has no body column"
    ] * 2


def test_csv_duplicate_property_and_header_row_error(tmp_path: Path) -> None:
    path = write(tmp_path, "in.csv", 'topic,"bo"dy\ntopic,body,keys,prop.KEYS\nt,b,k,k2\n')
    header_error, dup = read(path)
    assert isinstance(header_error, Invalid)
    assert header_error.source == f"{path}:1"
    assert header_error.error.startswith("CSV header row: malformed CSV")
    assert isinstance(dup, Invalid)
    assert (dup.source, dup.error) == (f"{path}:3", 'property "KEYS" is given more than once')


def test_csv_gzip_corrupt_midway(tmp_path: Path) -> None:
    rows = b"".join(b"t,row %06d %s\n" % (i, os.urandom(8).hex().encode()) for i in range(20000))
    packed = gzip.compress(b"topic,body\n" + rows)
    path = write(tmp_path, "in.csv.gz", packed[: len(packed) // 2])
    items = read(path)
    assert [type(i) for i in items[:-1]] == [Record] * (len(items) - 1)
    assert isinstance(items[-1], Invalid)
    assert items[-1].source == f"{path}:{len(items) + 1}"
    assert "gzip data is corrupt" in items[-1].error
    assert "t,row".startswith(items[-1].raw[:5]), items[-1].raw  # the partial line alone


def test_csv_gzip_corrupt_inside_an_open_quote_keeps_the_row_whole(tmp_path: Path) -> None:
    rows = "".join(f"t,row {i}\n" for i in range(100))
    packed = gzip.compress(f'topic,body\nt,first\nt,"open\n{rows}'.encode())
    path = write(tmp_path, "in.csv.gz", packed[:-10])  # the trailer cut: the break is last
    first, broken = read(path)
    assert first == rec(0, f"{path}:2", "t", "first")
    assert isinstance(broken, Invalid)
    assert broken.source == f"{path}:3"
    assert "gzip data is corrupt" in broken.error
    assert broken.raw.startswith('t,"open\nt,row 0\n')


# --- the pure functions ----------------------------------------------------------------------


def test_parse_jsonl_line_and_record_from_obj() -> None:
    line = b'{"topic":"t","body":"b"}\r\n'
    assert parse_jsonl_line(line, seq=3, source="f:9", default_topic=None) == Record(
        3, "f:9", "t", "b"
    )
    blank = parse_jsonl_line(b"  \n", seq=0, source="f:1", default_topic="t")
    assert isinstance(blank, Invalid)
    assert blank.error == "line is blank"
    bad = record_from_obj({"body": 1.5, "id": 3}, seq=1, source="s:1", raw="r", default_topic=None)
    assert bad == Invalid(
        1, "s:1", "r", "topic is missing and no default topic (--topic) is given", "3"
    )
    ok = record_from_obj({"body": 1.5}, seq=1, source="s:1", raw="r", default_topic="t")
    assert ok == Record(1, "s:1", "t", "1.5")


def test_csv_header_maps_rows() -> None:
    header = CsvHeader([" body ", "prop.x", "id"])
    assert header.item(["b", "1", ""], seq=0, source="s:2", raw="", default_topic="t") == Record(
        0, "s:2", "t", "b", (("x", "1"),)
    )


def test_deeply_nested_body_is_sent_exactly_or_invalid_not_a_crash(tmp_path: Path) -> None:
    deep = "[" * 300 + "]" * 300
    deeper = "[" * 1000 + "]" * 1000  # orjson reads it; Python's scanner cannot follow it
    path = write(
        tmp_path, "in.jsonl", f'{{"topic":"t","body":{deep}}}\n{{"topic":"t","body":{deeper}}}\n'
    )
    sent, bad = read(path)
    assert isinstance(sent, Record) and sent.body == deep
    assert isinstance(bad, Invalid) and bad.error == "body is nested too deeply to be read exactly"


# --- exact bodies and ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("1E2", "1E2"),
        ("-0", "-0"),
        ("1.0000000000000000000001", "1.0000000000000000000001"),
        (
            '{ "z" : 1e-7 , "a" : [ 18446744073709551616 , "x  y" ] }',
            '{"z":1e-7,"a":[18446744073709551616,"x  y"]}',
        ),
        ('{"s":"\\u00e9\\n","k":{"b":1,"a":2}}', '{"s":"\\u00e9\\n","k":{"b":1,"a":2}}'),
        ('[ "a\\"]" , 2 ]', '["a\\"]",2]'),
    ],
)
def test_non_string_body_is_the_inputs_own_json_text(tmp_path: Path, body: str, sent: str) -> None:
    path = write(tmp_path, "m.jsonl", f'{{"topic":"t", "body" :  {body}  ,"id":1}}\n')
    item = only(read(path))
    assert isinstance(item, Record)
    assert item.body == sent


@pytest.mark.parametrize(
    ("line", "sent"),
    [
        ('{"topic":"t","body":1,"body":[2, 3]}', "[2,3]"),  # the last, as orjson reads it
        ('{"topic":"t","x":{"body":2},"body":[1]}', "[1]"),
        ('{"topic":"body","body":1E2}', "1E2"),
        ('{"topic":"t","bo\\u0064y":[1],"x":{"body":2}}', "[1]"),  # an escaped key
        ('{"topic":"t","x":"\\"body\\":9","body":[1]}', "[1]"),
    ],
)
def test_the_top_level_body_member_is_found_wherever_body_appears(
    tmp_path: Path, line: str, sent: str
) -> None:
    path = write(tmp_path, "m.jsonl", line + "\n")
    item = only(read(path))
    assert isinstance(item, Record) and item.body == sent


@pytest.mark.parametrize(
    ("rid", "kept"),
    [
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("18446744073709551616", "18446744073709551616"),
        ("-9223372036854775809", "-9223372036854775809"),
        ("1E2", "1E2"),
        ("2.50", "2.50"),
        ("-0", "-0"),
        ("42", "42"),
    ],
)
def test_numeric_id_keeps_its_exact_text(tmp_path: Path, rid: str, kept: str) -> None:
    path = write(
        tmp_path, "m.jsonl", f'{{"topic":"t","body":"b","id":{rid}}}\n{{"topic":"t","id":{rid}}}\n'
    )
    good, bad = read(path)
    assert good.id == kept and bad.id == kept  # an invalid record keeps its id too


def test_library_objects_big_int_body_is_invalid_not_a_float() -> None:
    item = record_from_obj({"body": {"n": 2**70}}, seq=0, source="s:1", raw="r", default_topic="t")
    assert isinstance(item, Invalid) and item.error.startswith("body cannot be sent as JSON")


# --- replaying a --failed file ------------------------------------------------------------------


def test_replayed_invalid_record_keeps_its_original_reason(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "failed.jsonl",
        '{"_raw":"{\\"topic\\":\\"t\\"","_error":"malformed JSON: unexpected end of data at column 12","_source":"in.jsonl:7"}\n'
        '{"_raw":"x","_error":"","_source":"in.jsonl:8"}\n'
        '{"topic":"t","body":"again","_error":"DMS.00503001: busy","_source":"in.jsonl:9"}\n',
    )
    first, second, third = read(path)
    assert isinstance(first, Invalid)
    assert (first.error, first.raw) == (
        "malformed JSON: unexpected end of data at column 12",
        '{"topic":"t"',
    )
    assert first.source == f"{path}:1"
    assert isinstance(second, Invalid) and second.error == "body is missing"  # no reason kept
    assert isinstance(third, Record) and third.body == "again"


# --- JSON arrays ----------------------------------------------------------------------------------


def test_json_array_file_is_read_as_records(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "a.json",
        '\ufeff  [\n  {"topic": "t", "body": "one"},\n  {"topic": "t", "body": {"n": 1E2}},'
        ' {"topic": "t"},\n  [1],\n  {"topic": "t", "body": "f\u00fcnf", "id": 123456789012345678901234567890}\n]\n',
    )
    items = read(path)
    assert [(i.seq, i.source) for i in items] == [
        (0, f"{path}:2:3"),
        (1, f"{path}:3:3"),
        (2, f"{path}:3:39"),
        (3, f"{path}:4:3"),
        (4, f"{path}:5:3"),
    ]
    one, two, three, four, five = items
    assert isinstance(one, Record) and one.body == "one"
    assert isinstance(two, Record) and two.body == '{"n":1E2}'
    assert isinstance(three, Invalid) and three.error == "body is missing"
    assert three.raw == '{"topic": "t"}'
    assert isinstance(four, Invalid) and four.error == "not a JSON object (got an array)"
    assert (
        isinstance(five, Record)
        and five.body == "fünf"
        and five.id == "123456789012345678901234567890"
    )
    key = input_key(str(path))
    assert [i.identity for i in items] == [f"{key}:{i.source.split(':', 1)[1]}" for i in items]
    assert len({i.identity for i in items}) == 5


def test_one_line_json_array_gives_each_element_its_own_column(tmp_path: Path) -> None:
    path = write(
        tmp_path, "a.json", json_dumps([{"topic": "t", "body": f"m{i}"} for i in range(3)])
    )
    items = read(path)
    assert [i.source for i in items] == [f"{path}:1:2", f"{path}:1:32", f"{path}:1:62"]
    assert len({i.identity for i in items}) == 3


def test_json_named_jsonl_is_still_jsonl_and_empty_array_is_empty(tmp_path: Path) -> None:
    lines = write(tmp_path, "l.json", '\n{"topic":"t","body":"a"}\n{"topic":"t","body":"b"}\n')
    assert [i.source for i in read(lines)] == [f"{lines}:2", f"{lines}:3"]
    assert read(write(tmp_path, "e.json", " [ ] \n")) == []
    assert read(write(tmp_path, "blank.json", " \n\n")) == []


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ('[{"topic":"t","body":"a"},]', "1:27", "Expecting value: line 1 column 27"),
        (
            '[{"topic":"t","body":"a"} {"body":"b"}]',
            "1:27",
            "Expecting ',' delimiter or ']': line 1 column 27",
        ),
        (
            '[{"topic":"t","body":"a"},\n{"topic":"t","bo',
            "2:1",
            "Unterminated string starting at: line 2 column 14",
        ),
        (
            '[{"topic":"t","body":"a"},\n{"topic":"t",}',
            "2:1",
            "Expecting property name enclosed in double quotes: line 2 column 14",
        ),
        ('[{"topic":"t","body":"a"}] x', "1:28", "Extra data: line 1 column 28"),
        ('[{"topic":"t","body":"a"}', "1:26", "Expecting ',' delimiter or ']': line 1 column 26"),
    ],
)
def test_broken_json_array_is_one_invalid_for_the_rest(
    tmp_path: Path, text: str, where: str, message: str
) -> None:
    path = write(tmp_path, "a.json", text)
    first, rest = read(path)
    assert isinstance(first, Record) and first.body == "a"
    assert isinstance(rest, Invalid)
    assert rest.source == f"{path}:{where}"
    assert rest.error == f"malformed JSON array: {message}; the rest of this file is skipped"


def test_big_json_array_streams_across_chunks_gzip_and_bad_utf8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bulksend.sources.CHUNK_BYTES", 64)  # elements straddle every read
    records = [{"topic": "t", "body": f"message {i} " + "é" * (i % 7), "id": i} for i in range(300)]
    text = "[\n" + ",\n".join(json_dumps(r) for r in records) + "\n]"
    data = text.encode().replace(b"message 150 ", b"message \xff ")
    path = tmp_path / "big.json.gz"
    path.write_bytes(gzip.compress(data))
    items = read(path)
    assert [i.source for i in items] == [f"{path}:{n}:1" for n in range(2, 302)]
    bad = items[150]
    assert isinstance(bad, Invalid) and bad.error.startswith("invalid UTF-8 at byte")
    assert [i.body for i in items if isinstance(i, Record)] == [
        r["body"] for n, r in enumerate(records) if n != 150
    ]


def json_dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)
