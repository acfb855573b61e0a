"""TLS for the fast client: a minimal asyncio transport over a non-blocking ``ssl.SSLSocket``.

Hand-written because the event loop's own TLS transport is most of TLS's cost per message.
uvloop (like asyncio since 3.11) runs TLS over memory BIOs: each record is copied into a
BIO, decrypted into a fresh buffer, copied out again, through a Cython state machine with
flow control and a context copy per write. Measured on this project's benchmark machine, one
request/answer pair against nginx costs ~12-15 µs of CPU over plain TCP through uvloop,
~45-58 µs over uvloop's TLS, and ~15-17 µs with an ``SSLSocket`` whose reads and writes are
one C call each (the kernel I/O and the record in one go), driven by ``add_reader``.

What it does, and only that (an HTTP/1.1 client writing a request, then reading its answer):

* ``open_tls`` connects (each address ``getaddrinfo`` gives, in order), then handshakes
  without blocking the loop; a certificate that does not verify raises ``ssl.SSLError``.
* The protocol gets ``connection_made``, ``data_received`` for all the plaintext of each
  readable event, and ``connection_lost`` once: ``None`` at the peer's close (close_notify
  or a bare TCP close, as uvloop treats it too), else the error.
* ``write`` sends at once; what the socket does not take waits for it to be writable.
* ``close``/``abort`` drop the connection at once (no close_notify: an HTTP/1.1 answer is
  delimited by its length, so nothing depends on it) and call ``connection_lost(None)``
  soon, as asyncio transports do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

P = TypeVar("P", bound=asyncio.Protocol)

#: Plaintext read per call, into one buffer per connection (a bigger answer takes several).
READ_SIZE = 64 * 1024


class TLSTransport(asyncio.Transport):
    """See the module docstring."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol: asyncio.Protocol
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        # ssl.SSLSocket's recv_into, send and pending are Python wrappers (a closed-check
        # and a call on) around the C object's read, write and pending: ~8 Python frames per
        # message, ~1.5 µs of TLS's cost. The C object is called directly where it is there.
        direct = getattr(sock, "_sslobj", None)
        self._read_into: Callable[[int, memoryview], int] = (
            direct.read if direct is not None else lambda n, buf: sock.recv_into(buf, n)
        )
        self._send: Callable[[bytes | bytearray | memoryview], int] = (
            direct.write if direct is not None else sock.send
        )
        self._pending: Callable[[], int] = direct.pending if direct is not None else sock.pending
        self._fd = sock.fileno()
        self._protocol = protocol
        self._backlog = bytearray()
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self._closed = False
        protocol.connection_made(self)
        loop.add_reader(self._fd, self._on_readable)

    # asyncio.Transport
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            return
        if self._backlog:
            self._backlog += data
            return
        try:
            sent = self._send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            sent = 0
        except (OSError, ssl.SSLError) as exc:
            self._lose(exc)
            return
        if sent < len(data):
            self._backlog += memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._on_writable)

    def close(self) -> None:
        self._lose(None)

    def abort(self) -> None:
        self._lose(None)

    def is_closing(self) -> bool:
        return self._closed

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "ssl_object":
            return self._sock
        if name == "socket":
            return self._sock
        return default

    # the loop's callbacks
    def _on_readable(self) -> None:
        read_into, pending, view = self._read_into, self._pending, self._view
        while not self._closed:
            try:
                n = read_into(READ_SIZE, view)
            except (ssl.SSLWantReadError, BlockingIOError):
                return  # the rest of a record is still on its way
            except ssl.SSLWantWriteError:
                return  # renegotiation wants to write: the writer side retries
            except ssl.SSLEOFError:
                self._lose(None)  # a bare TCP close, no close_notify: an end all the same
                return
            except (OSError, ssl.SSLError) as exc:
                self._lose(exc)
                return
            if not n:
                self._lose(None)  # close_notify
                return
            try:
                self._protocol.data_received(bytes(view[:n]))
            except Exception as exc:  # a protocol's bug: the connection cannot go on
                self._lose(exc)
                raise
            # Decrypted bytes left in the SSL object raise no readiness event: drain them.
            if not pending():
                return

    def _on_writable(self) -> None:
        if self._closed:
            return
        try:
            sent = self._send(self._backlog)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return
        except (OSError, ssl.SSLError) as exc:
            self._lose(exc)
            return
        del self._backlog[:sent]
        if not self._backlog:
            self._loop.remove_writer(self._fd)

    def _lose(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._backlog:
            self._loop.remove_writer(self._fd)
            self._backlog.clear()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


async def open_tls(
    host: str, port: int, context: ssl.SSLContext, protocol_factory: Callable[[], P]
) -> tuple[TLSTransport, P]:
    """Connect to ``host:port``, handshake, and start ``protocol_factory()`` on it. Raises
    OSError (no connection) or ssl.SSLError (handshake); the caller bounds the time."""
    loop = asyncio.get_running_loop()
    sock = await _connect(loop, host, port)
    try:
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        await _handshake(loop, tls)
    except BaseException:
        tls.close()
        raise
    protocol = protocol_factory()
    return TLSTransport(loop, tls, protocol), protocol


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket: each address in ``getaddrinfo``'s order, the
    last error raised when none connects."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error or OSError(f"no address for {host}")


async def _handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket) -> None:
    """Drive the handshake, waiting on the socket as the SSL object asks."""
    fd = sock.fileno()
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            add, remove = loop.add_reader, loop.remove_reader
        except ssl.SSLWantWriteError:
            add, remove = loop.add_writer, loop.remove_writer
        ready: asyncio.Future[None] = loop.create_future()
        add(fd, _resolve, ready)
        try:
            await ready
        finally:
            remove(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
