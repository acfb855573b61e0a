"""Exactly-once delivery's check: is this record's message stored at the server?

A record whose answer was lost after its request was written (a timeout, a closed
connection, a 200 without JSON or msg_id) may or may not be stored; so may a record in
flight when the process was killed. Sending it again risks a duplicate, not sending it
risks a loss. Instead, each record carries a key unique to it in KEYS, the ledger holds an
*intent* for it (topic, key, time) before its first request leaves, and an ambiguous
record is looked up with ListMessages by that key in a window around its intent::

    record_key(record, salt) -> key            the key bulksend adds to KEYS (pure)
    with_key(properties, key) -> properties    KEYS with the key beside the record's own
    intent_line(...) / Intent                  the write-ahead ledger line
    attempt_in_doubt(status, code, written)    which attempts need a check (pure)
    query_window(at, now, skew) -> (start, end)
    decide(intent, listed) -> Found | NotFound | Ambiguous      (pure)
    Reconciler.probe / check / reconcile_all   the clock, the waits, ListMessages, retries
    reconciled_fields(outcome) -> fields of the record's ok ledger line

**The key** is always bulksend's own, derived from the ledger's salt, the record's identity
(its canonical input and first physical line) and its content (topic, body, properties,
id), and goes *beside* the record's own KEYS. The issue's order
(the record's KEYS when unique in the input, else its id, else a derived key) needs the
uniqueness known before the first send: a pre-pass over the whole input (a second read of
a file, impossible for a pipe, which is read once) holding every key in memory (200,000
records: ~4.7 µs CPU and ~99 bytes held a record, against ~1 µs and nothing to derive the
key; ``benchmarks/bench_exactly_once.py``), and "unique in the input" is not
even enough: ListMessages searches the topic, where a record's KEYS may also be another
producer's or another input's. The derived key is unique to the record by construction
(a 120-bit hash), the same in every run over the same ledger and under any spelling of the
input path (the identity is), short (22 characters: KEYS is indexed by the broker), and
made of ``[A-Za-z0-9_-]`` (no space, RocketMQ's key separator; nothing to escape in a URL).
An intent line carries its key, so a check never needs to derive it again.

Why the salt and the content, not the identity alone: an identity names a *position* (the
input's path and a line), and the same position holds another record in another input
(stdin, or a file replaced at the same path). The salt (``writeahead.ledger_salt``: the
time the ledger's first run began) keeps a fresh run's keys apart from any earlier run's,
whose copies a check could otherwise find within its window; the content keeps a record
apart from the one that stood at its position when a ``--resume --force`` runs over a
changed input, so a crashed run's copy of the old line is never taken for the new one.

**The window.** A stored message's ``store_timestamp`` is the broker's clock at the store,
some time after the intent (written before the first attempt) and before the query. The
query covers [intent − skew, now + skew] with skew 15 minutes by default: the signing
gateway refuses a client clock further off than that, so any client that can send at all
is inside it. No assumption on how many attempts or how long each took is needed.

**Index lag.** A broker indexes keys asynchronously: a message stored a moment ago may not
be listed yet. A check waits until the record's last attempt settled at least
``after_s`` (``--reconcile-after``, 3 s) ago before asking.

**Outages.** A check made during a run may be handed the run's target health (``Gate``):
while the target is unreachable, a failed query is not charged to the check's retries (it
waits for the target, or a backoff); when the run stops, the check gives up
(``CheckStopped``) and the record's intent is left for ``--resume``.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import orjson

from bulksend.config import Credentials, RetryPolicy, Target, TLSOptions
from bulksend.errors import (
    BulksendError,
    ConfigError,
    ListMessagesUnavailable,
    ReconcileError,
    TransportError,
)
from bulksend.listing import ListedMessage, ListMessagesBusy, ListMessagesClient, ListQuery, Page
from bulksend.record import KEYS, Record
from bulksend.retry import compute_backoff, parse_retry_after
from bulksend.signing import MAX_CLOCK_SKEW_S

__all__ = [
    "Ambiguous",
    "CheckStopped",
    "Found",
    "Gate",
    "Intent",
    "NotFound",
    "Outcome",
    "ReconcileCounters",
    "ReconcileError",
    "ReconcileOptions",
    "Reconciler",
    "attempt_in_doubt",
    "decide",
    "derive_key",
    "intent_line",
    "query_window",
    "reconciled_fields",
    "record_key",
    "with_key",
]

#: Every derived key starts so; the rest is base64 of a 15-byte BLAKE2b.
KEY_PREFIX = "bs"
#: BLAKE2b personalised with the derivation's version, so another derivation never
#: yields the same keys.
_KEY_HASH = hashlib.blake2b(digest_size=15, person=b"bulksend-key-v1")
_URL_SAFE = bytes.maketrans(b"+/", b"-_")
#: The error_code of an ok line whose key more than one stored message carries.
DUPLICATE_AT_SERVER = "DUPLICATE_AT_SERVER"


# --- the key --------------------------------------------------------------------------


def derive_key(material: str | bytes) -> str:
    """A key for KEYS: ``bs`` + 20 characters of URL-safe base64 (``[A-Za-z0-9_-]``) of
    BLAKE2b-120 of ``material`` (a str as UTF-8, lone surrogates kept by
    ``surrogateescape``): 10^9 records collide with probability ~10^-18. ~0.8 µs: a keyed
    hash object is copied rather than set up, and base64 rather than base32 (the stdlib's
    base32 is Python code, ~6 µs).
    """
    digest = _KEY_HASH.copy()
    if isinstance(material, str):
        material = material.encode("utf-8", "surrogateescape")
    digest.update(material)
    # binascii and a translation table rather than base64.urlsafe_b64encode: the same bytes
    # without its two Python-level calls (~0.3 µs of the ~1 µs a key costs).
    b64 = binascii.b2a_base64(digest.digest(), newline=False).translate(_URL_SAFE)
    return KEY_PREFIX + b64.decode("ascii")


def record_key(record: Record, salt: str) -> str:
    """The key bulksend adds to ``record``'s KEYS in a ledger salted ``salt``: of the salt,
    the record's identity and its content (topic, body, properties, id), serialised by
    orjson in one call (~0.4 µs for a 256-byte body). See the module docstring for why
    each is in it."""
    return derive_key(
        orjson.dumps(
            (salt, record.identity, record.topic, record.body, record.properties, record.id)
        )
    )


def with_key(properties: tuple[tuple[str, str], ...], key: str) -> tuple[tuple[str, str], ...]:
    """``properties`` with ``key`` in KEYS: appended, space-separated, to the record's own
    KEYS (the first KEYS property, the one RocketMQ reads), or as a new KEYS property."""
    for i, (name, value) in enumerate(properties):
        if name == KEYS:
            if key in value.split():
                return properties
            merged = f"{value} {key}" if value.strip() else key
            return (*properties[:i], (KEYS, merged), *properties[i + 1 :])
    return (*properties, (KEYS, key))


# --- which attempts are in doubt --------------------------------------------------------

#: Server errors after which the message may be stored all the same: a 500 may come after
#: the store, and a gateway's 502/504 means it stopped waiting for a backend that may have
#: stored it. 429 and 503 (DMS.00503001, broker busy) refuse the message as a whole.
IN_DOUBT_STATUSES = frozenset({500, 502, 504})


def attempt_in_doubt(
    http_status: int | None, error_code: str | None, *, request_written: bool
) -> bool:
    """Whether an attempt may have stored the message without the answer saying so: then
    the record is reconciled before any re-send.

    * no answer (``http_status`` None): in doubt once the request was written, whatever
      ended the wait (a timeout, the connection closed); a connection that never opened
      (refused, unknown host, TLS, connect timeout) sent nothing;
    * a 2xx that is not a usable answer (``error_code`` set: not JSON, no msg_id, too
      large): stored, but which message is only ListMessages' to say;
    * 500, 502, 504: in doubt; any other status is a plain answer.
    """
    if http_status is None:
        return request_written
    if 200 <= http_status < 300:
        return error_code is not None
    return http_status in IN_DOUBT_STATUSES


# --- the intent -----------------------------------------------------------------------


def intent_line(seq: int, identity: str, topic: str, key: str, at: int) -> bytes:
    """The write-ahead ledger line of a record about to be sent, newline included::

        {"seq": N, "identity": "...", "status": "intent", "topic": "...", "key": "...", "at": ms}

    A function, not a method, for the hot path: no Intent is built per record (~1 µs)."""
    return orjson.dumps(
        {
            "seq": seq,
            "identity": identity,
            "status": "intent",
            "topic": topic,
            "key": key,
            "at": at,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


@dataclass(frozen=True, slots=True)
class Intent:
    """What the ledger holds of a record before its first request leaves."""

    seq: int
    identity: str
    topic: str
    key: str
    #: Wall clock, ms since the epoch, when the intent was written.
    at: int

    def to_json_line(self) -> bytes:
        """The ledger line (see ``intent_line``)."""
        return intent_line(self.seq, self.identity, self.topic, self.key, self.at)

    @classmethod
    def from_line(cls, obj: Mapping[str, Any]) -> Intent:
        """An intent from a parsed ledger line; ValueError says what is missing."""
        seq, identity, topic, key, at = (
            obj.get(k) for k in ("seq", "identity", "topic", "key", "at")
        )
        if obj.get("status") != "intent":
            raise ValueError("not an intent line")
        if type(seq) is not int or type(at) is not int:
            raise ValueError("an intent needs integer seq and at")
        if not (isinstance(identity, str) and isinstance(topic, str) and isinstance(key, str)):
            raise ValueError("an intent needs string identity, topic and key")
        if not (identity and topic and key):
            raise ValueError("an intent needs a non-empty identity, topic and key")
        return cls(seq, identity, topic, key, at)


# --- the decision ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """One stored message carries the record's key: the record is stored."""

    intent: Intent
    message: ListedMessage


