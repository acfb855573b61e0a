"""What the server answers: routing, auth, validation, SendMessage, ListMessages, metrics.

Transport-free: ``App.handle`` takes a parsed ``Request`` and returns an ``Answer``, a
``Deferred`` one (SendMessage on a ``--store``: released by ``App.settle`` once the commit
holding the message ends, so a 200 always means stored), or an awaitable of one
(ListMessages on a ``--store``); ``http.py`` writes each when ``due``. Every answer
carries X-Request-Id, and errors are shaped as Huawei's gateway and DMS shape them::

    {"error_code": "DMS.00400002", "error_msg": "...", "request_id": "..."}

=====  ===============  ==========================================================
HTTP   error_code       when
=====  ===============  ==========================================================
400    APIGW.0100       the request is not HTTP/1.1 we can parse
400    DMS.00400001     the body is not a JSON object
400    DMS.00400002     topic / body / property_list missing or of the wrong type
400    DMS.00400800     a ListMessages query parameter is invalid or missing (the time
                        range without msg_id), more than 100 keys
401    APIGW.0301       missing or wrong signature or token, unknown AK, stale date
404    APIGW.0101       no such API (path, method or engine)
413    APIGW.0201       request body over --max-body
429    APIG.0308        over --rate-limit (with Retry-After)
431    APIGW.0201       request line over 32 KiB, a header over 32 KiB, all over 128 KiB
500    DMS.00500000     the store failed
503    DMS.00503001     --error-rate
=====  ===============  ==========================================================
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from enum import IntEnum
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote

import orjson

from bulksend.server.auth import Authenticator
from bulksend.server.faults import Fault, Faults, Mangle, retry_after_seconds
from bulksend.server.metrics import LIST, METRICS, OTHER, SEND, Metrics
from bulksend.server.options import ENGINES, ServerOptions
from bulksend.server.store import (
    MAX_KEYS,
    MAX_LIMIT,
    Commit,
    MessageQuery,
    Store,
    StoredMessage,
    StoreError,
)

#: RocketMQ refuses message bodies over 4 MiB (DefaultMQProducer.maxMessageSize).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class Action(IntEnum):
    REPLY = 0
    DROP = 1  # close the connection instead of answering
    HANG = 2  # never answer; keep the connection open


class Request(NamedTuple):
    method: str
    #: The raw path, exactly as sent (what the client signed), without the query.
    path: str
    #: The raw query string, "" when there is none.
    query: str
    #: Raw header lines, names lower-cased; repeated headers joined with ",".
    headers: dict[bytes, bytes]
    body: bytes
    #: The client's ``ip:port``.
    peer: str


class Answer(NamedTuple):
    status: int
    #: The X-Request-Id value.
    rid: bytes
    #: Header lines but X-Request-Id, Content-Length and Connection, each ending in CRLF.
    headers: bytes
    body: bytes
    #: Event-loop time (loop.time()) before which it must not be written; None: now.
    due: float | None = None
    action: Action = Action.REPLY


class Deferred(NamedTuple):
    """A SendMessage answer that may leave only once ``commit`` (the batch commit holding
    its message) has ended: ``App.settle`` gives the answer to write then."""

    commit: Commit
    answer: Answer


Handler = Callable[[Request], "Answer | Deferred | Awaitable[Answer]"]

_JSON = b"Content-Type: application/json;charset=UTF-8\r\n"
_TEXT = b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
_REPLY = Action.REPLY
_HEX2 = [b"%02x" % n for n in range(256)]
_new_tuple = tuple.__new__
_time_ns = time.time_ns
_DROP = Answer(0, b"", b"", b"", None, Action.DROP)
_HANG = Answer(0, b"", b"", b"", None, Action.HANG)
_NO_SUCH_API = "The API does not exist or has not been published in the environment"
#: DMS's code for an invalid request parameter (its RocketMQ error-code table).
_BAD_PARAM = "DMS.00400800"


def instance_of(path: str) -> str | None:
    """The instance_id of a messages path, or None when the path is no messages API.

    ``/v2/{engine}/{project_id}/instances/{instance_id}/messages`` (engine rocketmq or
    reliability), or the SDK's older ``/v2/{project_id}/rocketmq/instances/{id}/messages``.
    """
    parts = path.split("/")
    if len(parts) == 8 and not parts[7]:  # one trailing slash
        parts.pop()
    if (
        len(parts) != 7
        or parts[0]
        or parts[1] != "v2"
        or parts[4] != "instances"
        or parts[6] != "messages"
        or not parts[5]
        or not (parts[2] in ENGINES or parts[3] == "rocketmq")
    ):
        return None
    return unquote(parts[5]) if "%" in parts[5] else parts[5]


class Invalid(Exception):
    """A request the API refuses with 400: (error_code, error_msg)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


