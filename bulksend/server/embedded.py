"""``--embedded``: the built-in server as the target of a ``send`` or ``load`` run, started in
the same process on a free loopback port and stopped when the run ends."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from bulksend.config import Credentials, Target

#: Identifies the built-in server's target in --embedded runs.
EMBEDDED_PROJECT = "embedded-project"
EMBEDDED_INSTANCE = "embedded-instance"


@contextlib.asynccontextmanager
async def target_or_embedded(
    target: Target | None, credentials: Credentials, engine: str = "rocketmq"
) -> AsyncIterator[tuple[Target, Credentials]]:
    """The given target, or (None: --embedded) the built-in server started in this process
    on a free loopback port with no auth, stopped on leaving."""
    if target is not None:
        yield target, credentials
        return
    from bulksend.server.options import ServerOptions
    from bulksend.server.runner import run_server

    async with run_server(ServerOptions(host="127.0.0.1", port=0)) as server:
        yield Target(server.url, EMBEDDED_PROJECT, EMBEDDED_INSTANCE, engine), Credentials()
