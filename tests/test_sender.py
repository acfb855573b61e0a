"""The Sender's rules over real loopback sockets, against a scripted server."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from bulksend import signing
from bulksend.config import Credentials, RetryPolicy, SendOptions, Target
from bulksend.errors import AuthenticationFailed, TargetUnreachable
from bulksend.record import Invalid, Record
from bulksend.result import Result
from bulksend.sender import Sender
from bulksend.server import MessageQuery
from tests.scripted_server import DROP, HANG, Answer, ScriptedServer, ok_answer
from tests.serve_helpers import INSTANCE_ID, PROJECT_ID, start_server_inprocess

AK, SK = "AKSENDERTEST", "sender-secret-key"
FAST_RETRY = RetryPolicy(max_retries=5, backoff_base=0.001, backoff_max=0.01)


def records(n: int, topic: str = "t") -> list[Record]:
    return [Record(seq=i, source=f"in.jsonl:{i + 1}", topic=topic, body=f"m{i}") for i in range(n)]


async def run(url: str, items: list, **opts) -> list[Result]:  # type: ignore[type-arg]
    creds = opts.pop("credentials", Credentials())
    options = SendOptions(**{"retry": FAST_RETRY, "concurrency": 4, **opts})
    async with Sender(Target(url, "proj", "inst"), creds, options) as sender:
        return [r async for r in sender.send(items)]


async def test_every_record_gets_one_ok_result_with_answer_fields() -> None:
    async with ScriptedServer(lambda n, b: ok_answer(b)) as srv:
        results = await run(srv.url, records(50))
    assert sorted(r.seq for r in results) == list(range(50))
    assert {r.status for r in results} == {"ok"}
    r = results[0]
    assert r.http_status == 200 and r.attempts == 1 and r.msg_id and len(r.msg_id) == 32
    assert r.request_id and r.request_id.startswith("req-")
    assert r.queue_id is not None and r.queue_offset is not None and r.broker_name == "broker-0"
    assert (
        r.latency_ms is not None and r.latency_ms > 0 and r.started_at and r.done_at >= r.started_at
    )
    assert len(srv.seen) == 50


async def test_requests_are_signed_so_the_shared_verifier_accepts_them() -> None:
    async with ScriptedServer(lambda n, b: ok_answer(b)) as srv:
        await run(
            srv.url, records(5), credentials=Credentials(ak=AK, sk=SK, security_token="sts-token")
        )
    for seen in srv.seen:
        h = seen.headers
        assert h["X-Project-Id"] == "proj" and h["X-Security-Token"] == "sts-token"
        assert "x-security-token" in h["Authorization"] and "x-sdk-date" in h["Authorization"]
        assert (
            signing.verify(
                "POST",
                "/v2/rocketmq/proj/instances/inst/messages",
                [],
                h,
                seen.body,
                secret_for={AK: SK}.get,
                now=time.time(),
            )
            == AK
        )


async def test_token_auth_sends_x_auth_token_and_no_signature() -> None:
    async with ScriptedServer(lambda n, b: ok_answer(b)) as srv:
        await run(srv.url, records(2), credentials=Credentials(auth_token="iam-token"))
    assert all(
        s.headers["X-Auth-Token"] == "iam-token" and "Authorization" not in s.headers
        for s in srv.seen
    )


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_retryable_statuses_are_retried(status: int) -> None:
    def script(n: int, b: bytes) -> Answer:
        return Answer(status, {"error_code": "E", "error_msg": "busy"}) if n < 2 else ok_answer(b)

    async with ScriptedServer(script) as srv:
        [r] = await run(srv.url, records(1))
    assert (r.status, r.attempts, r.http_status) == ("ok", 3, 200)


@pytest.mark.parametrize("trouble", [503, DROP], ids=["503", "drop"])
async def test_a_first_attempt_sent_by_callback_is_retried_by_the_same_rules(
    trouble: int | str,
) -> None:
    """One connection: record 0 connects, records 1.. go by callback on it. Record 2's
    first two attempts fail; the callback hands the first to the retry loop, which counts
    it, backs off, retries, and times the record from that first attempt's start."""
    tries: dict[bytes, int] = {}

    def script(n: int, body: bytes) -> Answer | str:
        tries[body] = tries.get(body, 0) + 1
        if b'"m2"' in body and tries[body] <= 2:
            return Answer(503, {"error_code": "E", "error_msg": "busy"}) if trouble == 503 else DROP
        return ok_answer(body)

    async with ScriptedServer(script) as srv:
        t0 = time.time()
        results = sorted(await run(srv.url, records(4), concurrency=1), key=lambda r: r.seq)
    assert [(r.seq, r.status, r.attempts) for r in results] == [
        (0, "ok", 1),
        (1, "ok", 1),
        (2, "ok", 3),
        (3, "ok", 1),
    ]
    r2 = results[2]
    assert r2.started_at is not None and r2.done_at is not None and r2.latency_ms is not None
    assert int(t0 * 1000) <= r2.started_at <= r2.done_at
    assert r2.latency_ms >= 0.0 and results[1].done_at <= r2.started_at + 1  # ms-grained


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422])
async def test_other_4xx_are_not_retried(status: int) -> None:
    async with ScriptedServer(
        lambda n, b: Answer(status, {"error_code": "DMS.400", "error_msg": "bad"})
    ) as srv:
        [r] = await run(srv.url, records(1))
    assert (r.status, r.attempts, r.http_status, r.error_code, r.error_msg) == (
        "failed",
        1,
        status,
        "DMS.400",
        "bad",
    )
    assert len(srv.seen) == 1


