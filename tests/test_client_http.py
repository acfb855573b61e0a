"""The client's HTTP/1.1 against a raw server that writes exact bytes: 1xx answers, bytes
nobody asked for, close-delimited answers, and answers too large to hold."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
import trustme

from bulksend.client import AiohttpTransport, H1Transport, Transport
from bulksend.config import RetryPolicy, SendOptions, Target, TLSOptions
from bulksend.delivery import fixed_headers
from bulksend.record import Record
from bulksend.result import Result
from bulksend.sender import Sender
from tests.cli_helpers import SECRET_ENV, bulksend, read_jsonl, target, write_jsonl
from tests.raw_server import Exchange, RawServer, answer_json, response
from tests.serve_helpers import list_messages, start_server_inprocess

TARGET_PATH = ("p", "i")
RETRY = RetryPolicy(max_retries=2, backoff_base=0.001, backoff_max=0.01)
CAP = 64 << 10


def clean_env() -> dict[str, str]:
    """The test's environment without secrets, BULKSEND_* settings or proxies."""
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return {
        k: v
        for k, v in os.environ.items()
        if k not in SECRET_ENV and not k.startswith("BULKSEND_") and k.lower() not in proxies
    }


@dataclass(frozen=True)
class Wire:
    """Plain TCP, or TLS: the raw server's context and the client's options to trust it."""

    name: str
    server: ssl.SSLContext | None = None
    client: TLSOptions = field(default_factory=TLSOptions)


@pytest.fixture(scope="module")
def tls_wire(tmp_path_factory: pytest.TempPathFactory) -> Wire:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    bundle = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return Wire("tls", server, TLSOptions(ca_bundle=str(bundle)))


@pytest.fixture(params=["tcp", "tls"])
def wire(request: pytest.FixtureRequest) -> Wire:
    """Each HTTP case over plain TCP and over TLS (the client's own TLS transport)."""
    if request.param == "tls":
        tls: Wire = request.getfixturevalue("tls_wire")
        return tls
    return Wire("tcp")


def records(n: int) -> list[Record]:
    return [Record(seq=i, source=f"in:{i + 1}", topic="t", body=f"m{i}") for i in range(n)]


async def send(
    url: str,
    n: int,
    *,
    concurrency: int = 1,
    transport: Transport | None = None,
    **opts: object,
) -> list[Result]:
    options = SendOptions(concurrency=concurrency, retry=RETRY, **opts)  # type: ignore[arg-type]
    assert url.startswith("http://") or options.tls.ca_bundle, "an https server needs tls=..."
    async with Sender(Target(url, *TARGET_PATH), options=options, transport=transport) as s:
        return sorted([r async for r in s.send(records(n))], key=lambda r: r.seq)


def assert_each_ok_with_its_own_answer(results: list[Result], n: int) -> None:
    assert [(r.seq, r.status, r.attempts, r.msg_id) for r in results] == [
        (i, "ok", 1, f"ID-m{i}") for i in range(n)
    ]


# --- 1xx ---------------------------------------------------------------------------------

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


@pytest.mark.parametrize(
    "interim",
    [[CONTINUE], [EARLY_HINTS], [CONTINUE, EARLY_HINTS, EARLY_HINTS]],
    ids=["100", "103", "100+103+103"],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "apart"])
async def test_interim_1xx_answers_are_skipped(
    interim: list[bytes], split: bool, wire: Wire
) -> None:
    """RFC 9110 §15.2: a client reads past 1xx to the final answer. ``apart``: the final
    answer comes a little later, after the client could have sent its next request."""

    async def handle(ex: Exchange) -> None:
        final = response("200 OK", answer_json(ex.body))
        if split:
            await ex.write(*interim)
            await asyncio.sleep(0.02)
            await ex.write(final)
        else:
            await ex.write(*interim, final)

    async with RawServer(handle, tls=wire.server) as srv:
        results = await send(srv.url, 8, concurrency=2, tls=wire.client)
    assert_each_ok_with_its_own_answer(results, 8)
    assert len(srv.requests) == 8 and srv.connections == 2


async def test_a_1xx_and_then_the_close_is_no_answer(wire: Wire) -> None:
    async def handle(ex: Exchange) -> None:
        await ex.write(EARLY_HINTS)
        ex.close()

    async with RawServer(handle, tls=wire.server) as srv:
        [r] = await send(srv.url, 1, tls=wire.client)
    assert (r.status, r.error_code, r.http_status, r.attempts) == (
        "failed",
        "PROTOCOL_ERROR",
        None,
        3,
    )


