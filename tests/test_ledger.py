"""The ledger readers and the input fingerprints: what --resume skips, what report reads,
which lines are not results (run and intent lines), legacy ledgers, pipes never opened."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulksend.errors import InputOpenError, LedgerError
from bulksend.ledger import (
    IdentitySet,
    ReadState,
    check_inputs,
    fingerprint,
    fingerprints_path,
    read_ledger,
    read_results,
    write_fingerprints,
)
from bulksend.record import Invalid, Record
from bulksend.result import Result
from bulksend.sources import canonical_input, input_key


def write_lines(path: Path, *objs: dict[str, Any], tail: bytes = b"") -> Path:
    path.write_bytes(b"".join(orjson.dumps(o) + b"\n" for o in objs) + tail)
    return path


def result(seq: int, identity: str | None, status: str = "ok", **more: Any) -> dict[str, Any]:
    return {"seq": seq, "source": f"f:{seq + 1}", "id": None, "identity": identity,
            "status": status, **more}  # fmt: skip


RUN_LINE = {"status": "run", "at": 1, "command": "send", "settings": {"rate": 5}}


# --- IdentitySet --------------------------------------------------------------------------------


def test_identity_set_bits_pages_and_other_strings() -> None:
    ids = IdentitySet()
    for identity in ["k:1", "k:1", "k:8", "k:524288", "k:9000000000", "j:1", "k:3:4", "load:7",
                     "k:01", "nocolon", "k:²", ":5"]:  # fmt: skip
        ids.add(identity)
    assert len(ids) == 11  # "k:1" twice
    for identity in ["k:1", "k:8", "k:524288", "k:9000000000", "j:1", "k:3:4", "load:7", "k:01",
                     "nocolon", "k:²", ":5"]:  # fmt: skip
        assert identity in ids, identity
    for identity in ["k:2", "k:0", "k:524289", "j:8", "x:1", "k:3", "k:3:5", "k", 5]:
        assert identity not in ids, identity


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c:d", ""]), st.integers(0, 3_000_000)), max_size=60
    ),
    st.lists(st.tuples(st.sampled_from(["a", "b", "c:d", "e"]), st.integers(0, 3_000_000))),
)
def test_identity_set_is_a_set(added: list[tuple[str, int]], probes: list[tuple[str, int]]) -> None:
    ids, plain = IdentitySet(), set()
    for key, line in added:
        ids.add(f"{key}:{line}")
        plain.add(f"{key}:{line}")
    assert len(ids) == len(plain)
    for key, line in added + probes:
        assert (f"{key}:{line}" in ids) == (f"{key}:{line}" in plain)


# --- read_ledger (--resume) ---------------------------------------------------------------------


def test_resume_reader_matches_identities_never_ids(tmp_path: Path) -> None:
    ledger = write_lines(
        tmp_path / "l.jsonl",
        RUN_LINE,
        result(0, "k:1", id="order-1"),
        result(1, "k:2", "failed", id="order-1", error_msg='server said "ok"'),
        result(2, "k:3", "invalid"),
    )
    state = read_ledger(str(ledger))
    assert state.lines == 4 and state.torn_bytes == 0 and state.legacy == 0
    assert len(state.done_identities) == 1
    same_id = Record(1, "f:2", "t", "b", (), "order-1", "k:2")
    assert state.done(Record(0, "f:1", "t", "b", (), "order-1", "k:1"))
    assert not state.done(same_id)  # an id shared with an ok record does not make it done
    assert not state.done(Invalid(2, "f:3", "x", "bad", None, "k:3"))
    assert not state.done(Record(0, "f:1", "t", "b"))  # no identity: never skipped


def test_intents_are_kept_until_an_outcome_follows(tmp_path: Path) -> None:
    def intent(seq: int, identity: str) -> dict[str, Any]:
        return {"seq": seq, "identity": identity, "status": "intent", "topic": "t",
                "key": f"K{seq}", "at": 5}  # fmt: skip

    ledger = write_lines(
        tmp_path / "l.jsonl",
        RUN_LINE,
        intent(0, "k:1"),
        intent(1, "k:2"),
        intent(2, "k:3"),
        result(0, "k:1"),
        result(1, "k:2", "failed"),
        RUN_LINE,
        intent(1, "k:2"),
        tail=b'{"seq":3,"identity":"k:4","status":"inte',
    )
    state = read_ledger(str(ledger))
    assert state.intents == {"k:3": intent(2, "k:3"), "k:2": intent(1, "k:2")}
    assert len(state.done_identities) == 1 and "k:1" in state.done_identities
    assert state.torn_bytes > 0 and not ledger.read_bytes().endswith(b"inte")


def test_lines_without_identity_match_by_canonical_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    ledger = write_lines(
        tmp_path / "l.jsonl",
        {"seq": 0, "source": "day1.jsonl:1", "id": "x", "status": "ok"},
        {"seq": 1, "source": "sub/../day1.jsonl:2", "id": "x", "status": "ok"},
        {"seq": 2, "source": "-:3", "id": None, "status": "ok"},
        {"seq": 3, "source": "load", "id": None, "status": "ok"},
        {"seq": 4, "source": "day1.jsonl:5", "identity": None, "status": "ok"},
    )
    state = read_ledger(str(ledger))
    key = input_key(str(tmp_path / "day1.jsonl"))
    assert state.legacy == 3
    assert all(f"{key}:{n}" in state.done_identities for n in (1, 2, 5))
    assert len(state.done_identities) == 3


def test_missing_ledger_is_empty_and_unreadable_one_is_an_error(tmp_path: Path) -> None:
    assert len(read_ledger(str(tmp_path / "none.jsonl")).done_identities) == 0
    with pytest.raises(LedgerError):
        read_ledger(str(tmp_path))


# --- read_results (report) ----------------------------------------------------------------------


def test_report_reader_skips_run_and_intent_lines_and_keeps_run_settings(tmp_path: Path) -> None:
    ledger = write_lines(
        tmp_path / "l.jsonl",
        RUN_LINE,
        {"seq": 0, "identity": "k:1", "status": "intent", "topic": "t", "key": "K", "at": 1},
        result(0, "k:1", shard=1, reconciled=True),
        {"seq": 1, "source": "f:2", "id": "7", "status": "failed"},  # from before identities
        tail=b'{"seq":2,',
    )
    state = ReadState()
    results = list(read_results([str(ledger)], state))
    assert results == [
        Result(seq=0, source="f:1", id=None, identity="k:1", status="ok", reconciled=True),
        Result(seq=1, source="f:2", id="7", status="failed"),
    ]
    assert state.runs == [RUN_LINE] and state.intents == 1 and state.lines == 2
    assert state.torn == [f"{ledger}:5"]


def test_report_reader_reads_stdin_and_refuses_other_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = orjson.dumps(result(0, "k:1")) + b"\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert [r.seq for r in read_results(["-"])] == [0]
    bad = write_lines(tmp_path / "bad.jsonl", result(0, "k:1"), {"hello": 1})
    with pytest.raises(LedgerError, match=r"bad.jsonl:2: not a results line"):
        list(read_results([str(bad)]))


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("status", "weird", "status"),
        ("seq", "0", "seq"),
        ("seq", -1, "seq"),
        ("latency_ms", 1e308, "latency_ms"),
        ("latency_ms", "12", "latency_ms"),
        ("latency_ms", -5, "latency_ms"),
        ("queue_ms", [1], "queue_ms"),
        ("http_status", "abc", "http_status"),
        ("http_status", True, "http_status"),
        ("attempts", 1.5, "attempts"),
        ("started_at", -1e20, "started_at"),
        ("done_at", 2**63, "done_at"),
        ("error_msg", {"a": 1}, "error_msg"),
        ("reconciled", "yes", "reconciled"),
    ],
)
def test_report_reader_refuses_a_field_a_run_never_writes(
    tmp_path: Path, field: str, value: Any, why: str
) -> None:
    # A ledger edited by hand (or by another tool) must give a line-precise error, never a
    # traceback from deep inside the stats or the HTML report's timeline.
    fine = result(0, "k:1", http_status=200, latency_ms=1.5, started_at=1, done_at=2)
    bad = write_lines(tmp_path / "odd.jsonl", fine, {**fine, "seq": 1, field: value})
    with pytest.raises(LedgerError, match=rf"odd.jsonl:2: not a results line \(bad {why}"):
        list(read_results([str(bad)]))


# --- fingerprints -------------------------------------------------------------------------------


def test_fingerprint_changes_with_content_and_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"x" * (3 << 20))
    first = fingerprint(str(path))
    assert first == fingerprint(str(path))
    assert first.startswith(f"v1:{3 << 20}:")
    stat = path.stat()
    with path.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"y")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: the tail tells
    assert fingerprint(str(path)) != first
    with pytest.raises(InputOpenError):
        fingerprint(str(tmp_path / "missing"))
    with pytest.raises(InputOpenError):
        fingerprint("-")


def test_a_fifo_is_never_opened_for_a_fingerprint(tmp_path: Path) -> None:
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)  # opening it to read would block: no writer ever comes
    with pytest.raises(InputOpenError, match="is a pipe or FIFO"):
        fingerprint(str(fifo))
    out = tmp_path / "l.jsonl"
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    write_fingerprints(str(out), [str(fifo), str(data), "-"])
    stored = orjson.loads(Path(fingerprints_path(str(out))).read_bytes())
    assert stored == {"version": 2, "inputs": {str(data.resolve()): fingerprint(str(data))}}
    with pytest.raises(LedgerError, match=r"cannot --resume over .*: it is a pipe or FIFO"):
        check_inputs(str(out), [str(data), str(fifo)], force=True)
    with pytest.raises(LedgerError, match="cannot --resume over -: it is stdin"):
        check_inputs(str(out), ["-"], force=True)


def test_no_sidecar_beside_a_device() -> None:
    write_fingerprints("/dev/null", [__file__])
    assert not os.path.exists(fingerprints_path("/dev/null"))


def test_sidecar_is_keyed_canonically_and_old_sidecars_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "day1.jsonl"
    data.write_text('{"body":"a"}\n')
    out = str(tmp_path / "l.jsonl")
    write_fingerprints(out, ["./day1.jsonl"])
    check_inputs(out, ["day1.jsonl", str(data)], force=False)
    data.write_text('{"body":"b"}\n')
    # Same size: the message says what changed (two fingerprints' first characters were
    # shown, the same as each other whenever the size is).
    with pytest.raises(LedgerError, match=r"changed since .*\(its (modification time, )?content"):
        check_inputs(out, [str(data)], force=False)
    check_inputs(out, [str(data)], force=True)
    # A sidecar from before version 2: keyed by the path as typed.
    Path(fingerprints_path(out)).write_bytes(
        orjson.dumps({"inputs": {"day1.jsonl": fingerprint(str(data))}})
    )
    check_inputs(out, ["./day1.jsonl"], force=False)
    data.write_text('{"body":"c"}\n')
    with pytest.raises(LedgerError, match="changed since"):
        check_inputs(out, ["./day1.jsonl"], force=False)
    write_fingerprints(out, ["./day1.jsonl"])
    doc = orjson.loads(Path(fingerprints_path(out)).read_bytes())
    assert doc == {"version": 2, "inputs": {canonical_input("day1.jsonl"): fingerprint(str(data))}}
