"""Delivery: everything between a record and its Result. The request body, the credentials'
headers (signature or token), every attempt with retry and backoff, and the Result with its
timings. One ``Delivery`` per run; each worker of the pool holds a ``Courier`` of it bound
to one keep-alive connection.

Per attempt::

    health.admit (only while the target is unreachable: wait for the probe)
    -> auth headers (credentials in use *now*) -> Connection.post -> interpret(answer) | TransportError
        -> health.on_answer | health.on_failure -> observers.on_attempt(result)
        -> retry? (policy, Retry-After, halt, whose failure) -> sleep(backoff)

``--max-retries`` is spent on a record's own failures only: what the run's ``TargetHealth``
(health.py) judges an outage of the target is not charged, and the record waits for the
target instead of retrying. When the run stops because the target cannot be reached, a
record that would have tried again ends *withheld* (``WITHHELD``): not a result, never
reported; it is left for --resume.

Credentials can change during a run (``set_credentials``: temporary AK/SK refreshed from a
metadata service). Each attempt takes the credentials current when it starts, whole; a
request already written keeps the headers it was sent with.

**--exactly-once** (a ``WriteAhead``, writeahead.py): before a record's first attempt its
intent goes into the ledger, and the request leaves only once that write is done; every
attempt carries bulksend's key in KEYS. An attempt in doubt (``reconcile.attempt_in_doubt``:
the request was written, and no usable answer says what became of it) is checked with
ListMessages before anything else happens to the record: found stored, it is ok
(``reconciled``); not stored, it goes on as any failed attempt, and may be retried whatever
the answer was (nothing stored, so a re-send cannot duplicate). A check is made for the
last attempt too, so a ``failed`` line always means not stored. While the record is being
checked it is out of ``health``'s count of records that may bring news of the target.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import orjson

from bulksend._version import __version__
from bulksend.client import Connection, OnAnswer, Response, Transport, make_transport
from bulksend.config import Credentials, SendOptions, Target
from bulksend.errors import TransportError
from bulksend.health import Admit, TargetHealth, Verdict
from bulksend.observers import AttemptObserver
from bulksend.outcome import interpret
from bulksend.pool import Counters, Done
from bulksend.reconcile import NotFound, attempt_in_doubt, with_key
from bulksend.record import KEYS, Record
from bulksend.result import FAILED, OK, Result, result_for
from bulksend.retry import is_retryable_error, is_retryable_status, retry_wait
from bulksend.signing import FastSigner
from bulksend.writeahead import WriteAhead

USER_AGENT = f"bulksend/{__version__}"

#: The status of a record the run stopped before it was done, because the target cannot be
#: reached: the Sender never reports it (no ledger line), so --resume sends it.
WITHHELD: Final = "withheld"

#: Awaited (when it returns an awaitable) before a record's first attempt.
BeforeSend = Callable[[Record], Awaitable[None] | None]
#: --exactly-once: a record's key and its intent's time (ms), once the intent is written.
Ahead = tuple[str, int]


def fixed_headers(target: Target) -> dict[str, str]:
    """The headers every request to ``target`` carries, whoever sends it. No credential is
    among them: those change during a run, the connection's fixed headers do not."""
    return {
        "Host": target.url.split("/", 3)[2],
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Project-Id": target.project_id,
    }


def open_transport(target: Target, options: SendOptions) -> Transport:
    """The transport for a run to ``target`` (see ``client.make_transport``)."""
    return make_transport(
        target.url,
        fixed_headers(target),
        timeout=options.timeout,
        ssl_context=options.tls.context() if target.url.startswith("https") else None,
        max_answer_bytes=options.max_answer_bytes,
    )


class Auth:
    """One set of credentials as request headers: AK/SK sign each body (SDK-HMAC-SHA256,
    with X-Security-Token sent and signed when there is one), a token is sent as
    X-Auth-Token, no credentials send nothing. Immutable once built."""

    __slots__ = ("_signer", "_static", "_static_lines")

    def __init__(self, target: Target, credentials: Credentials) -> None:
        static: dict[str, str] = {}
        if credentials.mode == "aksk" and credentials.security_token:
            static["X-Security-Token"] = credentials.security_token
        elif credentials.mode == "token":
            static["X-Auth-Token"] = credentials.auth_token or ""
        self._static = static
        self._static_lines = "".join(f"{k}: {v}\r\n" for k, v in static.items()).encode("latin-1")
        self._signer = (
            FastSigner(
                "POST",
                target.path,
                {**fixed_headers(target), **static},
                ak=credentials.ak or "",
                sk=credentials.sk or "",
            )
            if credentials.mode == "aksk"
            else None
        )

    def headers(self, body: bytes) -> Mapping[str, str]:
        """The credential headers of one request with this ``body``."""
        signer = self._signer
        if signer is None:
            return self._static
        date = signer.date_for(time.time())
        authorization = signer.authorization(body, date)
        if self._static:
            return {**self._static, "X-Sdk-Date": date, "Authorization": authorization}
        return {"X-Sdk-Date": date, "Authorization": authorization}

    def header_lines(self, body: bytes, now: float) -> bytes:
        """``headers(body)`` as the request's header lines, signed at ``now`` (epoch s)."""
        if self._signer is None:
            return self._static_lines
        return self._static_lines + self._signer.header_lines(body, now)