async def test_bytes_nobody_asked_for_close_the_connection(wire: Wire) -> None:
    """After each first answer on a connection the server starts a second, unasked-for
    answer; it finishes it only once the next request arrives. Credited to that request, it
    would give it a msg_id that is not its own."""
    stray = response("200 OK", b'{"msg_id":"STRAY","queue_id":0,"queue_offset":0}')

    async def handle(ex: Exchange) -> None:
        if ex.n == 0:
            await ex.write(response("200 OK", answer_json(ex.body)), stray[:-10])
        else:
            await ex.write(stray[-10:], response("200 OK", answer_json(ex.body)))

    async with RawServer(handle, tls=wire.server) as srv:
        results = await send(srv.url, 6, tls=wire.client)
    assert_each_ok_with_its_own_answer(results, 6)
    # Each connection carried one request: the stray bytes closed it.
    assert srv.connections == 6 and {n for _, n, _ in srv.requests} == {0}


async def test_stray_bytes_in_the_answers_packet_never_reach_the_request_sent_at_once(
    wire: Wire,
) -> None:
    """The answer completes its record by callback and the pool sends the next record on the
    same connection at once, from inside that callback. Bytes that came in the same packet
    after the answer (the start of an unasked-for one) are still in the parser's hands then:
    they must close the connection, not become the next request's answer."""
    stray = response("200 OK", b'{"msg_id":"STRAY","queue_id":0,"queue_offset":0}')

    async def handle(ex: Exchange) -> None:
        # A connection's first request connects (no callback yet); its second is sent by
        # callback, and its answer comes with the stray bytes.
        if ex.n == 0:
            await ex.write(response("200 OK", answer_json(ex.body)))
        elif ex.n == 1:
            await ex.write(response("200 OK", answer_json(ex.body)) + stray[:-10])
        else:
            await ex.write(stray[-10:], response("200 OK", answer_json(ex.body)))

    got: list[Result] = []
    async with RawServer(handle, tls=wire.server) as srv:
        options = SendOptions(concurrency=1, retry=RETRY, tls=wire.client)
        async with Sender(Target(srv.url, *TARGET_PATH), options=options) as s:
            await s.run(records(6), lambda item, result: got.append(result))
    assert_each_ok_with_its_own_answer(sorted(got, key=lambda r: r.seq), 6)
    assert srv.connections == 3  # two requests each: the stray bytes closed it


async def test_bytes_arriving_while_no_request_is_outstanding_close_the_connection() -> None:
    """As above, but the stray bytes come while the client holds no request at all: its
    worker is kept busy writing the result until the server sees the connection close (or
    gives up after 2 s, which is how the client fails this test)."""
    stray = response("200 OK", b'{"msg_id":"STRAY","queue_id":0,"queue_offset":0}')
    released = asyncio.Event()

    async def handle(ex: Exchange) -> None:
        if ex.n == 0 or ex.conn > 0:
            await ex.write(response("200 OK", answer_json(ex.body)))
            if ex.conn == 0:
                await ex.write(stray[:-10])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ex.reader.read(1), 2)
                released.set()
        else:  # only a connection the client kept after the stray bytes gets here
            await ex.write(stray[-10:], response("200 OK", answer_json(ex.body)))

    got: list[Result] = []

    def on_result(item: object, result: Result) -> Awaitable[bool] | None:
        got.append(result)
        return released.wait() if result.seq == 0 else None

    async with RawServer(handle) as srv:
        options = SendOptions(concurrency=1, retry=RETRY)
        async with Sender(Target(srv.url, *TARGET_PATH), options=options) as s:
            await s.run(records(3), on_result)
    assert_each_ok_with_its_own_answer(got, 3)
    assert srv.connections == 2


async def test_an_attempt_given_up_by_its_caller_leaves_no_answer_for_the_next() -> None:
    """A caller cancels ``post`` while its request is out; the answer the server sends
    later must not be the answer to the next request on that connection."""

    async def handle(ex: Exchange) -> None:
        if ex.conn == 0 and ex.n == 0:
            return  # answered only when the next request comes (if it comes on this one)
        if ex.conn == 0:
            await ex.write(response("200 OK", orjson.dumps({"msg_id": "ID-m0"})))
        await ex.write(response("200 OK", answer_json(ex.body)))

    target = Target("http://127.0.0.1", *TARGET_PATH)
    async with RawServer(handle) as srv:
        transport = H1Transport(
            srv.url + target.path, fixed_headers(target), timeout=10, ssl_context=None
        )
        conn = transport.connection()
        first = asyncio.create_task(conn.post({}, b'{"topic":"t","body":"m0"}'))
        for _ in range(500):  # until the server holds the request (at most 5 s)
            if srv.requests:
                break
            await asyncio.sleep(0.01)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        answer = await conn.post({}, b'{"topic":"t","body":"m1"}')
        await transport.aclose()
    assert orjson.loads(answer.body)["msg_id"] == "ID-m1" and srv.connections == 2


