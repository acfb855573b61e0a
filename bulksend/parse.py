"""What one input record means: a JSONL line or a CSV row in, a ``Record`` or an ``Invalid``
out. Pure and I/O-free; ``sources`` reads, splits and numbers the lines.

The record rules (CSV columns map onto the same object, see ``CsvHeader``)::

    {"topic"?, "body", "property_list"?, "properties"?, "keys"?, "tags"?, "id"?}

- ``body``: a string is sent as is; any other JSON value is sent as the input's own JSON
  text of it, whitespace outside strings dropped: numbers, strings and key order exactly as
  written (``1E2`` stays ``1E2``, a 30-digit integer stays whole). Missing, null or ``""``
  is invalid.
- ``topic``: a non-empty string. Missing or null takes ``default_topic`` (``--topic``).
- ``property_list`` ``[{"name", "value"}, ...]`` and ``properties`` ``{name: value}``: names
  and values are strings, names are not empty.
- ``keys``: a string, or a list of strings joined with single spaces (RocketMQ's
  ``Message.setKeys(Collection)`` joins with ``MessageConst.KEY_SEPARATOR``, a space) ->
  the ``KEYS`` property. ``tags``: a string -> ``TAGS``. ``""`` and ``[]`` mean "none".
- ``id``: a non-empty string, or a number (stored as the input's text of it, so an integer
  past 64 bits or ``1E2`` keeps its exact digits).
- null for any optional field means absent; unknown fields are ignored.
- A property name given twice (say ``keys`` and a ``KEYS`` property) is invalid: which one
  the broker would keep is unspecified, so we refuse to guess.
- A line of a ``--failed`` file for an invalid record, ``{"_raw", "_error", "_source"}``,
  is that record again: invalid, with its original reason (not "body is missing").

Errors name the field and what is wrong with it, and are always one line: names taken from
the input are JSON-quoted. Each record gets at most one error, the first found.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

from bulksend.record import KEYS, TAGS, Invalid, Item, Record

__all__ = [
    "CsvHeader",
    "decode_raw",
    "parse_jsonl",
    "parse_jsonl_line",
    "record_from_obj",
    "scan_json_value",
    "skip_json_space",
]

_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError

#: What the CSV module calls each of our columns; any other property is ``prop.NAME``.
CSV_FIELDS: Final = ("topic", "body", "keys", "tags", "id")
CSV_PROP_PREFIX: Final = "prop."


class _Reject(Exception):
    """Internal: the record is invalid for the reason given. Never leaves this module."""


# --- JSONL -------------------------------------------------------------------------------


def parse_jsonl_line(
    line: bytes,
    *,
    seq: int,
    source: str,
    default_topic: str | None,
    identity: str | None = None,
) -> Item:
    """One JSONL line (without or with its ``\\n``/``\\r\\n``) -> a Record or an Invalid.

    Never raises on any input bytes. A blank line, which ``Inputs`` skips before it gets
    here, is an Invalid ("line is blank")."""
    item = parse_jsonl(line, seq, source, default_topic, identity)
    if item is None:
        return Invalid(seq, source, decode_raw(line), "line is blank", None, identity)
    return item


def parse_jsonl(
    line: bytes, seq: int, source: str, default_topic: str | None, identity: str | None
) -> Item | None:
    """The hot path behind ``parse_jsonl_line``: positional, and None for a blank line
    (ASCII-whitespace only) so the reader can skip it without using up a ``seq``.

    Blankness is tested only after orjson has failed, so a normal line pays nothing for it.
    """
    try:
        obj = _loads(line)
    except _JSONDecodeError as exc:
        if not line.strip():
            return None
        return Invalid(seq, source, decode_raw(line), _json_error(line, exc), None, identity)
    if type(obj) is not dict:
        return Invalid(
            seq, source, decode_raw(line), f"not a JSON object (got {_kind(obj)})", None, identity
        )
    try:
        return _record(obj, seq, source, default_topic, identity, line)
    except _Reject as exc:
        return _invalid(obj, seq, source, decode_raw(line), str(exc), identity, line)


def decode_raw(line: bytes) -> str:
    """An input line as text for ``Invalid.raw``: line end dropped, bad UTF-8 replaced."""
    return line.rstrip(b"\r\n").decode("utf-8", "replace")


def _json_error(line: bytes, exc: orjson.JSONDecodeError) -> str:
    # orjson reports bad UTF-8 at column 1 whatever its place; find the real byte.
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"invalid UTF-8 at byte {bad.start + 1}"
    # colno counts characters, 1-based: what an editor shows.
    return f"malformed JSON: {exc.msg} at column {exc.colno}"


# --- the record rules, shared by JSONL and CSV ------------------------------------------


def record_from_obj(
    obj: dict[str, Any],
    *,
    seq: int,
    source: str,
    raw: str,
    default_topic: str | None,
    identity: str | None = None,
) -> Item:
    """A decoded JSON object (or a CSV row mapped onto one) -> a Record or an Invalid
    carrying ``raw``. Never raises. With no input text behind ``obj``, a non-string body is
    sent as ``orjson.dumps`` writes it (an int past 64 bits cannot be: the record is
    invalid)."""
    try:
        return _record(obj, seq, source, default_topic, identity, None)
    except _Reject as exc:
        return _invalid(obj, seq, source, raw, str(exc), identity, None)


def _invalid(
    obj: dict[str, Any],
    seq: int,
    source: str,
    raw: str,
    error: str,
    identity: str | None,
    line: bytes | None,
) -> Invalid:
    if "body" not in obj and "_error" in obj and "_raw" in obj:
        replayed = _replayed(obj, seq, source, identity)
        if replayed is not None:
            return replayed
    return Invalid(seq, source, raw, error, _id_or_none(obj, line), identity)


def _replayed(obj: dict[str, Any], seq: int, source: str, identity: str | None) -> Invalid | None:
    """A ``--failed`` file's line for an invalid record: that record, with its reason."""
    raw, error = obj["_raw"], obj["_error"]
    if type(raw) is not str or type(error) is not str or not error:
        return None
    return Invalid(seq, source, raw, " ".join(error.split()), None, identity)


