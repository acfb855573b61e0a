"""The pure parts of exactly-once: the key, KEYS, the intent line, the window, the
decision, the ledger fields, and reading a ListMessages answer. Tables, no sockets."""

from __future__ import annotations

import base64
import hashlib
import math
import re

import orjson
import pytest

from bulksend.config import Target
from bulksend.errors import BulksendError, ConfigError, ProtocolError
from bulksend.listing import (
    ListedMessage,
    ListMessagesClient,
    ListMessagesUnavailable,
    ListQuery,
    parse_page,
    printable,
    refusal_text,
)
from bulksend.reconcile import (
    DUPLICATE_AT_SERVER,
    Ambiguous,
    Found,
    Intent,
    NotFound,
    ReconcileOptions,
    attempt_in_doubt,
    decide,
    derive_key,
    intent_line,
    query_window,
    reconciled_fields,
    with_key,
)

# --- the key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "identity",
    [
        "v1:/data/day1.jsonl:1",
        "v1:/data/day1.jsonl:2",
        "v1:/data/day 1 with spaces.jsonl:1",
        "v1:/data/d\udcffay1.jsonl:1",  # a file name that is not UTF-8 (surrogateescape)
        "v1:/données/日本.jsonl:1",
        "",
        "x" * 10_000,
    ],
)
def test_derived_key_is_short_unspaced_and_url_safe(identity: str) -> None:
    key = derive_key(identity)
    assert re.fullmatch(r"bs[A-Za-z0-9_-]{20}", key)
    assert derive_key(identity) == key  # a function of the identity alone


def test_derived_key_is_pinned() -> None:
    # The key is a contract across versions: a record re-sent by a newer bulksend must
    # carry the key an older one gave it (consumers may de-duplicate on it). Changing the
    # derivation must change these lines on purpose.
    identity = "v1:/data/day1.jsonl:1"
    spec = hashlib.blake2b(identity.encode(), digest_size=15, person=b"bulksend-key-v1")
    assert derive_key(identity) == "bs" + base64.urlsafe_b64encode(spec.digest()).decode()
    assert derive_key(identity) == "bszQVceixgyMjyP9L6dHAp"


def test_derived_keys_differ_across_many_identities() -> None:
    keys = {derive_key(f"v1:/data/in.jsonl:{line}") for line in range(1, 100_001)}
    assert len(keys) == 100_000


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ((), (("KEYS", "K"),)),
        ((("TAGS", "t"),), (("TAGS", "t"), ("KEYS", "K"))),
        ((("KEYS", "order-1"),), (("KEYS", "order-1 K"),)),
        ((("KEYS", "a b"), ("TAGS", "t")), (("KEYS", "a b K"), ("TAGS", "t"))),
        ((("KEYS", "a K"),), (("KEYS", "a K"),)),  # already there: unchanged
        ((("KEYS", ""),), (("KEYS", "K"),)),
        ((("KEYS", "  "),), (("KEYS", "K"),)),
        ((("KEYS", "aK"),), (("KEYS", "aK K"),)),  # whole keys only, as RocketMQ matches
        # Only the first KEYS counts (what Record.keys and the server read).
        ((("KEYS", "a"), ("KEYS", "b")), (("KEYS", "a K"), ("KEYS", "b"))),
    ],
)
def test_with_key(
    properties: tuple[tuple[str, str], ...], expected: tuple[tuple[str, str], ...]
) -> None:
    assert with_key(properties, "K") == expected


# --- attempts in doubt --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "written", "in_doubt"),
    [
        (None, "TIMEOUT", True, True),  # the answer never came
        (None, "PROTOCOL_ERROR", True, True),  # closed before a complete answer
        (None, "TIMEOUT", False, False),  # connect timed out: nothing was sent
        (None, "CONNECT_ERROR", False, False),  # refused, unknown host, TLS
        (200, None, True, False),  # ok
        (200, "BAD_RESPONSE", True, True),  # not JSON, or no msg_id
        (200, "ANSWER_TOO_LARGE", True, True),
        (204, "BAD_RESPONSE", True, True),
        (500, "DMS.00500000", True, True),
        (502, "HTTP_502", True, True),
        (504, "HTTP_504", True, True),
        (503, "DMS.00503001", True, False),  # broker busy: not stored
        (429, "APIG.0308", True, False),  # throttled at the gateway
        (400, "DMS.00400002", True, False),
        (401, "APIGW.0301", True, False),
        (404, "APIGW.0101", True, False),
        (413, "APIGW.0201", True, False),
    ],
)
def test_attempt_in_doubt(
    status: int | None, code: str | None, written: bool, in_doubt: bool
) -> None:
    assert attempt_in_doubt(status, code, request_written=written) is in_doubt