async def test_a_request_bigger_than_the_socket_takes_at_once_goes_whole(wire: Wire) -> None:
    """8 MiB to a server with a small receive buffer: more than a socket takes at once (on
    Linux the send buffer grows to 4 MiB at most), so the rest waits for it to drain (over
    TLS, the client's own transport does that)."""
    big = "x" * (8 << 20)

    async def handle(ex: Exchange) -> None:
        body = orjson.loads(ex.body)["body"]
        await ex.write(response("200 OK", orjson.dumps({"msg_id": f"ID-{len(body)}"})))

    async with RawServer(handle, tls=wire.server, rcvbuf=16 << 10) as srv:
        options = SendOptions(concurrency=1, retry=RETRY, tls=wire.client)
        async with Sender(Target(srv.url, *TARGET_PATH), options=options) as s:
            [r] = [r async for r in s.send([Record(seq=0, source="in:1", topic="t", body=big)])]
    assert (r.status, r.msg_id, r.attempts) == ("ok", f"ID-{len(big)}", 1)


# --- close-delimited answers -------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
    ],
    ids=["http-1.0", "connection-close"],
)
@pytest.mark.parametrize("drop", [False, True], ids=["close", "bare-close"])
async def test_close_delimited_answers_are_complete_at_eof(
    head: bytes, drop: bool, wire: Wire
) -> None:
    async def handle(ex: Exchange) -> None:
        await ex.write(head, answer_json(ex.body))
        ex.drop() if drop else ex.close()  # over TLS: with or without close_notify

    async with RawServer(handle, tls=wire.server) as srv:
        results = await send(srv.url, 20, concurrency=4, tls=wire.client)
    assert_each_ok_with_its_own_answer(results, 20)
    assert len(srv.requests) == 20  # one delivery per record, none retried


# --- broken framing: before and after the status line --------------------------------------
#
# Once a final status line was read the server has spoken: a 2xx whose framing then breaks
# may mean the message was stored, so a retry could store it again.


def cut_short(status: bytes, body: bytes) -> bytes:
    """Writes an answer whose body stops 5 bytes short of its Content-Length; the handler
    then closes the connection."""
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body[:-5])


