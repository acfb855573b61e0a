"""The pool: a dispatcher paces records into a bounded queue; ``concurrency`` workers, each
with its own keep-alive connection, send them with retries and report each result the
moment it is in, in completion order. This module is the only code that reads the clock
and sleeps for a send (STYLE habit 2): the pacer, retry policy, AIMD and key lanes are pure.

Clocks: ``time.monotonic()`` for every interval (latency, pacing), never ``loop.time()``:
uvloop's loop time has millisecond resolution, which would quantise loopback latencies
to whole milliseconds and pace high rates in 1 ms steps.

Shutdown order is fixed (STYLE habit 3): stop the source -> close the work queue (one
sentinel per worker) -> workers finish what they hold and report it -> the task group of
``run()`` ends -> ``run()`` returns. ``stop()`` enters that order early (a drain);
cancelling ``run()`` (or leaving ``send()``'s loop early) cancels whatever still runs.

    async with Sender(target, credentials, options) as sender:
        async for result in sender.send(records):
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import orjson

from bulksend import __version__
from bulksend.adaptive import AIMD
from bulksend.client import Connection, Transport, make_transport
from bulksend.config import Credentials, SendOptions, Target
from bulksend.errors import AuthenticationFailed, TransportError
from bulksend.ordering import KeyLanes, key_function
from bulksend.outcome import interpret
from bulksend.pacer import Pacer, Schedule
from bulksend.record import KEYS, Invalid, Item, Record
from bulksend.result import FAILED, INVALID, OK, SKIPPED, Result
from bulksend.retry import compute_backoff, is_retryable_status, parse_retry_after
from bulksend.signing import FastSigner

USER_AGENT = f"bulksend/{__version__}"
#: Records pulled from a blocking source per hop to a worker thread.
READ_BATCH = 512
#: --ordered: records that may wait in key lanes, per unit of concurrency, before the
#: dispatcher stops reading (a hot key must not pull the whole input into memory).
LANE_WAITING_PER_WORKER = 16

Items = Iterable[Item] | AsyncIterable[Item]
#: A record on its way to a worker, with the loop time it was due (0.0 when unpaced).
Work = tuple[Record, float]
#: Called with each item and its result as it completes; may return an awaitable.
OnResult = Callable[[Item, Result], Awaitable[None] | None]


class BatchSource(Protocol):
    """A blocking source that hands out records n at a time (``bulksend.sources.Inputs``)."""

    def batches(self, n: int) -> Iterator[list[Item]]: ...


@dataclass(slots=True)
class Counters:
    """Live figures for progress hooks and adaptive control; the pool writes, others read."""

    dispatched: int = 0
    in_flight: int = 0
    retrying: int = 0
    ok: int = 0


def invalid_result(item: Invalid) -> Result:
    return Result(
        seq=item.seq,
        source=item.source,
        id=item.id,
        identity=item.identity,
        status=INVALID,
        error_code="INVALID_RECORD",
        error_msg=item.error,
    )


def skipped_result(item: Item) -> Result:
    return Result(
        seq=item.seq, source=item.source, id=item.id, identity=item.identity, status=SKIPPED
    )


class Sender:
    """Sends records to one SendMessage target. See the module docstring for the shape."""

    def __init__(
        self,
        target: Target,
        credentials: Credentials | None = None,
        options: SendOptions | None = None,
        *,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        schedule: Pacer | None = None,
    ) -> None:
        self.target = target
        self.credentials = credentials or Credentials()
        self.options = opts = options or SendOptions()
        self.counters = Counters()
        self._rng = rng or random.Random()
        self._secrets = self.credentials.secrets()
        host = target.url.split("/", 3)[2]
        fixed = {
            "Host": host,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Project-Id": target.project_id,
        }
        creds = self.credentials
        if creds.mode == "aksk" and creds.security_token:
            fixed["X-Security-Token"] = creds.security_token
        elif creds.mode == "token":
            fixed["X-Auth-Token"] = creds.auth_token or ""
        self._signer = (
            FastSigner("POST", target.path, fixed, ak=creds.ak or "", sk=creds.sk or "")
            if creds.mode == "aksk"
            else None
        )
        self._transport = transport or make_transport(
            target.url,
            fixed,
            timeout=opts.timeout,
            ssl_context=opts.tls.context() if target.url.startswith("https") else None,
        )
        self.schedule: Pacer = schedule or Schedule(opts.rate)
        self.aimd = AIMD(opts.rate, ceiling=opts.rate or float("inf")) if opts.adaptive else None
        key_of = key_function(opts.order_by)
        self._key_of = key_of
        self._lanes: KeyLanes[Work] | None = (
            KeyLanes(lambda w: key_of(w[0])) if opts.ordered else None
        )
        self._failed_keys: dict[str, int] = {}
        self._lane_space = asyncio.Event()
        self._stopping = asyncio.Event()
        self._auth_failures = 0
        self._auth_error: str | None = None
        self._t0 = 0.0
        self._window_start = 0.0
        self._window_ok = 0
        self._accepted_rate = 0.0

    async def __aenter__(self) -> Sender:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._transport.aclose()

    def stop(self) -> None:
        """Drain: read no more records; what is in flight finishes and is reported."""
        self._stopping.set()
        self._lane_space.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def set_rate(self, rate: float) -> None:
        """Change the paced rate from now on (adaptive control, ramps). 0 = unpaced."""
        elapsed = time.monotonic() - self._t0
        self.schedule.set_rate(rate, elapsed, self.counters.dispatched)

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
        answers stopped the run.

        Subtleness ahead! A worker reports its result itself, the moment the answer is in,
        with no queue between it and ``on_result``: a ledger written from ``on_result`` then
        trails the server by no more than the requests in flight, which is what bounds the
        duplicates a kill -9 can cause (a buffer here would add its size to that bound).
        """
        n = self.options.concurrency
        inbox: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=n)
        self._t0 = self._window_start = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    self._dispatch(items, done, inbox, on_result, n), name="bulksend-dispatch"
                )
                for i in range(n):
                    tg.create_task(
                        self._work(self._transport.connection(), inbox, on_result),
                        name=f"bulksend-worker-{i}",
                    )
        except BaseExceptionGroup as group:
            # One failure (say, an input read error) is the run's failure: raise it as
            # itself so the CLI's one boundary can translate it.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if self._auth_error is not None:
            raise AuthenticationFailed(f"authentication failed: {self._auth_error}")

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

    # --- dispatcher ----------------------------------------------------------------------

    @staticmethod
    async def _items(items: Items | BatchSource) -> AsyncGenerator[Item, None]:
        if hasattr(items, "batches"):
            # A blocking file source: read and parse a batch in a worker thread while the
            # loop keeps sending; one thread hop per READ_BATCH records.
            batches = items.batches(READ_BATCH)
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                for item in batch:
                    yield item
        elif isinstance(items, AsyncIterable):
            async for item in items:
                yield item
        else:
            for i, item in enumerate(items):
                yield item
                if i % READ_BATCH == READ_BATCH - 1:
                    await asyncio.sleep(0)  # let workers run while a long list is queued

    async def _dispatch(
        self,
        items: Items | BatchSource,
        done: Callable[[Item], bool] | None,
        inbox: asyncio.Queue[Work | None],
        on_result: OnResult,
        workers: int,
    ) -> None:
        monotonic = time.monotonic
        counters, schedule, lanes = self.counters, self.schedule, self._lanes
        lane_limit = LANE_WAITING_PER_WORKER * self.options.concurrency
        async with contextlib.aclosing(self._items(items)) as stream:
            async for item in stream:
                if self._stopping.is_set():
                    break
                if done is not None and done(item):
                    if (waiting := on_result(item, skipped_result(item))) is not None:
                        await waiting
                    continue
                if isinstance(item, Invalid):
                    if (waiting := on_result(item, invalid_result(item))) is not None:
                        await waiting
                    continue
                if self.aimd is not None:
                    self._adapt_tick(monotonic())
                intended = 0.0
                if counters.dispatched == 0:
                    # The schedule starts with the first record, not with run(): reading
                    # the first batch takes a while, and a clock started before it would
                    # find the first messages overdue and send them in a burst.
                    self._t0 = self._window_start = monotonic()
                if schedule.rate > 0:
                    intended = self._t0 + schedule.due_at(counters.dispatched)
                    wait = intended - monotonic()
                    if wait > 0:
                        await self._pause(wait)
                        if self._stopping.is_set():
                            break
                counters.dispatched += 1
                work = (item, intended)
                if lanes is not None:
                    while lanes.waiting >= lane_limit and not self._stopping.is_set():
                        self._lane_space.clear()
                        await self._lane_space.wait()
                    if not lanes.admit(work):
                        continue  # its key is busy: the worker holding the key sends it next
                await inbox.put(work)
        # Close the work queue: one sentinel per worker. Not in a ``finally``: when the run is
        # cancelled, nobody is left to take them and a full queue would block forever.
        for _ in range(workers):
            await inbox.put(None)

    async def _pause(self, seconds: float) -> None:
        """Sleep until a paced due time; a drain (``stop()``) cuts a long pause short. Short
        pauses, the common case at any real rate, skip the cost of a cancellable wait."""
        if seconds < 0.05:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    # --- workers -------------------------------------------------------------------------

    async def _work(
        self, conn: Connection, inbox: asyncio.Queue[Work | None], on_result: OnResult
    ) -> None:
        counters, lanes = self.counters, self._lanes
        try:
            while (work := await inbox.get()) is not None:
                next_work: Work | None = work
                while next_work is not None:
                    work = next_work
                    record = work[0]
                    counters.in_flight += 1
                    try:
                        result = await self._send_or_skip(conn, record, work[1])
                    finally:
                        counters.in_flight -= 1
                    if result.status == OK:
                        counters.ok += 1
                    if (waiting := on_result(record, result)) is not None:
                        await waiting
                    # Per-key order: this worker carries on with the key's next record.
                    next_work = lanes.release(work) if lanes is not None else None
                    if lanes is not None:
                        self._lane_space.set()
                        if self._stopping.is_set() and next_work is not None:
                            next_work = None  # drain: lane leftovers are for --resume
        finally:
            conn.close()

    async def _send_or_skip(self, conn: Connection, record: Record, intended: float) -> Result:
        if self._lanes is None:
            return await self.send_one(conn, record, intended)
        key = self._key_of(record)
        if key is not None and self.options.on_key_failure == "skip" and key in self._failed_keys:
            return Result(
                seq=record.seq,
                source=record.source,
                id=record.id,
                identity=record.identity,
                status=FAILED,
                error_code="KEY_FAILED",
                error_msg=f"not sent: record seq {self._failed_keys[key]} with the same key"
                " failed (--on-key-failure skip)",
            )
        result = await self.send_one(conn, record, intended)
        if key is not None and result.status == FAILED:
            self._failed_keys.setdefault(key, record.seq)
        return result

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

    def _headers(self, body: bytes) -> dict[str, str]:
        signer = self._signer
        if signer is None:
            return {}
        date = signer.date_for(time.time())
        return {"X-Sdk-Date": date, "Authorization": signer.authorization(body, date)}

    async def send_one(self, conn: Connection, record: Record, intended: float = 0.0) -> Result:
        """Every attempt for one record, retries and backoff included; always a Result.
        ``intended``: the loop time the pacer meant it to go (0.0 = unpaced)."""
        policy = self.options.retry
        body = self.body_of(record)
        started = time.monotonic()
        started_at = time.time()
        attempts = 0
        while True:
            attempts += 1
            retry_after: str | None = None
            try:
                resp = await conn.post(self._headers(body), body)
            except TransportError as exc:
                result = Result(
                    seq=record.seq,
                    source=record.source,
                    id=record.id,
                    identity=record.identity,
                    status=FAILED,
                    error_code=exc.code,
                    error_msg=str(exc),
                )
                retryable = True
            else:
                result = interpret(record, resp, self._secrets)
                retryable = result.status != OK and is_retryable_status(resp.status, policy)
                retry_after = resp.retry_after
                self._note_auth(resp.status, result)
                if resp.status == 429 and self.aimd is not None:
                    self._adapt_throttle(time.monotonic())
            if not retryable or attempts > policy.max_retries or self._auth_error is not None:
                break
            delay = parse_retry_after(retry_after, time.time())
            if delay is None:
                delay = compute_backoff(attempts - 1, policy, self._rng)
            self.counters.retrying += 1
            try:
                await asyncio.sleep(delay)
            finally:
                self.counters.retrying -= 1
        result.attempts = attempts
        result.latency_ms = round((time.monotonic() - started) * 1000.0, 3)
        result.started_at = int(started_at * 1000)
        result.done_at = int(time.time() * 1000)
        if intended:
            queued = max(0.0, started - intended)
            result.queue_ms = round(queued * 1000.0, 3)
            result.intended_at = int((started_at - queued) * 1000)
        return result

    def _note_auth(self, status: int, result: Result) -> None:
        if status in (401, 403):
            self._auth_failures += 1
            if self._auth_failures >= self.options.auth_failure_limit and self._auth_error is None:
                self._auth_error = (
                    f"{self._auth_failures} answers of HTTP {status} in a row"
                    f" ({result.error_code}: {result.error_msg})"
                )
                self.stop()
        else:
            self._auth_failures = 0

    # --- adaptive rate ---------------------------------------------------------------------

    def _adapt_tick(self, now: float) -> None:
        assert self.aimd is not None
        if now - self._window_start >= self.aimd.window:
            self._accepted_rate = (self.counters.ok - self._window_ok) / (now - self._window_start)
            self._window_start, self._window_ok = now, self.counters.ok
        if (rate := self.aimd.on_tick(now)) is not None:
            self.set_rate(rate)

    def _adapt_throttle(self, now: float) -> None:
        assert self.aimd is not None
        span = now - self._window_start
        accepted = self._accepted_rate
        if not accepted and span > 0.2:  # no whole window yet: use the part we have
            accepted = (self.counters.ok - self._window_ok) / span
        if (rate := self.aimd.on_throttle(now, accepted)) is not None:
            self.set_rate(rate)

    @property
    def rate_changes(self) -> int:
        return self.aimd.changes if self.aimd is not None else 0