class Delivery:
    """Every attempt for a record, for all the workers of one run. ``halt()`` ends every
    retry loop after its current attempt (the run is stopping for a reason no retry fixes).
    """

    def __init__(
        self,
        target: Target,
        credentials: Credentials,
        options: SendOptions,
        *,
        counters: Counters,
        rng: random.Random,
        observers: Sequence[AttemptObserver] = (),
        before_send: BeforeSend | None = None,
        health: TargetHealth | None = None,
        write_ahead: WriteAhead | None = None,
    ) -> None:
        self.target = target
        self.options = options
        self.counters = counters
        self.halted = False
        self._rng = rng
        self._observers = tuple(o.on_attempt for o in observers)
        self._before_send = before_send
        self.write_ahead = write_ahead
        self.health = health or TargetHealth(options, rng, on_stop=lambda: None)
        self._auth = Auth(target, credentials)
        self._current_secrets = self._secrets = credentials.secrets()

    def set_credentials(self, credentials: Credentials) -> None:
        """Sign (or authenticate) every attempt that starts from now on with ``credentials``.
        The previous secrets stay scrubbed from answers too: an answer to a request sent
        with them may still arrive (those before are long gone: a request lives at most
        ``timeout`` seconds, credentials are refreshed far less often)."""
        self._auth = Auth(self.target, credentials)
        current = credentials.secrets()
        self._secrets = tuple(dict.fromkeys((*current, *self._current_secrets)))
        self._current_secrets = current
        if self.write_ahead is not None:
            self.write_ahead.reconciler.set_credentials(credentials)

    def halt(self) -> None:
        self.halted = True

    def courier(self, conn: Connection) -> Courier:
        return Courier(self, conn)

    def body_of(self, record: Record, key: str | None = None) -> bytes:
        """The SendMessage request body (compact JSON); ``key`` (--exactly-once's) goes
        into KEYS beside the record's own (and --key-from-id's)."""
        props = record.properties
        if self.options.key_from_id and record.id is not None and record.keys is None:
            props = (*props, (KEYS, record.id))
        if key is not None:
            props = with_key(props, key)
        return orjson.dumps(
            {
                "topic": record.topic,
                "body": record.body,
                "property_list": [{"name": n, "value": v} for n, v in props],
            }
        )

    async def send_one(
        self,
        conn: Connection,
        record: Record,
        intended: float = 0.0,
        *,
        first: FirstAttempt | None = None,
        ahead: Ahead | None = None,
    ) -> Result:
        """Every attempt for one record, retries and backoff included; always a Result
        (status ``WITHHELD`` when the run stopped for an unreachable target first).
        ``intended``: the monotonic time the pacer meant it to go (0.0 = unpaced).
        ``first``: the first attempt, already made (by a ``Courier``'s callback, which
        entered the record into ``health`` when it sent it). ``ahead``: --exactly-once,
        the record's intent is already written (``first.ahead`` when ``first`` is given)."""
        before = self._before_send if first is None else None
        if before is not None and (pending := before(record)) is not None:
            await pending
        wa = self.write_ahead
        key: str | None = None
        at = 0
        if wa is not None:
            if first is not None:
                ahead = first.ahead
            if ahead is None:
                prepared = await wa.prepare(record)
                if isinstance(prepared, Result):
                    return prepared  # found stored by a crashed run's intent, or no identity
                key = prepared
                at, written = wa.intent(record, key)
                if written is not None:
                    await written  # the request leaves only once its intent is written
            else:
                key, at = ahead
        health = self.health
        policy = self.options.retry
        observers = self._observers
        body = self.body_of(record, key)
        started = time.monotonic()
        started_at = time.time()
        if first is not None:
            started, started_at = first.started, first.started_at
        attempts = 0
        #: Failures that count against --max-retries: the record's own.
        charged = 0
        #: The health streak of this record's latest charged transport failures, and how
        #: many of them it holds: refunded if that streak proves an outage.
        streak = in_streak = 0
        probe = False
        if first is None:
            health.enter()  # until leave(): a record that may still bring news of the target
        try:
            while True:
                if in_streak and health.was_outage(streak):
                    charged -= in_streak
                    in_streak = 0
                if first is None and (health.down or health.stopping):
                    admitted = await health.admit()
                    if admitted is Admit.STOP:
                        result = _withheld(record, health)
                        break
                    probe = admitted is Admit.PROBE
                attempts += 1
                retry_after: str | None = None
                verdict = Verdict.OWN
                doubt = False
                try:
                    if first is None:
                        resp = await conn.post(self._auth.headers(body), body)
                    elif isinstance(outcome := first.outcome, TransportError):
                        first = None
                        raise outcome
                    else:
                        resp, first = outcome, None
                except TransportError as exc:
                    result = result_for(record, FAILED)
                    result.error_code = exc.code
                    result.error_msg = str(exc)
                    retryable = is_retryable_error(exc)
                    verdict = health.on_failure(exc, conn, probe)
                    doubt = wa is not None and exc.request_written
                else:
                    if not health.quiet:
                        health.on_answer(probe)
                    result = interpret(record, resp, self._secrets)
                    retryable = result.status != OK and is_retryable_status(resp.status, policy)
                    retry_after = resp.retry_after
                    doubt = (
                        wa is not None
                        and result.status != OK
                        and attempt_in_doubt(resp.status, result.error_code, request_written=True)
                    )
                probe = False
                for observe in observers:
                    observe(result)
                if doubt:
                    assert wa is not None and key is not None
                    # Checked before anything else: a retry, a give-up and a halt alike
                    # would each be wrong for a stored record.
                    health.leave()  # a record in its check brings no news of the target
                    try:
                        checked = await wa.check(record, key, at, health)
                    finally:
                        health.enter()
                    if checked is None:
                        result = _withheld(record, health)
                        break
                    if not health.quiet:
                        # ListMessages answered: the target is reachable. Timeouts of lost
                        # answers on several connections at once look like an outage, and
                        # a record found stored waits for no probe that could end it.
                        health.on_answer()
                    if not isinstance(checked, NotFound):
                        result = wa.reconciled(result, checked)
                        break
                    retryable = True  # nothing stored: a re-send cannot duplicate
                if not retryable or self.halted:
                    break
                if health.stopping:
                    result = _withheld(record, health)
                    break
                if verdict is Verdict.OUTAGE:
                    continue  # not charged: wait in health.admit for the probe
                charged += 1
                if verdict is Verdict.SUSPECT:
                    if streak != health.streak.id:
                        streak, in_streak = health.streak.id, 0
                    in_streak += 1
                if charged > policy.max_retries:
                    if verdict is Verdict.OWN or await health.verdict(streak) is Verdict.OWN:
                        break
                    continue  # the streak proved an outage: refunded at the loop's top
                delay = retry_wait(retry_after, charged - 1, policy, time.time(), self._rng)
                self.counters.retrying += 1
                try:
                    await health.sleep(delay)
                finally:
                    self.counters.retrying -= 1
        finally:
            health.leave()
        return stamp(result, attempts, started, started_at, intended)


