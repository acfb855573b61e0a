"""Headless Chromium driven over the DevTools protocol (its websocket, with aiohttp): open a
page, record every request it makes and every script error, move and click the mouse,
evaluate script, take a screenshot. No extra install: aiohttp is a dependency already, and
CI installs Debian's chromium.

Also a command, for README's picture: ``python -m tests.browser REPORT.html PNG`` writes a
screenshot of the report with the cursor on its latency chart's highest p99 (the legends'
values shown).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Any fetch over the network would go to a proxy that is not there, and fail loudly.
    "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
]  # fmt: skip
#: Seconds to wait for the browser to start, a page to load, an answer to a command.
DEADLINE_S = 30.0


def chromium() -> str:
    # CI installs it (apt-get install -y chromium); a missing browser is a failure, not a skip.
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    assert found, "no chromium: apt-get install -y chromium"
    return found


@dataclass
class Page:
    """One tab: ``call`` a DevTools method; what the page did is collected as it happens."""

    ws: aiohttp.ClientWebSocketResponse
    #: URL of every request the page made (Network.requestWillBeSent).
    requests: list[str] = field(default_factory=list)
    #: Uncaught exceptions, console errors and warnings, failed loads.
    errors: list[str] = field(default_factory=list)
    _next_id: int = 0
    _waiting: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _events: dict[str, asyncio.Event] = field(default_factory=dict)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        answer = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = answer
        await self.ws.send_json({"id": self._next_id, "method": method, "params": params})
        async with asyncio.timeout(DEADLINE_S):
            reply = await answer
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a script expression (awaited when it is a promise)."""
        out = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression!r}: {out['exceptionDetails']}")
        return out["result"].get("value")

    async def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        loaded = self._events.setdefault("Page.loadEventFired", asyncio.Event())
        loaded.clear()
        await self.call("Page.navigate", url=url)
        async with asyncio.timeout(DEADLINE_S):
            await loaded.wait()

    async def mouse(self, kind: str, x: float, y: float, **more: Any) -> None:
        """``kind``: mouseMoved, mousePressed or mouseReleased, at CSS pixels of the viewport."""
        await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **more)

    async def center_of(self, selector: str) -> tuple[float, float, float]:
        """Scroll the element into view: its centre (x, y) and its width, in the viewport."""
        rect = await self.evaluate(
            f"(() => {{ const el = document.querySelector({selector!r});"
            "el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
            "return [r.left + r.width / 2, r.top + r.height / 2, r.width]; })()"
        )
        return float(rect[0]), float(rect[1]), float(rect[2])

    async def screenshot(self) -> bytes:
        """The whole page as PNG."""
        out = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(out["data"])

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            answer = self._waiting.pop(message["id"], None)
            if answer is not None and not answer.done():
                answer.set_result(message)
            return
        method, params = message.get("method", ""), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            self.errors.append(f"load failed: {params.get('errorText')}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(str(details.get("exception", {}).get("description") or details))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            self.errors.append(" ".join(str(a.get("value")) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            self.errors.append(params["entry"].get("text", ""))
        event = self._events.get(method)
        if event is not None:
            event.set()


@asynccontextmanager
async def browser_page(width: int = 1400, height: int = 900) -> AsyncIterator[Page]:
    """A fresh headless Chromium (its own profile, HOME and port) and its one tab, with the
    Page, Network, Runtime and Log domains on; the browser is ended on exit."""
    with tempfile.TemporaryDirectory(prefix="bulksend-chromium-") as home:
        profile = Path(home) / "profile"
        proc = await asyncio.create_subprocess_exec(
            chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
            "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "HOME": home},
        )  # fmt: skip
        try:
            # Chromium writes the port it chose into the profile once it listens.
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + DEADLINE_S
            while not (port_file.exists() and port_file.read_text().strip()):
                assert proc.returncode is None, "chromium exited at start"
                assert time.monotonic() < deadline, "chromium did not start its DevTools server"
                await asyncio.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as answer:
                    targets = await answer.json()
                tab = next(t for t in targets if t["type"] == "page")
                async with http.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    page = Page(ws)
                    reader = asyncio.create_task(_read(ws, page))
                    try:
                        for domain in ("Page", "Network", "Runtime", "Log"):
                            await page.call(f"{domain}.enable")
                        yield page
                    finally:
                        reader.cancel()
                        with suppress(asyncio.CancelledError):
                            await reader
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(DEADLINE_S):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def _read(ws: aiohttp.ClientWebSocketResponse, page: Page) -> None:
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            page._dispatch(message.json())


async def _screenshot(url: str) -> bytes:
    async with browser_page(1400, 1000) as page:
        await page.open(url)
        assert page.errors == [], page.errors
        at_px = await page.evaluate(
            "(() => { const u = bulksendCharts.latency; const p99 = u.data[3];"
            "return u.valToPos(u.data[0][p99.indexOf(Math.max(...p99))], 'x'); })()"
        )
        x, y, width = await page.center_of("#chart-latency .u-over")
        await page.mouse("mouseMoved", x - width / 2 + min(max(at_px, 2), width - 2), y)
        return await page.screenshot()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.browser REPORT.html PNG")
    png = asyncio.run(_screenshot(Path(sys.argv[1]).resolve().as_uri()))
    Path(sys.argv[2]).write_bytes(png)
