"""One HTTP attempt: POST a signed body, get an answer or a TransportError.

Two transports behind one small interface (``Connection.post``), chosen per run:

* ``H1Transport`` (default): a purpose-built HTTP/1.1 keep-alive client on
  ``asyncio.Protocol`` + httptools (llhttp). Hand-written because the CPU per message is the
  product: on this machine (100k signed messages to nginx, one core) aiohttp's client costs
  ~95 µs per message at its best and this shape ~16-20 µs. It does only what SendMessage
  needs: one request at a time per connection, Content-Length bodies, TLS via ssl. Answers
  are read as RFC 9112 says: Content-Length, chunked, or (no length at all) up to the close.
* ``AiohttpTransport``: aiohttp's client, used when an HTTP(S) proxy from the standard
  environment variables applies to the endpoint (CONNECT tunnels and proxy auth are
  aiohttp's well-kept business, not ours).

Every exception from the layers below (OSError, ssl, httptools, aiohttp, timeouts) becomes a
``bulksend.errors.TransportError`` here and nowhere else.

Answers are capped (``max_answer_bytes``, head and body): a server that streams without end
costs one attempt (``AnswerTooLarge``) and a connection, never the process's memory.

Timeouts: one sweep timer per transport, not a timer per request. Each attempt records a
deadline; the sweep runs every ``timeout / 8`` seconds (at most 0.25 s, at least 10 ms) and
aborts attempts past theirs, so an attempt times out between ``timeout`` and ``timeout +
tick`` after it started.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import httptools

if TYPE_CHECKING:
    import aiohttp

from bulksend.errors import (
    AnswerTooLarge,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    ProtocolError,
    RequestTimeout,
    TransportError,
)
from bulksend.tls import open_tls

#: Bytes; the default cap on one answer (SendOptions.max_answer_bytes).
DEFAULT_MAX_ANSWER_BYTES = 1 << 20


@dataclass(slots=True)
class Response:
    """One final answer. Not frozen: a frozen dataclass's __init__ costs a setattr call per
    field, and one is made per message.

    ``broken``: the answer's framing broke after its final status line was read (two
    Content-Lengths, a bad chunk, a close short of its length). The status stands (the
    server said it, and a 2xx may mean the message was stored), ``body`` is empty, and the
    headers read before the break are kept (a broken 429's Retry-After)."""

    status: int
    body: bytes
    request_id: str | None = None
    retry_after: str | None = None
    broken: TransportError | None = None


class Connection(Protocol):
    """One keep-alive connection; one request at a time."""

    async def post(self, headers: Mapping[str, str], body: bytes) -> Response:
        """POST ``body`` with the transport's fixed headers plus ``headers``."""
        ...

    def close(self) -> None: ...


class Transport(Protocol):
    def connection(self) -> Connection: ...

    async def aclose(self) -> None: ...


def proxy_for(url: str) -> str | None:
    """The proxy the standard env vars (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY) name for url."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # untyped, stdlib
    if not proxy or bypass(parts.hostname or "", proxies):
        return None
    return proxy


def make_transport(
    url: str,
    fixed_headers: Mapping[str, str],
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
) -> Transport:
    """The fast transport unless a proxy applies to ``url``."""
    kind = AiohttpTransport if proxy_for(url) else H1Transport
    return kind(
        url,
        fixed_headers,
        timeout=timeout,
        ssl_context=ssl_context,
        max_answer_bytes=max_answer_bytes,
    )


# --- the fast HTTP/1.1 transport ---------------------------------------------------------


#: Called once with an attempt's outcome: the final answer, or why there is none.
OnAnswer = Callable[["Response | TransportError"], None]


class _H1Protocol(asyncio.Protocol):
    """Parses answers with httptools; calls ``on_answer`` once per request.

    A callback, not a Future per request: an answer then completes its record inside this
    ``data_received``, with no task to wake (the sender's hot path; see ``H1Connection``).

    Subtleness ahead! Bytes are credited to the request outstanding, and to nothing else:

    * 1xx answers (100 Continue, 103 Early Hints) are interim (RFC 9110 §15.2): skipped, the
      request still waits for its final answer.
    * Bytes that arrive with no request outstanding (a second answer, a late 1xx) cannot
      belong to the next request: the connection is closed, so they never reach it.
    * An answer with neither Content-Length nor chunked encoding ends at the close (RFC 9112
      §6.3): a clean EOF completes it; a reset, or EOF inside a delimited answer, fails it.
    * More than ``limit`` bytes while a request is outstanding (or a Content-Length over
      it) fail the attempt with AnswerTooLarge and close the connection.
    * ``on_answer`` runs after ``feed_data`` has returned, never inside it: it may write the
      next request at once, and bytes still in the parser's hands (a stray answer in the same
      packet) must meet a connection with no request outstanding.
    * Framing that breaks (unparsable bytes, a close short of the answer's length) after a
      final status line was read is an answer with that status, ``broken`` (``_break``);
      before one, a ProtocolError. The parser keeps the previous answer's status code until
      the next status line's digits are read, so "was one read" is our own flag
      (``_status_line``): cleared when a request is sent and after a 1xx, set by
      ``on_status``, which llhttp calls once the code and the space after it (RFC 9112 §4)
      are in.
    """

    __slots__ = (
        "_answer",
        "_body",
        "_clock",
        "_declared",
        "_delimited",
        "_headers_done",
        "_limit",
        "_parser",
        "_received",
        "_request_id",
        "_retry_after",
        "_status_line",
        "_stray",
        "closed",
        "deadline",
        "on_answer",
        "transport",
    )

    def __init__(self, limit: int) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._limit = limit
        self.transport: asyncio.Transport | None = None
        #: The outstanding request's callback; None while no request is outstanding.
        self.on_answer: OnAnswer | None = None
        #: When the outstanding request times out (the loop's clock).
        self.deadline = 0.0
        self.closed = False
        self._clock: Callable[[], float] = time.monotonic  # the loop's, once connected
        self._received = 0
        self._stray = False
        #: The final answer parsed, not yet handed to ``on_answer``.
        self._answer: Response | None = None
        self._reset()

    def _reset(self) -> None:
        self._body: list[bytes] = []
        self._request_id: str | None = None
        self._retry_after: str | None = None
        self._headers_done = False
        #: This answer's status line was read (``on_status``): its code is the parser's.
        self._status_line = False
        #: Content-Length or Transfer-Encoding seen: the answer does not end at the close.
        self._delimited = False
        self._declared = 0

    def send(self, request: bytes, on_answer: OnAnswer, timeout: float) -> None:
        """Write ``request``; its outcome goes to ``on_answer`` (within ``timeout`` s, by
        the transport's sweep)."""
        self.on_answer = on_answer
        self._received = 0
        # The previous answer's status line is not this one's: a close before any byte
        # of this answer is no answer.
        self._status_line = False
        self.deadline = self._clock() + timeout
        assert self.transport is not None
        self.transport.write(request)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._clock = asyncio.get_running_loop().time  # the sweep's clock

    def data_received(self, data: bytes) -> None:
        if self.on_answer is None:
            self._discard()  # no request outstanding: these bytes answer nothing we sent
            return
        self._received += len(data)
        if self._received > self._limit:
            self._too_large()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - we never ask to upgrade
            self._fail(ProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._break(ProtocolError(f"malformed HTTP answer: {exc}"))
        if self._stray:
            self._discard()  # an answer began after ours was complete
        elif self._declared > self._limit and self.on_answer is not None:
            self._too_large()
        if self._answer is not None:
            self._deliver()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if (
            exc is None
            and self.on_answer is not None
            and self._headers_done
            and not self._delimited
        ):
            # A close-delimited answer: the close is its end.
            self._complete(self._parser.get_status_code())
            self._deliver()
            return
        self._break(ConnectionClosed("connection closed before a complete answer"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.on_answer is None or self._answer is not None:
            self._stray = True
        # _reset(), inline: this runs once per answer.
        self._body = []
        self._request_id = self._retry_after = None
        self._headers_done = self._delimited = False
        self._declared = 0

    def on_status(self, reason: bytes) -> None:
        # The status code is in (one call per answer: llhttp calls it again only when the
        # reason phrase spans packets).
        self._status_line = True

    def on_header(self, name: bytes, value: bytes) -> None:
        n = len(name)
        if n == 12 and name.lower() == b"x-request-id":
            self._request_id = value.decode("latin-1")
        elif n == 11 and name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")
        elif n == 14 and name.lower() == b"content-length":
            self._delimited = True
            # llhttp has checked it is a number (an invalid one is a parser error).
            self._declared = int(value) if value.strip().isdigit() else 0
        elif n == 17 and name.lower() == b"transfer-encoding":
            self._delimited = True

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self._reset()  # interim (1xx): the final answer follows
            return
        if not self._parser.should_keep_alive():
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self._complete(status)

    def _complete(self, status: int) -> None:
        """The final answer is in: no request is outstanding any more (bytes after it are
        stray); ``_deliver`` hands it over once the parser is done with this packet."""
        if self.on_answer is not None:
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            self._answer = Response(status, body, self._request_id, self._retry_after)

    def _deliver(self) -> None:
        on_answer, self.on_answer = self.on_answer, None
        answer, self._answer = self._answer, None
        if on_answer is not None and answer is not None:
            on_answer(answer)

    def _too_large(self) -> None:
        status = self._parser.get_status_code() if self._headers_done else None
        self._fail(
            AnswerTooLarge(
                f"answer over {self._limit} bytes (--max-answer-bytes)"
                + (f", HTTP {status}" if status else "")
            )
        )

    def _break(self, exc: ProtocolError) -> None:
        """The answer outstanding cannot be read to its end. After a final status line the
        server has answered, so the attempt ends as that answer, ``broken``: a 2xx whose
        framing broke may have stored the message, and is not to be sent again blind."""
        if self._status_line and self.on_answer is not None and self._answer is None:
            status = self._parser.get_status_code()
            if status >= 200:
                self._answer = Response(status, b"", self._request_id, self._retry_after, exc)
        self._fail(exc)

    def _discard(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: TransportError) -> None:
        """No (more) answer on this connection: close it; the request outstanding fails with
        ``exc``, unless its answer was complete before the trouble began."""
        self._discard()
        on_answer, self.on_answer = self.on_answer, None
        answer, self._answer = self._answer, None
        if on_answer is not None:
            on_answer(answer if answer is not None else exc)


class H1Transport:
    """Keep-alive HTTP/1.1 connections to one origin, sharing one timeout sweep."""

    def __init__(
        self,
        url: str,
        fixed_headers: Mapping[str, str],
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.ssl_context = (ssl_context or ssl.create_default_context()) if self.tls else None
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        #: TLS over our own socket transport (``bulksend.tls``) rather than the loop's; False
        #: on a loop that cannot watch sockets (Windows' proactor).
        self.own_tls = not sys.platform.startswith("win")
        path = parts.path or "/"
        lines = "".join(f"{k}: {v}\r\n" for k, v in fixed_headers.items())
        self._head = f"POST {path} HTTP/1.1\r\n{lines}".encode("latin-1")
        self._tick = min(0.25, max(0.01, timeout / 8))
        self._sweeper: asyncio.TimerHandle | None = None
        self._connections: set[H1Connection] = set()

    def connection(self) -> H1Connection:
        conn = H1Connection(self)
        self._connections.add(conn)
        return conn

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self._connections:
            conn.close()
        self._connections.clear()

    def _watch(self) -> None:
        """A request went out: make sure the sweep runs."""
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_at(loop.time() + self._tick, self._sweep)

    def _sweep(self) -> None:
        """Fail every attempt past its deadline; runs while any is outstanding. A look at
        each connection per tick costs less than keeping a registry up to date per request."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        outstanding = False
        for conn in list(self._connections):
            proto = conn._proto
            if proto is None or proto.on_answer is None:
                continue
            if now >= proto.deadline:
                proto._fail(RequestTimeout(f"no answer within {self.timeout:g}s"))
            else:
                outstanding = True
        self._sweeper = loop.call_at(now + self._tick, self._sweep) if outstanding else None


class H1Connection:
    """One keep-alive connection of an ``H1Transport``; reconnects when the peer closed it.

    Two ways to send: ``post`` (a coroutine; connects when needed) and ``try_send`` (a
    callback, no Future and no task: the sender's hot path, for a connection already open).
    """

    __slots__ = ("_proto", "_t")

    def __init__(self, transport: H1Transport) -> None:
        self._t = transport
        self._proto: _H1Protocol | None = None

    async def _connect(self) -> _H1Protocol:
        t = self._t
        loop = asyncio.get_running_loop()
        where = f"{t.host}:{t.port}"
        try:
            async with asyncio.timeout(t.timeout):
                if t.ssl_context is not None and t.own_tls:
                    # Resolves with loop.getaddrinfo too (see below), then each address.
                    _, proto = await open_tls(
                        t.host, t.port, t.ssl_context, lambda: _H1Protocol(t.max_answer_bytes)
                    )
                    return proto
                # Resolved here, then connected to by number: uvloop's create_connection,
                # cancelled while it resolves (by this timeout, by a run that stops), leaves
                # its lookup's future behind, logged as "Future exception was never
                # retrieved ... gaierror" once per attempt (MagicStack/uvloop#437).
                # loop.getaddrinfo cancels cleanly, and a numeric host is never resolved.
                infos = await loop.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
                error: OSError = OSError(f"no address for {t.host}")
                for family, _, _, _, address in infos:
                    try:
                        _, proto = await loop.create_connection(
                            lambda: _H1Protocol(t.max_answer_bytes),
                            str(address[0]),
                            t.port,
                            family=family,
                            ssl=t.ssl_context,
                            server_hostname=t.host if t.tls else None,
                        )
                    except ssl.SSLError:
                        raise  # the handshake failed: another address serves the same cert
                    except OSError as exc:
                        error = exc  # the next address may answer (IPv6, then IPv4)
                    else:
                        return proto
                raise error
        except TimeoutError:
            raise ConnectTimeout(f"connect to {where} timed out after {t.timeout:g}s") from None
        except socket.gaierror as exc:
            raise ConnectError(
                f"cannot resolve host {t.host}: {exc.strerror or exc}", "unknown-host"
            ) from None
        except UnicodeError:  # the IDNA codec refuses the name (an empty or overlong label)
            raise ConnectError(
                f"cannot resolve host {t.host}: not a valid name", "unknown-host"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(
                f"TLS certificate of {where} not trusted: {exc.verify_message or exc.reason}",
                "tls-verify",
            ) from None
        except ssl.SSLError as exc:
            raise ConnectError(
                f"TLS handshake with {where} failed: {exc.reason or exc}", "tls"
            ) from None
        except ConnectionRefusedError:
            raise ConnectError(f"connection to {where} refused", "refused") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {where}: {exc.strerror or exc}") from None

    def try_send(self, headers: bytes, body: bytes, on_answer: OnAnswer) -> bool:
        """POST ``body`` with the fixed headers plus ``headers`` (whole ``Name: value\\r\\n``
        lines) if the connection is open and idle, and return True: ``on_answer`` is then
        called once, later, with the answer or a TransportError. False: nothing was sent
        (not connected; use ``post``)."""
        proto = self._proto
        if proto is None or proto.closed or proto.on_answer is not None:
            return False
        t = self._t
        proto.send(
            b"%s%sContent-Length: %d\r\n\r\n%s" % (t._head, headers, len(body), body),
            on_answer,
            t.timeout,
        )
        if t._sweeper is None:
            t._watch()
        return True

    async def post(self, headers: Mapping[str, str], body: bytes) -> Response:
        proto = self._proto
        if proto is None or proto.closed:
            proto = self._proto = await self._connect()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response | TransportError] = loop.create_future()

        def on_answer(outcome: Response | TransportError) -> None:
            if not waiter.done():
                waiter.set_result(outcome)

        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if not self.try_send(extra.encode("latin-1"), body, on_answer):
            # Closed by the peer between the connect and now (nothing else is outstanding):
            # nothing of this request went out.
            closed = ProtocolError("connection closed before the request was sent")
            closed.request_written = False
            raise closed
        try:
            outcome = await waiter
        finally:
            if waiter.cancelled():
                # The caller gave up (a cancelled run): the answer may still come, and must
                # not be taken as the next request's.
                proto.on_answer = None
                self.close()
        if isinstance(outcome, TransportError):
            raise outcome
        return outcome

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


# --- aiohttp, for proxies ----------------------------------------------------------------


class AiohttpTransport:
    """aiohttp's client with ``trust_env`` (proxies from the environment), pool = connections."""

    def __init__(
        self,
        url: str,
        fixed_headers: Mapping[str, str],
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        self.url = url
        self.max_answer_bytes = max_answer_bytes
        self.fixed = dict(fixed_headers)
        self.timeout = timeout
        self.ssl_context = ssl_context
        self._session: object | None = None

    def _get_session(self) -> object:
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0, ssl=self.ssl_context if self.ssl_context else True
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=True,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                skip_auto_headers=("User-Agent", "Content-Type"),
            )
        return self._session

    def connection(self) -> AiohttpConnection:
        return AiohttpConnection(self)

    async def aclose(self) -> None:
        if self._session is not None:
            import aiohttp

            assert isinstance(self._session, aiohttp.ClientSession)
            await self._session.close()
            self._session = None


class AiohttpConnection:
    __slots__ = ("_t",)

    def __init__(self, transport: AiohttpTransport) -> None:
        self._t = transport

    async def post(self, headers: Mapping[str, str], body: bytes) -> Response:
        import aiohttp

        session = self._t._get_session()
        assert isinstance(session, aiohttp.ClientSession)
        all_headers = {**self._t.fixed, **headers}
        all_headers.pop("Host", None)  # aiohttp writes Host itself, from the URL (same value)
        try:
            async with session.post(self._t.url, data=body, headers=all_headers) as resp:
                request_id = resp.headers.get("X-Request-Id")
                retry_after = resp.headers.get("Retry-After")
                try:
                    answer = await self._read_capped(resp)
                except aiohttp.ClientPayloadError as exc:
                    # The head was read: the status stands, broken (see Response). A head
                    # aiohttp cannot parse tells no status (a ProtocolError, below).
                    broken = ProtocolError(f"{type(exc).__name__}: {exc}")
                    return Response(resp.status, b"", request_id, retry_after, broken)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    closed = ConnectionClosed(f"{type(exc).__name__}: {exc}")
                    return Response(resp.status, b"", request_id, retry_after, closed)
                return Response(resp.status, answer, request_id, retry_after)
        except TimeoutError:
            raise RequestTimeout(f"no answer within {self._t.timeout:g}s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ConnectError(f"TLS certificate not trusted: {exc}", "tls-verify") from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectError(f"cannot connect: {exc}", _connect_cause(exc.os_error)) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise ConnectionClosed(f"{type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ProtocolError(f"{type(exc).__name__}: {exc}") from None

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body, or AnswerTooLarge past the cap (the head is bounded by aiohttp's own
        line and field limits)."""
        limit = self._t.max_answer_bytes
        declared = resp.content_length
        data = bytearray()
        if declared is None or declared <= limit:
            async for chunk in resp.content.iter_any():
                data += chunk
                if len(data) > limit:
                    break
            else:
                return bytes(data)
        resp.close()  # drop the connection: the rest of the answer is never read
        raise AnswerTooLarge(f"answer over {limit} bytes (--max-answer-bytes), HTTP {resp.status}")

    def close(self) -> None:
        pass


def _connect_cause(exc: OSError) -> str:
    """``ConnectError.cause`` for the OS error behind an aiohttp connector error."""
    if isinstance(exc, socket.gaierror):
        return "unknown-host"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls-verify"
    return "tls" if isinstance(exc, ssl.SSLError) else "connect"