def stamp(
    result: Result, attempts: int, started: float, started_at: float, intended: float
) -> Result:
    """The record's figures: attempts, and its times from the first attempt's start
    (``started`` monotonic, ``started_at`` epoch seconds) to now."""
    result.attempts = attempts
    result.latency_ms = round((time.monotonic() - started) * 1000.0, 3)
    result.started_at = int(started_at * 1000)
    result.done_at = int(time.time() * 1000)
    if intended:
        queued = max(0.0, started - intended)
        result.queue_ms = round(queued * 1000.0, 3)
        result.intended_at = int((started_at - queued) * 1000)
    return result


@dataclass(frozen=True, slots=True)
class FirstAttempt:
    """An attempt made outside ``send_one``: its outcome and when it started."""

    outcome: Response | TransportError
    started: float
    started_at: float
    #: --exactly-once: the record's key and intent time.
    ahead: Ahead | None = None


async def _raise(exc: BaseException) -> Result:
    """For a callback that must stop the run: the pool awaits this in its task group."""
    raise exc


def _withheld(record: Record, health: TargetHealth) -> Result:
    result = result_for(record, WITHHELD)
    result.error_code = "TARGET_UNREACHABLE"
    result.error_msg = str(health.error) if health.error is not None else "the run stopped"
    return result


