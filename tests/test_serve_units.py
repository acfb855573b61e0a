"""The server's pure parts, with exact answers: token bucket, stall schedule, parsing,
routing, queue placement, answer shapes (against the SDK's models)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
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
from bulksend.server.store import MessageQuery, Store, StoredMessage, StoreError


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
    keys = [{"name": "KEYS", "value": "a b"}]
    assert parse_send(b'{"topic":"t","body":"b"}') == (
        "t", "b", (), {"topic": "t", "body": "b", "property_list": []},
    )  # fmt: skip
    assert parse_send(b'{"topic":"t","body":"b","property_list":null,"x":1}') == (
        "t", "b", (), {"topic": "t", "body": "b", "property_list": []},
    )  # fmt: skip
    assert parse_send(
        b'{"topic":"t","body":"b","property_list":[{"name":"KEYS","value":"a b"}]}'
    ) == ("t", "b", (("KEYS", "a b"),), {"topic": "t", "body": "b", "property_list": keys})
    # The answer echoes topic, body and property_list, nothing else the request held.
    assert parse_send(
        b'{"x":1,"topic":"t","body":"b","property_list":[{"name":"KEYS","value":"a b","y":2}]}'
    ) == ("t", "b", (("KEYS", "a b"),), {"topic": "t", "body": "b", "property_list": keys})
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
            topic, body, props, echo = parse_send(json.dumps(doc).encode())
        except Invalid as exc:
            codes.add(exc.code)
        else:
            assert topic
            assert body
            assert all(n and isinstance(v, str) for n, v in props)
            assert echo == {
                "topic": topic,
                "body": body,
                "property_list": [{"name": n, "value": v} for n, v in props],
            }
        assert codes <= {"DMS.00400001", "DMS.00400002"}


def test_parse_list_query() -> None:
    q = parse_list_query(
        "topic=t&key=a%20b&queue=3&limit=20&offset=5&start_time=1&end_time=2&msg_id=M", "i"
    )
    assert q == MessageQuery("i", "t", 3, ("a", "b"), "M", 1, 2, offset=5, limit=20)
    assert parse_list_query("msg_id=M", "i") == MessageQuery(instance_id="i", msg_id="M")
    assert parse_list_query("start_time=0&end_time=9", "i") == MessageQuery(
        instance_id="i", start_time=0, end_time=9
    )
    hundred = "%20".join(f"k{n}" for n in range(100))
    assert len(parse_list_query(f"msg_id=M&key={hundred}", "i").keys) == 100
    for bad in (
        "",  # as the real API: the time range is required without msg_id
        "topic=t&key=k",
        "start_time=1",
        "end_time=1",
        "msg_id=&start_time=1",
        "msg_id=M&limit=0",
        "msg_id=M&limit=10001",
        "msg_id=M&offset=-1",
        "msg_id=M&queue=x",
        "msg_id=M&end_time=1.5",
        f"msg_id=M&key={hundred}%20k100",  # 101 keys
    ):
        with pytest.raises(Invalid) as info:
            parse_list_query(bad, "i")
        assert info.value.code == "DMS.00400800"


def append(store: Store, *args: Any) -> StoredMessage:
    """Store.append for an in-memory store: the message (nothing to wait for)."""
    message, commit = store.append(*args)
    assert commit is None
    return message


def test_store_round_robin_broker_major_and_offsets() -> None:
    store = Store(queues=2, brokers=2, keep=3)
    placed = [append(store, "i", "t", "b", (), "h:1", 0) for _ in range(6)]
    assert [(m.broker, m.queue_id, m.queue_offset) for m in placed] == [
        (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1),
    ]  # fmt: skip
    other = append(store, "i", "u", "b", (), "h:1", 0)
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


def keyed(n: int, keys: str, at: int) -> tuple[Any, ...]:
    """Store.append's arguments for message n with KEYS ``keys``, stored at ``at`` ms."""
    return ("i", "t", f"b{n}", (("KEYS", keys),) if keys else (), "h:1", at)


async def query_both(stores: list[Store], **query: Any) -> tuple[list[int], int]:
    """(arrival numbers of the page, total) from each store; they must agree."""
    answers = []
    for store in stores:
        page, total = await store.query(MessageQuery(**query))
        answers.append(([m.seq for m in page], total))
    assert all(a == answers[0] for a in answers), answers
    return answers[0]


async def test_list_queries_memory_and_sqlite_agree(tmp_path: Path) -> None:
    journal, restored = await SqliteJournal.open(str(tmp_path / "q.db"))
    stores = [Store(queues=2), Store(queues=2, journal=journal, restored=restored)]
    ids = []
    for store in stores:
        for n, (keys, at) in enumerate(
            [("a b", 1000), ("b", 1000), ("", 1001), ("c a", 1003), ("a", 1002), ("b  b", 1005)]
        ):
            message, commit = store.append(*keyed(n, keys, at))
            if commit is not None:
                await commit
            ids.append(message.msg_id)
    assert await query_both(stores, keys=("a",), limit=10) == ([0, 3, 4], 3)
    assert await query_both(stores, keys=("b",), limit=2) == ([0, 1], 3)
    assert await query_both(stores, keys=("a", "b"), offset=1) == ([1, 3, 4, 5], 5)
    assert await query_both(stores, keys=("zz", "c")) == ([3], 1)
    assert await query_both(stores, keys=("",)) == ([], 0)
    # Store times never go back: message 4, stored at 1002 after one at 1003, keeps 1003.
    assert await query_both(stores, start_time=1001, end_time=1003) == ([2, 3, 4], 3)
    assert await query_both(stores, start_time=1004, end_time=2000) == ([5], 1)
    assert await query_both(stores, keys=("a",), start_time=1001, end_time=1003) == ([3, 4], 2)
    assert await query_both(stores, start_time=0, end_time=999) == ([], 0)
    assert await query_both(stores, queue=1, start_time=0, end_time=2000) == ([1, 3, 5], 3)
    for store, first in zip(stores, (0, 6), strict=True):
        page, total = await store.query(MessageQuery(msg_id=ids[first + 3]))
        assert ([m.body for m in page], total) == (["b3"], 1)
        for other in ("0" * 32, ids[first + 3][:-1], "x", ids[first + 3].lower()):
            assert (await store.query(MessageQuery(msg_id=other)))[1] == 0
        for keys, found in ((("a",), 1), (("b",), 0), (("zz", "c"), 1)):
            query = MessageQuery(msg_id=ids[first + 3], keys=keys)
            assert (await store.query(query))[1] == found
    await stores[1].close()