# --- the intent line ----------------------------------------------------------------------


def test_intent_line_is_the_ledger_contract() -> None:
    intent = Intent(seq=7, identity="v1:/d/in.jsonl:8", topic="orders", key="bsk", at=1700)
    line = intent.to_json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert list(orjson.loads(line).items()) == [
        ("seq", 7),
        ("identity", "v1:/d/in.jsonl:8"),
        ("status", "intent"),
        ("topic", "orders"),
        ("key", "bsk"),
        ("at", 1700),
    ]
    assert Intent.from_line(orjson.loads(line)) == intent
    assert intent_line(7, "v1:/d/in.jsonl:8", "orders", "bsk", 1700) == line


@pytest.mark.parametrize(
    "line",
    [
        {"seq": 1, "identity": "i", "status": "ok", "topic": "t", "key": "k", "at": 1},
        {"seq": 1, "identity": "i", "status": "intent", "topic": "t", "key": "k"},
        {"seq": "1", "identity": "i", "status": "intent", "topic": "t", "key": "k", "at": 1},
        {"seq": 1, "identity": "i", "status": "intent", "topic": "t", "key": "k", "at": 1.5},
        {"seq": 1, "identity": "i", "status": "intent", "topic": "t", "key": "", "at": 1},
        {"seq": 1, "identity": 5, "status": "intent", "topic": "t", "key": "k", "at": 1},
        {"seq": True, "identity": "i", "status": "intent", "topic": "t", "key": "k", "at": 1},
    ],
)
def test_intent_from_a_bad_line_says_why(line: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="intent"):
        Intent.from_line(line)


# --- the window ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "now", "skew", "expected"),
    [
        (10_000, 13_000, 1_000, (9_000, 14_000)),
        (10_000, 13_000, 0, (10_000, 13_000)),
        (500, 600, 1_000, (0, 1_600)),  # never before the epoch
        (10_000, 9_000, 1_000, (9_000, 11_000)),  # the clock stepped back: still covers at
    ],
)
def test_query_window(at: int, now: int, skew: int, expected: tuple[int, int]) -> None:
    assert query_window(at, now, skew) == expected


# --- the decision -------------------------------------------------------------------------

INTENT = Intent(seq=0, identity="v1:/d/in.jsonl:1", topic="orders", key="bsK", at=1000)


def listed(
    msg_id: str,
    *,
    topic: str | None = "orders",
    keys: tuple[str, ...] | None = ("own", "bsK"),
    stored: int | None = 1001,
) -> ListedMessage:
    return ListedMessage(
        msg_id=msg_id,
        topic=topic,
        keys=keys,
        queue_id=3,
        queue_offset=42,
        store_timestamp=stored,
    )


@pytest.mark.parametrize(
    ("messages", "total", "kind", "ids"),
    [
        ([], None, NotFound, []),
        ([listed("A")], 1, Found, ["A"]),
        ([listed("A", keys=("bsKx",))], 1, NotFound, []),  # a looser listing: other key
        ([listed("A", topic="other")], 1, NotFound, []),
        ([listed("A", keys=None)], 1, Found, ["A"]),  # no properties given: trust the filter
        ([listed("A", topic=None)], 1, Found, ["A"]),
        ([listed("A"), listed("A")], 2, Found, ["A"]),  # the same message on two pages
        ([listed("B", stored=1005), listed("A", stored=1002)], 2, Ambiguous, ["A", "B"]),
        ([listed("B", stored=None), listed("A", stored=1002)], 2, Ambiguous, ["A", "B"]),
        ([listed("A", keys=("x",)), listed("B"), listed("C", topic="t2")], 3, Found, ["B"]),
    ],
)
def test_decide(
    messages: list[ListedMessage], total: int | None, kind: type, ids: list[str]
) -> None:
    outcome = decide(INTENT, messages, total)
    assert type(outcome) is kind and outcome.intent == INTENT
    if isinstance(outcome, Found):
        assert [outcome.message.msg_id] == ids
    if isinstance(outcome, Ambiguous):
        assert [m.msg_id for m in outcome.messages] == ids
        assert outcome.total == len(ids)


def test_ambiguous_total_is_the_servers_when_it_read_only_part() -> None:
    outcome = decide(INTENT, [listed("A"), listed("B", stored=1002)], total=25)
    assert isinstance(outcome, Ambiguous) and outcome.total == 25


