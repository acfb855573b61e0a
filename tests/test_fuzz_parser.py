"""No input bytes make the parser raise, and every non-blank line (every element of a JSON
array file) is exactly one item."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from bulksend.parse import parse_jsonl_line
from bulksend.record import Invalid, Item, Record
from bulksend.sources import Inputs

# No example database: nothing written into the checkout.
FUZZ = settings(max_examples=300, deadline=None, database=None)

FIELDS = ["topic", "body", "keys", "tags", "id", "property_list", "properties", "name", "value"]
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=12,
)
records = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=7)


def dumped(value: Any) -> bytes:
    """JSON text of value; ints beyond 64 bits written by hand, as another tool might."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return repr(value).encode()


# A line: structured (a record-like object, maybe damaged) or arbitrary bytes.
structured = st.builds(
    lambda obj, cut, junk: (dumped(obj)[:cut] if cut is not None else dumped(obj)) + junk,
    records | json_values,
    st.none() | st.integers(0, 40),
    st.sampled_from([b"", b"\r", b" ", b",", b"\xff", b"\xef\xbb\xbf", b"\x00", b"}"]),
)
lines = (structured | st.binary(max_size=40)).map(lambda b: b.replace(b"\n", b""))


def check_item(item: Item) -> None:
    assert isinstance(item, Record | Invalid)
    if isinstance(item, Record):
        assert item.topic
        assert item.body
        orjson.dumps(item.payload())  # sendable: valid UTF-8 text throughout
    else:
        assert item.error
        assert "\n" not in item.error


@FUZZ
@given(lines)
def test_parse_jsonl_line_never_raises(line: bytes) -> None:
    item = parse_jsonl_line(line, seq=5, source="f:3", default_topic=None)
    check_item(item)
    assert (item.seq, item.source) == (5, "f:3")


@FUZZ
@given(st.lists(lines, max_size=12), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_every_non_blank_jsonl_line_is_one_item(
    doc: list[bytes], end: bytes, final_newline: bool
) -> None:
    data = end.join(doc) + (end if final_newline and doc else b"")
    with Inputs(["-"], stdin=io.BytesIO(data), default_topic="t") as inputs:
        items = list(inputs)
    physical = data.split(b"\n")
    if physical and physical[0].startswith(b"\xef\xbb\xbf"):
        physical[0] = physical[0][3:]
    nonblank = [n for n, line in enumerate(physical, 1) if line.strip()]
    assert [i.source for i in items] == [f"-:{n}" for n in nonblank]
    assert [i.seq for i in items] == list(range(len(items)))
    for item in items:
        check_item(item)


csv_chars = st.sampled_from([*'ab,"\n\r \t\x00é\xff', "topic", "body", "prop.x", "keys"])


@FUZZ
@given(st.lists(csv_chars, max_size=60), st.booleans())
def test_csv_document_never_raises(parts: list[str], latin1: bool) -> None:
    data = "".join(parts).encode("latin-1" if latin1 else "utf-8", "replace")
    n_lines = data.count(b"\n") + 1
    with Inputs(["-"], stdin=io.BytesIO(data), fmt="csv") as inputs:
        items = list(inputs)
    assert [i.seq for i in items] == list(range(len(items)))
    line_numbers = [int(i.source.rpartition(":")[2]) for i in items]
    assert line_numbers == sorted(set(line_numbers))
    assert all(1 <= n <= n_lines for n in line_numbers)
    for item in items:
        check_item(item)


plain_cells = st.text(st.sampled_from("abé \t\x0cx"), max_size=5)


@FUZZ
@given(
    st.lists(st.lists(plain_cells, min_size=1, max_size=4), min_size=1, max_size=10),
    st.sampled_from(["\n", "\r\n"]),
)
def test_every_non_blank_unquoted_csv_line_is_one_item(rows: list[list[str]], end: str) -> None:
    text = end.join(["topic,body", *(",".join(row) for row in rows)]) + end
    with Inputs(["-"], stdin=io.BytesIO(text.encode()), fmt="csv", default_topic="d") as inputs:
        items = list(inputs)
    nonblank = [n for n, row in enumerate(rows, 2) if ",".join(row).encode().strip()]
    assert [i.source for i in items] == [f"-:{n}" for n in nonblank]
    for item in items:
        check_item(item)


@FUZZ
@given(st.lists(records | json_values, max_size=8), st.sampled_from([None, 1, 2]))
def test_json_array_gives_one_item_per_element(elements: list[Any], indent: int | None) -> None:
    text = json.dumps(elements, indent=indent, ensure_ascii=False)
    items = _read_named("a.json", text.encode())
    assert [i.seq for i in items] == list(range(len(elements)))
    for element, item in zip(elements, items, strict=True):
        check_item(item)
        if isinstance(item, Record) and isinstance(element, dict):
            body = element["body"]
            assert item.body == (
                body
                if isinstance(body, str)
                else json.dumps(body, separators=(",", ":"), ensure_ascii=False)
            )


@FUZZ
@given(lines, st.binary(max_size=60))
def test_json_array_reader_never_raises(line: bytes, junk: bytes) -> None:
    items = _read_named("a.json", b"[" + line + junk)
    assert [i.seq for i in items] == list(range(len(items)))
    for item in items:
        check_item(item)


def _read_named(name: str, data: bytes) -> list[Item]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        with Inputs([str(path)], default_topic="t") as inputs:
            return list(inputs)
