"""Run the server in the current event loop: ``async with run_server(options) as server``.

Order on the way in: open the store (restoring offsets) -> build the app -> listen.
On the way out, the reverse: stop accepting -> finish in-flight answers (up to the grace)
-> commit and close the store.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from bulksend.errors import ConfigError
from bulksend.server.app import App
from bulksend.server.http import HttpServer
from bulksend.server.journal import SqliteJournal, StoreInUse
from bulksend.server.metrics import Metrics
from bulksend.server.options import ServerOptions
from bulksend.server.store import Store


@dataclass(eq=False)
class RunningServer:
    """A server serving in this event loop, as ``run_server`` yields it."""

    #: ``http://HOST:PORT`` (``https://`` with TLS), the port being the one bound.
    url: str
    host: str
    port: int
    options: ServerOptions
    #: Every accepted message: ``await server.store.messages(MessageQuery(...))``.
    store: Store
    metrics: Metrics
    #: The seed of the misbehaviour's random choices; None when nothing misbehaves.
    seed: int | None
    _http: HttpServer = field(repr=False)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _stopping: bool = field(default=False, repr=False)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight answers finish (up to ``grace_s``, default the
        options' ``shutdown_grace_s``), then commit the store. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await self._http.shutdown(self.options.shutdown_grace_s if grace_s is None else grace_s)
        finally:
            try:
                await self.store.close()
            finally:
                self._stopped.set()

    def abort(self) -> None:
        """Cut every connection now (a second SIGINT); a running shutdown then ends."""
        self._http.abort()


def _tls(options: ServerOptions) -> ssl.SSLContext | None:
    if options.tls_cert is None or options.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(options.tls_cert, options.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load --tls-cert/--tls-key: {exc}") from None
    return context


def _url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def _open_store(options: ServerOptions) -> Store:
    if options.store_path is None:
        return Store(queues=options.queues, brokers=options.brokers, keep=options.keep)
    try:
        journal, restored = await SqliteJournal.open(
            options.store_path, commit_interval_s=options.commit_interval_s
        )
    except StoreInUse as exc:
        raise ConfigError(f"--store {exc}") from None
    except Exception as exc:  # sqlite3.Error, OSError: an unusable --store file
        raise ConfigError(f"cannot open --store {options.store_path}: {exc}") from None
    return Store(queues=options.queues, brokers=options.brokers, journal=journal, restored=restored)


@asynccontextmanager
async def run_server(options: ServerOptions | None = None) -> AsyncIterator[RunningServer]:
    """Bind and serve in the current event loop until the block ends, then shut down
    gracefully (in-flight answers finish, the store commits). Raises ConfigError when the
    address cannot be bound or the store or TLS files cannot be used."""
    options = options or ServerOptions()
    loop = asyncio.get_running_loop()
    tls = _tls(options)
    store = await _open_store(options)
    app = App(options, store, Metrics(), loop.time)
    http = HttpServer(app, max_body=options.max_body)
    try:
        port = await http.start(options.host, options.port, tls)
    except OSError as exc:
        await store.close()
        raise ConfigError(
            f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}"
        ) from None
    server = RunningServer(
        url=_url("https" if tls else "http", options.host, port),
        host=options.host,
        port=port,
        options=options,
        store=store,
        metrics=app.metrics,
        seed=app.faults.seed if app.faults is not None else None,
        _http=http,
    )
    try:
        yield server
    finally:
        await server.shutdown()
