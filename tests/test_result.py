"""The ledger line: ``Result.to_json_line`` is generated from the fields, and must say exactly
what orjson's serialisation of the dataclass says, for any value a field can hold."""

from __future__ import annotations

import dataclasses

import orjson
from hypothesis import given
from hypothesis import strategies as st

from bulksend.result import Result


def as_orjson_writes_it(result: Result) -> bytes:
    """orjson's serialisation of the dataclass, less ``reconciled`` when it is None."""
    fields = orjson.loads(orjson.dumps(result))
    if result.reconciled is None:
        del fields["reconciled"]
    return orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)


texts = st.text()  # any code point but lone surrogates, which no JSON encoder accepts
maybe_text = st.none() | texts
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # orjson's range
maybe_int = st.none() | ints
maybe_float = st.none() | st.floats()  # NaN and infinities included (orjson: null)

results = st.builds(
    Result,
    seq=ints,
    source=texts,
    id=maybe_text,
    status=st.sampled_from(["ok", "failed", "invalid", "skipped"]) | texts,
    http_status=maybe_int,
    msg_id=maybe_text,
    queue_id=maybe_int,
    queue_offset=maybe_int,
    broker_name=maybe_text,
    attempts=ints,
    latency_ms=maybe_float,
    error_code=maybe_text,
    error_msg=maybe_text,
    request_id=maybe_text,
    started_at=maybe_int,
    done_at=maybe_int,
    intended_at=maybe_int,
    queue_ms=maybe_float,
    reconciled=st.none() | st.booleans(),
)


@given(results)
def test_the_line_is_the_dataclass_as_orjson_writes_it(result: Result) -> None:
    line = result.to_json_line()
    assert line == as_orjson_writes_it(result)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the text
    written = orjson.loads(orjson.dumps(dataclasses.asdict(result)))
    if result.reconciled is None:
        del written["reconciled"]
    assert orjson.loads(line) == written


def test_every_field_is_written_in_order_with_its_type() -> None:
    result = Result(
        seq=7,
        source='in "quoted"\\path:8\n',
        id=None,
        status="ok",
        http_status=200,
        latency_ms=1.25,
        error_msg="\u2028 ünïcode \x00",
    )
    decoded = orjson.loads(result.to_json_line())
    fields = [f.name for f in dataclasses.fields(Result)]
    assert list(decoded) == [name for name in fields if name != "reconciled"]
    result.reconciled = True
    assert list(orjson.loads(result.to_json_line())) == fields
    assert decoded["seq"] == 7 and decoded["source"] == 'in "quoted"\\path:8\n'
    assert decoded["id"] is None and decoded["http_status"] == 200
    assert decoded["latency_ms"] == 1.25 and decoded["error_msg"] == "\u2028 ünïcode \x00"