#: What parse_send gives: topic, body, properties, and the answer's first fields (a dict
#: to which the server adds msg_id, queue_id, queue_offset and broker_name).
Parsed = tuple[str, str, tuple[tuple[str, str], ...], dict[str, Any]]


def parse_send(body: bytes) -> Parsed:
    """(topic, body, properties, answer fields) of a SendMessage body, or raise Invalid.

    The answer echoes topic, body and property_list. When the request holds exactly those
    (the usual case), its parsed object is reused for the answer rather than rebuilt.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Invalid("DMS.00400001", "the request body is not valid JSON") from None
    if type(data) is not dict:
        raise Invalid("DMS.00400001", "the request body must be a JSON object")
    topic = data.get("topic")
    text = data.get("body")
    listed = data.get("property_list")
    # One test for the common valid case; the checks below only name what is wrong.
    if (
        type(topic) is str
        and topic
        and type(text) is str
        and text
        and (len(text) <= MAX_MESSAGE_BYTES // 4 or len(text.encode()) <= MAX_MESSAGE_BYTES)
    ):
        if listed is None:
            if len(data) != 2:
                data = {"topic": topic, "body": text}
            data["property_list"] = []
            return topic, text, (), data
        if type(listed) is list:
            props = []
            plain = len(data) == 3
            for item in listed:
                if type(item) is not dict:
                    break
                name, value = item.get("name"), item.get("value")
                if type(name) is not str or type(value) is not str or not name:
                    break
                props.append((name, value))
                plain = plain and len(item) == 2
            else:
                if not plain:
                    data = {
                        "topic": topic,
                        "body": text,
                        "property_list": [{"name": n, "value": v} for n, v in props],
                    }
                return topic, text, tuple(props), data
    if type(topic) is not str or not topic:
        raise Invalid("DMS.00400002", "topic is required and must be a non-empty string")
    if type(text) is not str:
        raise Invalid("DMS.00400002", "body is required and must be a string")
    if not text:
        raise Invalid("DMS.00400002", "the message body length is zero")
    if len(text.encode()) > MAX_MESSAGE_BYTES:
        raise Invalid(
            "DMS.00400002", f"the message body size over max value, MAX: {MAX_MESSAGE_BYTES}"
        )
    raise Invalid(
        "DMS.00400002",
        "property_list must be a list of {name, value}: non-empty string names, string values",
    )


def _int(params: dict[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Invalid(_BAD_PARAM, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise Invalid(_BAD_PARAM, f"{name} must be in [{low}, {high}]")
    return value


def parse_list_query(query: str, instance_id: str) -> MessageQuery:
    """ListMessages' query string as a MessageQuery, or raise Invalid.

    As the real API: without ``msg_id``, ``start_time`` and ``end_time`` are required.
    ``key`` may hold up to MAX_KEYS keys separated by spaces (a message holding any of
    them matches); the real API takes one.
    """
    params = dict(parse_qsl(query, keep_blank_values=True))
    big = 2**62
    msg_id = params.get("msg_id") or None
    start_time = _int(params, "start_time", None, 0, big)
    end_time = _int(params, "end_time", None, 0, big)
    if msg_id is None and (start_time is None or end_time is None):
        raise Invalid(_BAD_PARAM, "start_time and end_time are required without msg_id")
    keys = params.get("key", "").split(maxsplit=MAX_KEYS)
    if len(keys) > MAX_KEYS:
        raise Invalid(_BAD_PARAM, f"key holds more than {MAX_KEYS} keys")
    return MessageQuery(
        instance_id=instance_id,
        topic=params.get("topic") or None,
        queue=_int(params, "queue", None, 0, big),
        keys=tuple(keys),
        msg_id=msg_id,
        start_time=start_time,
        end_time=end_time,
        offset=_int(params, "offset", 0, 0, big) or 0,
        limit=_int(params, "limit", 10, 1, MAX_LIMIT) or 10,
    )


def store_size(m: StoredMessage) -> int:
    """The message's size in RocketMQ's commit log (CommitLog.calMsgLength, IPv4 hosts):
    84 bytes of fixed fields + 4 + body + 1 + topic + 2 + properties (name\\x01value\\x02)."""
    props = sum(len(n.encode()) + len(v.encode()) + 2 for n, v in m.properties)
    return 84 + 4 + len(m.body.encode()) + 1 + len(m.topic.encode()) + 2 + props


class App:
    """The server's behaviour. ``now`` is the event loop's clock (for due times)."""

    def __init__(
        self, options: ServerOptions, store: Store, metrics: Metrics, now: Callable[[], float]
    ) -> None:
        self.options = options
        self.store = store
        self.metrics = metrics
        self._now = now
        self.auth = Authenticator(ak=options.ak, sk=options.sk, token=options.token)
        self.faults = Faults(options, now()) if options.misbehaves else None
        self._rid_prefix = os.urandom(8).hex().encode()
        self._rids = 0
        self._rid_head = b""
        # path -> instance_id of messages paths seen; senders repeat one path.
        self._routes: dict[str, str] = {}
        self._brokers = [f"broker-{b}" for b in range(options.brokers)]

    # --- answers -----------------------------------------------------------------------

    def _rid(self) -> bytes:
        """A new X-Request-Id: the prefix and a serial number in 16 hex digits (the first
        14 formatted once every 256 requests, as Store.append does for msg_ids)."""
        n = self._rids
        self._rids = n + 1
        if not n & 0xFF:
            self._rid_head = b"%s%014x" % (self._rid_prefix, n >> 8)
        return self._rid_head + _HEX2[n & 0xFF]

    def _json(self, route: str, status: int, rid: bytes, body: bytes, extra: bytes = b"") -> Answer:
        self.metrics.answered[(route, status)] += 1
        return Answer(status, rid, _JSON + extra if extra else _JSON, body)

    def _error(
        self, route: str, status: int, code: str, message: str, rid: bytes, extra: bytes = b""
    ) -> Answer:
        body = orjson.dumps({"error_code": code, "error_msg": message, "request_id": rid.decode()})
        return self._json(route, status, rid, body, extra)

    def malformed(self) -> Answer:
        """For bytes that are not HTTP/1.1."""
        return self._error(OTHER, 400, "APIGW.0100", "malformed HTTP request", self._rid())

    def internal_error(self) -> Answer:
        """For a bug in a handler (logged on stderr by the caller)."""
        return self._error(OTHER, 500, "DMS.00500000", "internal error", self._rid())

    def too_large(self, path: str) -> Answer:
        """For a body over --max-body (or the 64 MiB ceiling)."""
        route = SEND if instance_of(path) else OTHER
        return self._error(route, 413, "APIGW.0201", "Request entity too large", self._rid())

    def head_too_large(self) -> Answer:
        """For a request line or headers over the caps (431; the connection then closes)."""
        return self._error(OTHER, 431, "APIGW.0201", "Request headers too large", self._rid())

    # --- routing -----------------------------------------------------------------------

    def handle(self, req: Request) -> Answer | Deferred | Awaitable[Answer]:
        instance_id = self._routes.get(req.path)
        if instance_id is None:
            instance_id = instance_of(req.path)
            if instance_id is not None and len(self._routes) < 1024:
                self._routes[req.path] = instance_id
        if instance_id is not None:
            if req.method == "POST":
                return self._send(req, instance_id)
            if req.method == "GET":
                return self._list(req, instance_id)
        elif req.path == "/metrics" and req.method == "GET":
            self.metrics.answered[(METRICS, 200)] += 1
            return Answer(200, self._rid(), _TEXT, self.metrics.render(self.store))
        return self._error(OTHER, 404, "APIGW.0101", _NO_SUCH_API, self._rid())

    def _refused(self, route: str, req: Request, rid: bytes) -> Answer | None:
        """401 when the request fails auth, else None."""
        why = self.auth.refuse(req.method, req.path, req.query, req.headers, req.body, time.time())
        if why is None:
            return None
        return self._error(
            route, 401, "APIGW.0301", f"Incorrect IAM authentication information: {why}", rid
        )

    # --- SendMessage ---------------------------------------------------------------------

    def _send(self, req: Request, instance_id: str) -> Answer | Deferred:
        rid = self._rid()
        if self.auth.required:
            refused = self._refused(SEND, req, rid)
            if refused is not None:
                return self._delay(refused)
        faults = self.faults
        if faults is None:  # the hot path: nothing to misbehave
            return self._accept(req, instance_id, rid, None)
        refusal = self._misbehave(rid, faults)
        if refusal is not None:
            return self._delay(refusal)
        return self._accept(req, instance_id, rid, faults)

    def _delay(self, answer: Answer, hold_s: float = 0.0) -> Answer:
        """The answer with its due time: after --latency, jitter, --stall and ``hold_s``."""
        faults = self.faults
        if faults is None or answer.action != Action.REPLY or not (faults.delays or hold_s):
            return answer
        due, stalled = faults.due(self._now())
        if stalled:
            self.metrics.faults["stalled"] += 1
        return answer._replace(due=due + hold_s)

    def settle(self, deferred: Deferred) -> Answer:
        """The answer to write once a deferred answer's commit has ended: as built when
        the message is stored, else 500 (the message is not stored: never a 200)."""
        error = deferred.commit.result()
        answer = deferred.answer
        if error is None:
            if answer.action == _REPLY:
                self.metrics.send_ok += 1
            return answer
        return self._error(SEND, 500, "DMS.00500000", f"internal error: {error}", answer.rid)

    def _misbehave(self, rid: bytes, faults: Faults) -> Answer | None:
        """The refusal the faults choose for this request before it is stored, if any."""
        wait = faults.throttle(self._now())
        if wait:
            self.metrics.faults["throttled"] += 1
            if self.options.retry_after_date:
                retry_after = formatdate(math.ceil(time.time() + wait), usegmt=True)
            else:
                retry_after = str(retry_after_seconds(wait))
            return self._error(
                SEND, 429, "APIG.0308", "The throttling threshold has been reached", rid,
                b"Retry-After: %s\r\n" % retry_after.encode(),
            )  # fmt: skip
        fault = faults.fault()
        if fault == Fault.DROP:
            self.metrics.faults["drop"] += 1
            return _DROP
        if fault == Fault.HANG:
            self.metrics.faults["hang"] += 1
            return _HANG
        if fault == Fault.ERROR:
            self.metrics.faults["error"] += 1
            return self._error(
                SEND, 503, "DMS.00503001", "The broker is busy, try again later", rid
            )
        return None

    def _accept(
        self, req: Request, instance_id: str, rid: bytes, faults: Faults | None
    ) -> Answer | Deferred:
        """Validate, store, answer: at once in memory, after the commit with a journal."""
        try:
            topic, body, props, out = parse_send(req.body)
        except Invalid as exc:
            return self._delay(self._error(SEND, 400, exc.code, str(exc), rid))
        try:
            m, commit = self.store.append(
                instance_id, topic, body, props, req.peer, _time_ns() // 1_000_000
            )
        except StoreError as exc:
            return self._delay(
                self._error(SEND, 500, "DMS.00500000", f"internal error: {exc}", rid)
            )
        out["msg_id"] = m.msg_id
        out["queue_id"] = m.queue_id
        out["queue_offset"] = m.queue_offset
        out["broker_name"] = self._brokers[m.broker]
        if faults is None:  # the hot path
            answer: Answer = _new_tuple(Answer, (200, rid, _JSON, orjson.dumps(out), None, _REPLY))
            if commit is None:
                self.metrics.send_ok += 1
                return answer
            return _new_tuple(Deferred, (commit, answer))
        mangle = faults.mangle()
        if mangle == Mangle.NO_MSG_ID:
            self.metrics.faults["no_msgid"] += 1
            del out["msg_id"]
        payload = orjson.dumps(out)
        if mangle == Mangle.GARBAGE:
            self.metrics.faults["garbage"] += 1
            payload = payload[: len(payload) // 2]  # an unfinished JSON object: never valid
        answer = self._lose_or_delay(Answer(200, rid, _JSON, payload), faults)
        if commit is None:
            if answer.action == _REPLY:
                self.metrics.send_ok += 1
            return answer
        return _new_tuple(Deferred, (commit, answer))

    def _lose_or_delay(self, answer: Answer, faults: Faults) -> Answer:
        """--lose-answer-rate: the stored message's answer dropped with the connection, or
        (--lose-answer-hang S) held S seconds more; else the usual delays."""
        if not faults.lose():
            return self._delay(answer)
        self.metrics.faults["lose_answer"] += 1
        hang_s = self.options.lose_answer_hang_s
        return self._delay(answer, hang_s) if hang_s else _DROP

    # --- ListMessages --------------------------------------------------------------------

    def _list(self, req: Request, instance_id: str) -> Answer | Awaitable[Answer]:
        rid = self._rid()
        if self.auth.required:
            refused = self._refused(LIST, req, rid)
            if refused is not None:
                return refused
        try:
            query = parse_list_query(req.query, instance_id)
        except Invalid as exc:
            return self._error(LIST, 400, exc.code, str(exc), rid)
        return self._list_answer(query, rid)

    async def _list_answer(self, query: MessageQuery, rid: bytes) -> Answer:
        try:
            page, total = await self.store.query(query)
        except StoreError as exc:
            return self._error(LIST, 500, "DMS.00500000", f"internal error: {exc}", rid)
        messages = [message_json(m) for m in page]
        return self._json(LIST, 200, rid, orjson.dumps({"messages": messages, "total": total}))


def message_json(m: StoredMessage) -> dict[str, Any]:
    """A stored message in the shape of the SDK's ``Message`` model."""
    return {
        "msg_id": m.msg_id,
        "instance_id": m.instance_id,
        "topic": m.topic,
        "store_timestamp": m.store_timestamp,
        "born_timestamp": m.born_timestamp,
        "reconsume_times": 0,
        "body": m.body,
        "body_crc": zlib.crc32(m.body.encode()) & 0x7FFFFFFF,  # as RocketMQ's UtilAll.crc32
        "store_size": store_size(m),
        "property_list": [{"name": n, "value": v} for n, v in m.properties],
        "born_host": m.born_host,
        "store_host": f"127.0.0.1:{10911 + 100 * m.broker}",  # broker-N's made-up address
        "queue_id": m.queue_id,
        "queue_offset": m.queue_offset,
    }
