"""Auth of ``bulksend serve``: SDK-HMAC-SHA256 signatures (checked with the SDK's own client
too), X-Auth-Token, unsigned mode, and that no secret reaches its output."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.serve_helpers import (
    AK,
    INSTANCE_ID,
    SK,
    messages_path,
    sdk_client,
    sign_headers,
    start_server_subprocess,
)

TIMEOUT = aiohttp.ClientTimeout(total=15)
BODY = b'{"topic":"auth","body":"hello","property_list":[{"name":"KEYS","value":"k1"}]}'
TOKEN = "MIIEXAMPLE-token-value-1234567890"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server verifying signatures made with (AK, SK); its URL and stderr file."""
    err = tmp_path_factory.mktemp("signed") / "stderr"
    with (
        err.open("w") as stderr,
        start_server_subprocess(
            env={"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK}, stderr=stderr
        ) as (_, url),
    ):
        yield url, err


async def post(
    url: str, headers: dict[str, str], body: bytes = BODY, path: str | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.post(url + (path or messages_path()), data=body, headers=headers) as r,
    ):
        assert r.headers["X-Request-Id"]
        return r.status, json.loads(await r.read())


def sdk_send(url: str, ak: str = AK, sk: str = SK) -> Any:
    from huaweicloudsdkrocketmq.v2 import SendMessageProperties, SendMessageReq, SendMessageRequest

    req = SendMessageReq(
        topic="auth-sdk",
        body="b",
        property_list=[SendMessageProperties(name="KEYS", value="sdk-key")],
    )
    return sdk_client(url, ak=ak, sk=sk).send_message(
        SendMessageRequest(engine="rocketmq", instance_id=INSTANCE_ID, body=req)
    )


def test_sdk_signed_send_and_list(signed: tuple[str, Path]) -> None:
    from huaweicloudsdkrocketmq.v2 import ListMessagesRequest

    url, _ = signed
    sent = sdk_send(url)
    # A signed GET: the query string is part of what the SDK signs.
    found = sdk_client(url).list_messages(
        ListMessagesRequest(
            engine="rocketmq",
            instance_id=INSTANCE_ID,
            topic="auth-sdk",
            key="sdk-key",
            limit=5,
            start_time=str(int(time.time() * 1000) - 600_000),
            end_time=str(int(time.time() * 1000) + 600_000),
        )
    )
    assert [m.msg_id for m in found.messages] == [sent.msg_id]


@pytest.mark.parametrize(("ak", "sk"), [(AK, "wrong-secret"), ("AKUNKNOWN00000000000", SK)])
def test_sdk_wrong_credentials_401(signed: tuple[str, Path], ak: str, sk: str) -> None:
    from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException

    with pytest.raises(ClientRequestException) as info:
        sdk_send(signed[0], ak=ak, sk=sk)
    assert info.value.status_code == 401
    assert info.value.error_code == "APIGW.0301"


async def test_signed_request_accepted(signed: tuple[str, Path]) -> None:
    url, _ = signed
    status, body = await post(url, sign_headers(url, "POST", messages_path(), BODY))
    assert status == 200
    assert body["msg_id"]


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda h: {k: v for k, v in h.items() if k != "Authorization"}, "missing Authorization"),
        (lambda h: {k: v for k, v in h.items() if k != "X-Sdk-Date"}, "missing X-Sdk-Date"),
        (lambda h: {**h, "Authorization": h["Authorization"][:-4] + "0000"}, "does not match"),
        (lambda h: {**h, "Authorization": "Basic dXNlcjpwYXNz"}, "unsupported"),
        (lambda h: {**h, "Host": "other.example.com"}, "does not match"),  # a signed header changed
    ],
)
async def test_bad_signature_401(signed: tuple[str, Path], mutate: Any, why: str) -> None:
    url, _ = signed
    status, body = await post(url, mutate(sign_headers(url, "POST", messages_path(), BODY)))
    assert status == 401
    assert body["error_code"] == "APIGW.0301"
    assert why in body["error_msg"]


async def test_changed_body_401(signed: tuple[str, Path]) -> None:
    url, _ = signed
    status, _ = await post(
        url, sign_headers(url, "POST", messages_path(), BODY), body=BODY.replace(b"hello", b"HELLO")
    )
    assert status == 401


