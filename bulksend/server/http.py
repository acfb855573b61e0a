"""HTTP/1.1 for the server: a lean ``asyncio.Protocol`` over httptools (llhttp).

Why not aiohttp's server: on this 2-core machine, pinned to one core (``taskset -c 0``,
wrk on the other, 32 connections, uvloop), a handler that only parses the JSON and
answers made 7,000 req/s on ``aiohttp.web`` and 7,800 req/s on the low-level
``aiohttp.web_server.Server``: below the 10,000 msg/s the server must exceed so that it
never limits a benchmark. The same handler on this protocol made 39,000 req/s, and the
whole server (validation, store, metrics) makes ~31,000 accepted messages per CPU-second,
45 % of what nginx makes on the same core (``benchmarks/bench_serve.py``).

What it does: keep-alive, pipelining (answers leave in request order, each no earlier
than its ``due`` time), ``Expect: 100-continue``, 413 for oversized bodies, 431 for an
oversized request line or headers (the caps of Huawei's API gateway: 32 KiB a line,
128 KiB in all), 400 for bytes that are not HTTP, backpressure (a connection stops being
read while its peer does not read answers or while 64 answers wait), and a graceful
shutdown: stop accepting, close idle connections, let busy ones finish their answers,
then close them.

Bounded work per request: llhttp hands a header that spans reads over in pieces, and
httptools joins the pieces by concatenation, so an endless head costs time quadratic in
its size (a 128 MB one held every client for seconds). A head is therefore also cut off
by how many bytes arrive while it is unfinished, whatever the parser has seen of it.

Subtleness ahead! A connection's answers form a FIFO of slots; a slot is filled when its
answer is ready and due, and only the head is ever written, so a late answer holds back
the ones behind it, as HTTP/1.1 demands. A DROP slot closes the connection when it
reaches the head; a HANG slot never leaves it (until shutdown). After either, the
connection ignores further requests.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import traceback
from collections import deque
from collections.abc import Awaitable
from http import HTTPStatus
from typing import cast

import httptools

from bulksend.server.app import Action, Answer, App, Deferred, Request
from bulksend.server.store import Commit

#: Bodies over this are refused (413) even without --max-body: they would only eat memory.
HARD_MAX_BODY = 64 * 1024 * 1024
#: Answers a connection may have waiting before we stop reading its requests.
MAX_QUEUED = 64
#: Request-head caps (431 past them), as Huawei's API gateway has them: the request line,
#: one header line (name and value), all the header lines.
MAX_REQUEST_LINE = 32 * 1024
MAX_HEADER = 32 * 1024
MAX_HEADERS = 128 * 1024
#: Bytes that may arrive while a head is unfinished, past the read it began in, before it
#: is refused whatever the parser has reported of it (see the module docstring): room for
#: a head within the caps and its separators.
MAX_HEAD_STREAM = 2 * (MAX_REQUEST_LINE + MAX_HEADERS)
#: After a 431 the peer may still be sending its head: we half-close, read and discard for
#: up to this long (so that it can read the 431 rather than meet a reset), then cut.
LINGER_S = 2.0

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_METHODS = {b"GET": "GET", b"POST": "POST"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_new_tuple = tuple.__new__
_REPLY = Action.REPLY


def render(answer: Answer, close: bool) -> bytes:
    """The bytes of an answer on the wire."""
    return b"%s%sX-Request-Id: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        _STATUS_LINES.get(answer.status) or b"HTTP/1.1 %d Unknown\r\n" % answer.status,
        answer.headers,
        answer.rid,
        len(answer.body),
        b"Connection: close\r\n" if close else b"",
        answer.body,
    )


class _Slot:
    __slots__ = ("answer", "keep_alive")

    def __init__(self, keep_alive: bool, answer: Answer | None = None) -> None:
        self.keep_alive = keep_alive
        self.answer = answer


class Connection(asyncio.Protocol):
    """One client connection: parse requests, hand them to the App, write answers in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._app = server.app
        self._loop = server.loop
        self._max_body = server.max_body
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self._paths = server.paths
        # The request being parsed. No on_message_begin callback (a callback costs ~0.5 µs
        # a request): this state is reset once a request is complete (_next_request).
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._in_message = False  # from its first byte (on_url) to its end
        # Its head: unfinished (from the end of the last request to on_headers_complete);
        # bytes of its header lines; bytes fed past the read it began in (-1: in that read).
        self._in_head = True
        self._head_size = 0
        self._head_fed = -1
        self._head_refused = False  # over a cap: answered 431, then closed
        self._lingering = False
        # answers not yet written, oldest first
        self._queue: deque[_Slot] = deque()
        self._dead = False  # dropped, hung, broken or closed: ignore further requests
        self._closed = False  # we closed it: write nothing more
        self._closing = False  # server shutting down: close once idle
        self._write_paused = False
        self._read_paused = False
        # An Upgrade request we decline: its body bytes still to read raw, else -1.
        self._upgrade_left = -1
        self._upgrade_request: Request | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown:0"
        self._server.connections.add(self)
        if self._server.closing:
            self.begin_close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._dead = True
        self._queue.clear()
        self._server.forget(self)

    def data_received(self, data: bytes) -> None:
        if self._upgrade_left >= 0:
            self._read_upgrade_body(data)
            return
        if self._dead:
            return
        try:
            self._parser.feed_data(data)
            if self._in_head:  # between requests, or inside a head
                if self._head_fed < 0:
                    self._head_fed = 0  # the read a head begins in is parsed in one pass
                else:
                    self._count_head(len(data))
        except httptools.HttpParserUpgrade as exc:
            # Subtleness ahead! llhttp ends an Upgrade request (e.g. curl --http2's h2c) at
            # its headers and hands back the rest as the new protocol's bytes. We decline
            # upgrades, so, as RFC 9110 asks, we read its Content-Length body ourselves,
            # answer it, and close (the parser cannot continue).
            length = self._headers.get(b"content-length", b"0")
            self._upgrade_left = int(length) if length.isdigit() else 0
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._read_upgrade_body(data[offset:])
        except httptools.HttpParserError:
            self._dead = True
            self._in_message = False
            self._push(self._app.malformed(), keep_alive=False)
        if self._head_refused and self._dead and not self._lingering:
            self._refuse_head()

    def _count_head(self, fed: int) -> None:
        self._head_fed += fed
        if self._head_fed > MAX_HEAD_STREAM:
            self._head_refused = self._dead = True

    def _refuse_head(self) -> None:
        """431 for a head over the caps, then a lingering close."""
        self._in_message = self._in_head = False
        self._lingering = True
        self._push(self._app.head_too_large(), keep_alive=False)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # --- httptools callbacks ---------------------------------------------------------------

    def _next_request(self) -> None:
        """Forget the request just parsed: what follows is the next one's head."""
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._too_large = self._in_message = False
        self._in_head = True
        self._head_size = 0
        self._head_fed = -1

    def on_url(self, url: bytes) -> None:
        self._in_message = True
        if len(self._url) + len(url) > MAX_REQUEST_LINE:
            self._head_refused = self._dead = True
        else:
            self._url += url  # may come in pieces; at most 32 KiB in all

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_size + len(name) + len(value)
        self._head_size = size
        if size > MAX_HEADERS or len(value) > MAX_HEADER:
            self._head_refused = self._dead = True
        # Raw bytes: decoding every header costs ~0.7 µs each; only auth needs text.
        key = name.lower()
        headers = self._headers
        if key in headers:
            headers[key] += b"," + value  # at most 128 KiB in all
        else:
            headers[key] = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._dead:
            return
        # Only a client that waits for 100 Continue needs a word before the body; for the
        # others an oversized body is caught in on_body.
        expect = self._headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            length = self._headers.get(b"content-length", b"")
            self._too_large = length.isdigit() and int(length) > self._max_body
            if self._too_large:
                # The client waits for our word before sending the body: refuse it now.
                self._dead = True
                self._in_message = False
                self._push(self._app.too_large(self._path()[0]), keep_alive=False)
            elif not self._queue and self._transport is not None:
                self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return  # read and discard, so that the 413 reaches a client still sending
        self._size += len(body)
        if self._size > self._max_body:
            self._too_large = True
            self._body = []
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._dead:
            self._in_message = False
            return
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        path, query = self._paths.get(self._url) or self._path()
        if parser.should_upgrade():
            verb = parser.get_method().decode("latin-1")
            self._upgrade_request = Request(verb, path, query, self._headers, b"", self.peer)
            return  # answered once its body is read (data_received)
        if self._too_large:
            self._next_request()
            self._push(self._app.too_large(path), keep_alive)
            return
        method = parser.get_method()
        # tuple.__new__ skips NamedTuple's Python-level __new__ on the hot path.
        request: Request = _new_tuple(Request, (
            _METHODS.get(method) or method.decode("latin-1"),
            path,
            query,
            self._headers,
            b"".join(self._body),
            self.peer,
        ))  # fmt: skip
        self._next_request()
        self._dispatch(request, keep_alive)

    def _dispatch(self, request: Request, keep_alive: bool) -> None:
        """Hand a request to the App; write, queue or await its answer."""
        try:
            answer = self._app.handle(request)
        except Exception:  # a bug: say so, answer 500, keep serving
            traceback.print_exc(file=sys.stderr)
            answer = self._app.internal_error()
        if type(answer) is Answer:
            # The hot path: nothing queued, nothing to wait for: write it now.
            if not self._queue and answer.due is None and answer.action == _REPLY:
                self._write(answer, not keep_alive or self._closing)
            else:
                self._push(answer, keep_alive)
        elif type(answer) is Deferred:
            # Its message is being committed: the answer waits in its slot until then.
            slot = _Slot(keep_alive)
            queue = self._queue
            queue.append(slot)
            if len(queue) >= MAX_QUEUED:
                self._update_reading()
            self._server.after_commit(answer, self, slot)
        else:
            slot = _Slot(keep_alive)
            self._queue.append(slot)
            self._update_reading()
            self._server.spawn(cast(Awaitable[Answer], answer), self, slot)

    def _read_upgrade_body(self, data: bytes) -> None:
        if self._upgrade_left > self._max_body:
            self._upgrade_left = -1
            self._dead = True
            self._push(self._app.too_large(self._path()[0]), keep_alive=False)
            return
        self._body.append(data[: self._upgrade_left])
        self._upgrade_left -= min(len(data), self._upgrade_left)
        request = self._upgrade_request
        if self._upgrade_left > 0 or request is None:
            return
        self._upgrade_left = -1
        self._dead = True
        self._dispatch(request._replace(body=b"".join(self._body)), keep_alive=False)

    def settle(self, slot: _Slot, deferred: Deferred) -> None:
        """Write a deferred answer (or what replaces it) now that its commit has ended."""
        answer = self._app.settle(deferred)
        if answer.due is not None and answer.due > self._loop.time():
            self._loop.call_at(answer.due, self.fill, slot, answer)
        else:
            self.fill(slot, answer)

    def _path(self) -> tuple[str, str]:
        """(path, query) of the request's URL, cached: a sender repeats one URL."""
        path, _, query = self._url.decode("utf-8", "replace").partition("?")
        if len(self._paths) < 1024:
            self._paths[self._url] = (path, query)
        return path, query

    # --- answering -------------------------------------------------------------------------

    def _write(self, answer: Answer, close: bool) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        transport.write(render(answer, close))
        if close:
            self._close()

    def _close(self) -> None:
        transport = self._transport
        if self._closed or transport is None:
            self._dead = self._closed = True
            return
        self._dead = self._closed = True
        if self._lingering and transport.can_write_eof():
            # Half-close: the peer reads our answer and EOF while we discard what it still
            # sends; a close with unread input would reset the connection, answer and all.
            transport.write_eof()
            self._loop.call_later(LINGER_S, self.abort)
        else:
            transport.close()

    def _push(self, answer: Answer, keep_alive: bool) -> None:
        """Queue an answer; write it (and those behind it) when it is due and at the head."""
        slot = _Slot(keep_alive)
        self._queue.append(slot)
        if answer.action == Action.HANG:
            self._dead = True
        if answer.due is not None and answer.due > self._loop.time():
            self._loop.call_at(answer.due, self.fill, slot, answer)
            self._update_reading()
        else:
            self.fill(slot, answer)

    def fill(self, slot: _Slot, answer: Answer) -> None:
        """Give a queued slot its answer and write whatever is now at the head."""
        slot.answer = answer
        queue = self._queue
        while queue and not self._closed and self._transport is not None:
            head = queue[0].answer
            if head is None:
                break
            if head.action == Action.HANG:
                if self._closing:
                    self._close()
                break
            keep_alive = queue.popleft().keep_alive
            if head.action == Action.DROP:
                queue.clear()
                self._close()
                break
            last = not queue and not self._in_message
            self._write(head, not keep_alive or (self._closing and last))
        if self._closing and not queue and not self._in_message and not self._closed:
            self._close()
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pause = (
            (self._dead and not self._lingering)
            or self._write_paused
            or len(self._queue) >= MAX_QUEUED
        )
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # --- shutdown --------------------------------------------------------------------------

    def begin_close(self) -> None:
        """Close once the answers already owed are written (idle: now)."""
        self._closing = True
        if not self._queue and not self._in_message:
            self._close()
        elif self._queue:
            head = self._queue[0].answer
            if head is not None and head.action == Action.HANG:
                self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class HttpServer:
    """Listens, tracks connections and the answers being computed, shuts down in order."""

    def __init__(self, app: App, *, max_body: int | None) -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.max_body = min(HARD_MAX_BODY, max_body) if max_body is not None else HARD_MAX_BODY
        self.connections: set[Connection] = set()
        #: Request URL -> (path, query), for the URLs seen first (see Connection._path).
        self.paths: dict[bytes, tuple[str, str]] = {}
        self.closing = False
        self._server: asyncio.Server | None = None
        # Answers still being computed (ListMessages on SQLite); awaited at shutdown.
        self._tasks: set[asyncio.Task[None]] = set()
        # Deferred answers by the commit they wait for; the last commit's list at hand.
        self._waiting: dict[Commit, list[tuple[Connection, _Slot, Deferred]]] = {}
        self._last_commit: Commit | None = None
        self._last_waiting: list[tuple[Connection, _Slot, Deferred]] = []
        self._idle = asyncio.Event()

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        """Listen; return the port (the one picked when ``port`` is 0)."""
        self._server = await self.loop.create_server(
            lambda: Connection(self), host, port, ssl=tls, backlog=1024, reuse_address=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self.closing and not self.connections:
            self._idle.set()

    def after_commit(self, deferred: Deferred, conn: Connection, slot: _Slot) -> None:
        """Settle ``slot`` once the deferred answer's commit ends. One callback a commit,
        not one a message: a batch's answers then go out in one pass."""
        commit = deferred.commit
        if commit is self._last_commit:
            waiting = self._last_waiting
        else:
            waiting = self._waiting.get(commit)  # type: ignore[assignment]
            if waiting is None:
                waiting = self._waiting[commit] = []
                commit.add_done_callback(self._committed)
            self._last_commit, self._last_waiting = commit, waiting
        waiting.append((conn, slot, deferred))

    def _committed(self, commit: Commit) -> None:
        if commit is self._last_commit:
            self._last_commit = None
        for conn, slot, deferred in self._waiting.pop(commit, ()):
            conn.settle(slot, deferred)

    def spawn(self, answer: Awaitable[Answer], conn: Connection, slot: _Slot) -> None:
        # Not a task group: the protocol's callbacks are not coroutines. The set keeps each
        # task referenced until done, and shutdown waits for it with the connections.
        task = self.loop.create_task(self._deliver(answer, conn, slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, answer: Awaitable[Answer], conn: Connection, slot: _Slot) -> None:
        try:
            ready = await answer
        except Exception:
            traceback.print_exc(file=sys.stderr)
            ready = self.app.internal_error()
        conn.fill(slot, ready)

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting; let owed answers go out for up to ``grace_s``; cut the rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.begin_close()
        if self.connections:
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except TimeoutError:
                self.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()

    def abort(self) -> None:
        """Cut every connection now."""
        for conn in list(self.connections):
            conn.abort()