@dataclass(frozen=True, slots=True)
class NotFound:
    """No stored message carries the key: the record was not stored; send it."""

    intent: Intent


@dataclass(frozen=True, slots=True)
class Ambiguous:
    """More than one stored message carries the key: a duplicate already at the server
    (KEYS reused, or an earlier copy). The record is stored; sending adds another."""

    intent: Intent
    #: Oldest first; at most what the reconciler read (see ``total``).
    messages: tuple[ListedMessage, ...]
    #: How many the server says carry the key (at least ``len(messages)``).
    total: int


Outcome = Found | NotFound | Ambiguous


def _carries(intent: Intent, m: ListedMessage) -> bool:
    # A listing may be looser than its query (RocketMQ looks keys up by hash): check the
    # topic and the key where the answer says them; trust the server's filter where not.
    return (m.topic is None or m.topic == intent.topic) and (m.keys is None or intent.key in m.keys)


def decide(intent: Intent, listed: Iterable[ListedMessage], total: int | None = None) -> Outcome:
    """What a listing says of ``intent``'s record. ``listed`` may hold messages of other
    keys or topics (ignored) and the same message twice (pages shift as messages arrive);
    ``total`` is the server's count when it read only part of the matches."""
    seen: dict[str, ListedMessage] = {}
    for m in listed:
        if _carries(intent, m) and m.msg_id not in seen:
            seen[m.msg_id] = m
    if not seen:
        return NotFound(intent)
    ordered = sorted(seen.values(), key=lambda m: (m.store_timestamp is None, m.store_timestamp))
    if len(ordered) == 1:
        return Found(intent, ordered[0])
    return Ambiguous(intent, tuple(ordered), max(len(ordered), total or 0))


