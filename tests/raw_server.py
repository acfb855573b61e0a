"""A raw HTTP/1.1 server on 127.0.0.1 that writes exactly the bytes a test tells it to, for
the client's protocol cases (1xx, close-delimited answers, stray bytes, endless answers).

``RawServer(handle)``: for each request (head + Content-Length body) it awaits
``handle(exchange)``, which writes whatever bytes it likes with ``exchange.write`` and may
``exchange.close()`` the connection. Every request and connection is recorded.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

#: Upper bound on what a streaming handler writes, so that a client that fails to stop
#: reading cannot make a test use unbounded memory: it times out instead.
STREAM_LIMIT = 8 << 20


@dataclass
class Exchange:
    server: RawServer
    conn: int  # 0-based connection number
    n: int  # 0-based request number on this connection
    head: bytes
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def write(self, *chunks: bytes) -> None:
        self.writer.write(b"".join(chunks))
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    def drop(self) -> None:
        """Close at once; over TLS, without a close_notify (a bare TCP close)."""
        self.writer.transport.abort()

    async def stream(self, head: bytes, chunk: bytes) -> None:
        """Write ``head``, then ``chunk`` again and again (up to STREAM_LIMIT bytes) until the
        client goes away; then hold the connection open, silent, until the client closes it.
        """
        try:
            await self.write(head)
            sent = 0
            while sent < STREAM_LIMIT:
                await self.write(chunk)
                sent += len(chunk)
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.server.closed_by_client += 1
        self.close()


@dataclass
class RawServer:
    handle: Callable[[Exchange], Awaitable[None]]
    #: Serve TLS with this context (the url is then https).
    tls: ssl.SSLContext | None = None
    #: The server's receive buffer (bytes), small to make a big request wait for the reader.
    rcvbuf: int | None = None
    url: str = ""
    requests: list[tuple[int, int, bytes]] = field(default_factory=list)
    connections: int = 0
    #: Connections the client closed (EOF or reset seen by the server).
    closed_by_client: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Future[object]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            n = 0
            while not writer.is_closing():
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    body = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_client += 1
                    return
                self.requests.append((conn, n, body))
                try:
                    await self.handle(Exchange(self, conn, n, head, body, reader, writer))
                except ConnectionError:
                    self.closed_by_client += 1
                    return
                n += 1
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> RawServer:
        sock = socket.socket()
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._serve, sock=sock, ssl=self.tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # Closing each connection ends its handler (a read sees EOF): no task is cancelled.
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        await self._server.wait_closed()


def answer_json(body: bytes) -> bytes:
    """A SendMessage 200 body whose msg_id names the request's body, so a test sees at once
    which request an answer was credited to."""
    req = orjson.loads(body)
    return orjson.dumps({"msg_id": f"ID-{req['body']}", "queue_id": 0, "queue_offset": 0})


def response(status: str, body: bytes, *headers: str, length: bool = True) -> bytes:
    """``HTTP/1.1 {status}`` with ``headers``, Content-Length (unless ``length`` is False)
    and ``body``."""
    lines = [f"HTTP/1.1 {status}", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