def two_lengths(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\nContent-Length: 5\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


def bad_chunk_size(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n%s\r\n0\r\n\r\n" % (
        status,
        body,
    )


BROKEN = [cut_short, two_lengths, bad_chunk_size]
#: Headers the front does not pass on: aiohttp writes its own.
HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding"}


def broken_answers(status: bytes, broken: Callable[[bytes, bytes], bytes]):  # type: ignore[no-untyped-def]
    """Every request gets ``broken(status, ...)`` as its answer, and its connection closed."""

    async def handle(ex: Exchange) -> None:
        await ex.write(broken(status, answer_json(ex.body)))
        ex.close()

    return handle


@pytest.mark.parametrize("broken", BROKEN, ids=lambda f: f.__name__)
async def test_a_2xx_whose_framing_breaks_is_final_and_keeps_its_status(
    broken: Callable[[bytes, bytes], bytes], wire: Wire
) -> None:
    """Each connection's first answer is whole, its second broken: the broken one comes on
    a fresh connection's parser and on one that already read a 200."""

    async def handle(ex: Exchange) -> None:
        if ex.n == 0:
            await ex.write(response("200 OK", answer_json(ex.body)))
        else:
            await broken_answers(b"200 OK", broken)(ex)

    async with RawServer(handle, tls=wire.server) as srv:
        results = await send(srv.url, 6, tls=wire.client)
    assert [(r.status, r.http_status, r.error_code, r.attempts) for r in results] == [
        ("ok", 200, None, 1),
        ("failed", 200, "PROTOCOL_ERROR", 1),
    ] * 3
    assert all("after HTTP 200" in (r.error_msg or "") for r in results[1::2])
    assert len(srv.requests) == 6  # one request per record: none sent again


@pytest.mark.parametrize("broken", BROKEN, ids=lambda f: f.__name__)
async def test_a_503_whose_framing_breaks_is_retried(
    broken: Callable[[bytes, bytes], bytes], wire: Wire
) -> None:
    """The server said it did not take the message: sending it again cannot duplicate."""
    async with RawServer(
        broken_answers(b"503 Service Unavailable", broken), tls=wire.server
    ) as srv:
        results = await send(srv.url, 2, tls=wire.client)
    assert [(r.status, r.http_status, r.error_code, r.attempts) for r in results] == [
        ("failed", 503, "PROTOCOL_ERROR", 3)
    ] * 2
    assert len(srv.requests) == 6


async def test_a_broken_429_keeps_its_retry_after() -> None:
    async def handle(ex: Exchange) -> None:
        if ex.conn == 0:
            await ex.write(
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nX-Request-Id: r-1\r\n"
                b"Content-Length: 9\r\nContent-Length: 5\r\n\r\n"
            )
            ex.close()
        else:
            await ex.write(response("200 OK", answer_json(ex.body)))

    async with RawServer(handle) as srv:
        transport = H1Transport(
            srv.url, fixed_headers(Target(srv.url, *TARGET_PATH)), timeout=10, ssl_context=None
        )
        answer = await transport.connection().post({}, b'{"topic":"t","body":"m0"}')
        await transport.aclose()
    assert (answer.status, answer.body, answer.request_id, answer.retry_after) == (
        429,
        b"",
        "r-1",
        "0",
    )
    assert answer.broken is not None and answer.broken.code == "PROTOCOL_ERROR"


@pytest.mark.parametrize(
    "garbage",
    [b"", b"garbage\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 200OK\r\n\r\n"],
    ids=["closed", "no-status-line", "bad-status-code", "no-space-after-code"],
)
@pytest.mark.parametrize("after_an_answer", [False, True], ids=["first", "reused"])
async def test_garbage_before_a_status_line_is_retried(
    garbage: bytes, after_an_answer: bool, wire: Wire
) -> None:
    """No status was read, so nothing says the message was taken: retried. ``reused``: the
    garbage comes on a keep-alive connection after a 200, whose status the parser still
    holds; it must not be taken as this answer's."""

    async def handle(ex: Exchange) -> None:
        if after_an_answer and ex.n == 0:
            await ex.write(response("200 OK", answer_json(ex.body)))
        elif ex.server.connections <= 2:  # every record's first try on its connection
            if garbage:
                await ex.write(garbage)
            ex.close()
        else:
            await ex.write(response("200 OK", answer_json(ex.body)))

    async with RawServer(handle, tls=wire.server) as srv:
        results = await send(srv.url, 2, tls=wire.client)
    if after_an_answer:  # m0 answered on connection 0; m1 broke it, and went again on 1
        assert [(r.status, r.attempts) for r in results] == [("ok", 1), ("ok", 2)]
    else:  # m0 broke connections 0 and 1, then went on 2; m1 followed on 2
        assert [(r.status, r.attempts) for r in results] == [("ok", 3), ("ok", 1)]
    assert {r.http_status for r in results} == {200}


async def test_exactly_once_checks_a_broken_2xx_with_listmessages(tmp_path: Path) -> None:
    """With --exactly-once a broken 2xx is an attempt in doubt, as a lost answer is:
    ListMessages finds each message stored, and none is sent twice. A raw front passes every
    request to the built-in server and breaks the framing of each SendMessage answer."""
    n = 5
    inp = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": f"m{i}"} for i in range(n)])
    out = tmp_path / "out.jsonl"
    async with start_server_inprocess() as upstream, aiohttp.ClientSession() as session:

        async def handle(ex: Exchange) -> None:
            request_line, *lines = ex.head.decode("latin-1").strip().split("\r\n")
            method, path, _ = request_line.split(" ")
            pairs = (line.split(":", 1) for line in lines)
            headers = {k: v.strip() for k, v in pairs if k.lower() not in HOP_HEADERS}
            async with session.request(
                method, upstream.url + path, headers=headers, data=ex.body
            ) as r:
                status, body = r.status, await r.read()
            if method == "POST":
                await ex.write(two_lengths(b"%d OK" % status, body))
                ex.close()
            else:
                await ex.write(response(f"{status} OK", body, "Content-Type: application/json"))

        async with RawServer(handle) as front:
            proc = await asyncio.to_thread(
                bulksend,
                "send",
                str(inp),
                *target(front.url),
                "--exactly-once",
                "--reconcile-after",
                "0.1",
                "--out",
                str(out),
                "--quiet",
            )
            stored = await list_messages(session, upstream.url, topic="t")
    assert proc.returncode == 0, proc.stderr
    results = [r for r in read_jsonl(out) if r["status"] != "intent"]
    assert sorted((r["seq"], r["status"], r.get("reconciled")) for r in results) == [
        (i, "ok", True) for i in range(n)
    ]
    assert sorted(m["body"] for m in stored) == [f"m{i}" for i in range(n)]
    assert sum(1 for *_, body in front.requests if body) == n  # each sent once


async def test_aiohttp_a_2xx_whose_body_framing_breaks_is_final() -> None:
    """Through a proxy (aiohttp): a body cut short after the head was read keeps its status
    too. (What aiohttp's parser refuses, two Content-Lengths or a bad chunk size in the
    head's packet, it reports without the status: retried, as before any status line.)"""
    async with RawServer(broken_answers(b"200 OK", cut_short)) as srv:
        results = await send(srv.url, 2, transport=aiohttp_transport(srv.url, CAP))
    assert [(r.status, r.http_status, r.error_code, r.attempts) for r in results] == [
        ("failed", 200, "PROTOCOL_ERROR", 1)
    ] * 2
    assert len(srv.requests) == 2


# --- answer size cap -----------------------------------------------------------------------

ENDLESS_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"8000\r\n" + b"x" * 0x8000 + b"\r\n",
)
HUGE_LENGTH = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000000\r\n\r\n",
    b"x" * 0x8000,
)