def reconciled_fields(outcome: Found | Ambiguous) -> dict[str, Any]:
    """The ledger fields of a record found stored: ``ok``, ``"reconciled": true`` and the
    stored message's msg_id / queue_id / queue_offset / broker_name (ListMessages gives no
    broker_name: None unless the server sent one). An Ambiguous record is ok too (it is
    stored) with the oldest copy's fields and ``DUPLICATE_AT_SERVER`` naming every copy."""
    first = outcome.message if isinstance(outcome, Found) else outcome.messages[0]
    fields: dict[str, Any] = {
        "status": "ok",
        "reconciled": True,
        "msg_id": first.msg_id,
        "queue_id": first.queue_id,
        "queue_offset": first.queue_offset,
        "broker_name": first.broker_name,
    }
    if isinstance(outcome, Ambiguous):
        ids = ", ".join(m.msg_id for m in outcome.messages)
        more = outcome.total - len(outcome.messages)
        fields["error_code"] = DUPLICATE_AT_SERVER
        fields["error_msg"] = (
            f"{outcome.total} stored messages carry key {outcome.intent.key}: {ids}"
            + (f" and {more} more" if more > 0 else "")
        )
    return fields


def query_window(at_ms: int, now_ms: int, skew_ms: int) -> tuple[int, int]:
    """ListMessages' [start_time, end_time] (ms, inclusive) for an intent written at
    ``at_ms`` and a query made at ``now_ms``: every store time between, ± the clock skew."""
    return max(0, at_ms - skew_ms), max(at_ms, now_ms) + skew_ms