def test_reconciled_fields_found() -> None:
    fields = reconciled_fields(Found(INTENT, listed("A")))
    assert fields == {
        "status": "ok",
        "reconciled": True,
        "msg_id": "A",
        "queue_id": 3,
        "queue_offset": 42,
        "broker_name": None,
    }


def test_reconciled_fields_ambiguous_names_every_copy() -> None:
    outcome = Ambiguous(INTENT, (listed("A"), listed("B", stored=1002)), total=3)
    fields = reconciled_fields(outcome)
    assert fields["status"] == "ok" and fields["reconciled"] is True
    assert fields["msg_id"] == "A"  # the oldest copy
    assert fields["error_code"] == DUPLICATE_AT_SERVER
    assert fields["error_msg"] == "3 stored messages carry key bsK: A, B and 1 more"


# --- reading an answer --------------------------------------------------------------------


def test_parse_page_reads_the_sdk_shape() -> None:
    body = orjson.dumps(
        {
            "messages": [
                {
                    "msg_id": "M1",
                    "topic": "orders",
                    "property_list": [
                        {"name": "TAGS", "value": "t"},
                        {"name": "KEYS", "value": "a bsK"},
                    ],
                    "queue_id": 2,
                    "queue_offset": "17",  # the SDK types some integers as strings
                    "store_timestamp": 1001,
                },
                {"msg_id": "M2", "queue_id": True},  # no properties, no topic, a bool id
                {"msg_id": ""},  # cannot stand for a stored record: skipped
                "junk",
                {"topic": "orders"},
            ],
            "total": 5,
        }
    )
    page = parse_page(body, where="http://h")
    assert page.total == 5
    assert page.messages == [
        ListedMessage("M1", "orders", ("a", "bsK"), 2, 17, 1001),
        ListedMessage("M2", None, None, None, None, None),
    ]


def test_parse_page_properties_without_keys() -> None:
    body = orjson.dumps({"messages": [{"msg_id": "M", "property_list": []}]})
    page = parse_page(body, where="h")
    assert page.messages[0].keys == () and page.total is None
    assert isinstance(decide(INTENT, page.messages), NotFound)


def test_parse_page_cut_answer_is_retryable() -> None:
    with pytest.raises(ProtocolError):
        parse_page(b'{"messages": [', where="h")


@pytest.mark.parametrize("body", [b"{}", b"[]", b'{"messages": 3}', b'"x"'])
def test_parse_page_other_json_is_no_listmessages(body: bytes) -> None:
    with pytest.raises(ListMessagesUnavailable, match="no messages list") as info:
        parse_page(body, where="http://h")
    assert info.value.exit_code == 2 and isinstance(info.value, BulksendError)


def test_refusal_text_scrubs_secrets_and_escapes_controls() -> None:
    body = orjson.dumps({"error_code": "X\x1b]0;pwn\x07", "error_msg": "bad SECRET here"})
    text = refusal_text(401, body, ("SECRET",))
    assert "SECRET" not in text and "\x1b" not in text and "\x07" not in text
    assert text == "HTTP 401 X\\x1b]0;pwn\\x07: bad *** here"
    assert refusal_text(404, b"", ()) == "HTTP 404"
    assert (
        refusal_text(502, b"<html>bad gateway</html>\n", ()) == "HTTP 502 <html>bad gateway</html>"
    )


def test_printable_caps_length() -> None:
    assert printable("a" * 500) == "a" * 200
    assert printable("line1\nline2") == "line1\\nline2"


# --- options and request shape ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"after_s": -1.0},
        {"after_s": math.nan},
        {"clock_skew_s": -1.0},
        {"timeout_s": 0.0},
        {"timeout_s": math.nan},
        {"page_size": 1},
        {"max_pages": 0},
        {"concurrency": 0},
    ],
)
def test_options_refuse_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ReconcileOptions(**kwargs)  # type: ignore[arg-type]


def test_query_string_is_canonical_and_carries_the_time_range() -> None:
    client = ListMessagesClient(Target("http://h:1/base", "p", "i d"))
    query = ListQuery("or ders", "bsK", 1000, 2000, limit=10, offset=20)
    url = client.url(query)
    assert str(url) == (
        "http://h:1/base/v2/rocketmq/p/instances/i%20d/messages"
        "?end_time=2000&key=bsK&limit=10&offset=20&start_time=1000&topic=or%20ders"
    )
    headers = client.headers(query)
    assert "Authorization" not in headers and headers["Host"] == "h:1"