def _record(
    obj: dict[str, Any],
    seq: int,
    source: str,
    default_topic: str | None,
    identity: str | None,
    line: bytes | None,
) -> Record:
    """``line``: the JSON text ``obj`` was decoded from, if any, for exact numbers."""
    get = obj.get
    body = get("body")
    if type(body) is not str:
        if body is None:
            raise _Reject("body is null" if "body" in obj else "body is missing")
        body = _body_json(body) if line is None else _member_text(line, "body")
    elif not body:
        raise _Reject("body is empty")
    topic = get("topic")
    if topic is None:
        topic = default_topic
        if topic is None:
            raise _Reject("topic is missing and no default topic (--topic) is given")
    elif type(topic) is not str:
        raise _Reject(f"topic is not a string (got {_kind(topic)})")
    elif not topic:
        raise _Reject("topic is empty")
    rid = get("id")
    if rid is not None:
        rid = _id(rid, line)
    plist, pdict, keys, tags = get("property_list"), get("properties"), get("keys"), get("tags")
    if plist is None and pdict is None and keys is None and tags is None:
        return Record(seq, source, topic, body, (), rid, identity)
    return Record(seq, source, topic, body, _properties(plist, pdict, keys, tags), rid, identity)


def _body_json(body: Any) -> str:
    try:
        return orjson.dumps(body).decode()
    except orjson.JSONEncodeError as exc:  # nested too deep, or an int past 64 bits
        raise _Reject(f"body cannot be sent as JSON: {exc}") from None


def _id(rid: Any, line: bytes | None) -> str:
    if type(rid) is str:
        if not rid:
            raise _Reject("id is empty")
        return rid
    # orjson reads an integer past 64 bits as a float, and both -0 and 0 as 0: take those
    # from the text. Any other int's str is exactly its JSON text.
    if type(rid) is int and (rid or line is None):
        return str(rid)
    if type(rid) is int or type(rid) is float:
        return str(rid) if line is None else _member_text(line, "id")
    raise _Reject(f"id is not a string or a number (got {_kind(rid)})")


