"""``bulksend serve`` as a subprocess, driven with plain HTTP and with the official SDK:
SendMessage, validation, routes, ListMessages, /metrics, HTTP/1.1 details."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.serve_helpers import (
    ALL_TIME,
    INSTANCE_ID,
    messages_path,
    sdk_client,
    start_server_subprocess,
)

MSG_ID = re.compile(r"^[0-9A-F]{32}$")
TIMEOUT = aiohttp.ClientTimeout(total=15)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """One unsigned server for this module, 2 queues per topic on 2 brokers."""
    with start_server_subprocess("--queues", "2", "--brokers", "2") as (_, url):
        yield url


async def post(
    session: aiohttp.ClientSession, url: str, payload: Any, path: str | None = None
) -> tuple[int, Any, aiohttp.ClientResponse]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with session.post(
        url + (path or messages_path()), data=data, headers={"Content-Type": "application/json"}
    ) as r:
        raw = await r.read()
        return r.status, json.loads(raw), r


def send_sdk(
    url: str, topic: str, body: str, keys: str | None = None, instance_id: str = INSTANCE_ID
) -> Any:
    from huaweicloudsdkrocketmq.v2 import SendMessageProperties, SendMessageReq, SendMessageRequest

    props = [SendMessageProperties(name="KEYS", value=keys)] if keys else []
    req = SendMessageReq(topic=topic, body=body, property_list=props)
    return sdk_client(url).send_message(
        SendMessageRequest(engine="rocketmq", instance_id=instance_id, body=req)
    )


def list_sdk(url: str, **query: Any) -> Any:
    """ListMessages through the SDK; over all time unless a msg_id or time is given."""
    from huaweicloudsdkrocketmq.v2 import ListMessagesRequest

    if not {"msg_id", "start_time", "end_time"} & set(query):
        query = {**ALL_TIME, **query}
    return sdk_client(url).list_messages(
        ListMessagesRequest(engine="rocketmq", instance_id=INSTANCE_ID, **query)
    )


# --- with the official SDK -------------------------------------------------------------


def test_sdk_send_then_list_by_msg_id_and_key(url: str) -> None:
    sent = send_sdk(url, "sdk-topic", "héllo 你好", keys="order-1 order-2")
    assert MSG_ID.match(sent.msg_id)
    assert sent.topic == "sdk-topic"
    assert sent.body == "héllo 你好"
    assert sent.broker_name in {"broker-0", "broker-1"}
    assert [(p.name, p.value) for p in sent.property_list] == [("KEYS", "order-1 order-2")]

    by_id = list_sdk(url, topic="sdk-topic", msg_id=sent.msg_id)
    assert by_id.total == 1
    (m,) = by_id.messages
    assert (m.msg_id, m.topic, m.body, m.instance_id) == (
        sent.msg_id,
        "sdk-topic",
        "héllo 你好",
        INSTANCE_ID,
    )
    assert (m.queue_id, m.queue_offset) == (sent.queue_id, sent.queue_offset)
    assert m.store_timestamp > 1.6e12
    assert m.born_timestamp > 1.6e12
    assert m.reconsume_times == 0
    assert m.body_crc > 0
    assert m.store_size > len("héllo 你好".encode())
    assert m.born_host.startswith("127.0.0.1:")

    for key in ("order-2", "order-1"):  # KEYS holds several keys: any one finds it
        assert [x.msg_id for x in list_sdk(url, topic="sdk-topic", key=key).messages] == [
            sent.msg_id
        ]
    assert list_sdk(url, topic="sdk-topic", key="order").total == 0  # whole keys only


def test_sdk_list_messages_by_key_and_time_range(url: str) -> None:
    """The official SDK's ListMessagesRequest, as an exactly-once reconciler sends it: a key
    and a time window (ms, as strings); the window is required without msg_id."""
    from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
    from huaweicloudsdkrocketmq.v2 import ListMessagesRequest

    sent = send_sdk(url, "sdk-window", "b", keys="order-77 batch-3")
    (stored,) = list_sdk(url, msg_id=sent.msg_id).messages  # msg_id alone: no window needed
    at = int(stored.store_timestamp)
    around = {"start_time": str(at - 1000), "end_time": str(at + 1000)}
    found = list_sdk(url, topic="sdk-window", key="order-77", **around)
    assert (found.total, [m.msg_id for m in found.messages]) == (1, [sent.msg_id])
    assert list_sdk(url, key="batch-3", **around).total == 1  # any key of KEYS, any topic
    assert list_sdk(url, key="order-77", start_time=str(at + 1), end_time=str(at + 9)).total == 0
    assert list_sdk(url, key="order-77", start_time="0", end_time=str(at - 1)).total == 0
    assert list_sdk(url, key="order-7", **around).total == 0  # whole keys only
    for partial in ({}, {"start_time": str(at)}, {"end_time": str(at)}):
        request = ListMessagesRequest(
            engine="rocketmq", instance_id=INSTANCE_ID, key="order-77", **partial
        )
        with pytest.raises(ClientRequestException) as info:
            sdk_client(url).list_messages(request)
        assert info.value.status_code == 400
        assert info.value.error_code == "DMS.00400800"
        assert "start_time and end_time are required" in info.value.error_msg


def test_sdk_queue_offsets_increase_per_queue(url: str) -> None:
    sent = [send_sdk(url, "offsets", f"m{i}") for i in range(12)]
    per_queue: dict[tuple[str, int], list[int]] = {}
    for s in sent:
        per_queue.setdefault((s.broker_name, int(s.queue_id)), []).append(int(s.queue_offset))
    # 2 brokers x 2 queues, round-robin: each queue got 3 messages, offsets 0, 1, 2.
    assert sorted(per_queue) == [("broker-0", 0), ("broker-0", 1), ("broker-1", 0), ("broker-1", 1)]
    assert all(offsets == [0, 1, 2] for offsets in per_queue.values())
    assert len({s.msg_id for s in sent}) == 12


# --- plain HTTP ------------------------------------------------------------------------


async def test_send_answer_shape_and_request_id(url: str) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        payload = {"topic": "shape", "body": "b", "property_list": [{"name": "TAGS", "value": "t"}]}
        status, body, r = await post(s, url, payload)
    assert status == 200
    assert set(body) == {
        "topic",
        "body",
        "property_list",
        "msg_id",
        "queue_id",
        "queue_offset",
        "broker_name",
    }
    assert body["property_list"] == [{"name": "TAGS", "value": "t"}]
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
    assert r.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "DMS.00400001"),
        (b"[1, 2]", "DMS.00400001"),
        ({"body": "b"}, "DMS.00400002"),
        ({"topic": "", "body": "b"}, "DMS.00400002"),
        ({"topic": 5, "body": "b"}, "DMS.00400002"),
        ({"topic": "t"}, "DMS.00400002"),
        ({"topic": "t", "body": 1}, "DMS.00400002"),
        ({"topic": "t", "body": ""}, "DMS.00400002"),
        ({"topic": "t", "body": "b", "property_list": {"name": "a", "value": "b"}}, "DMS.00400002"),
        ({"topic": "t", "body": "b", "property_list": ["x"]}, "DMS.00400002"),
        ({"topic": "t", "body": "b", "property_list": [{"name": "a"}]}, "DMS.00400002"),
        ({"topic": "t", "body": "b", "property_list": [{"name": "a", "value": 1}]}, "DMS.00400002"),
        (
            {"topic": "t", "body": "b", "property_list": [{"name": "", "value": "v"}]},
            "DMS.00400002",
        ),
    ],
)
async def test_invalid_send_is_400(url: str, payload: Any, code: str) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, body, r = await post(s, url, payload)
    assert status == 400
    assert body["error_code"] == code
    assert body["error_msg"]
    assert body["request_id"] == r.headers["X-Request-Id"]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/kafka/p/instances/i/messages",  # unknown engine
        "/v2/rocketmq/p/instances//messages",
        "/v2/rocketmq/p/instances/i/message",
        "/v3/rocketmq/p/instances/i/messages",
        "/",
    ],
)
async def test_unknown_route_is_404(url: str, path: str) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, body, r = await post(s, url, {"topic": "t", "body": "b"}, path)
    assert status == 404
    assert body["error_code"] == "APIGW.0101"
    assert r.headers["X-Request-Id"]


async def test_delete_is_404(url: str) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.delete(url + messages_path()) as r:
        assert r.status == 404
        assert r.headers["X-Request-Id"]


@pytest.mark.parametrize(
    "path",
    [
        messages_path(engine="reliability"),
        "/v2/0a1b2c3d4e5f/rocketmq/instances/" + INSTANCE_ID + "/messages",  # the SDK's older route
        messages_path() + "/",
    ],
)
async def test_other_accepted_routes(url: str, path: str) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        status, body, _ = await post(s, url, {"topic": "routes", "body": "b"}, path)
        assert status == 200
        assert MSG_ID.match(body["msg_id"])
        async with s.get(url + path, params={"msg_id": body["msg_id"]}) as r:
            assert r.status == 200
            assert (await r.json())["total"] == 1


async def test_list_filters_and_pages(url: str) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        ids = [
            (await post(s, url, {"topic": "pages", "body": f"m{i}"}))[1]["msg_id"] for i in range(7)
        ]

        async def listed(**params: Any) -> tuple[list[str], int]:
            query = {"topic": "pages", **ALL_TIME, **params}
            async with s.get(url + messages_path(), params=query) as r:
                assert r.status == 200, await r.text()
                data = await r.json()
                return [m["msg_id"] for m in data["messages"]], data["total"]

        assert await listed() == (ids, 7)  # arrival order; 10 by default
        assert await listed(limit=3) == (ids[:3], 7)
        assert await listed(limit=3, offset=5) == (ids[5:], 7)
        q0, total_q0 = await listed(queue=0, limit=50)
        assert total_q0 >= 1
        assert set(q0) <= set(ids)
        assert await listed(end_time=1) == ([], 0)
        assert await listed(start_time=1) == (ids, 7)
        assert await listed(msg_id=ids[4]) == ([ids[4]], 1)
        other = messages_path(instance_id="other")
        async with s.get(url + other, params={"topic": "pages", **ALL_TIME}) as r:
            assert (await r.json())["total"] == 0  # topics are per instance
        for bad in (
            {"limit": "x", **ALL_TIME},
            {"limit": "0", **ALL_TIME},
            {"offset": "-1", **ALL_TIME},
            {"queue": "q", **ALL_TIME},
            {"start_time": "yesterday", "end_time": "1"},
            {"topic": "pages"},  # without msg_id, the time range is required
            {"topic": "pages", "key": "k", "start_time": "0"},
            {"end_time": "1"},
            {"key": " ".join(f"k{n}" for n in range(101)), **ALL_TIME},  # at most 100 keys
        ):
            async with s.get(url + messages_path(), params=bad) as r:
                assert r.status == 400
                error = await r.json()
                assert error["error_code"] == "DMS.00400800"
                assert error["request_id"] == r.headers["X-Request-Id"]


async def test_metrics_count_requests_messages_and_offsets() -> None:
    with start_server_subprocess("--queues", "1") as (_, url):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            for i in range(5):
                assert (await post(s, url, {"topic": 'we"ird', "body": f"m{i}"}))[0] == 200
            assert (await post(s, url, {"topic": "x"}))[0] == 400
            async with s.get(url + "/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                assert r.headers["X-Request-Id"]
                text = await r.text()
    lines = set(text.splitlines())
    assert 'bulksend_serve_requests_total{route="send",status="200"} 5' in lines
    assert 'bulksend_serve_requests_total{route="send",status="400"} 1' in lines
    assert "bulksend_serve_messages_accepted_total 5" in lines
    assert f'bulksend_serve_topic_messages{{instance="{INSTANCE_ID}",topic="we\\"ird"}} 5' in lines
    queue_labels = f'instance="{INSTANCE_ID}",topic="we\\"ird",broker="broker-0",queue="0"'
    assert f"bulksend_serve_queue_next_offset{{{queue_labels}}} 5" in lines
    assert "# TYPE bulksend_serve_requests_total counter" in lines


# --- HTTP/1.1 on a raw socket ------------------------------------------------------------


def _request(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def _read_answers(sock: socket.socket, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """n HTTP answers from the socket (each with Content-Length)."""
    buf = b""
    out = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} answers"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
        length = int(headers["content-length"])
        while len(buf) < length:
            chunk = sock.recv(65536)
            assert chunk
            buf += chunk
        out.append((int(status_line.split()[1]), headers, buf[:length]))
        buf = buf[length:]
    return out


def _connect(url: str) -> socket.socket:
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    return sock


def test_pipelined_requests_are_answered_in_order(url: str) -> None:
    body = b'{"topic":"pipelined","body":"x"}'
    with _connect(url) as sock:
        sock.sendall(_request(messages_path(), body) * 3 + _request(messages_path(), b"{}"))
        answers = _read_answers(sock, 4)
    assert [a[0] for a in answers] == [200, 200, 200, 400]
    rids = [a[1]["x-request-id"] for a in answers]
    assert rids == sorted(rids)
    assert len(set(rids)) == 4


def test_expect_100_continue(url: str) -> None:
    body = b'{"topic":"continue","body":"x"}'
    with _connect(url) as sock:
        head, _, payload = _request(messages_path(), body, "Expect: 100-continue\r\n").partition(
            b"\r\n\r\n"
        )
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(payload)
        ((status, _, _),) = _read_answers(sock, 1)
    assert status == 200


def test_malformed_http_is_400_and_closed(url: str) -> None:
    with _connect(url) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        ((status, headers, body),) = _read_answers(sock, 1)
        assert status == 400
        assert json.loads(body)["error_code"] == "APIGW.0100"
        assert headers["connection"] == "close"
        assert sock.recv(10) == b""


def test_connection_close_is_honoured(url: str) -> None:
    with _connect(url) as sock:
        sock.sendall(
            _request(messages_path(), b'{"topic":"c","body":"x"}', "Connection: close\r\n")
        )
        ((status, headers, _),) = _read_answers(sock, 1)
        assert status == 200
        assert headers["connection"] == "close"
        assert sock.recv(10) == b""


async def test_many_concurrent_connections(url: str) -> None:
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as s:
        results = await asyncio.gather(
            *(post(s, url, {"topic": "conc", "body": str(i)}) for i in range(300))
        )
    assert {r[0] for r in results} == {200}
    assert len({r[1]["msg_id"] for r in results}) == 300
    offsets = sorted((r[1]["broker_name"], r[1]["queue_id"], r[1]["queue_offset"]) for r in results)
    assert len(set(offsets)) == 300  # no (queue, offset) handed out twice


def test_upgrade_request_is_answered_then_closed(url: str) -> None:
    upgrade = (
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
    )
    with _connect(url) as sock:
        sock.sendall(_request(messages_path(), b'{"topic":"up","body":"x"}', upgrade))
        ((status, _, _),) = _read_answers(sock, 1)
        assert status == 200
        assert sock.recv(10) == b""