def test_memory_key_index_forgets_what_is_no_longer_kept() -> None:
    store = Store(keep=2)
    for n, keys in enumerate(["a", "a b", "b", "c"]):
        append(store, *keyed(n, keys, 1000))
    assert asyncio.run(store.query(MessageQuery(keys=("a",))))[1] == 0
    assert [m.seq for m in asyncio.run(store.query(MessageQuery(keys=("b", "c"))))[0]] == [2, 3]
    assert store._by_key.keys() == {"b", "c"}  # nothing left behind for evicted messages


async def test_sqlite_journal_restores_offsets(tmp_path: Path) -> None:
    db = str(tmp_path / "j.db")
    journal, restored = await SqliteJournal.open(db)
    store = Store(queues=3, journal=journal, restored=restored)
    first = []
    for n in range(4):
        message, commit = store.append("i", "t", "b", (("KEYS", "k1 k2"),), "h:1", 1000 + n)
        assert commit is not None
        first.append(message)
    await store.flush()
    page, total = await store.query(MessageQuery(keys=("k2",), limit=2))
    assert total == 4
    assert page == first[:2]
    await store.close()

    journal, restored = await SqliteJournal.open(db)
    store = Store(queues=3, journal=journal, restored=restored)
    nxt, _ = store.append("i", "t", "b", (), "h:1", 0)
    assert (nxt.seq, nxt.queue_id, nxt.queue_offset) == (4, 1, 1)
    assert nxt.store_timestamp == 1003  # a clock gone back: store times still never do
    await store.flush()
    assert (await store.query(MessageQuery(start_time=1001, end_time=1002)))[1] == 2
    assert (await store.query(MessageQuery(keys=("k",))))[1] == 0  # whole keys only
    await store.close()


async def test_group_commit_resolves_once_stored(tmp_path: Path) -> None:
    journal, restored = await SqliteJournal.open(str(tmp_path / "g.db"))
    store = Store(journal=journal, restored=restored)
    # Hold the writer thread in its commit until we have looked.
    release = threading.Event()
    write = journal._write

    def slow_write(batch: list[StoredMessage]) -> None:
        assert release.wait(20)
        write(batch)

    journal._write = slow_write  # type: ignore[method-assign]
    commits = [store.append(*keyed(n, "k", 1000))[1] for n in range(3)]
    assert commits[0] is commits[1] is commits[2]  # one loop turn, one batch
    assert commits[0] is not None
    await asyncio.sleep(0)  # one loop turn: the batch has gone to the writer
    second = store.append(*keyed(3, "k", 1000))[1]
    assert second is not None and second is not commits[0]  # fills while the first commits
    assert not commits[0].done()
    assert (await store.query(MessageQuery(keys=("k",))))[1] == 0  # nothing stored yet
    release.set()
    assert await commits[0] is None
    assert (await store.query(MessageQuery(keys=("k",))))[1] >= 3
    assert await second is None
    assert (await store.query(MessageQuery(keys=("k",))))[1] == 4
    await store.close()


async def test_failed_commit_fails_its_batch_and_every_message_after(tmp_path: Path) -> None:
    journal, restored = await SqliteJournal.open(str(tmp_path / "f.db"))
    store = Store(journal=journal, restored=restored)

    def disk_full(batch: list[StoredMessage]) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    journal._write = disk_full  # type: ignore[method-assign]
    _, commit = store.append(*keyed(0, "k", 1000))
    assert commit is not None
    error = await commit
    assert isinstance(error, sqlite3.OperationalError)
    with pytest.raises(StoreError, match="disk is full"):
        store.append(*keyed(1, "k", 1000))
    with pytest.raises(StoreError):
        await store.flush()
    await store.close()


def test_answers_have_the_sdks_field_names() -> None:
    from huaweicloudsdkrocketmq.v2.model.list_messages_response import ListMessagesResponse
    from huaweicloudsdkrocketmq.v2.model.message import Message
    from huaweicloudsdkrocketmq.v2.model.send_message_response import SendMessageResponse

    store = Store()
    m = append(store, "i", "t", "héllo", (("KEYS", "k"),), "127.0.0.1:5", 1)
    assert set(message_json(m)) == set(Message.attribute_map.values())
    assert set(ListMessagesResponse.attribute_map.values()) == {"messages", "total"}
    assert set(SendMessageResponse.attribute_map.values()) >= {
        "topic", "body", "property_list", "msg_id", "queue_id", "queue_offset", "broker_name",
    }  # fmt: skip
    # RocketMQ's commit-log size: 84 fixed + 4+6 body bytes + 1+1 topic + 2+(4+1+1+1) properties.
    assert store_size(m) == 84 + 4 + 6 + 1 + 1 + 2 + 7
