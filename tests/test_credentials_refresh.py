"""Temporary credentials renewed during a real run (issue 11.7, end to end): ``bulksend
send`` takes its AK/SK/security token from a metadata stand-in, and before they expire
signs with the next ones it hands out. The target is a small aiohttp server on 127.0.0.1
that checks every request's signature with bulksend's own verifier and, as IAM does,
refuses temporary keys once they have expired (401: the run would stop with exit 2)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import orjson
import pytest
from aiohttp import web

from bulksend import signing
from tests.cli_helpers import SECRET_ENV, read_jsonl, target
from tests.metadata_standin import Issued, run_standin
from tests.scripted_server import ok_answer

pytestmark = pytest.mark.timeout(90)

#: The first keys' lifetime: the refresher renews at half of it (short lifetimes), so a
#: run paced to last twice as long sends with both.
FIRST_LIFETIME_S = 6.0


@dataclass
class Verifying:
    """SendMessage answers for requests signed with a known, unexpired temporary key."""

    keys: dict[str, Issued] = field(default_factory=dict)
    #: (access key, security token sent, wall-clock arrival) of every accepted request.
    accepted: list[tuple[str, str | None, float]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        path, _, query = request.raw_path.partition("?")
        try:
            ak = signing.verify(
                request.method,
                path,
                parse_qsl(query, keep_blank_values=True),
                request.headers,
                body,
                secret_for=lambda a: self.keys[a].sk if a in self.keys else None,
                now=now,
            )
        except signing.SignatureError as exc:
            self.refused.append(str(exc))
            refusal = {"error_code": "APIGW.0301", "error_msg": str(exc)}
            return web.json_response(refusal, status=401)
        issued = self.keys[ak]
        token = request.headers.get("X-Security-Token")
        if now >= issued.expires_at or token != issued.token:
            self.refused.append(f"{ak}: expired or wrong token")
            refusal = {"error_code": "APIGW.0307", "error_msg": "expired"}
            return web.json_response(refusal, status=401)
        self.accepted.append((ak, token, now))
        answer = ok_answer(body)
        return web.json_response(answer.json, headers=answer.headers)


async def test_a_send_renews_its_temporary_keys_before_they_expire(tmp_path: Path) -> None:
    verifying = Verifying()

    def issue(n: int) -> Issued:
        lifetime = FIRST_LIFETIME_S if n == 0 else 3600.0
        issued = Issued(f"AKTEMP{n}", f"temp-sk-{n}", f"temp-token-{n}", time.time() + lifetime)
        verifying.keys[issued.ak] = issued
        return issued

    count, rate = 160, 16  # ~10 s of sends: past the renewal at ~3 s and the expiry at ~6 s
    data = tmp_path / "in.jsonl"
    lines = (orjson.dumps({"topic": "t", "body": f"m{i}"}) + b"\n" for i in range(count))
    data.write_bytes(b"".join(lines))
    out = tmp_path / "out.jsonl"
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", verifying.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    env = {
        k: v for k, v in os.environ.items() if k not in SECRET_ENV and not k.startswith("BULKSEND_")
    }
    args = ["send", str(data), *target(url), "--rate", str(rate), "--out", str(out), "--quiet"]
    try:
        with run_standin(issue) as standin:
            env |= {"BULKSEND_METADATA_URL": standin.url, "HOME": str(tmp_path)}
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bulksend",
                *args,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
            fetched = standin.security_key_requests()
    finally:
        await runner.cleanup()
    assert proc.returncode == 0, stderr.decode()
    assert verifying.refused == []
    assert [r["status"] for r in read_jsonl(out)] == ["ok"] * count
    # Both keys signed: the first until it was renewed, the next from then on, each with
    # its own security token; no request signed with the first after it expired.
    used = [ak for ak, _, _ in verifying.accepted]
    switch = used.index("AKTEMP1")
    assert used[:switch] == ["AKTEMP0"] * switch and set(used[switch:]) == {"AKTEMP1"}
    assert 0 < switch < count
    first_expiry = verifying.keys["AKTEMP0"].expires_at
    assert all(at < first_expiry for ak, _, at in verifying.accepted if ak == "AKTEMP0")
    assert {(ak, tok) for ak, tok, _ in verifying.accepted} == {
        ("AKTEMP0", "temp-token-0"),
        ("AKTEMP1", "temp-token-1"),
    }
    assert fetched == 2
    for issued in verifying.keys.values():
        for secret in (issued.sk, issued.token):
            assert secret.encode() not in stdout + stderr and secret not in out.read_text()
