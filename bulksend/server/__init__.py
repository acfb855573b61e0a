"""The built-in SendMessage-compatible server (``bulksend serve``), usable in-process::

    async with run_server(ServerOptions(port=0, error_rate=0.1, seed=1)) as server:
        ...  # send to server.url
        stored = await server.store.messages(MessageQuery(topic="orders"))

Modules in data-flow order: ``options`` (what to do) -> ``http`` (bytes to requests and
back) -> ``app`` (routing, auth, validation, answers) with ``auth``, ``faults`` (deliberate
misbehaviour), ``store`` / ``journal`` (offsets, messages, SQLite) and ``metrics``;
``runner`` puts them together.
"""

from __future__ import annotations

from bulksend.server.options import ServerOptions, Stall
from bulksend.server.runner import RunningServer, run_server
from bulksend.server.store import MessageQuery, Store, StoredMessage

__all__ = [
    "MessageQuery",
    "RunningServer",
    "ServerOptions",
    "Stall",
    "Store",
    "StoredMessage",
    "run_server",
]