# --- the reconciler -------------------------------------------------------------------


#: 8 retries, full jitter under 0.5 s * 2^n capped at 10 s: at most ~46 s of backoff plus
#: nine timeouts before a failing ListMessages stops the run.
RECONCILE_RETRY = RetryPolicy(max_retries=8, backoff_base=0.5, backoff_max=10.0)


@dataclass(frozen=True, slots=True)
class ReconcileOptions:
    """How the reconciler asks. Units in the names' comments."""

    #: --reconcile-after: seconds a record's last attempt must have settled before
    #: ListMessages is asked about it (a broker indexes keys asynchronously).
    after_s: float = 3.0
    #: Seconds the window reaches past both ends, for the difference between this host's
    #: clock and the broker's (the gateway refuses signatures further off than this).
    clock_skew_s: float = float(MAX_CLOCK_SKEW_S)
    #: Seconds per ListMessages request.
    timeout_s: float = 10.0
    #: Messages asked per page (0 or 1 expected; more only for a duplicate at the server).
    page_size: int = 10
    #: Pages read at most for one key: past page_size * max_pages copies, the count is the
    #: server's ``total``.
    max_pages: int = 10
    #: ListMessages requests in flight at once in ``reconcile_all``.
    concurrency: int = 8
    #: 429 / 5xx / timeouts / connection errors are retried so, then the run stops
    #: (ReconcileError).
    retry: RetryPolicy = RECONCILE_RETRY

    def __post_init__(self) -> None:
        if not self.after_s >= 0:  # NaN too
            raise ConfigError("--reconcile-after must be >= 0 seconds")
        if not self.clock_skew_s >= 0:
            raise ConfigError("the clock skew must be >= 0 seconds")
        if not self.timeout_s > 0:
            raise ConfigError("the ListMessages timeout must be > 0 seconds")
        if self.page_size < 2 or self.max_pages < 1 or self.concurrency < 1:
            raise ConfigError("page_size must be >= 2, max_pages and concurrency >= 1")


@dataclass(slots=True)
class ReconcileCounters:
    """What the reconciler did, for stats and the summary."""

    checks: int = 0
    #: ListMessages requests sent (pages and retries included).
    queries: int = 0
    retries: int = 0
    found: int = 0
    not_found: int = 0
    ambiguous: int = 0
    #: Seconds spent waiting for index lag, summed over checks (they overlap in a batch).
    waited_s: float = 0.0


#: A retry is never put off longer than this, whatever Retry-After says.
MAX_RETRY_WAIT_S = 60.0


class Gate(Protocol):
    """The run's verdict on its target (``health.TargetHealth``), as a check sees it."""

    #: The target is unreachable now: a failed query is not the check's fault.
    down: bool
    #: The run is stopping for good.
    stopping: bool

    def gate(self) -> Awaitable[None] | None:
        """None while reachable, else an awaitable done when it answers again or stops."""
        ...


class CheckStopped(Exception):
    """The run stopped (its target unreachable for good) before the check could ask: the
    record is neither known stored nor known not stored, and is left for ``--resume``."""