class Courier:
    """A worker's share of a ``Delivery``: its one connection (``pool.Courier``).

    ``try_start`` is the hot path: the first attempt by callback (``H1Connection.try_send``),
    and an ok answer completes the record right there, with no task and no Future. Anything
    else (no open connection yet, an answer that is not ok, a transport error, a
    ``before_send``) goes on in ``Delivery.send_one``, so retries, backoff and every rule
    about them live in one place.

    With --exactly-once the callback path holds: ``try_start`` queues the record's intent
    into the loop turn's ledger write and sends from that write's callback (``_go``), once
    the intent is on disk — no task either. A record the write-ahead must prepare first
    (a topic not yet probed, a crashed run's outcome to apply) goes by ``send_one``.
    """

    __slots__ = (
        "_ahead",
        "_body",
        "_conn",
        "_delivery",
        "_done",
        "_go",
        "_intended",
        "_on_answer",
        "_record",
        "_started",
        "_started_at",
        "_try_send",
    )

    def __init__(self, delivery: Delivery, conn: Connection) -> None:
        self._delivery = delivery
        self._conn = conn
        self._try_send: Callable[[bytes, bytes, OnAnswer], bool] | None = getattr(
            conn, "try_send", None
        )
        self._on_answer: OnAnswer = self._answered  # one bound method, not one per record
        self._go: Callable[[BaseException | None], None] = self._intent_written
        self._record: Record | None = None
        self._done: Done | None = None
        self._intended = self._started = self._started_at = 0.0
        self._ahead: Ahead | None = None
        self._body = b""

    def deliver(self, record: Record, intended: float) -> Awaitable[Result]:
        return self._delivery.send_one(self._conn, record, intended)

    def try_start(self, record: Record, intended: float, done: Done) -> bool:
        d = self._delivery
        try_send = self._try_send
        health = d.health
        # During an outage every attempt goes through health's gate (send_one).
        if try_send is None or d._before_send is not None or d.halted or health.down:
            return False
        if health.stopping:
            return False
        wa = d.write_ahead
        if wa is not None:
            return self._write_ahead(wa, record, intended, done)
        body = d.body_of(record)
        started_at = time.time()
        started = time.monotonic()
        if not try_send(d._auth.header_lines(body, started_at), body, self._on_answer):
            return False
        health.enter()  # left on an ok answer below, else by send_one(first=...)
        self._record, self._done, self._intended = record, done, intended
        self._started, self._started_at = started, started_at
        self._ahead = None
        return True

    def _write_ahead(self, wa: WriteAhead, record: Record, intended: float, done: Done) -> bool:
        """--exactly-once's ``try_start``: queue the intent; ``_intent_written`` sends."""
        if not wa.fast(record):
            return False
        key = wa.key(record)
        at, written = wa.intent(record, key)
        if written is None:  # pragma: no cover - no running loop: the pool always has one
            return False
        self._record, self._done, self._intended = record, done, intended
        self._ahead = (key, at)
        self._body = self._delivery.body_of(record, key)
        wa.after(written, self._go)
        return True

    def _intent_written(self, error: BaseException | None) -> None:
        """The record's intent is written (or its write failed: the run stops): send now,
        by callback when the connection and the target allow, else by ``send_one``."""
        d, record, done, ahead = self._delivery, self._record, self._done, self._ahead
        assert record is not None and done is not None
        if error is not None:
            self._record = self._done = None
            done(_raise(error))
            return
        health = d.health
        body = self._body
        started_at = time.time()
        started = time.monotonic()
        try_send = self._try_send
        assert try_send is not None
        if (
            d.halted
            or health.down
            or health.stopping
            or not try_send(d._auth.header_lines(body, started_at), body, self._on_answer)
        ):
            self._record = self._done = None
            done(d.send_one(self._conn, record, self._intended, ahead=ahead))
            return
        health.enter()  # left on an ok answer, else by send_one(first=...)
        self._started, self._started_at = started, started_at

    def _answered(self, outcome: Response | TransportError) -> None:
        d, record, done = self._delivery, self._record, self._done
        assert record is not None and done is not None
        self._record = self._done = None
        if not isinstance(outcome, TransportError):
            result = interpret(record, outcome, d._secrets)
            if result.status == OK:
                health = d.health
                if not health.quiet:
                    health.on_answer()
                health.leave()
                for observe in d._observers:
                    observe(result)
                done(stamp(result, 1, self._started, self._started_at, self._intended))
                return
        first = FirstAttempt(outcome, self._started, self._started_at, self._ahead)
        done(d.send_one(self._conn, record, self._intended, first=first))

    def close(self) -> None:
        self._conn.close()
