"""``Sender``: the library's one entry point for sending, a façade over the stages it puts
together for a run::

    Pool (pool.py)            dispatch, pacing, bounded workers, key lanes, shutdown order
      └─ Courier per worker   ── Delivery (delivery.py): body, auth headers, attempts, Result
                                   └─ Connection (client.py): one HTTP attempt
    observers.py              AuthStreak (stops the run), AdaptiveRate (--adaptive)
    health.py                 TargetHealth: holds dispatch and retries while the target is
                              unreachable, probes it; stops the run (fail fast, outage timeout)

    async with Sender(target, credentials, options) as sender:
        async for result in sender.send(records):
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType

from bulksend.adaptive import AIMD
from bulksend.client import Connection, Transport
from bulksend.config import Credentials, SendOptions, Target
from bulksend.delivery import USER_AGENT, WITHHELD, BeforeSend, Delivery, open_transport
from bulksend.errors import AuthenticationFailed
from bulksend.health import TargetHealth
from bulksend.observers import AdaptiveRate, AttemptObserver, AuthStreak
from bulksend.pacer import Pacer, Schedule
from bulksend.pool import (
    BatchSource,
    Counters,
    Courier,
    Items,
    OnResult,
    Pool,
    invalid_result,
    skipped_result,
)
from bulksend.record import Item, Record
from bulksend.result import Result
from bulksend.writeahead import WriteAhead

__all__ = [
    "USER_AGENT",
    "BatchSource",
    "Counters",
    "Items",
    "OnResult",
    "Sender",
    "invalid_result",
    "skipped_result",
]


class Sender:
    """Sends records to one SendMessage target; see the module docstring for the shape.

    ``transport``: a ready transport (tests, proxies); by default one is opened for the
    target (``delivery.open_transport``). ``rng`` draws the backoff jitter. ``schedule``
    replaces the constant ``options.rate`` (load's stages). ``before_send(record)`` runs
    before a record's first attempt, awaited when it returns an awaitable. ``observers``
    see every attempt's Result (``observers.AttemptObserver``; live metrics count them).
    ``write_ahead``: --exactly-once's intents and checks (``bulksend.writeahead``;
    ``options.exactly_once`` is what the harness builds it for).
    """

    def __init__(
        self,
        target: Target,
        credentials: Credentials | None = None,
        options: SendOptions | None = None,
        *,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        schedule: Pacer | None = None,
        before_send: BeforeSend | None = None,
        observers: Sequence[AttemptObserver] = (),
        write_ahead: WriteAhead | None = None,
    ) -> None:
        self.target = target
        self.credentials = credentials or Credentials()
        self.options = opts = options or SendOptions()
        self.counters = Counters()
        self.schedule: Pacer = schedule or Schedule(opts.rate)
        self._transport = transport or open_transport(target, opts)
        rng = rng or random.Random()
        self.health = TargetHealth(
            opts, rng, on_stop=self._target_unreachable, on_recover=self._target_back
        )
        self._auth = AuthStreak(opts.auth_failure_limit, self._auth_failed)
        attempt_observers: list[AttemptObserver] = [self._auth, *observers]
        self._adaptive: AdaptiveRate | None = None
        if opts.adaptive:
            aimd = AIMD(opts.rate, ceiling=opts.rate or float("inf"))
            self._adaptive = AdaptiveRate(aimd, self.counters, self.set_rate)
            attempt_observers.append(self._adaptive)
        self._delivery = Delivery(
            target,
            self.credentials,
            opts,
            counters=self.counters,
            rng=rng,
            observers=attempt_observers,
            before_send=before_send,
            health=self.health,
            write_ahead=write_ahead,
        )
        self._pool = Pool(
            opts,
            self.schedule,
            self._open_courier,
            counters=self.counters,
            on_dispatch=self._dispatch,
        )

    async def __aenter__(self) -> Sender:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._transport.aclose()

    def _open_courier(self) -> Courier:
        return self._delivery.courier(self._transport.connection())

    def _auth_failed(self, reason: str) -> None:
        # Every further request would be refused too: no more retries, no more records.
        self._delivery.halt()
        self.stop()

    def _dispatch(self, now: float) -> Awaitable[None] | None:
        """Before each record is dispatched: AIMD's windows; hold while unreachable."""
        if self._adaptive is not None:
            self._adaptive.on_dispatch(now)
        return self.health.gate()

    def _target_unreachable(self) -> None:
        # Read no more records; what is in flight finishes, the rest is withheld.
        self._pool.stop()

    def _target_back(self) -> None:
        # A paced run starts its schedule again from now: the records held during the
        # outage are not "late", and a catch-up burst is the last thing a target that has
        # just come back needs. (A load's stages keep their clock: a ramp is a plan in time.)
        if isinstance(self.schedule, Schedule) and self.schedule.rate > 0:
            self._pool.set_rate(self.schedule.rate)

    # --- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Drain: read no more records; what is in flight finishes and is reported (while
        the target is unreachable, records waiting for it are withheld instead)."""
        self._pool.stop()
        self.health.drain()

    @property
    def stopping(self) -> bool:
        return self._pool.stopping

    def set_rate(self, rate: float) -> None:
        """Change the paced rate from now on (adaptive control, ramps). 0 = unpaced."""
        self._pool.set_rate(rate)

    def set_credentials(self, credentials: Credentials) -> None:
        """Use ``credentials`` (AK/SK and security token, or a token) for every attempt that
        starts from now on, retries of records already in flight included; requests already
        written keep the credentials they were sent with. For temporary credentials that are
        refreshed during a long run."""
        self.credentials = credentials
        self._delivery.set_credentials(credentials)

    @property
    def aimd(self) -> AIMD | None:
        return self._adaptive.aimd if self._adaptive is not None else None

    @property
    def rate_changes(self) -> int:
        return self._adaptive.aimd.changes if self._adaptive is not None else 0

    # --- sending -------------------------------------------------------------------------

    async def run(
        self,
        items: Items | BatchSource,
        on_result: OnResult,
        *,
        done: Callable[[Item], bool] | None = None,
    ) -> None:
        """Send every record, calling ``on_result(item, result)`` for each item as it
        completes (invalid items as ``invalid``, items ``done(item)`` says were sent before
        as ``skipped``). ``on_result`` runs on the event loop; it may return an awaitable
        (backpressure), else it must not block. Returns when every item is reported or a
        drain (``stop()``) finished; raises AuthenticationFailed if repeated 401/403
        answers stopped the run, TargetUnreachable if the target refused, could not be
        resolved or was not trusted from the start, or stayed unreachable past
        ``options.outage_timeout`` (see health.py). A record the run stopped before it was
        done (withheld) is not reported: it has no result, and --resume sends it."""

        def report(item: Item, result: Result) -> Awaitable[None] | None:
            return None if result.status == WITHHELD else on_result(item, result)

        await self._pool.run(items, report, done=done)
        if self._auth.error is not None:
            raise AuthenticationFailed(f"authentication failed: {self._auth.error}")
        if self.health.error is not None:
            raise self.health.error

    async def send(
        self, items: Items | BatchSource, *, done: Callable[[Item], bool] | None = None
    ) -> AsyncIterator[Result]:
        """``run`` as an async iterator of Results, in completion order."""
        async for _, result in self.send_with_items(items, done=done):
            yield result

    async def send_with_items(
        self, items: Items | BatchSource, *, done: Callable[[Item], bool] | None = None
    ) -> AsyncIterator[tuple[Item, Result]]:
        """``run`` as an async iterator of (item, result) pairs (for a --failed file).

        ``run`` goes in a task of its own: a generator cannot own a task group (it may be
        abandoned mid-iteration). Leaving the loop early cancels that task."""
        outbox: asyncio.Queue[tuple[Item, Result] | None] = asyncio.Queue(
            maxsize=2 * self.options.concurrency
        )

        async def produce() -> None:
            try:
                await self.run(items, lambda item, result: outbox.put((item, result)), done=done)
            except asyncio.CancelledError:
                raise  # the consumer left: nobody reads a sentinel
            except BaseException:
                await outbox.put(None)  # the consumer then awaits this task: it re-raises
                raise
            await outbox.put(None)

        task = asyncio.create_task(produce(), name="bulksend-run")
        try:
            while (entry := await outbox.get()) is not None:
                yield entry
            await task  # re-raises what stopped the run
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # --- one record, for callers that hold their own connection --------------------------

    def body_of(self, record: Record) -> bytes:
        """The SendMessage request body (compact JSON)."""
        return self._delivery.body_of(record)

    async def send_one(self, conn: Connection, record: Record, intended: float = 0.0) -> Result:
        """Every attempt for one record on ``conn``, retries included; always a Result
        (status ``withheld`` if the run stopped first for an unreachable target)."""
        return await self._delivery.send_one(conn, record, intended)