class Reconciler:
    """Checks records' intents against ListMessages. One per run; ``async with`` closes
    its HTTP session. ``clock`` is the wall clock (intents carry wall times: they outlive
    the process); waits sleep on the event loop."""

    def __init__(
        self,
        target: Target,
        credentials: Credentials | None = None,
        options: ReconcileOptions | None = None,
        *,
        tls: TLSOptions | None = None,
        client: ListMessagesClient | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = opts = options or ReconcileOptions()
        self.counters = ReconcileCounters()
        self._clock = clock
        self._rng = rng or random.Random()
        self._client = client or ListMessagesClient(
            target,
            credentials,
            tls=tls,
            timeout=opts.timeout_s,
            connections=opts.concurrency,
            clock=clock,
        )

    async def __aenter__(self) -> Reconciler:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._client.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    def set_credentials(self, credentials: Credentials) -> None:
        """Use ``credentials`` for every query from now on (refreshed temporary AK/SK)."""
        self._client.set_credentials(credentials)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def probe(self, topic: str) -> None:
        """Before anything is sent: make sure ListMessages answers for ``topic`` and honours
        its key filter, with a key no message carries. Raises ListMessagesUnavailable (an
        endpoint without it, credentials without query rights) or ReconcileError."""
        key = f"{KEY_PREFIX}probe{os.urandom(8).hex()}"
        now = self._now_ms()
        start, end = query_window(now, now, round(self.options.clock_skew_s * 1000))
        page = await self._get(ListQuery(topic, key, start, end, self.options.page_size, 0))
        if any(m.keys is not None and key not in m.keys for m in page.messages):
            raise ListMessagesUnavailable(
                f"--exactly-once needs ListMessages to filter by key, and "
                f"{self._client.where} listed messages of other keys for key={key}"
            )

    async def check(
        self, intent: Intent, *, settled_at_ms: int | None = None, gate: Gate | None = None
    ) -> Outcome:
        """Whether ``intent``'s record is stored. ``settled_at_ms``: wall time (ms) its last
        attempt ended (default: the intent's time); the query waits until that is
        ``after_s`` old. Raises ReconcileError when ListMessages cannot tell, CheckStopped
        when ``gate`` stops first (see the module docstring)."""
        opts = self.options
        self.counters.checks += 1
        due = max(intent.at, settled_at_ms or 0) + round(opts.after_s * 1000)
        # Sleep at most after_s: a wall clock stepped back must not stretch the wait; the
        # real time since the attempt settled is then at least after_s all the same.
        wait = min(due - self._now_ms(), round(opts.after_s * 1000)) / 1000
        if wait > 0:
            self.counters.waited_s += wait
            await asyncio.sleep(wait)
        start, end = query_window(intent.at, self._now_ms(), round(opts.clock_skew_s * 1000))
        listed: list[ListedMessage] = []
        total: int | None = None
        for page_no in range(opts.max_pages):
            query = ListQuery(
                intent.topic, intent.key, start, end, opts.page_size, page_no * opts.page_size
            )
            page = await self._get(query, gate)
            listed.extend(page.messages)
            total = page.total
            read = (page_no + 1) * opts.page_size
            if len(page.messages) < opts.page_size or (total is not None and read >= total):
                break
        outcome = decide(intent, listed, total)
        if isinstance(outcome, Found):
            self.counters.found += 1
        elif isinstance(outcome, NotFound):
            self.counters.not_found += 1
        else:
            self.counters.ambiguous += 1
        return outcome

    async def reconcile_all(
        self, intents: Iterable[Intent], *, settled_at_ms: int | None = None
    ) -> dict[str, Outcome]:
        """Check every record's intents, ``concurrency`` queries at a time: identity ->
        outcome, in the order identities first appear. An identity with several intents
        (sent by two crashed runs) is checked from its earliest; intents of one identity
        under different topics or keys are each checked, and their copies counted together.

        For ``--resume``, ``settled_at_ms`` is when the resume started: the crashed
        process's attempts all ended before it, so one ``after_s`` wait covers them all."""
        groups: dict[tuple[str, str, str], Intent] = {}
        for intent in intents:
            group = (intent.identity, intent.topic, intent.key)
            earlier = groups.get(group)
            if earlier is None or intent.at < earlier.at:
                groups[group] = intent
        work = list(groups.values())
        outcomes: list[Outcome | None] = [None] * len(work)
        queue = iter(enumerate(work))

        async def worker() -> None:
            # One shared iterator: next() never awaits, so no two workers take one item.
            for i, intent in queue:
                outcomes[i] = await self.check(intent, settled_at_ms=settled_at_ms)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.options.concurrency, len(work))):
                    tg.create_task(worker())
        except BaseExceptionGroup as group:
            # Several workers may meet the same refusal at once: it is one error.
            first = group.exceptions[0]
            if all(isinstance(e, BulksendError) for e in group.exceptions):
                raise first from None
            raise
        return _by_identity(work, outcomes)

    async def _get(self, query: ListQuery, gate: Gate | None = None) -> Page:
        """One page, retried on 429 / 5xx / transport errors per the policy; failures while
        ``gate`` says the target is unreachable are not charged (module docstring)."""
        policy = self.options.retry
        started = time.monotonic()
        attempt = unreachable = 0
        while True:
            if gate is not None and gate.stopping:
                raise CheckStopped
            self.counters.queries += 1
            try:
                return await self._client.get(query)
            except TransportError as exc:
                if gate is not None and gate.down:
                    # Wait for the target's probe to bring it back, but look again after
                    # a backoff: ListMessages may answer before any record's probe does.
                    backoff = compute_backoff(unreachable, policy, self._rng)
                    unreachable += 1
                    self.counters.retries += 1
                    await _first_of(gate.gate(), min(backoff, MAX_RETRY_WAIT_S))
                    continue
                if attempt >= policy.max_retries:
                    raise ReconcileError(
                        f"--exactly-once: ListMessages gave no answer in {attempt + 1} attempts"
                        f" over {time.monotonic() - started:.0f}s (last: {exc}); stopping, the"
                        " records in doubt stay in the ledger as intents for --resume"
                    ) from None
                delay = None
                if isinstance(exc, ListMessagesBusy):
                    delay = parse_retry_after(exc.retry_after, time.time())
                if delay is None:
                    delay = compute_backoff(attempt, policy, self._rng)
                attempt += 1
                self.counters.retries += 1
                await asyncio.sleep(min(delay, MAX_RETRY_WAIT_S))


