"""Target health: one verdict for the whole run on whether the target can be reached, so
that an outage costs the run waiting, not records.

Delivery reports every attempt's outcome here: an *answer* (any HTTP status, even a
malformed or oversized one: something answered), or a *failure* that says the target may
be unreachable::

    connect failure   refused, unknown host, TLS handshake, connect timeout: the request
                      never left, so it cannot be the record's fault
    request failure   closed or reset before a complete answer, no answer in time: the
                      target's, the connection's, or the record's own (a body the target
                      chokes on, a WAF resetting it)

**Unreachable.** A *streak* is the failures since the last answer anywhere in the run. The
target is judged unreachable when its streak holds

    (a) ``WITNESSES`` (4) connect failures, on any connections, or
    (b) failures on ``min(concurrency, WITNESSES)`` different connections (at least 2).

Each worker holds one connection and one record at a time, so different connections are
different records: a record the target chokes on, or one stale keep-alive connection, fails
on one connection while the others keep getting answers, each of which ends the streak;
a target that is down fails them all. Four is few enough that a refused target is known
within milliseconds at any concurrency (under a second at ``--concurrency 1``, retries
and their backoff included), and enough that one unlucky connection or record does not
pass for an outage. At ``--concurrency 1`` only (a) applies: a request failure of the one
connection in use cannot be told from the record's own.

**While unreachable:**

* no new record is dispatched (``gate``, the pool's ``on_dispatch`` hold);
* attempts in flight finish; their failures are not charged to their records;
* every record that would try again waits in ``admit`` instead of spending its retries;
* one waiting record at a time is let through as the **probe**: its own next attempt, so
  nothing extra is sent and no record is ever in flight twice. Probes go after a backoff
  (``retry.compute_backoff`` of the run's policy for probe n, at least ``MIN_PROBE_S``); a
  failed probe goes to the back of the line and the next waiter probes next time;
* any answer (a probe's, or a late one of an attempt in flight) ends it: every waiter goes
  again and dispatch resumes;
* after ``outage_timeout`` seconds the run stops: ``TargetUnreachable`` (cause ``outage``).

**Fail fast.** While the run has had no answer at all and every failure so far is a
refusal, an unknown host or an untrusted certificate, becoming unreachable stops the run
at once (``TargetUnreachable`` naming the cause) instead of probing: that target is
misconfigured far more often than it is down.

**Charging.** A record's ``--max-retries`` counts its own failures. The failures of a streak
that becomes an outage are refunded to their records. A record whose budget runs out on a
failure of a streak not yet decided waits for the verdict (an answer elsewhere: the
failure was its own, it fails; an outage: refunded); when no other record is left to give
one, a connect failure decides for the target (unreachable), a request failure for the
record (failed).

When the run stops (fail fast, the outage timeout, or a drain while unreachable) the
records waiting here are *withheld*: they get no result at all and are left for --resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any

from bulksend.config import SendOptions
from bulksend.errors import (
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    RequestTimeout,
    TargetUnreachable,
    TransportError,
)
from bulksend.retry import compute_backoff

#: Failures in a streak that make the target unreachable (see the module docstring).
WITNESSES = 4
#: Seconds; the shortest wait before a probe (the policy's jitter may draw ~0).
MIN_PROBE_S = 0.05
#: Causes that, from the very first attempts, mean a misconfigured target: stop at once.
FAIL_FAST_CAUSES = frozenset({"refused", "unknown-host", "tls-verify"})


class Verdict(Enum):
    """What a failed attempt says, for the record's retry budget."""

    #: The record's own failure: charged.
    OWN = "own"
    #: Maybe the target's: charged for now, refunded if its streak becomes an outage.
    SUSPECT = "suspect"
    #: The target's: not charged; the record waits for the probe.
    OUTAGE = "outage"


