"""The server's pure parts, with exact answers: token bucket, stall schedule, parsing,
routing, queue placement, answer shapes (against the SDK's models)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulksend.config import parse_duration
from bulksend.errors import ConfigError
from bulksend.server.app import (
    Invalid,
    instance_of,
    message_json,
    parse_list_query,
    parse_send,
    store_size,
)
from bulksend.server.faults import Faults, TokenBucket, retry_after_seconds, stall_release
from bulksend.server.journal import SqliteJournal
from bulksend.server.options import ServerOptions, Stall
from bulksend.server.store import MessageQuery, Store


def test_token_bucket_starts_full_then_refills_at_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.1)  # empty: one token in 1/rate
    assert bucket.take(100.05) == pytest.approx(0.05)
    assert bucket.take(100.1) == 0.0
    assert bucket.take(200.0) == 0.0  # refilled, but never beyond the burst
    assert [bucket.take(200.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


@pytest.mark.parametrize(("wait", "header"), [(0.01, 1), (1.0, 1), (1.01, 2), (7.5, 8)])
def test_retry_after_seconds(wait: float, header: int) -> None:
    assert retry_after_seconds(wait) == header


@pytest.mark.parametrize(
    ("due", "released"),
    [
        (0.0, 0.0),
        (9.99, 9.99),  # before the first stall
        (10.0, 11.0),  # a stall starts at 10 s and lasts 1 s
        (10.5, 11.0),
        (11.0, 11.0),  # it has ended
        (15.0, 15.0),
        (20.2, 21.0),
        (-5.0, -5.0),
    ],
)
def test_stall_release(due: float, released: float) -> None:
    assert stall_release(100.0 + due, 100.0, Stall(10.0, 1.0)) == pytest.approx(100.0 + released)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1.5", 1.5), (" 3 s ", 3.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "-1s", "1d", "1s:2s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_stall_parse() -> None:
    assert Stall.parse("10s:1s") == Stall(10.0, 1.0)
    assert Stall.parse("500ms:200ms") == Stall(0.5, 0.2)
    for bad in ("10s", "1s:1s", "1s:0s", "x:y"):
        with pytest.raises(ConfigError):
            Stall.parse(bad)


def test_faults_due_latency_and_jitter_seeded() -> None:
    options = ServerOptions(latency_ms=100, latency_jitter_ms=50, seed=3)
    a, b = Faults(options, now=0.0), Faults(options, now=0.0)
    dues = [a.due(10.0) for _ in range(200)]
    assert dues == [b.due(10.0) for _ in range(200)]  # same seed, same draws
    assert all(10.1 <= due <= 10.15 and not stalled for due, stalled in dues)
    assert max(d for d, _ in dues) - min(d for d, _ in dues) > 0.03  # jitter does spread them


def test_options_validate_and_hide_secrets() -> None:
    options = ServerOptions(ak="AK1", sk="very-secret", token="tok-secret")
    assert "very-secret" not in repr(options)
    assert "tok-secret" not in repr(options)
    for bad in (
        {"ak": "a"},
        {"drop_rate": -0.1},
        {"rate_limit": 0},
        {"tls_key": "k"},
        {"brokers": 0},
        {"latency_ms": -1},
    ):
        with pytest.raises(ConfigError):
            ServerOptions(**bad)  # type: ignore[arg-type]
    assert not ServerOptions().misbehaves
    assert ServerOptions(stall=Stall(1, 0.5)).misbehaves


@pytest.mark.parametrize(
    ("path", "instance"),
    [
        ("/v2/rocketmq/p/instances/i-1/messages", "i-1"),
        ("/v2/reliability/p/instances/i-1/messages", "i-1"),
        ("/v2/p/rocketmq/instances/i-1/messages", "i-1"),  # the SDK's older route
        ("/v2/rocketmq/p/instances/i%201/messages/", "i 1"),
        ("/v2/kafka/p/instances/i/messages", None),
        ("/v2/rocketmq/p/instances/i/messages/x", None),
        ("/v2/rocketmq/p/instances//messages", None),
        ("v2/rocketmq/p/instances/i/messages", None),
        ("/metrics", None),
    ],
)
def test_instance_of(path: str, instance: str | None) -> None:
    assert instance_of(path) == instance


def test_parse_send() -> None:
    assert parse_send(b'{"topic":"t","body":"b"}') == ("t", "b", ())
    assert parse_send(b'{"topic":"t","body":"b","property_list":null,"x":1}') == ("t", "b", ())
    assert parse_send(
        b'{"topic":"t","body":"b","property_list":[{"name":"KEYS","value":"a b"}]}'
    ) == (
        "t",
        "b",
        (("KEYS", "a b"),),
    )
    with pytest.raises(Invalid, match="over max value"):
        parse_send(b'{"topic":"t","body":"' + b"x" * (4 * 1024 * 1024 + 1) + b'"}')


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
)


@given(_JSON_VALUES)
def test_parse_send_only_ever_raises_invalid(value: Any) -> None:
    import json

    for doc in (
        value,
        {"topic": "t", "body": "b", "property_list": value},
        {"topic": value, "body": value},
    ):
        codes: set[str] = set()
        try:
            topic, body, props = parse_send(json.dumps(doc).encode())
        except Invalid as exc:
            codes.add(exc.code)
        else:
            assert topic
            assert body
            assert all(n and isinstance(v, str) for n, v in props)
        assert codes <= {"DMS.00400001", "DMS.00400002"}


def test_parse_list_query() -> None:
    q = parse_list_query(
        "topic=t&key=a%20b&queue=3&limit=20&offset=5&start_time=1&end_time=2&msg_id=M", "i"
    )
    assert q == MessageQuery("i", "t", 3, ("a", "b"), "M", 1, 2, offset=5, limit=20)
    assert parse_list_query("", "i") == MessageQuery(instance_id="i")
    for bad in ("limit=0", "limit=10001", "offset=-1", "queue=x", "end_time=1.5"):
        with pytest.raises(Invalid):
            parse_list_query(bad, "i")


def test_store_round_robin_broker_major_and_offsets() -> None:
    store = Store(queues=2, brokers=2, keep=3)
    placed = [store.append("i", "t", "b", (), "h:1", 0) for _ in range(6)]
    assert [(m.broker, m.queue_id, m.queue_offset) for m in placed] == [
        (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1),
    ]  # fmt: skip
    other = store.append("i", "u", "b", (), "h:1", 0)
    assert (other.broker, other.queue_id, other.queue_offset) == (0, 0, 0)  # offsets are per topic
    assert len({m.msg_id for m in [*placed, other]}) == 7
    assert store.accepted == store.total == 7
    assert sorted(store.offsets()) == [
        ("i", "t", 0, 0, 2), ("i", "t", 0, 1, 2), ("i", "t", 1, 0, 1), ("i", "t", 1, 1, 1),
        ("i", "u", 0, 0, 1),
    ]  # fmt: skip
    # keep=3: ListMessages sees the newest 3, the counts go on.
    page, total = asyncio.run(store.query(MessageQuery(limit=100)))
    assert total == 3
    assert [m.seq for m in page] == [4, 5, 6]


async def test_sqlite_journal_restores_offsets(tmp_path: Path) -> None:
    db = str(tmp_path / "j.db")
    journal, restored = await SqliteJournal.open(db, commit_interval_s=0.001)
    store = Store(queues=3, journal=journal, restored=restored)
    first = [store.append("i", "t", "b", (("KEYS", "k1 k2"),), "h:1", 1000 + n) for n in range(4)]
    page, total = await store.query(MessageQuery(keys=("k2",), limit=2))
    assert total == 4
    assert page == first[:2]
    await store.close()

    journal, restored = await SqliteJournal.open(db)
    store = Store(queues=3, journal=journal, restored=restored)
    nxt = store.append("i", "t", "b", (), "h:1", 0)
    assert (nxt.seq, nxt.queue_id, nxt.queue_offset) == (4, 1, 1)
    assert (await store.query(MessageQuery(start_time=1001, end_time=1002)))[1] == 2
    assert (await store.query(MessageQuery(keys=("k",))))[1] == 0  # whole keys only
    await store.close()


def test_answers_have_the_sdks_field_names() -> None:
    from huaweicloudsdkrocketmq.v2.model.list_messages_response import ListMessagesResponse
    from huaweicloudsdkrocketmq.v2.model.message import Message
    from huaweicloudsdkrocketmq.v2.model.send_message_response import SendMessageResponse

    store = Store()
    m = store.append("i", "t", "héllo", (("KEYS", "k"),), "127.0.0.1:5", 1)
    assert set(message_json(m)) == set(Message.attribute_map.values())
    assert set(ListMessagesResponse.attribute_map.values()) == {"messages", "total"}
    assert set(SendMessageResponse.attribute_map.values()) >= {
        "topic", "body", "property_list", "msg_id", "queue_id", "queue_offset", "broker_name",
    }  # fmt: skip
    # RocketMQ's commit-log size: 84 fixed + 4+6 body bytes + 1+1 topic + 2+(4+1+1+1) properties.
    assert store_size(m) == 84 + 4 + 6 + 1 + 1 + 2 + 7
