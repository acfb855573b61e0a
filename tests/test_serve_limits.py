"""Bounded work per request: oversized request heads get 431 without holding up other
clients, and ListMessages takes at most 100 keys (400), in memory and with ``--store``."""

from __future__ import annotations

import json
import select
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.serve_helpers import ALL_TIME, messages_path, start_server_subprocess

PIECE = 8 * 1024


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with start_server_subprocess() as (_, url):
        yield url


def connect(url: str) -> socket.socket:
    u = urlsplit(url)
    return socket.create_connection((u.hostname, u.port), timeout=20)


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def get(url: str, path: str, query: dict[str, str] | None = None) -> tuple[int, Any]:
    full = url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    try:
        with urllib.request.urlopen(full, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_431(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:200]
    assert b"\r\nConnection: close" in head
    error = json.loads(body)
    assert error["error_code"] == "APIGW.0201"
    assert error["request_id"]


# Each an endless head: (its start, the piece repeated after it).
ENDLESS = {
    "request line": (f"GET {messages_path()}?topic=".encode(), b"a" * PIECE),
    "one header": (f"POST {messages_path()} HTTP/1.1\r\nX-Big: ".encode(), b"a" * PIECE),
    "many headers": (
        f"POST {messages_path()} HTTP/1.1\r\n".encode(),
        b"X-Same: a\r\n" * (PIECE // 11),  # joined into one ever longer value
    ),
}


@pytest.mark.parametrize("kind", list(ENDLESS))
def test_endless_head_is_431_while_other_clients_are_served(url: str, kind: str) -> None:
    start, piece = ENDLESS[kind]
    served_meanwhile = 0
    with connect(url) as big:
        big.sendall(start)
        # Lock-step: a piece of the endless head, then a whole request from another
        # client, until the server answers the head. Up to 64 MB.
        for _ in range(64 * 1024 * 1024 // PIECE):
            big.sendall(piece)
            assert get(url, "/metrics")[0] == 200
            served_meanwhile += 1
            if select.select([big], [], [], 0)[0]:
                break
        else:
            pytest.fail("64 MB of request head and still no answer")
        assert_431(read_to_eof(big))
    assert served_meanwhile >= 2  # the other client was served while the head came in


@pytest.mark.parametrize(
    "extra",
    [
        "X-Big: " + "a" * 33 * 1024 + "\r\n",
        "".join(f"X-H{n}: {'a' * 8000}\r\n" for n in range(17)),  # 136 kB of headers
    ],
)
def test_oversized_head_in_one_read_is_431(url: str, extra: str) -> None:
    with connect(url) as sock:
        sock.sendall(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        assert_431(read_to_eof(sock))


def test_long_request_line_is_431(url: str) -> None:
    with connect(url) as sock:
        sock.sendall(f"GET /metrics?{'a' * 33 * 1024} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert_431(read_to_eof(sock))


def test_heads_within_the_caps_are_served(url: str) -> None:
    body = b'{"topic":"limits","body":"b"}'
    big_but_fine = "".join(f"X-H{n}: {'a' * 30_000}\r\n" for n in range(4))
    with connect(url) as sock:
        sock.sendall(
            f"POST {messages_path()}?{'q' * 30_000} HTTP/1.1\r\nHost: x\r\n{big_but_fine}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("store", [False, True])
def test_list_messages_takes_at_most_100_keys(tmp_path: Path, store: bool) -> None:
    flags = ["--store", str(tmp_path / "s.db")] if store else []
    with start_server_subprocess(*flags) as (_, url):
        # Keys of their own, and 100 more keys that nothing holds.
        for n in range(3):
            payload = {
                "topic": "keys",
                "body": f"m{n}",
                "property_list": [{"name": "KEYS", "value": f"mine-{n} common"}],
            }
            request = urllib.request.Request(
                url + messages_path(),
                data=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=20) as r:
                assert r.status == 200
        others = [f"other-{n}" for n in range(97)]
        status, raw = get(
            url, messages_path(), {"key": " ".join(["mine-0", "mine-2", *others]), **ALL_TIME}
        )
        assert status == 200
        listed = json.loads(raw)
        assert [m["body"] for m in listed["messages"]] == ["m0", "m2"]
        for many in (101, 1000):
            status, error = get(
                url,
                messages_path(),
                {"key": " ".join(f"k{n}" for n in range(many)), **ALL_TIME},
            )
            assert status == 400
            assert error["error_code"] == "DMS.00400800"
            assert "100 keys" in error["error_msg"]
        # 10,000 keys do not fit in the request line's 32 KiB.
        status, error = get(
            url, messages_path(), {"key": " ".join(f"k{n}" for n in range(10_000)), **ALL_TIME}
        )
        assert status == 431
        assert error["error_code"] == "APIGW.0201"
