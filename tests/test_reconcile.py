"""Reconciliation over real sockets: the built-in server stores messages sent by the real
Sender; the Reconciler asks its ListMessages, directly or through a misbehaving proxy
(index lag, 404, 503, a hang, a loose key filter)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
import trustme

from bulksend.config import Credentials, RetryPolicy, SendOptions, Target, TLSOptions
from bulksend.errors import BulksendError
from bulksend.listing import (
    ListMessagesClient,
    ListMessagesUnavailable,
    ListQuery,
    ReconcileError,
)
from bulksend.reconcile import (
    DUPLICATE_AT_SERVER,
    Ambiguous,
    Found,
    Intent,
    NotFound,
    ReconcileOptions,
    Reconciler,
    derive_key,
    reconciled_fields,
    with_key,
)
from bulksend.record import Record
from bulksend.result import Result
from bulksend.sender import Sender
from bulksend.server import RunningServer
from tests.reconcile_proxy import Misbehaviour, misbehaving_proxy
from tests.serve_helpers import (
    AK,
    INSTANCE_ID,
    PROJECT_ID,
    SK,
    start_server_inprocess,
    start_server_subprocess,
)

TOPIC = "orders"
#: Tests do not wait for index lag unless they test it, and retry fast.
QUICK = ReconcileOptions(
    after_s=0.0,
    timeout_s=5.0,
    retry=RetryPolicy(max_retries=3, backoff_base=0.01, backoff_max=0.02),
)


def now_ms() -> int:
    return int(time.time() * 1000)


def intent_for(line: int, *, at: int | None = None, topic: str = TOPIC) -> Intent:
    identity = f"v1:/data/in.jsonl:{line}"
    return Intent(line - 1, identity, topic, derive_key(identity), now_ms() if at is None else at)


def record_for(intent: Intent, own_keys: str = "order-1") -> Record:
    return Record(
        seq=intent.seq,
        source=intent.identity,
        topic=intent.topic,
        body=f"body of {intent.identity}",
        properties=with_key((("KEYS", own_keys),), intent.key),
    )


def target(url: str) -> Target:
    return Target(url, PROJECT_ID, INSTANCE_ID)


async def send(
    url: str, records: Sequence[Record], creds: Credentials | None = None
) -> list[Result]:
    async with Sender(target(url), creds, SendOptions(concurrency=8)) as sender:
        results = [r async for r in sender.send(records)]
    assert all(r.status == "ok" for r in results), results
    return sorted(results, key=lambda r: r.seq)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with start_server_inprocess() as running:
        yield running


# --- found / not found --------------------------------------------------------------------


async def test_stored_record_is_found_at_its_stored_position(server: RunningServer) -> None:
    sent, unsent = intent_for(1), intent_for(2)
    [result] = await send(server.url, [record_for(sent)])
    async with Reconciler(target(server.url), options=QUICK) as reconciler:
        await reconciler.probe(TOPIC)
        found = await reconciler.check(sent)
        not_found = await reconciler.check(unsent)
    assert isinstance(found, Found) and isinstance(not_found, NotFound)
    assert found.intent == sent and not_found.intent == unsent
    fields = reconciled_fields(found)
    assert (fields["msg_id"], fields["queue_id"], fields["queue_offset"]) == (
        result.msg_id,
        result.queue_id,
        result.queue_offset,
    )
    assert fields["status"] == "ok" and fields["reconciled"] is True
    assert reconciler.counters.found == 1 and reconciler.counters.not_found == 1


async def test_a_long_settled_record_is_checked_without_waiting(server: RunningServer) -> None:
    intent = intent_for(1, at=now_ms() - 60_000)
    await send(server.url, [record_for(intent)])
    options = ReconcileOptions(after_s=30.0, retry=QUICK.retry)
    async with Reconciler(target(server.url), options=options) as reconciler:
        outcome = await reconciler.check(intent, settled_at_ms=now_ms() - 40_000)
    assert isinstance(outcome, Found) and reconciler.counters.waited_s == 0


async def test_other_topics_and_other_runs_keys_are_not_mistaken(server: RunningServer) -> None:
    intent = intent_for(1)
    elsewhere = intent_for(1, topic="other")  # the same key in another topic
    await send(server.url, [record_for(elsewhere), record_for(intent_for(2))])
    async with Reconciler(target(server.url), options=QUICK) as reconciler:
        assert isinstance(await reconciler.check(intent), NotFound)
        assert isinstance(await reconciler.check(elsewhere), Found)


# --- index lag ----------------------------------------------------------------------------


async def test_index_lag_is_waited_out(server: RunningServer) -> None:
    intent = intent_for(1)
    await send(server.url, [record_for(intent)])
    settled = now_ms()
    # A broker that lists a message only 5 s after storing it, asked at once: not found,
    # which would re-send a stored record. This is what --reconcile-after is for.
    async with (
        misbehaving_proxy(server.url, Misbehaviour(hide_younger_ms=5_000)) as slow,
        Reconciler(target(slow.url), options=QUICK) as hasty,
    ):
        assert isinstance(await hasty.check(intent, settled_at_ms=settled), NotFound)
    # Lag 0.5 s, --reconcile-after 1 s from when the attempt settled: found.
    patient_options = ReconcileOptions(after_s=1.0, timeout_s=5.0, retry=QUICK.retry)
    async with (
        misbehaving_proxy(server.url, Misbehaviour(hide_younger_ms=500)) as lagging,
        Reconciler(target(lagging.url), options=patient_options) as patient,
    ):
        outcome = await patient.check(intent, settled_at_ms=settled)
    assert isinstance(outcome, Found)
    assert patient.counters.waited_s > 0


# --- an endpoint without ListMessages -----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (404, "has no ListMessages API"),
        (405, "has no ListMessages API"),
        (403, "refused ListMessages to these credentials"),
        (400, "refused the ListMessages query"),
    ],
)
async def test_no_listmessages_stops_the_run_with_one_line(
    server: RunningServer, status: int, says: str
) -> None:
    async with (
        misbehaving_proxy(server.url, Misbehaviour(list_status=status)) as proxy,
        Reconciler(target(proxy.url), options=QUICK) as reconciler,
    ):
        with pytest.raises(ListMessagesUnavailable) as probed:
            await reconciler.probe(TOPIC)
        with pytest.raises(ListMessagesUnavailable) as checked:
            await reconciler.check(intent_for(1))
        assert proxy.gets == 2  # never retried: asking again will not help
    for exc in (probed.value, checked.value):
        line = str(exc)
        assert isinstance(exc, BulksendError) and exc.exit_code == 2
        assert "\n" not in line and says in line and f"HTTP {status}" in line
        assert line.startswith("--exactly-once needs ListMessages")


async def test_an_answer_that_is_no_listing_stops_the_run(server: RunningServer) -> None:
    async with (
        misbehaving_proxy(server.url, Misbehaviour(not_a_listing=True)) as proxy,
        Reconciler(target(proxy.url), options=QUICK) as reconciler,
    ):
        with pytest.raises(ListMessagesUnavailable, match="no messages list"):
            await reconciler.probe(TOPIC)


async def test_probe_refuses_a_listing_that_ignores_the_key(server: RunningServer) -> None:
    await send(server.url, [record_for(intent_for(1))])
    async with (
        misbehaving_proxy(server.url, Misbehaviour(ignore_key=True)) as proxy,
        Reconciler(target(proxy.url), options=QUICK) as reconciler,
    ):
        with pytest.raises(ListMessagesUnavailable, match="filter by key"):
            await reconciler.probe(TOPIC)
        # And a check still tells records apart by the key each message carries.
        assert isinstance(await reconciler.check(intent_for(2)), NotFound)
        assert isinstance(await reconciler.check(intent_for(1)), Found)


# --- retries ------------------------------------------------------------------------------


async def test_busy_listmessages_is_retried(server: RunningServer) -> None:
    intent = intent_for(1)
    await send(server.url, [record_for(intent)])
    async with (
        misbehaving_proxy(server.url, Misbehaviour(busy_first=2)) as proxy,
        Reconciler(target(proxy.url), options=QUICK) as reconciler,
    ):
        assert isinstance(await reconciler.check(intent), Found)
    assert reconciler.counters.retries == 2 and proxy.gets == 3


async def test_a_hung_query_times_out_and_is_retried(server: RunningServer) -> None:
    intent = intent_for(1)
    await send(server.url, [record_for(intent)])
    options = ReconcileOptions(after_s=0.0, timeout_s=0.5, retry=QUICK.retry)
    async with (
        misbehaving_proxy(server.url, Misbehaviour(hang_first=1)) as proxy,
        Reconciler(target(proxy.url), options=options) as reconciler,
    ):
        assert isinstance(await reconciler.check(intent), Found)
    assert reconciler.counters.retries == 1 and proxy.gets == 2


async def test_listmessages_down_for_good_stops_after_bounded_retries(
    server: RunningServer,
) -> None:
    async with (
        misbehaving_proxy(server.url, Misbehaviour(busy_always=True)) as proxy,
        Reconciler(target(proxy.url), options=QUICK) as reconciler,
    ):
        with pytest.raises(ReconcileError) as info:
            await reconciler.check(intent_for(1))
    assert not isinstance(info.value, ListMessagesUnavailable)
    assert proxy.gets == QUICK.retry.max_retries + 1
    line = str(info.value)
    assert "\n" not in line and "HTTP 503" in line and "--resume" in line
    assert info.value.exit_code == 2


async def test_connection_refused_is_retried_then_stops() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with Reconciler(target(f"http://127.0.0.1:{port}"), options=QUICK) as reconciler:
        with pytest.raises(ReconcileError, match="cannot connect"):
            await reconciler.check(intent_for(1))
    assert reconciler.counters.queries == QUICK.retry.max_retries + 1


# --- pagination and duplicates ------------------------------------------------------------


async def test_a_duplicate_at_the_server_is_reported_across_pages(server: RunningServer) -> None:
    intent = intent_for(1)
    copies = await send(server.url, [record_for(intent)] * 25)
    by_arrival = [r.msg_id for r in sorted(copies, key=lambda r: r.msg_id or "")]
    all_pages = ReconcileOptions(after_s=0.0, page_size=4, max_pages=10, retry=QUICK.retry)
    async with (
        misbehaving_proxy(server.url, Misbehaviour()) as proxy,
        Reconciler(target(proxy.url), options=all_pages) as reconciler,
    ):
        outcome = await reconciler.check(intent)
    assert isinstance(outcome, Ambiguous) and outcome.total == 25
    assert [m.msg_id for m in outcome.messages] == by_arrival  # all of them, oldest first
    assert [q["offset"] for q in proxy.queries] == [str(o) for o in range(0, 25, 4)]
    assert {q["limit"] for q in proxy.queries} == {"4"}
    fields = reconciled_fields(outcome)
    assert fields["error_code"] == DUPLICATE_AT_SERVER and fields["msg_id"] == by_arrival[0]

    two_pages = ReconcileOptions(after_s=0.0, page_size=4, max_pages=2, retry=QUICK.retry)
    async with Reconciler(target(server.url), options=two_pages) as bounded:
        outcome = await bounded.check(intent)
    assert isinstance(outcome, Ambiguous)
    assert len(outcome.messages) == 8 and outcome.total == 25
    assert reconciled_fields(outcome)["error_msg"].endswith("and 17 more")


# --- the batch form (resume) --------------------------------------------------------------


async def test_reconcile_all_of_64_in_flight_records(server: RunningServer) -> None:
    t0 = now_ms() - 10_000
    intents = [intent_for(line, at=t0 + line) for line in range(1, 65)]
    stored = [i for n, i in enumerate(intents[:63]) if n % 3 != 2]  # 42 of the first 63
    await send(server.url, [record_for(i) for i in stored])
    # Records 1..5 were in flight in two crashed runs: two intents each, the older first.
    again = [intent_for(line, at=t0 + 5_000 + line) for line in range(1, 6)]
    # Record 64 was sent (by some run) under two keys: both copies are stored.
    other_key = Intent(63, intents[63].identity, TOPIC, derive_key("another"), t0)
    await send(server.url, [record_for(other_key), record_for(intents[63])])
    options = ReconcileOptions(after_s=0.0, concurrency=8, retry=QUICK.retry)
    async with (
        misbehaving_proxy(server.url, Misbehaviour()) as proxy,
        Reconciler(target(proxy.url), options=options) as reconciler,
    ):
        outcomes = await reconciler.reconcile_all([*intents, *again, other_key])
    assert list(outcomes) == [i.identity for i in intents]
    stored_ids = {i.identity for i in stored}
    for intent in intents[:63]:
        outcome = outcomes[intent.identity]
        assert isinstance(outcome, Found if intent.identity in stored_ids else NotFound), intent
    both = outcomes[intents[63].identity]
    assert isinstance(both, Ambiguous) and both.total == 2
    # One query per (identity, key), from the earliest intent, never more than 8 at once.
    assert proxy.gets == 65 and proxy.max_in_flight <= 8
    skew = round(options.clock_skew_s * 1000)
    starts = {int(q["start_time"]) for q in proxy.queries if q["key"] == intents[0].key}
    assert starts == {intents[0].at - skew}


async def test_reconcile_all_stops_at_the_first_refusal(server: RunningServer) -> None:
    intents = [intent_for(line) for line in range(1, 33)]
    async with (
        misbehaving_proxy(server.url, Misbehaviour(list_status=404)) as proxy,
        Reconciler(target(proxy.url), options=QUICK) as reconciler,
    ):
        with pytest.raises(ListMessagesUnavailable):
            await reconciler.reconcile_all(intents)
    assert proxy.gets <= QUICK.concurrency


# --- auth and TLS -------------------------------------------------------------------------


async def test_signed_server_with_credentials_in_its_environment() -> None:
    creds = Credentials(ak=AK, sk=SK)
    intent = intent_for(1)
    env = {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK}
    with start_server_subprocess(env=env) as (_, url):
        await send(url, [record_for(intent)], creds)
        async with Reconciler(target(url), creds, QUICK) as reconciler:
            await reconciler.probe(TOPIC)
            assert isinstance(await reconciler.check(intent), Found)
            assert isinstance(await reconciler.check(intent_for(2)), NotFound)
        wrong = Credentials(ak=AK, sk="not-the-secret-key")
        async with Reconciler(target(url), wrong, QUICK) as refused:
            with pytest.raises(ListMessagesUnavailable) as info:
                await refused.probe(TOPIC)
    line = str(info.value)
    assert "HTTP 401" in line and "credentials" in line and "not-the-secret-key" not in line


async def test_authorization_equals_the_sdk_signer() -> None:
    """Capture the GET on the wire (a raw server) and sign the same request with
    huaweicloudsdkcore's Signer: the Authorization values must be equal."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.sdk_request import SdkRequest
    from huaweicloudsdkcore.signer.signer import Signer

    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        body = b'{"messages": [], "total": 0}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    raw = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    creds = Credentials(ak=AK, sk=SK, security_token="tok/en+1")
    tgt = Target(f"http://127.0.0.1:{port}", PROJECT_ID, "inst ance~1")
    try:
        async with ListMessagesClient(tgt, creds) as client:
            await client.get(ListQuery("or ders/1", "bsK", 1000, 2000, 10, 0))
    finally:
        raw.close()
        await raw.wait_closed()
    head = seen[0].decode("latin-1").split("\r\n")
    method, target_uri, _ = head[0].split(" ")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    path, _, query = target_uri.partition("?")
    assert method == "GET" and path == tgt.path
    request = SdkRequest(
        method="GET",
        schema="http",
        host=headers["Host"],
        resource_path=path,
        query_params=parse_qsl(query, keep_blank_values=True),
        header_params={k: v for k, v in headers.items() if k != "Authorization"},
        body=b"",
    )
    theirs = Signer(BasicCredentials(AK, SK, PROJECT_ID)).sign(request)
    assert headers["Authorization"] == theirs.header_params["Authorization"]
    # What went out is what the SDK sends: its canonical query string as the URL's query.
    assert target_uri == theirs.uri
    assert headers["X-Security-Token"] == "tok/en+1" and headers["X-Project-Id"] == PROJECT_ID


async def test_tls_is_verified_and_ca_bundle_opens_it(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, bundle = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(bundle))
    async with start_server_inprocess(tls_cert=str(cert_file), tls_key=str(key_file)) as server:
        async with Reconciler(target(server.url), options=QUICK) as untrusted:
            with pytest.raises(ListMessagesUnavailable, match="--ca-bundle"):
                await untrusted.probe(TOPIC)
        trusted = Reconciler(
            target(server.url), options=QUICK, tls=TLSOptions(ca_bundle=str(bundle))
        )
        async with trusted:
            await trusted.probe(TOPIC)
            assert isinstance(await trusted.check(intent_for(1)), NotFound)