async def test_retries_stop_after_max_retries() -> None:
    async with ScriptedServer(lambda n, b: Answer(503, raw=b"<html>busy</html>")) as srv:
        [r] = await run(srv.url, records(1), retry=RetryPolicy(max_retries=3, backoff_base=0.001))
    assert (r.status, r.attempts, r.error_code) == ("failed", 4, "HTTP_503")
    assert "busy" in (r.error_msg or "") and len(srv.seen) == 4


@pytest.mark.parametrize("header", ["1", "date"])
async def test_retry_after_is_honoured(header: str) -> None:
    def script(n: int, b: bytes) -> Answer:
        if n == 0:
            value = "1" if header == "1" else email.utils.formatdate(time.time() + 2, usegmt=True)
            return Answer(
                429,
                {"error_code": "APIG.0308", "error_msg": "throttled"},
                headers={"Retry-After": value},
            )
        return ok_answer(b)

    async with ScriptedServer(script) as srv:
        # Honoured in full while it is within --backoff-max.
        [r] = await run(srv.url, records(1), retry=RetryPolicy(backoff_base=0.001, backoff_max=5))
    gap = srv.seen[1].at - srv.seen[0].at
    # Backoff alone would wait <= 1 ms; an HTTP date has 1 s resolution, hence >= 0.9.
    assert r.status == "ok" and r.attempts == 2 and gap >= 0.9


@pytest.mark.parametrize("header", ["1000000000", "date"])
async def test_a_retry_after_longer_than_backoff_max_waits_backoff_max(header: str) -> None:
    # A broken or hostile gateway's Retry-After (a billion seconds, a date in 2100) must not
    # park records past the wait the user allowed (--backoff-max): they would hold the pool.
    value = header if header != "date" else "Fri, 31 Dec 2100 23:59:59 GMT"

    def script(n: int, b: bytes) -> Answer:
        if n == 0:
            return Answer(429, {"error_code": "APIG.0308"}, headers={"Retry-After": value})
        return ok_answer(b)

    async with ScriptedServer(script) as srv:
        [r] = await asyncio.wait_for(
            run(srv.url, records(1), retry=RetryPolicy(backoff_base=0.001, backoff_max=0.3)),
            timeout=30,
        )
    gap = srv.seen[1].at - srv.seen[0].at
    assert r.status == "ok" and r.attempts == 2 and 0.25 <= gap < 5


async def test_connection_drop_and_hang_are_retried() -> None:
    script = lambda n, b: DROP if n == 0 else HANG if n == 1 else ok_answer(b)  # noqa: E731
    async with ScriptedServer(script) as srv:
        [r] = await run(srv.url, records(1), timeout=0.3)
    assert (r.status, r.attempts) == ("ok", 3)


async def test_timeout_gives_a_failed_result_not_an_exception() -> None:
    async with ScriptedServer(lambda n, b: HANG) as srv:
        [r] = await run(
            srv.url, records(1), timeout=0.2, retry=RetryPolicy(max_retries=1, backoff_base=0.001)
        )
    assert (r.status, r.attempts, r.error_code, r.http_status) == ("failed", 2, "TIMEOUT", None)


async def test_a_target_refusing_from_the_start_stops_the_run_with_no_result() -> None:
    got: list[Result] = []
    with pytest.raises(TargetUnreachable, match=r"connection to 127\.0\.0\.1:1 refused") as stopped:
        got = await run(
            "http://127.0.0.1:1", records(1), retry=RetryPolicy(max_retries=2, backoff_base=0.001)
        )
    assert stopped.value.cause == "refused" and got == []


