"""Our SDK-HMAC-SHA256 signer against huaweicloudsdkcore's own Signer: equal, byte for byte."""

from __future__ import annotations

import calendar
import time

import pytest
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

from bulksend import signing

AK, SK = "AKTESTEXAMPLE0000001", "sk/with+odd=chars~0123456789abcdef"
PATH = "/v2/rocketmq/0a1b2c3d4e5f/instances/11111111-2222-3333-4444-555555555555/messages"
NOW = calendar.timegm((2026, 11, 26, 9, 30, 15, 0, 0, 0))


def sdk_sign(
    method: str,
    host: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    query: list[tuple[str, str]] | None = None,
) -> dict[str, str]:
    req = SdkRequest(
        method=method,
        schema="http",
        host=host,
        resource_path=path,
        query_params=query or [],
        header_params=dict(headers),
        body=body,
    )
    return dict(Signer(BasicCredentials(AK, SK, "p")).sign(req).header_params)


@pytest.mark.parametrize(
    ("body", "extra"),
    [
        (b'{"topic":"t","body":"hello","property_list":[]}', {}),
        ('{"topic":"t","body":"h\u00e9llo \u4f60\u597d"}'.encode(), {}),
        (b"", {}),
        (b'{"topic":"t","body":"x"}', {"X-Security-Token": "tok en"}),
    ],
)
def test_sign_equals_sdk(body: bytes, extra: dict[str, str]) -> None:
    headers = {
        "Content-Type": "application/json",
        "Host": "127.0.0.1:9876",
        "X-Project-Id": "0a1b2c3d4e5f",
        "User-Agent": "bulksend/0.1.0",
        **extra,
    }
    ours = signing.sign("POST", PATH, [], headers, body, ak=AK, sk=SK, now=NOW)
    theirs = sdk_sign(
        "POST", "127.0.0.1:9876", PATH, {**headers, "X-Sdk-Date": ours["X-Sdk-Date"]}, body
    )
    assert ours["X-Sdk-Date"] == "20261126T093015Z"
    assert ours["Authorization"] == theirs["Authorization"]


def test_query_and_odd_path_equal_sdk() -> None:
    path = "/v2/rocketmq/p/instances/i d~x/messages"
    query = [("topic", "a b"), ("limit", "10"), ("key", "k/1")]
    headers = {"Content-Type": "application/json", "Host": "h", "X-Sdk-Date": "20261126T093015Z"}
    theirs = sdk_sign("GET", "h", path, headers, b"", query)
    signed = signing.signed_header_names(headers)
    canonical = signing.canonical_request("GET", path, query, headers, signed, b"")
    sig = signing.signature(SK, signing.string_to_sign(canonical, "20261126T093015Z"))
    assert signing.authorization(AK, signed, sig) == theirs["Authorization"]


def test_fast_signer_equals_sign() -> None:
    headers = {
        "Content-Type": "application/json",
        "Host": "dms.example.com",
        "X-Project-Id": "p1",
        "User-Agent": "bulksend/0.1.0",
        "X-Security-Token": "t",
    }
    fast = signing.FastSigner("POST", PATH, headers, ak=AK, sk=SK)
    for body in (b'{"a":1}', b""):
        date = fast.date_for(NOW + 0.7)
        ref = signing.sign("POST", PATH, [], headers, body, ak=AK, sk=SK, now=NOW)
        assert date == ref["X-Sdk-Date"]
        assert fast.authorization(body, date) == ref["Authorization"]


def test_fast_signer_header_lines_equal_sign_across_seconds() -> None:
    """The hot path's header lines, whose per-second parts are cached: right in the same
    second, the next one, and back (a clock stepped back)."""
    headers = {"Content-Type": "application/json", "Host": "h:1", "X-Project-Id": "p1"}
    fast = signing.FastSigner("POST", PATH, headers, ak=AK, sk=SK)
    for now, body in [(NOW, b"{}"), (NOW + 0.9, b'{"b":2}'), (NOW + 1, b""), (NOW, b"x")]:
        ref = signing.sign("POST", PATH, [], headers, body, ak=AK, sk=SK, now=now)
        expected = f"X-Sdk-Date: {ref['X-Sdk-Date']}\r\nAuthorization: {ref['Authorization']}\r\n"
        assert fast.header_lines(body, now) == expected.encode()


def test_verify_accepts_sdk_signed_request() -> None:
    headers = {"Content-Type": "application/json", "Host": "127.0.0.1:1", "X-Project-Id": "p"}
    body = b'{"topic":"t","body":"b"}'
    signed = sdk_sign("POST", "127.0.0.1:1", PATH, headers, body)
    now = signing.parse_sdk_date(signed["X-Sdk-Date"])
    assert signing.verify("POST", PATH, [], signed, body, secret_for={AK: SK}.get, now=now) == AK


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h, b: (h, b + b" "), "does not match"),
        (lambda h, b: ({**h, "X-Project-Id": "other"}, b), "does not match"),
        (
            lambda h, b: ({k: v for k, v in h.items() if k != "Authorization"}, b),
            "missing Authorization",
        ),
        (
            lambda h, b: ({**h, "Authorization": h["Authorization"].replace(AK, "AKOTHER")}, b),
            "unknown access key",
        ),
        (lambda h, b: ({**h, "X-Sdk-Date": "yesterday"}, b), "malformed X-Sdk-Date"),
    ],
)
def test_verify_refuses(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    headers = {"Content-Type": "application/json", "Host": "h", "X-Project-Id": "p"}
    body = b'{"x":1}'
    signed = signing.sign("POST", PATH, [], headers, body, ak=AK, sk=SK, now=NOW)
    h2, b2 = mutate(signed, body)
    with pytest.raises(signing.SignatureError, match=reason):
        signing.verify("POST", PATH, [], h2, b2, secret_for={AK: SK}.get, now=NOW)


def test_verify_refuses_stale_date_and_wrong_secret() -> None:
    headers = {"Content-Type": "application/json", "Host": "h"}
    signed = signing.sign("POST", PATH, [], headers, b"{}", ak=AK, sk=SK, now=NOW)
    with pytest.raises(signing.SignatureError, match="15 minutes"):
        signing.verify("POST", PATH, [], signed, b"{}", secret_for={AK: SK}.get, now=NOW + 16 * 60)
    signing.verify("POST", PATH, [], signed, b"{}", secret_for={AK: SK}.get, now=NOW + 14 * 60)
    with pytest.raises(signing.SignatureError, match="does not match"):
        signing.verify("POST", PATH, [], signed, b"{}", secret_for={AK: "wrong"}.get, now=NOW)


def test_sdk_date_is_utc() -> None:
    assert signing.sdk_date(0) == "19700101T000000Z"
    assert signing.parse_sdk_date(signing.sdk_date(NOW)) == NOW
    assert abs(signing.parse_sdk_date(signing.sdk_date(time.time())) - time.time()) < 2
