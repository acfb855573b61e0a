"""A test server that answers from a script, for the client's rules (retry, Retry-After,
auth stop, bad answers, hangs): real sockets on 127.0.0.1, aiohttp's server.

``ScriptedServer(answer)``: ``answer(n, request_body)`` returns what the n-th request (0-based)
gets: an ``Answer`` (status, JSON or raw body, headers), ``HANG`` (never answer) or ``DROP``
(close the connection). Every request is recorded with its headers, body and arrival time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Answer:
    status: int = 200
    json: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


HANG = "hang"
DROP = "drop"

_ids = itertools.count()


def ok_answer(body: bytes) -> Answer:
    req = orjson.loads(body)
    n = next(_ids)
    return Answer(
        200,
        {
            "topic": req["topic"],
            "body": req["body"],
            "property_list": req.get("property_list", []),
            "msg_id": f"{n:032X}",
            "queue_id": n % 4,
            "queue_offset": n,
            "broker_name": "broker-0",
        },
        headers={"X-Request-Id": f"req-{n}"},
    )


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes
    at: float


class ScriptedServer:
    def __init__(self, answer: Callable[[int, bytes], Answer | str], *, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        #: Requests being handled now, and the most there ever were at once (a spy).
        self.in_flight = 0
        self.peak_in_flight = 0
        self.seen: list[Seen] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        n = len(self.seen)
        self.seen.append(Seen(dict(request.headers), body, time.monotonic()))
        what = self.answer(n, body)
        if what == HANG:
            await asyncio.sleep(3600)
        if what == DROP:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=599)
        assert isinstance(what, Answer)
        data = (
            what.raw
            if what.raw is not None
            else orjson.dumps(what.json)
            if what.json is not None
            else b""
        )
        return web.Response(
            status=what.status, body=data, headers=what.headers, content_type="application/json"
        )

    async def __aenter__(self) -> ScriptedServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