def _id_or_none(obj: dict[str, Any], line: bytes | None) -> str | None:
    """The record's id for an Invalid, kept in its result line; None if unusable."""
    rid = obj.get("id")
    if rid is None:
        return None
    try:
        return _id(rid, line)
    except _Reject:
        return None


# --- a member's own JSON text ------------------------------------------------------------

#: The stdlib's C scanner (``_json``), which reports where each value ends: orjson gives
#: values only. Numbers stay text (no int() of a 5,000-digit number), and it runs only for
#: the rare non-string body or float id, so string bodies keep orjson's speed.
_scan = json.scanner.make_scanner(  # type: ignore[attr-defined]
    json.JSONDecoder(parse_int=str, parse_float=str, parse_constant=str)
)
_SPACE = re.compile(r"[ \t\n\r]*")


def scan_json_value(text: str, at: int) -> int:
    """Where the JSON value starting at ``text[at]`` ends. Raises StopIteration (no value
    there), JSONDecodeError, or RecursionError (nested past Python's recursion limit)."""
    end: int = _scan(text, at)[1]
    return end


#: A JSON string (kept whole) or a run of JSON whitespace (dropped). A raw tab, CR or LF
#: cannot be inside a valid string, and orjson has checked the line.
_COMPACT = re.compile(r'("(?:[^"\\]|\\.)*")|[ \t\n\r]+')


def skip_json_space(text: str, at: int) -> int:
    """Past the JSON whitespace at ``text[at]``."""
    # Compact JSON has none: a look at one character costs a fifth of a regex match.
    if at >= len(text) or text[at] not in " \t\n\r":
        return at
    match = _SPACE.match(text, at)
    return at if match is None else match.end()


def _member_text(line: bytes, name: str) -> str:
    """The JSON text of top-level member ``name`` in the object on ``line`` (the last one
    when repeated, which is orjson's choice too), whitespace outside strings dropped.
    ``line`` must hold a valid JSON object that has ``name``: orjson has decoded it."""
    text = line.decode()
    try:
        found = _member_at(text, name)
    except RecursionError:
        raise _Reject(f"{name} is nested too deeply to be read exactly") from None
    if found is None:  # cannot happen for a line orjson decoded to a dict holding name
        raise _Reject(f"{name} cannot be read exactly from the line")
    value = text[found[0] : found[1]]
    if " " in value or "\t" in value or "\n" in value or "\r" in value:
        value = _COMPACT.sub(lambda m: m.group(1) or "", value)
    return value


def _member_at(text: str, name: str) -> tuple[int, int] | None:
    """Where the value of top-level member ``name`` starts and ends in ``text``."""
    space = skip_json_space
    token = f'"{name}"'
    # Shortcut, one scan instead of one per member. With no backslash in the line every
    # '"' opens or closes a string, so the text '"name"' can only be that string whole;
    # found once, it is the top-level key orjson saw (a key with escapes, or a second
    # occurrence anywhere, takes the walk below).
    if "\\" not in text and text.count(token) == 1:
        start = space(text, space(text, text.index(token) + len(token)) + 1)  # past ":"
        return start, scan_json_value(text, start)
    found = None
    at = space(text, space(text, 0) + 1)  # past "{"
    while text[at] == '"':
        key, at = _scan(text, at)
        start = space(text, space(text, at) + 1)  # past ":"
        at = scan_json_value(text, start)
        if key == name:
            found = (start, at)
        at = space(text, at)
        if text[at] != ",":
            break
        at = space(text, at + 1)
    return found


def _properties(plist: Any, pdict: Any, keys: Any, tags: Any) -> tuple[tuple[str, str], ...]:
    out = [] if plist is None else _property_list(plist)
    if pdict is not None:
        if type(pdict) is not dict:
            raise _Reject(f"properties is not an object (got {_kind(pdict)})")
        for name, value in pdict.items():
            if not name:
                raise _Reject("properties has an empty name")
            if type(value) is not str:
                raise _Reject(f"properties[{_quote(name)}] is not a string (got {_kind(value)})")
            out.append((name, value))
    if keys is not None:
        if type(keys) is list:
            keys = _join_keys(keys)
        elif type(keys) is not str:
            raise _Reject(f"keys is not a string or a list of strings (got {_kind(keys)})")
        if keys:
            out.append((KEYS, keys))
    if tags is not None:
        if type(tags) is not str:
            raise _Reject(f"tags is not a string (got {_kind(tags)})")
        if tags:
            out.append((TAGS, tags))
    # KEYS and TAGS alone cannot clash: only look when other properties are given.
    if (plist is not None or pdict is not None) and len(out) > 1:
        seen: set[str] = set()
        for name, _ in out:
            if name in seen:
                raise _Reject(f"property {_quote(name)} is given more than once")
            seen.add(name)
    return tuple(out)