@pytest.mark.parametrize(
    ("raw", "why"), [(b"<html>ok</html>", "not JSON"), (b'{"topic":"t"}', "lacks msg_id")]
)
async def test_bad_200_answers_are_failed_results_not_crashes(raw: bytes, why: str) -> None:
    async with ScriptedServer(lambda n, b: Answer(200, raw=raw)) as srv:
        [r] = await run(srv.url, records(1))
    assert (r.status, r.http_status, r.error_code, r.attempts) == ("failed", 200, "BAD_RESPONSE", 1)
    assert why in (r.error_msg or "")


async def test_twenty_auth_failures_in_a_row_stop_the_run() -> None:
    answer = Answer(
        401, {"error_code": "APIGW.0301", "error_msg": "Incorrect IAM authentication information"}
    )
    got: list[Result] = []

    async def send_all(url: str) -> None:
        opts = SendOptions(concurrency=2, retry=FAST_RETRY)
        async with Sender(Target(url, "p", "i"), Credentials(ak=AK, sk=SK), opts) as sender:
            async for r in sender.send(records(500)):
                got.append(r)

    async with ScriptedServer(lambda n, b: answer) as srv:
        with pytest.raises(
            AuthenticationFailed, match="authentication failed: 20 answers of HTTP 401"
        ):
            await send_all(srv.url)
    assert 20 <= len(got) < 30 and all(r.attempts == 1 and r.http_status == 401 for r in got)
    assert len(srv.seen) == len(got)
    assert all(SK not in (r.error_msg or "") for r in got)


async def test_invalid_items_become_invalid_results_in_order_of_seq() -> None:
    items = [records(1)[0], Invalid(seq=1, source="in.jsonl:2", raw="{", error="malformed JSON")]
    async with ScriptedServer(lambda n, b: ok_answer(b)) as srv:
        results = await run(srv.url, items)
    by_seq = {r.seq: r for r in results}
    assert (
        by_seq[1].status == "invalid"
        and by_seq[1].error_msg == "malformed JSON"
        and by_seq[1].attempts == 0
    )
    assert by_seq[0].status == "ok" and len(srv.seen) == 1


async def test_in_flight_never_exceeds_concurrency() -> None:
    async with ScriptedServer(lambda n, b: ok_answer(b), delay=0.005) as srv:
        results = await run(srv.url, records(200), concurrency=8)
    # 200 requests of >= 5 ms through 8 workers: the pool fills, and never overflows.
    assert len(results) == 200 and srv.peak_in_flight == 8


async def test_rate_is_paced_without_a_start_up_burst() -> None:
    async with ScriptedServer(lambda n, b: ok_answer(b)) as srv:
        t0 = time.monotonic()
        await run(srv.url, records(60), rate=50, concurrency=16)
        elapsed = time.monotonic() - t0
    arrivals = sorted(s.at for s in srv.seen)
    # 60 messages at 50/s: the 60th is due at 1.18 s. No burst: the first 11 span >= 0.18 s.
    assert elapsed >= 1.1
    assert arrivals[10] - arrivals[0] >= 0.18


async def test_stop_cuts_a_long_paced_pause_short() -> None:
    got: list[Result] = []
    async with (
        ScriptedServer(lambda n, b: ok_answer(b)) as srv,
        Sender(Target(srv.url, "p", "i"), options=SendOptions(rate=0.2)) as sender,
    ):

        def on_result(item: object, result: Result) -> None:
            got.append(result)
            sender.stop()  # the next record is due 5 s later: the drain must not wait

        t0 = time.monotonic()
        await sender.run(records(3), on_result)
        took = time.monotonic() - t0
    assert len(got) == 1 and took < 2.0


async def test_set_credentials_signs_from_then_on_against_the_built_in_server() -> None:
    """Temporary credentials refreshed mid-run: the server knows only the new AK/SK, so the
    records sent before the swap are refused (401) and every one after it is stored."""
    new_ak, new_sk = "AKREFRESHED000000002", "refreshed/secret+key"
    got: list[Result] = []
    async with start_server_inprocess(ak=new_ak, sk=new_sk) as server:
        opts = SendOptions(concurrency=1, retry=FAST_RETRY)
        creds = Credentials(ak=AK, sk=SK, security_token="sts-old")
        async with Sender(Target(server.url, PROJECT_ID, INSTANCE_ID), creds, opts) as sender:

            def on_result(item: object, result: Result) -> None:
                got.append(result)
                if len(got) == 2:
                    sender.set_credentials(
                        Credentials(ak=new_ak, sk=new_sk, security_token="sts-new")
                    )

            await sender.run(records(6, topic="refresh"), on_result)
        stored = await server.store.messages(MessageQuery(topic="refresh"))
    assert [(r.seq, r.status, r.http_status) for r in got] == [
        (0, "failed", 401),
        (1, "failed", 401),
        *((i, "ok", 200) for i in range(2, 6)),
    ]
    assert sorted(m.body for m in stored) == [f"m{i}" for i in range(2, 6)]


