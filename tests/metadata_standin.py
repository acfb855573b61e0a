"""A stand-in for the ECS metadata service on 127.0.0.1, as huaweicloudsdkcore's
MetadataAccessor talks to it: ``PUT /meta-data/latest/api/token`` (with
X-Metadata-Token-Ttl-Seconds) gives a session token; ``GET /openstack/latest/securitykey``
(with X-Metadata-Token) gives ``{"credential": {"access", "secret", "securitytoken",
"expires_at"}}``.

A thread of its own (the code under test asks it with blocking urllib calls, and a CLI
subprocess asks it too). ``issue(n)`` makes the n-th credentials; ``script`` holds
statuses to answer the next security-key requests with before answering properly.
"""

from __future__ import annotations

import datetime
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

NO_AGENCY = "Please configure Cloud Service Agency first"


def expiry_text(epoch_s: float) -> str:
    """The service's (and the SDK's) format: ``%Y-%m-%dT%H:%M:%S.%fZ``, UTC."""
    when = datetime.datetime.fromtimestamp(epoch_s, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Issued:
    ak: str
    sk: str
    token: str
    expires_at: float


@dataclass
class Standin:
    issue: Callable[[int], Issued]
    #: "v2": session tokens required; "v1": the token PUT answers 404, no token needed.
    tokens: str = "v2"
    #: Statuses (or "no-agency") to answer the next security-key requests with.
    script: list[Any] = field(default_factory=list)
    #: (method, path, headers) of every request.
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    issued: list[Issued] = field(default_factory=list)
    url: str = ""
    _numbers: Iterator[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def security_key_requests(self) -> int:
        return sum(1 for _, path, _ in self.seen if path.endswith("/securitykey"))


def _handler(standin: Standin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            with standin._lock:
                standin.seen.append(("PUT", self.path, dict(self.headers)))
                if self.path != "/meta-data/latest/api/token" or standin.tokens != "v2":
                    return self._answer(404, b"not found")
                if not self.headers.get("X-Metadata-Token-Ttl-Seconds"):
                    return self._answer(400, b"ttl missing")
                token = f"session-{next(standin._numbers)}"
                standin.valid_tokens.add(token)
            self._answer(200, token.encode())

        def do_GET(self) -> None:
            with standin._lock:
                standin.seen.append(("GET", self.path, dict(self.headers)))
                if self.path != "/openstack/latest/securitykey":
                    return self._answer(404, b"not found")
                if standin.script:
                    step = standin.script.pop(0)
                    if step == "no-agency":
                        return self._answer(401, NO_AGENCY.encode())
                    if step == "expire-tokens":
                        standin.valid_tokens.clear()
                    else:
                        return self._answer(int(step), b'{"error": "scripted"}')
                if standin.tokens == "v2" and (
                    self.headers.get("X-Metadata-Token") not in standin.valid_tokens
                ):
                    return self._answer(401, b"invalid or expired metadata token")
                issued = standin.issue(len(standin.issued))
                standin.issued.append(issued)
            body = {
                "credential": {
                    "access": issued.ak,
                    "secret": issued.sk,
                    "securitytoken": issued.token,
                    "expires_at": expiry_text(issued.expires_at),
                }
            }
            self._answer(200, orjson.dumps(body))

    return Handler


@contextmanager
def run_standin(issue: Callable[[int], Issued], **kw: Any) -> Iterator[Standin]:
    standin = Standin(issue, **kw)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(standin))
    server.daemon_threads = True
    standin.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