class Admit(Enum):
    """How a record leaves ``admit``."""

    GO = "go"
    #: Its attempt is the probe.
    PROBE = "probe"
    #: The run is stopping: the record is withheld (no result, left for --resume).
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt as health sees it."""

    #: Which connection (worker) it failed on.
    connection: int
    #: True when nothing was sent (the connection could not be made).
    connect: bool
    #: ``ConnectError.cause``, ``connect-timeout``, ``closed`` or ``timeout``.
    cause: str
    message: str


def failure_of(exc: TransportError, connection: int) -> Failure | None:
    """The failure ``exc`` is; None when something answered (malformed, oversized)."""
    if isinstance(exc, ConnectError):
        return Failure(connection, True, exc.cause, str(exc))
    if isinstance(exc, ConnectTimeout):
        return Failure(connection, True, "connect-timeout", str(exc))
    if isinstance(exc, RequestTimeout):
        return Failure(connection, False, "timeout", str(exc))
    if isinstance(exc, ConnectionClosed):
        return Failure(connection, False, "closed", str(exc))
    return None


class Streak:
    """The failures since the last answer, and whether they make an outage. Pure: no clock.

    ``id`` numbers the streaks of a run (1, 2, ...): a record remembers the streak its
    charged failures belong to, to be refunded if that one proves an outage."""

    __slots__ = ("causes", "connect_failures", "connections", "failures", "id", "last", "needed")

    def __init__(self, concurrency: int) -> None:
        #: Different connections that make an outage (rule b); > concurrency: never.
        self.needed = max(2, min(concurrency, WITNESSES))
        self.id = 0
        self.failures = 0
        self.connect_failures = 0
        self.connections: set[int] = set()
        self.causes: set[str] = set()
        self.last: Failure | None = None

    def add(self, failure: Failure) -> bool:
        """Count ``failure``; whether the streak now makes the target unreachable."""
        if not self.failures:
            self.id += 1
        self.failures += 1
        self.connect_failures += failure.connect
        self.connections.add(failure.connection)
        self.causes.add(failure.cause)
        self.last = failure
        return self.connect_failures >= WITNESSES or len(self.connections) >= self.needed

    def end(self) -> None:
        """Something answered."""
        self.failures = self.connect_failures = 0
        self.connections.clear()
        self.causes.clear()


class TargetHealth:
    """The run's verdict on its target, the gate records wait at while it is unreachable,
    and the probe. See the module docstring for the rules.

    ``on_stop()`` is called once when the run must stop (``error`` says why);
    ``on_recover()`` each time the target answers again after being unreachable."""

    def __init__(
        self,
        options: SendOptions,
        rng: random.Random,
        *,
        on_stop: Callable[[], None],
        on_recover: Callable[[], None] | None = None,
    ) -> None:
        self.policy = options.retry
        self.outage_timeout = options.outage_timeout
        self.ride_outages = options.ride_outages
        self.streak = Streak(options.concurrency)
        #: Unreachable now (read before every attempt: a plain attribute).
        self.down = False
        #: The run is stopping for good: no attempt starts any more.
        self.stopping = False
        #: True once anything answered and while no failure is pending: nothing to do on
        #: an answer (the hot path's one check).
        self.quiet = False
        #: Why the run stopped, once it did.
        self.error: TargetUnreachable | None = None
        #: Wall clock (epoch s) the current outage began; None while reachable.
        self.since: float | None = None
        #: Outages ridden out or not, probes sent, seconds unreachable (ended outages).
        self.outages = 0
        self.probes = 0
        self.downtime_s = 0.0
        self._answered = False
        self._draining = False
        self._rng = rng
        self._on_stop = on_stop
        self._on_recover = on_recover
        self._outage_streaks: set[int] = set()
        self._waiters: deque[asyncio.Future[Admit]] = deque()
        self._parked: list[asyncio.Future[Verdict]] = []
        #: Records in delivery, not parked: who may still bring an answer or a failure.
        self._active = 0
        self._probe_n = 0
        self._probe_due = False
        self._down_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._up = asyncio.Event()
        self._up.set()
        self._stop = asyncio.Event()

    # --- what delivery calls --------------------------------------------------------------

    def enter(self) -> None:
        """A record starts its attempts."""
        self._active += 1

    def leave(self) -> None:
        """A record is done (result, withheld, or cancelled)."""
        self._active -= 1
        if not self._active and self._parked:
            self._decide_parked()

    def on_answer(self, probe: bool = False) -> None:
        """Something answered (any status): the target is reachable."""
        self._answered = True
        self.streak.end()
        self._resolve_parked(Verdict.OWN)
        if self.down:
            self._recover()
        self.quiet = not self.stopping

    def on_failure(self, exc: TransportError, connection: object, probe: bool = False) -> Verdict:
        """A failed attempt: whose failure it is."""
        failure = failure_of(exc, id(connection))
        if failure is None:
            self.on_answer(probe)
            return Verdict.OWN
        self.quiet = False
        if not self.ride_outages and (self._answered or failure.cause not in FAIL_FAST_CAUSES):
            # Only a target refusing from the start (fail fast) stops such a run: past
            # that, every failure is the message's own result.
            return Verdict.OWN
        if self.stopping:
            return Verdict.OUTAGE
        if self.down:
            self.streak.last = failure
            if probe:
                self._schedule_probe()
            return Verdict.OUTAGE
        if self.streak.add(failure):
            self._go_down()
            return Verdict.OUTAGE
        return Verdict.SUSPECT

    def was_outage(self, streak_id: int) -> bool:
        """Whether streak ``streak_id`` became an outage (its failures are refunded)."""
        return streak_id in self._outage_streaks

    async def admit(self) -> Admit:
        """Before an attempt while unreachable or stopping: wait for the probe's verdict."""
        while True:
            if self.stopping or (self._draining and self.down):
                return Admit.STOP
            if not self.down:
                return Admit.GO
            if self._probe_due:
                self._probe_due = False
                self.probes += 1
                return Admit.PROBE
            waiter: asyncio.Future[Admit] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            admitted = await waiter
            if admitted is not Admit.GO:
                return admitted

    async def verdict(self, streak_id: int) -> Verdict:
        """For a record whose budget ran out on a failure of streak ``streak_id``: OWN
        (something answered since: it fails) or OUTAGE (refunded: it waits and tries
        again). Waits for the streak to be decided (see the module docstring)."""
        if streak_id in self._outage_streaks or self.stopping:
            return Verdict.OUTAGE
        if streak_id != self.streak.id or not self.streak.failures:
            return Verdict.OWN
        parked: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._parked.append(parked)
        self._active -= 1
        try:
            if not self._active:
                self._decide_parked()
            return await parked
        finally:
            self._active += 1

    async def sleep(self, seconds: float) -> None:
        """A backoff that a stop cuts short."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    # --- what the sender calls ------------------------------------------------------------

    def gate(self) -> Coroutine[Any, Any, None] | None:
        """For the pool's ``on_dispatch``: None while reachable, else an awaitable done
        when the target answers again or the run stops."""
        return self._until_up() if self.down else None

    async def _until_up(self) -> None:
        await self._up.wait()

    def drain(self) -> None:
        """The run is draining (SIGINT, ``Sender.stop``): while unreachable, nothing waiting
        here will be sent; withhold it, and let dispatch see the drain."""
        self._draining = True
        if self.down:
            self._release(Admit.STOP)
            self._up.set()

    def note(self) -> str | None:
        """For progress lines: ``target unreachable since 12:03:04 (...), probing``."""
        if self.since is None or not self.down:
            return None
        last = self.streak.last.message if self.streak.last is not None else "no answer"
        waiting = len(self._waiters)
        return (
            f"target unreachable since {time.strftime('%H:%M:%S', time.localtime(self.since))}"
            f" ({last}), probing; {waiting} record{'s' if waiting != 1 else ''} waiting"
        )

    # --- transitions ----------------------------------------------------------------------

    def _go_down(self) -> None:
        self._outage_streaks.add(self.streak.id)
        self._resolve_parked(Verdict.OUTAGE)
        last = self.streak.last
        assert last is not None
        if not self._answered and self.streak.causes <= FAIL_FAST_CAUSES:
            self._halt(_fail_fast_error(last))
            return
        self.down = True
        self.quiet = False
        self.outages += 1
        self.since = time.time()
        self._down_at = time.monotonic()
        self._up.clear()
        self._probe_n = 0
        self._schedule_probe()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.outage_timeout, self._timed_out)

    def _recover(self) -> None:
        self.down = False
        self.since = None
        self.downtime_s += time.monotonic() - self._down_at
        self._probe_due = False
        self._cancel_timers()
        self._release(Admit.GO)
        self._up.set()
        if self._on_recover is not None:
            self._on_recover()

    def _schedule_probe(self) -> None:
        delay = max(MIN_PROBE_S, compute_backoff(self._probe_n, self.policy, self._rng))
        self._probe_n += 1
        self._timer = asyncio.get_running_loop().call_later(delay, self._probe)

    def _probe(self) -> None:
        self._timer = None
        if not self.down or self.stopping:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.probes += 1
                waiter.set_result(Admit.PROBE)
                return
        self._probe_due = True  # nobody waits yet: the next record to arrive probes

    def _timed_out(self) -> None:
        self._deadline = None
        last = self.streak.last.message if self.streak.last is not None else "no answer"
        since = time.strftime("%H:%M:%S", time.localtime(self.since or time.time()))
        self._halt(
            TargetUnreachable(
                f"target unreachable since {since} ({last}) for longer than --outage-timeout"
                f" {self.outage_timeout:g} s; the records not sent are left for --resume",
                "outage",
            )
        )

    def _halt(self, error: TargetUnreachable) -> None:
        if self.error is None:
            self.error = error
        self.stopping = True
        self.quiet = False
        self._cancel_timers()
        self._release(Admit.STOP)
        self._resolve_parked(Verdict.OUTAGE)
        self._stop.set()
        self._up.set()
        self._on_stop()

    def _decide_parked(self) -> None:
        """No record is left to bring news: the last failure decides (module docstring)."""
        last = self.streak.last
        if last is not None and last.connect and self.streak.failures:
            self._go_down()
        else:
            self._resolve_parked(Verdict.OWN)

    def _release(self, admitted: Admit) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(admitted)

    def _resolve_parked(self, verdict: Verdict) -> None:
        parked, self._parked = self._parked, []
        for future in parked:
            if not future.done():
                future.set_result(verdict)

    def _cancel_timers(self) -> None:
        for handle in (self._timer, self._deadline):
            if handle is not None:
                handle.cancel()
        self._timer = self._deadline = None


def _fail_fast_error(last: Failure) -> TargetUnreachable:
    """The one line for a target that never answered: what is wrong and what to do."""
    if last.cause == "tls-verify":
        hint = (
            "pass --ca-bundle FILE with the CA that signed it (or --insecure to skip verification)"
        )
    elif last.cause == "unknown-host":
        hint = "check --endpoint or --region"
    else:
        hint = "check --endpoint, and that the target is up"
    return TargetUnreachable(
        f"target unreachable: {last.message}; nothing has answered and no record was sent:"
        f" {hint}, then run again (--resume)",
        last.cause,
    )
