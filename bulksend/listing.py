"""ListMessages, the API's one way to ask whether a message is stored: a signed GET.

``GET /v2/{engine}/{project_id}/instances/{instance_id}/messages?topic=..&key=..
&start_time=..&end_time=..&limit=..&offset=..`` answers ``{"messages": [...], "total": n}``
(the official SDK's ``ListMessagesRequest`` / ``ListMessagesResponse``). Without ``msg_id``
the real service requires the time range, so every query here carries one.

aiohttp rather than the hand-written transport of ``client.py``: ListMessages is off the hot
path (a query per ambiguous attempt, a handful per run), and aiohttp gives proxies from the
environment, TLS and pooling for free. The request is signed with ``bulksend.signing``'s pure
steps and its query string is sent in canonical form, as the SDK sends it (the SDK's
``Signer.process_request_uri``), so what is signed is byte for byte what goes out.

Errors are translated here, and only here, for ListMessages (``ReconcileError`` and
``ListMessagesUnavailable`` live in ``bulksend.errors``, the one tree)::

    BulksendError
    └── ReconcileError            ListMessages cannot say whether a message is stored:
        │                         the run stops (exit 2), intents stay for --resume
        └── ListMessagesUnavailable   no usable ListMessages: 404/405, 401/403, another 4xx,
                                      a 200 that is not a ListMessages answer, TLS refused
    TransportError                 retried by the caller, never escapes the reconciler
    └── ListMessagesBusy          429 or 5xx (with Retry-After, when given)

aiohttp, ssl and OS errors become ``ConnectError`` / ``RequestTimeout`` / ``ProtocolError``
(retried) or ``ListMessagesUnavailable`` (a certificate that does not verify never will).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from yarl import URL

from bulksend import __version__
from bulksend.config import Credentials, Target, TLSOptions
from bulksend.errors import (
    ConnectError,
    ListMessagesUnavailable,
    ProtocolError,
    ReconcileError,
    RequestTimeout,
    TransportError,
)
from bulksend.outcome import scrub
from bulksend.record import KEYS
from bulksend.signing import canonical_query, sign

__all__ = [
    "ListMessagesBusy",
    "ListMessagesClient",
    "ListMessagesUnavailable",
    "ListQuery",
    "ListedMessage",
    "Page",
    "ReconcileError",
]

USER_AGENT = f"bulksend/{__version__}"
#: How much of a refusal's text goes into the one-line error.
ERROR_TEXT_CHARS = 200
#: The largest ListMessages answer read. A page of 10 messages of RocketMQ's 4 MiB bodies,
#: JSON-escaped, fits; an endless answer must not take the process's memory.
MAX_ANSWER_BYTES = 128 << 20


class ListMessagesBusy(TransportError):
    """A 429 or 5xx answer to ListMessages: worth asking again after a backoff."""

    def __init__(self, status: int, message: str, retry_after: str | None) -> None:
        super().__init__(message)
        self.code = f"HTTP_{status}"
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ListQuery:
    """One ListMessages page: messages of ``topic`` whose KEYS hold ``key``, stored in
    [``start_ms``, ``end_ms``] (ms since the epoch, inclusive)."""

    topic: str
    key: str
    start_ms: int
    end_ms: int
    limit: int = 10
    offset: int = 0

    def params(self) -> list[tuple[str, str]]:
        return [
            ("topic", self.topic),
            ("key", self.key),
            ("start_time", str(self.start_ms)),
            ("end_time", str(self.end_ms)),
            ("limit", str(self.limit)),
            ("offset", str(self.offset)),
        ]


@dataclass(frozen=True, slots=True)
class ListedMessage:
    """What reconciliation needs of a listed message. ``keys`` is None when the answer
    carries no ``property_list`` (then the server's own key filter is all we have).
    ListMessages' message has no ``broker_name`` (the SDK's ``Message`` model lacks it); it
    is kept when a server sends one anyway."""

    msg_id: str
    topic: str | None
    keys: tuple[str, ...] | None
    queue_id: int | None
    queue_offset: int | None
    store_timestamp: int | None
    broker_name: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[ListedMessage]
    #: The server's count of every match (all pages); None when it gives none.
    total: int | None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)  # the SDK types some integer fields as strings
    return None


def _keys(props: Any) -> tuple[str, ...] | None:
    if not isinstance(props, list):
        return None
    for prop in props:
        if isinstance(prop, dict) and prop.get("name") == KEYS:
            value = prop.get("value")
            return tuple(value.split()) if isinstance(value, str) else ()
    return ()


def parse_page(body: bytes, *, where: str) -> Page:
    """A ListMessages answer's messages. Raises ProtocolError for bytes that are not JSON
    (a cut answer: worth asking again) and ListMessagesUnavailable for JSON that is not a
    ListMessages answer (an endpoint that is something else: asking again will not help)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProtocolError(
            f"ListMessages at {where} answered 200 with a body that is not JSON"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ListMessagesUnavailable(
            f"{where} answered ListMessages with 200 but no messages list: it does not look "
            "like the DMS RocketMQ API, and --exactly-once needs its ListMessages"
        )
    messages = []
    for m in data["messages"]:
        if not isinstance(m, dict) or not isinstance(m.get("msg_id"), str) or not m["msg_id"]:
            continue  # a message without msg_id cannot stand for a stored record
        topic, broker = m.get("topic"), m.get("broker_name")
        messages.append(
            ListedMessage(
                msg_id=m["msg_id"],
                topic=topic if isinstance(topic, str) else None,
                keys=_keys(m.get("property_list")),
                queue_id=_int(m.get("queue_id")),
                queue_offset=_int(m.get("queue_offset")),
                store_timestamp=_int(m.get("store_timestamp")),
                broker_name=broker if isinstance(broker, str) else None,
            )
        )
    return Page(messages, _int(data.get("total")))


def printable(text: str, limit: int = ERROR_TEXT_CHARS) -> str:
    """Server-supplied text fit for one terminal line: control characters escaped (an
    answer must not retitle or clear the user's terminal), at most ``limit`` characters."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def refusal_text(status: int, body: bytes, secrets: tuple[str, ...]) -> str:
    """``HTTP 404 APIGW.0101: The API does not exist`` from an error answer, secrets scrubbed."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and ("error_code" in data or "error_msg" in data):
        text = f"{data.get('error_code') or ''}: {data.get('error_msg') or ''}".strip(": ")
    else:
        text = body[:ERROR_TEXT_CHARS].decode("utf-8", "replace").strip()
    text = printable(scrub(text, secrets))
    return f"HTTP {status} {text}" if text else f"HTTP {status}"


class ListMessagesClient:
    """Signed ListMessages GETs to one target over one aiohttp session (made on first use,
    in the running loop). ``clock`` gives the wall time that X-Sdk-Date states."""

    def __init__(
        self,
        target: Target,
        credentials: Credentials | None = None,
        *,
        tls: TLSOptions | None = None,
        timeout: float = 30.0,
        connections: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._connections = connections
        self._clock = clock
        https = target.url.startswith("https")
        self._ssl: ssl.SSLContext | None = (tls or TLSOptions()).context() if https else None
        self._host = target.url.split("/", 3)[2]  # as typed: what Host carries and is signed
        self._secrets: tuple[str, ...] = ()
        self.set_credentials(credentials or Credentials())
        self._session: aiohttp.ClientSession | None = None

    def set_credentials(self, credentials: Credentials) -> None:
        """Sign (or authenticate) every request from now on with ``credentials`` (temporary
        AK/SK refreshed during a run); the previous secrets stay scrubbed from answers."""
        self.credentials = creds = credentials
        self._secrets = tuple(dict.fromkeys((*creds.secrets(), *self._secrets)))
        fixed = {
            "Host": self._host,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Project-Id": self.target.project_id,
        }
        if creds.mode == "aksk" and creds.security_token:
            fixed["X-Security-Token"] = creds.security_token
        elif creds.mode == "token":
            fixed["X-Auth-Token"] = creds.auth_token or ""
        self._fixed = fixed

    @property
    def where(self) -> str:
        """The endpoint, for messages (no path: it holds nothing the user did not type)."""
        return self.target.endpoint

    def headers(self, query: ListQuery) -> dict[str, str]:
        """Every header of the GET for ``query``, signed when the credentials are AK/SK."""
        creds = self.credentials
        if creds.mode != "aksk":
            return dict(self._fixed)
        return sign(
            "GET",
            self.target.path,
            query.params(),
            self._fixed,
            b"",
            ak=creds.ak or "",
            sk=creds.sk or "",
            now=self._clock(),
        )

    def url(self, query: ListQuery) -> URL:
        """The request URL, its query in the canonical form that is signed."""
        return URL(f"{self.target.url}?{canonical_query(query.params())}", encoded=True)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._connections, ssl=self._ssl if self._ssl is not None else True
                ),
                # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as the sender honours them.
                trust_env=True,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                # Only the headers we sign go out (plus Host, which is signed too).
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        return self._session

    async def get(self, query: ListQuery) -> Page:
        """One GET: a Page, or ListMessagesUnavailable (stop), or a TransportError
        (ListMessagesBusy for 429/5xx; retry after a backoff)."""
        session = self._get_session()
        where = self.where
        try:
            async with session.get(
                self.url(query), headers=self.headers(query), allow_redirects=False
            ) as resp:
                body = await _read_capped(resp, MAX_ANSWER_BYTES)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError:
            raise RequestTimeout(
                f"ListMessages at {where}: no answer within {self.timeout:g}s"
            ) from None
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            raise ListMessagesUnavailable(
                f"TLS with {where} failed for ListMessages: {exc} (--ca-bundle FILE adds a CA)"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectError(
                f"ListMessages: cannot connect to {where}: {exc.strerror or exc}"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ProtocolError(f"ListMessages at {where}: {type(exc).__name__}: {exc}") from None
        if body is None:
            raise ListMessagesUnavailable(
                f"ListMessages at {where} answered more than {MAX_ANSWER_BYTES >> 20} MiB"
            )
        if 200 <= status < 300:
            return parse_page(body, where=where)
        text = refusal_text(status, body, self._secrets)
        if status == 429 or status >= 500:
            raise ListMessagesBusy(status, f"ListMessages at {where} answered {text}", retry_after)
        raise ListMessagesUnavailable(_refusal_line(status, where, text))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ListMessagesClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The answer's body, or None past ``cap`` bytes (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _refusal_line(status: int, where: str, text: str) -> str:
    if status in (404, 405):
        why = "has no ListMessages API"
    elif status in (401, 403):
        why = "refused ListMessages to these credentials (they need query rights as well as send)"
    else:
        why = "refused the ListMessages query"
    return f"--exactly-once needs ListMessages to check what is stored: {where} {why} ({text})"