@pytest.mark.parametrize(("skew_s", "expected"), [(-16 * 60, 401), (16 * 60, 401), (-14 * 60, 200)])
async def test_x_sdk_date_window(signed: tuple[str, Path], skew_s: float, expected: int) -> None:
    url, _ = signed
    headers = sign_headers(url, "POST", messages_path(), BODY, now=time.time() + skew_s)
    status, body = await post(url, headers)
    assert status == expected
    if expected == 401:
        assert "15 minutes" in body["error_msg"]


async def test_signed_list_with_query(signed: tuple[str, Path]) -> None:
    url, _ = signed
    path = messages_path()
    query = [("topic", "auth"), ("key", "k1"), ("limit", "50"), ("start_time", "0")]
    query.append(("end_time", str(2**53)))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(
            url + path, params=query, headers=sign_headers(url, "GET", path, query=query)
        ) as r:
            assert r.status == 200, await r.text()
        # The same headers with another query: the signature no longer matches.
        other = [*query[:1], ("key", "k2"), *query[2:]]
        async with s.get(
            url + path, params=other, headers=sign_headers(url, "GET", path, query=query)
        ) as r:
            assert r.status == 401


@pytest.mark.parametrize("signature", ["é" * 64, "\u00ff" + "0" * 63, "0" * 63 + "\u0100", "签名"])
def test_non_ascii_signature_is_401_not_500(signed: tuple[str, Path], signature: str) -> None:
    """Raw bytes on a socket: clients refuse to send such a header, an attacker does not."""
    url, err = signed
    headers = sign_headers(url, "POST", messages_path(), BODY)
    good = headers["Authorization"].rsplit("Signature=", 1)[0]
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k != "Authorization")
    raw = (
        f"POST {messages_path()} HTTP/1.1\r\n{head}Content-Length: {len(BODY)}\r\n".encode()
        + f"Authorization: {good}Signature={signature}\r\n\r\n".encode()
        + BODY
    )
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 401 Unauthorized"
    error = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert error["error_code"] == "APIGW.0301"
    assert "Traceback" not in err.read_text()


async def test_metrics_need_no_signature(signed: tuple[str, Path]) -> None:
    url, _ = signed
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(url + "/metrics") as r:
        assert r.status == 200


def test_no_secret_on_stderr(signed: tuple[str, Path]) -> None:
    _, err = signed
    text = err.read_text()
    assert "SDK-HMAC-SHA256" in text
    assert SK not in text
    assert "UNSIGNED" not in text


async def test_token_auth(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    with (
        err.open("w") as stderr,
        start_server_subprocess(env={"HUAWEICLOUD_SDK_AUTH_TOKEN": TOKEN}, stderr=stderr) as (
            _,
            url,
        ),
    ):
        assert (await post(url, {"X-Auth-Token": TOKEN}))[0] == 200
        status, body = await post(url, {"X-Auth-Token": TOKEN + "x"})
        assert status == 401
        assert body["error_code"] == "APIGW.0301"
        assert (await post(url, {}))[0] == 401
        # A valid signature is no substitute when only a token is configured.
        assert (await post(url, sign_headers(url, "POST", messages_path(), BODY)))[0] == 401
    text = err.read_text()
    assert "X-Auth-Token" in text
    assert TOKEN not in text


async def test_token_or_signature_when_both_configured() -> None:
    env = {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK, "HUAWEICLOUD_SDK_AUTH_TOKEN": TOKEN}
    with start_server_subprocess(env=env) as (_, url):
        assert (await post(url, {"X-Auth-Token": TOKEN}))[0] == 200
        assert (await post(url, sign_headers(url, "POST", messages_path(), BODY)))[0] == 200
        assert (await post(url, {"X-Auth-Token": "nope"}))[0] == 401
        assert (await post(url, {}))[0] == 401


async def test_unsigned_mode_says_so(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    with err.open("w") as stderr, start_server_subprocess(stderr=stderr) as (_, url):
        assert (await post(url, {}))[0] == 200
        # Any signature is ignored, even a wrong one.
        assert (await post(url, sign_headers(url, "POST", messages_path(), BODY, sk="x")))[0] == 200
    assert "UNSIGNED" in err.read_text()


def test_only_ak_without_sk_is_a_usage_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "bulksend", "serve", "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HUAWEICLOUD_SDK_AK": AK},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "HUAWEICLOUD_SDK_SK" in proc.stderr
    assert proc.stdout == ""