def too_large_then_ok(head_and_chunk: tuple[bytes, bytes]):  # type: ignore[no-untyped-def]
    """Record m0 gets an answer that never ends; every other record a normal one."""

    async def handle(ex: Exchange) -> None:
        if orjson.loads(ex.body)["body"] == "m0":
            await ex.stream(*head_and_chunk)
        else:
            await ex.write(response("200 OK", answer_json(ex.body)))

    return handle


def aiohttp_transport(url: str, cap: int) -> AiohttpTransport:
    target = Target(url, *TARGET_PATH)
    return AiohttpTransport(
        target.url, fixed_headers(target), timeout=10, ssl_context=None, max_answer_bytes=cap
    )


@pytest.mark.parametrize("answer", [ENDLESS_CHUNKED, HUGE_LENGTH], ids=["chunked", "length"])
@pytest.mark.parametrize("via", ["h1", "aiohttp"])
async def test_an_answer_over_the_cap_fails_the_attempt_and_closes_the_connection(
    answer: tuple[bytes, bytes], via: str
) -> None:
    async with RawServer(too_large_then_ok(answer)) as srv:
        transport = aiohttp_transport(srv.url, CAP) if via == "aiohttp" else None
        # timeout=10: were the cap not enforced, the attempt would end as a TIMEOUT.
        results = await send(srv.url, 3, transport=transport, max_answer_bytes=CAP, timeout=10)
    big, *rest = results
    assert (big.status, big.error_code, big.attempts) == ("failed", "ANSWER_TOO_LARGE", 1)
    assert f"{CAP} bytes" in (big.error_msg or "")
    assert [(r.status, r.msg_id) for r in rest] == [("ok", "ID-m1"), ("ok", "ID-m2")]
    # Not retried (a 200 may mean the message was stored), and its connection was closed.
    assert sum(1 for *_, body in srv.requests if b'"m0"' in body) == 1
    assert srv.closed_by_client >= 1


async def test_the_default_cap_is_one_mebibyte(wire: Wire) -> None:
    mib = 1 << 20

    async def handle(ex: Exchange) -> None:
        # m0: an answer a little under 1 MiB, head included; m1: a body alone over 1 MiB.
        size = mib - 1024 if b'"m0"' in ex.body else mib + 1
        body = answer_json(ex.body)
        await ex.write(response("200 OK", body + b" " * (size - len(body))))

    async with RawServer(handle, tls=wire.server) as srv:
        small, big = await send(srv.url, 2, tls=wire.client)
    assert SendOptions().max_answer_bytes == mib
    assert (small.status, big.status, big.error_code) == ("ok", "failed", "ANSWER_TOO_LARGE")


async def test_max_answer_bytes_flag_reaches_the_transport(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``bulksend send --max-answer-bytes``: the CLI's flag ends in the attempt's cap."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"topic":"t","body":"m0"}\n{"topic":"t","body":"m1"}\n')
    out = tmp_path / "out.jsonl"

    async def handle(ex: Exchange) -> None:
        pad = b" " * (3000 if b'"m0"' in ex.body else 0)
        await ex.write(response("200 OK", answer_json(ex.body) + pad))

    async with RawServer(handle) as srv:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bulksend",
            "send",
            str(inp),
            "--endpoint",
            srv.url,
            "--project-id",
            "p",
            "--instance-id",
            "i",
            "--max-answer-bytes",
            "2048",
            "--out",
            str(out),
            "--quiet",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(),
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err
    by_body = {r["seq"]: r for r in read_jsonl(out)}
    assert by_body[0]["error_code"] == "ANSWER_TOO_LARGE" and by_body[1]["status"] == "ok"
