"""A misbehaving front for the built-in server, for the reconciliation tests.

It forwards every request unchanged (raw path, raw query, every header, Host included, so
signatures still verify upstream) and can, for ListMessages (GET) only:

* ``list_status``: answer every GET with this error instead (404 = no such API);
* ``busy_first`` / ``busy_always``: answer 503 to the first N GETs, or to all;
* ``hang_first``: hold the first N GETs without answering (the client times out);
* ``hide_younger_ms``: drop listed messages stored less than this long ago — a broker
  whose key index lags behind its store;
* ``ignore_key``: forward without the ``key`` filter — an endpoint whose listing is looser
  than asked;
* ``not_a_listing``: answer 200 with JSON that is not a ListMessages answer.

It counts GETs and the most it held at once (a spy for the reconciler's concurrency bound).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Misbehaviour:
    list_status: int | None = None
    busy_first: int = 0
    busy_always: bool = False
    hang_first: int = 0
    hide_younger_ms: int = 0
    ignore_key: bool = False
    not_a_listing: bool = False


@dataclass
class Proxy:
    url: str
    faults: Misbehaviour
    gets: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    queries: list[dict[str, str]] = field(default_factory=list)


def _error(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error_code": code, "error_msg": message, "request_id": "proxy"})
    return web.Response(status=status, body=body, content_type="application/json")


@asynccontextmanager
async def misbehaving_proxy(upstream: str, faults: Misbehaviour) -> AsyncIterator[Proxy]:
    """A proxy on 127.0.0.1 and a free port in front of ``upstream`` (``http://host:port``)."""
    session = aiohttp.ClientSession(auto_decompress=False)
    proxy = Proxy(url="", faults=faults)
    stop = asyncio.Event()

    async def forward(request: web.Request, raw_path: str) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session.request(
            request.method,
            URL(upstream + raw_path, encoded=True),
            headers=headers,
            data=await request.read(),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        ) as resp:
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
            return resp.status, out, await resp.read()

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method != "GET" or request.path == "/metrics":
            status, headers, body = await forward(request, request.raw_path)
            return web.Response(status=status, headers=headers, body=body)
        proxy.gets += 1
        n = proxy.gets
        proxy.in_flight += 1
        proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
        try:
            return await answer_get(request, n)
        finally:
            proxy.in_flight -= 1

    async def answer_get(request: web.Request, n: int) -> web.StreamResponse:
        proxy.queries.append(dict(parse_qsl(request.query_string)))
        if faults.list_status is not None:
            return _error(faults.list_status, "APIGW.0101", "The API does not exist")
        if faults.busy_always or n <= faults.busy_first:
            resp = _error(503, "DMS.00503001", "busy")
            resp.headers["Retry-After"] = "0"
            return resp
        if n <= faults.hang_first:
            await stop.wait()  # until the proxy closes; the client times out first
            return _error(503, "DMS.00503001", "late")
        if faults.not_a_listing:
            return web.json_response({"hello": "world"})
        raw_path = request.raw_path
        if faults.ignore_key:
            query = [(k, v) for k, v in parse_qsl(request.query_string) if k != "key"]
            raw_path = f"{request.path}?{urlencode(query)}"
        status, headers, body = await forward(request, raw_path)
        if status == 200 and faults.hide_younger_ms:
            data = orjson.loads(body)
            cutoff = time.time() * 1000 - faults.hide_younger_ms
            data["messages"] = [m for m in data["messages"] if m["store_timestamp"] <= cutoff]
            data["total"] = len(data["messages"])
            body = orjson.dumps(data)
        return web.Response(status=status, headers=headers, body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    proxy.url = f"http://127.0.0.1:{port}"
    try:
        yield proxy
    finally:
        stop.set()
        await runner.cleanup()
        await session.close()
