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
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

import orjson

from bulksend._version import __version__
from bulksend.client import Connection, Transport, make_transport
from bulksend.config import Credentials, SendOptions, Target
from bulksend.errors import TransportError
from bulksend.health import Admit, TargetHealth, Verdict
from bulksend.observers import AttemptObserver
from bulksend.outcome import interpret
from bulksend.pool import Counters
from bulksend.record import KEYS, Record
from bulksend.result import FAILED, OK, Result, result_for
from bulksend.retry import (
    compute_backoff,
    is_retryable_error,
    is_retryable_status,
    parse_retry_after,
)
from bulksend.signing import FastSigner

USER_AGENT = f"bulksend/{__version__}"

#: The status of a record the run stopped before it was done, because the target cannot be
#: reached: the Sender never reports it (no ledger line), so --resume sends it.
WITHHELD: Final = "withheld"

#: Awaited (when it returns an awaitable) before a record's first attempt.
BeforeSend = Callable[[Record], Awaitable[None] | None]


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

    __slots__ = ("_signer", "_static")

    def __init__(self, target: Target, credentials: Credentials) -> None:
        static: dict[str, str] = {}
        if credentials.mode == "aksk" and credentials.security_token:
            static["X-Security-Token"] = credentials.security_token
        elif credentials.mode == "token":
            static["X-Auth-Token"] = credentials.auth_token or ""
        self._static = static
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
    ) -> None:
        self.target = target
        self.options = options
        self.counters = counters
        self.halted = False
        self._rng = rng
        self._observers = tuple(o.on_attempt for o in observers)
        self._before_send = before_send
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

    def halt(self) -> None:
        self.halted = True

    def courier(self, conn: Connection) -> Courier:
        return Courier(self, conn)

    def body_of(self, record: Record) -> bytes:
        """The SendMessage request body (compact JSON)."""
        props = record.properties
        if self.options.key_from_id and record.id is not None and record.keys is None:
            props = (*props, (KEYS, record.id))
        return orjson.dumps(
            {
                "topic": record.topic,
                "body": record.body,
                "property_list": [{"name": n, "value": v} for n, v in props],
            }
        )

    async def send_one(self, conn: Connection, record: Record, intended: float = 0.0) -> Result:
        """Every attempt for one record, retries and backoff included; always a Result
        (status ``WITHHELD`` when the run stopped for an unreachable target first).
        ``intended``: the monotonic time the pacer meant it to go (0.0 = unpaced)."""
        if self._before_send is not None and (pending := self._before_send(record)) is not None:
            await pending
        health = self.health
        policy = self.options.retry
        observers = self._observers
        body = self.body_of(record)
        started = time.monotonic()
        started_at = time.time()
        attempts = 0
        #: Failures that count against --max-retries: the record's own.
        charged = 0
        #: The health streak of this record's latest charged transport failures, and how
        #: many of them it holds: refunded if that streak proves an outage.
        streak = in_streak = 0
        probe = False
        health.enter()  # until leave(): a record that may still bring news of the target
        try:
            while True:
                if in_streak and health.was_outage(streak):
                    charged -= in_streak
                    in_streak = 0
                if health.down or health.stopping:
                    admitted = await health.admit()
                    if admitted is Admit.STOP:
                        result = _withheld(record, health)
                        break
                    probe = admitted is Admit.PROBE
                attempts += 1
                retry_after: str | None = None
                verdict = Verdict.OWN
                try:
                    resp = await conn.post(self._auth.headers(body), body)
                except TransportError as exc:
                    result = result_for(record, FAILED)
                    result.error_code = exc.code
                    result.error_msg = str(exc)
                    retryable = is_retryable_error(exc)
                    verdict = health.on_failure(exc, conn, probe)
                else:
                    if not health.quiet:
                        health.on_answer(probe)
                    result = interpret(record, resp, self._secrets)
                    retryable = result.status != OK and is_retryable_status(resp.status, policy)
                    retry_after = resp.retry_after
                probe = False
                for observe in observers:
                    observe(result)
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
                delay = parse_retry_after(retry_after, time.time())
                if delay is None:
                    delay = compute_backoff(charged - 1, policy, self._rng)
                self.counters.retrying += 1
                try:
                    await health.sleep(delay)
                finally:
                    self.counters.retrying -= 1
        finally:
            health.leave()
        result.attempts = attempts
        result.latency_ms = round((time.monotonic() - started) * 1000.0, 3)
        result.started_at = int(started_at * 1000)
        result.done_at = int(time.time() * 1000)
        if intended:
            queued = max(0.0, started - intended)
            result.queue_ms = round(queued * 1000.0, 3)
            result.intended_at = int((started_at - queued) * 1000)
        return result


def _withheld(record: Record, health: TargetHealth) -> Result:
    result = result_for(record, WITHHELD)
    result.error_code = "TARGET_UNREACHABLE"
    result.error_msg = str(health.error) if health.error is not None else "the run stopped"
    return result


class Courier:
    """A worker's share of a ``Delivery``: its one connection (``pool.Courier``)."""

    __slots__ = ("_conn", "_delivery")

    def __init__(self, delivery: Delivery, conn: Connection) -> None:
        self._delivery = delivery
        self._conn = conn

    def deliver(self, record: Record, intended: float) -> Awaitable[Result]:
        return self._delivery.send_one(self._conn, record, intended)

    def close(self) -> None:
        self._conn.close()