def _property_list(plist: Any) -> list[tuple[str, str]]:
    if type(plist) is not list:
        raise _Reject(f"property_list is not a list (got {_kind(plist)})")
    out: list[tuple[str, str]] = []
    for i, prop in enumerate(plist):
        where = f"property_list[{i}]"
        if type(prop) is not dict:
            raise _Reject(f"{where} is not an object (got {_kind(prop)})")
        name = _string(prop, "name", f"{where}.name")
        if not name:
            raise _Reject(f"{where}.name is empty")
        out.append((name, _string(prop, "value", f"{where}.value")))
    return out


def _join_keys(keys: list[Any]) -> str:
    for i, key in enumerate(keys):
        if type(key) is not str:
            raise _Reject(f"keys[{i}] is not a string (got {_kind(key)})")
    return " ".join(k for k in keys if k)


def _string(obj: dict[str, Any], field: str, where: str) -> str:
    value = obj.get(field)
    if type(value) is str:
        return value
    if field not in obj:
        raise _Reject(f"{where} is missing")
    raise _Reject(f"{where} is not a string (got {_kind(value)})")


_KINDS: Final[dict[type, str]] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _kind(value: Any) -> str:
    """A JSON value's type in JSON's words, for messages: "an array", "null"."""
    return _KINDS.get(type(value), type(value).__name__)


def _quote(name: str) -> str:
    """A name taken from the input, JSON-quoted so a message stays one unambiguous line."""
    return orjson.dumps(name).decode()


# --- CSV ---------------------------------------------------------------------------------


class CsvHeader:
    """A CSV file's columns, from its header row: ``topic``, ``body``, ``keys``, ``tags``,
    ``id``, and ``prop.NAME`` for any other property; other columns are ignored, names
    are stripped of surrounding spaces. An empty cell is an absent field, except that an
    empty ``body`` is reported as empty rather than missing."""

    __slots__ = ("_columns", "_problem", "width")

    def __init__(self, names: list[str]) -> None:
        self.width = len(names)
        #: (index, field) for each column we use; field is a CSV_FIELDS name or "prop.X".
        self._columns: list[tuple[int, str]] = []
        self._problem: str | None = None
        seen: set[str] = set()
        for i, raw_name in enumerate(names):
            name = raw_name.strip()
            if name not in CSV_FIELDS and not name.startswith(CSV_PROP_PREFIX):
                continue
            if name in seen:
                self._problem = f"the CSV header has column {_quote(name)} twice"
            seen.add(name)
            self._columns.append((i, name))
        if self._problem is None and "body" not in seen:
            self._problem = "body is missing: the CSV header has no body column"

    def item(
        self,
        row: list[str],
        *,
        seq: int,
        source: str,
        raw: str,
        default_topic: str | None,
        identity: str | None = None,
    ) -> Item:
        """One data row -> a Record or an Invalid. Never raises."""
        if self._problem is not None:
            return Invalid(seq, source, raw, self._problem, None, identity)
        if len(row) != self.width:
            return Invalid(
                seq,
                source,
                raw,
                f"CSV row has {len(row)} fields, header has {self.width}",
                None,
                identity,
            )
        obj: dict[str, Any] = {}
        props: dict[str, str] = {}
        for i, name in self._columns:
            value = row[i]
            if name == "body":
                obj[name] = value
            elif not value:
                continue
            elif name.startswith(CSV_PROP_PREFIX):
                props[name[len(CSV_PROP_PREFIX) :]] = value
            else:
                obj[name] = value
        if props:
            obj["properties"] = props
        return record_from_obj(
            obj, seq=seq, source=source, raw=raw, default_topic=default_topic, identity=identity
        )