async def test_set_credentials_reaches_retries_but_not_a_request_already_sent() -> None:
    new_ak, new_sk = "AKNEW", "new-secret"
    swap: list[Sender] = []

    def script(n: int, b: bytes) -> Answer:
        if n == 0:  # the first request is on the wire: swap while it waits for its answer
            swap[0].set_credentials(Credentials(ak=new_ak, sk=new_sk, security_token="sts-new"))
            return Answer(503, {"error_code": "DMS.00503001", "error_msg": "busy"})
        return ok_answer(b)

    async with ScriptedServer(script) as srv:
        opts = SendOptions(concurrency=1, retry=FAST_RETRY)
        creds = Credentials(ak=AK, sk=SK, security_token="sts-old")
        async with Sender(Target(srv.url, "proj", "inst"), creds, opts) as sender:
            swap.append(sender)
            [r] = [r async for r in sender.send(records(1))]
    assert (r.status, r.attempts) == ("ok", 2)
    keys = {AK: SK, new_ak: new_sk}
    signed_by = [
        signing.verify(
            "POST",
            "/v2/rocketmq/proj/instances/inst/messages",
            [],
            seen.headers,
            seen.body,
            secret_for=keys.get,
            now=time.time(),
        )
        for seen in srv.seen
    ]
    assert signed_by == [AK, new_ak]
    assert [s.headers["X-Security-Token"] for s in srv.seen] == ["sts-old", "sts-new"]


async def test_set_credentials_switches_an_auth_token() -> None:
    async with ScriptedServer(lambda n, b: ok_answer(b)) as srv:
        opts = SendOptions(concurrency=1, retry=FAST_RETRY)
        async with Sender(
            Target(srv.url, "p", "i"), Credentials(auth_token="token-1"), opts
        ) as sender:

            def on_result(item: object, result: Result) -> None:
                sender.set_credentials(Credentials(auth_token="token-2"))

            await sender.run(records(2), on_result)
    assert [s.headers["X-Auth-Token"] for s in srv.seen] == ["token-1", "token-2"]


async def test_before_send_is_awaited_before_the_first_attempt_only() -> None:
    """The hook a write-ahead intent uses: it must finish before the request leaves, and
    retries must not call it again."""
    seen_at_hook: list[tuple[int, int]] = []

    def script(n: int, b: bytes) -> Answer:
        return Answer(503, {"error_code": "E", "error_msg": "busy"}) if n == 0 else ok_answer(b)

    async with ScriptedServer(script) as srv:

        async def before_send(record: Record) -> None:
            await asyncio.sleep(0.01)  # a ledger write's await: the request must wait for it
            seen_at_hook.append((record.seq, len(srv.seen)))

        opts = SendOptions(concurrency=1, retry=FAST_RETRY)
        async with Sender(Target(srv.url, "p", "i"), options=opts, before_send=before_send) as s:
            results = [r async for r in s.send(records(3))]
    assert [r.status for r in results] == ["ok"] * 3 and results[0].attempts == 2
    # Record n's hook ran before its request reached the server (record 0 made two).
    assert seen_at_hook == [(0, 0), (1, 2), (2, 3)]


async def test_secrets_old_and_new_are_scrubbed_after_set_credentials() -> None:
    swap: list[Sender] = []

    def script(n: int, b: bytes) -> Answer:
        swap[0].set_credentials(Credentials(auth_token="new-secret-token"))
        echo = "tokens old-secret-token and new-secret-token"
        return Answer(400, {"error_code": "DMS.400", "error_msg": echo})

    async with ScriptedServer(script) as srv:
        opts = SendOptions(concurrency=1, retry=FAST_RETRY)
        creds = Credentials(auth_token="old-secret-token")
        async with Sender(Target(srv.url, "p", "i"), creds, opts) as sender:
            swap.append(sender)
            [r] = [r async for r in sender.send(records(1))]
    assert r.error_msg == "tokens *** and ***"