async def _first_of(awaitable: Awaitable[None] | None, timeout_s: float) -> None:
    """Wait for ``awaitable`` (None: nothing to wait for) or ``timeout_s``, whichever first."""
    if awaitable is None:
        await asyncio.sleep(timeout_s)
        return
    try:
        async with asyncio.timeout(timeout_s):
            await awaitable
    except TimeoutError:
        pass


def _by_identity(work: Sequence[Intent], outcomes: Sequence[Outcome | None]) -> dict[str, Outcome]:
    """Fold per-(identity, topic, key) outcomes into one per identity: every stored copy
    counts, whichever key or topic found it."""
    copies: dict[str, list[ListedMessage]] = {}
    totals: dict[str, int] = {}
    first: dict[str, Intent] = {}
    for intent, outcome in zip(work, outcomes, strict=True):
        assert outcome is not None  # every worker finished, or the group raised
        first.setdefault(intent.identity, intent)
        found = copies.setdefault(intent.identity, [])
        if isinstance(outcome, Found):
            found.append(outcome.message)
            totals[intent.identity] = totals.get(intent.identity, 0) + 1
        elif isinstance(outcome, Ambiguous):
            found.extend(outcome.messages)
            totals[intent.identity] = totals.get(intent.identity, 0) + outcome.total
    result: dict[str, Outcome] = {}
    for identity, intent in first.items():
        found = list({m.msg_id: m for m in copies[identity]}.values())
        if not found:
            result[identity] = NotFound(intent)
        elif len(found) == 1:
            result[identity] = Found(intent, found[0])
        else:
            ordered = sorted(found, key=lambda m: (m.store_timestamp is None, m.store_timestamp))
            result[identity] = Ambiguous(intent, tuple(ordered), totals[identity])
    return result
