"""A server that echoes the request's credentials back (in X-Request-Id, in its error
body) must not get them written to the ledger, the failed file or the terminal.

The server is a raw asyncio server on 127.0.0.1 that copies Authorization, X-Security-Token
and X-Auth-Token into its answer; bulksend runs as the CLI in a subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest

from bulksend.outcome import scrub
from tests.cli_helpers import SECRET_ENV, read_jsonl, write_jsonl
from tests.serve_helpers import INSTANCE_ID, PROJECT_ID

AK = "AKECHOTEST000001"
SK = "echo-test-secret-access-key-000000000001"
SECURITY_TOKEN = "echo-security-token-" + "x" * 300
AUTH_TOKEN = "echo-iam-token-" + "y" * 300
SECRETS_ENV = {
    "aksk": {
        "HUAWEICLOUD_SDK_AK": AK,
        "HUAWEICLOUD_SDK_SK": SK,
        "HUAWEICLOUD_SDK_SECURITY_TOKEN": SECURITY_TOKEN,
    },
    "token": {"HUAWEICLOUD_SDK_AUTH_TOKEN": AUTH_TOKEN},
}
ECHOED = ("authorization", "x-security-token", "x-auth-token")


class EchoServer:
    """Answers every request with what it was sent: 200 with a msg_id, or (``fail``) 400
    with the credentials in error_code and error_msg. Records the signatures it saw."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.signatures: list[str] = []
        self.answered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                match = re.search(r"Signature=([0-9a-f]+)", headers.get("authorization", ""))
                if match:
                    self.signatures.append(match.group(1))
                echo = " | ".join(f"{h}: {headers[h]}" for h in ECHOED if h in headers)
                self.answered += 1
                if self.fail:
                    status = "400 Bad Request"
                    body = orjson.dumps({"error_code": echo, "error_msg": echo, "request_id": echo})
                else:
                    status = "200 OK"
                    n = self.answered
                    body = orjson.dumps(
                        {
                            "msg_id": f"{n:032X}",
                            "queue_id": 0,
                            "queue_offset": n,
                            "broker_name": "b",
                        }
                    )
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nX-Request-Id: {echo}\r\n\r\n".encode("latin-1")
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def echo_server(fail: bool) -> AsyncIterator[tuple[EchoServer, str]]:
    echo = EchoServer(fail)
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield echo, f"http://127.0.0.1:{port}"


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """``python -m bulksend ARGS`` without blocking the loop the echo server runs on."""
    clean = {
        k: v for k, v in os.environ.items() if k not in SECRET_ENV and not k.startswith("BULKSEND_")
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bulksend",
        *args,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


@pytest.mark.parametrize("fail", [False, True], ids=["ok-answers", "error-answers"])
@pytest.mark.parametrize("mode", ["aksk", "token"])
async def test_echoed_credentials_never_reach_an_output(
    tmp_path: Path, mode: str, fail: bool
) -> None:
    records = write_jsonl(
        tmp_path / "in.jsonl", [{"topic": "t", "body": f"m{i}"} for i in range(8)]
    )
    out, failed = tmp_path / "out.jsonl", tmp_path / "failed.jsonl"
    async with echo_server(fail) as (echo, url):
        code, terminal = await run_cli(
            "send",
            str(records),
            "--endpoint",
            url,
            "--project-id",
            PROJECT_ID,
            "--instance-id",
            INSTANCE_ID,
            "--out",
            str(out),
            "--failed",
            str(failed),
            "--max-retries",
            "0",
            env=SECRETS_ENV[mode],
        )
    assert code == (1 if fail else 0), terminal
    assert echo.answered == 8
    results = read_jsonl(out)
    assert len(results) == 8
    written = out.read_text() + (failed.read_text() if failed.exists() else "") + terminal
    leaked = [SK, SECURITY_TOKEN, AUTH_TOKEN, *echo.signatures]
    assert [s[:12] for s in leaked if s in written] == []
    # What the server said is still there, with the secrets masked.
    if mode == "aksk":
        assert len(echo.signatures) == 8
        assert all("Signature=***" in r["request_id"] and AK in r["request_id"] for r in results)
        assert all("x-security-token: ***" in r["request_id"] for r in results)
    else:
        assert all(r["request_id"] == "x-auth-token: ***" for r in results)


def test_scrub_masks_signatures_in_any_spelling() -> None:
    header = "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=host;x-sdk-date, Signature=0a1b2c"
    assert (
        scrub(header, ())
        == "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=host;x-sdk-date, Signature=***"
    )
    assert scrub("signature = 0a1b2c; next", ()) == "signature = ***; next"
    assert scrub("plain-request-id-123", ("secret",)) == "plain-request-id-123"
    assert scrub("a secret b secret", ("secret",)) == "a *** b ***"


def test_scrub_masks_secrets_lower_cased_or_url_encoded() -> None:
    # A gateway's error page may dump the request head URL-encoded, or a proxy lower-case
    # it: the token (a temporary credential) and the signature must go either way.
    token = "Tok/en+Secret=AB" + "c" * 40
    encoded = "Tok%2Fen%2BSecret%3DAB" + "c" * 40
    assert scrub(f"x-security-token: {token.lower()} end", (token,)) == "x-security-token: *** end"
    assert scrub(f"x-security-token%3A%20{encoded}%0D", (token,)) == "x-security-token%3A%20***%0D"
    assert scrub(f"t={encoded.lower()}", (token,)) == "t=***"
    sig = "0a1b2c" * 10 + "0a1b"
    dumped = f"Authorization%3A%20SDK-HMAC-SHA256%20Access%3DAK1%2C%20Signature%3D{sig}%0D%0A"
    assert sig not in scrub(dumped, ())
    assert scrub(dumped, ()).endswith("Signature%3D***%0D%0A")
