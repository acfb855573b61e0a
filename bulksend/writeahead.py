"""``--exactly-once`` for one run: bulksend's key in every record's KEYS, an *intent* in the
ledger before a record's first request leaves, and a ListMessages check of every attempt
whose answer was lost before anything is sent again (``bulksend.reconcile`` asks).

Delivery (``delivery.py``) calls one ``WriteAhead`` per run::

    fast(record)                 may the record go by the courier's callback path?
    key(record)                  bulksend's key for it (``reconcile.record_key``, salted)
    intent(record, key)          its intent line, queued into this loop turn's one ledger
                                 write: (at, the write's future); the request leaves once
                                 the future is done, so a crash never leaves a request
                                 sent without its intent in the ledger
    after(written, callback)     callback(error or None) once that write is done: one
                                 callback on the future however many records wait on it
    prepare(record)              the slow path's first step: the topic's ListMessages
                                 probed, a crashed run's outcome for the record applied
    check(record, key, at, gate) an attempt in doubt: ListMessages, after --reconcile-after
    reconciled(result, outcome)  the record's ok line, ``"reconciled": true``

and the harness (``run.py``) calls ``resume()`` before the first send of a ``--resume``:
every intent a crashed run left without an outcome is checked, all at once (one wait of
``--reconcile-after`` for them all). A record found stored gets its ok line when the input
reaches it; one not found is sent as any other, under the same key.

The check is the one in ``reconcile.py``; what its answers mean for a record:

* Found: ok, with the stored message's msg_id / queue_id / queue_offset, ``reconciled``.
* Ambiguous (several stored copies carry the key: an earlier duplicate, or KEYS reused by
  another producer): ok as well (the record is stored), naming every copy
  (``DUPLICATE_AT_SERVER``), counted in the stats; sending again would add one more.
* NotFound: nothing stored, so sending again cannot duplicate: retried as usual (even
  after a 2xx without msg_id, which alone is never retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bulksend.config import Credentials, SendOptions, Target
from bulksend.errors import ConfigError, LedgerError
from bulksend.ledger import first_run_at
from bulksend.reconcile import (
    Ambiguous,
    CheckStopped,
    Found,
    Gate,
    Intent,
    NotFound,
    Outcome,
    ReconcileOptions,
    Reconciler,
    intent_line,
    reconciled_fields,
    record_key,
)
from bulksend.record import Record
from bulksend.result import FAILED, Result, result_for
from bulksend.sinks import LineWriter, Place

__all__ = ["Figures", "WriteAhead", "check_ledger", "ledger_salt", "open_write_ahead"]

#: Called once a write is done: with its error, or None.
Written = Callable[[BaseException | None], None]


def check_ledger(place: Place | None) -> None:
    """ConfigError unless the ledger is a regular file: its intents are what a crash leaves
    to reconcile, and a ledger on stdout, a FIFO or a device cannot be read back."""
    if place is None:
        raise ConfigError(
            "--exactly-once needs --out FILE: the ledger holds each record's intent before it"
            " is sent, which is what a resume after a crash reconciles"
        )
    if not place.regular:
        raise ConfigError(
            f"--exactly-once needs --out FILE to be a regular file; {place.path} is not one,"
            " so its intents could not be read back after a crash"
        )


def ledger_salt(path: str) -> str:
    """The salt of the keys of a ledger's records: when the run that began the ledger
    started (its first run line's ``at``), so every ``--resume`` of it derives the same keys
    and a ledger started again (or another ledger) new ones."""
    at = first_run_at(path)
    return "" if at is None else str(at)


@dataclass(slots=True)
class Figures:
    """What --exactly-once did in a run, for the stats and the summary."""

    #: Records made ok by a check rather than an answer (during the run or on --resume).
    reconciled: int = 0
    #: Of those, records whose key more than one stored message carries.
    duplicates_at_server: int = 0
    #: Attempts in doubt that were checked during the run.
    in_doubt: int = 0
    #: A crashed run's intents checked before this --resume sent anything, and how many of
    #: them were found stored.
    resumed_intents: int = 0
    resumed_found: int = 0
    #: Wall seconds the --resume spent on them (the --reconcile-after wait included).
    resume_s: float = 0.0
    #: Crashed intents found stored whose input line now holds another record (the input
    #: changed; --force): the stored copy is of a record no longer in the input.
    stale: int = 0


class WriteAhead:
    """The write-ahead and the checks of one run; see the module docstring.

    ``ledger``: the run's ``--out`` writer (one write per loop turn). ``salt``: see
    ``ledger_salt``. ``intents``: identity -> intent line, from ``read_ledger`` on resume.
    ``settled``: identity -> outcome of crashed intents another process already checked
    (a distributed run's driver, for its shards), applied as ``resume``'s own are.
    """

    def __init__(
        self,
        reconciler: Reconciler,
        ledger: LineWriter,
        *,
        salt: str,
        intents: Mapping[str, Mapping[str, Any]] | None = None,
        settled: Mapping[str, Outcome] | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.figures = Figures()
        self._write = ledger.write
        self._salt = salt
        self._crashed = dict(intents or {})
        #: identity -> outcome of a crashed run's intent, until the record comes by.
        self._resumed: dict[str, Outcome] = dict(settled or {})
        self._probed: set[str] = set()
        self._probing = asyncio.Lock()
        #: The latest ledger write records wait on, and their callbacks (see ``after``).
        self._turn_of: asyncio.Future[None] | None = None
        self._turn: list[Written] = []

    # --- the hot path -----------------------------------------------------------------

    def fast(self, record: Record) -> bool:
        """Whether the record needs nothing ``prepare`` does (its topic is probed, it has an
        identity, and no crashed intent waits for it): then it may go by callback."""
        resumed = self._resumed
        return (
            record.topic in self._probed
            and record.identity is not None
            and (not resumed or record.identity not in resumed)
        )

    def key(self, record: Record) -> str:
        return record_key(record, self._salt)

    def intent(self, record: Record, key: str) -> tuple[int, asyncio.Future[None] | None]:
        """Queue the record's intent into this loop turn's ledger write: its time (ms since
        the epoch) and the future of that write (None: written already, no loop running).
        A failed earlier write raises its SinkError here."""
        at = time.time_ns() // 1_000_000
        assert record.identity is not None  # fast() or prepare() made sure
        line = intent_line(record.seq, record.identity, record.topic, key, at)
        return at, self._write(line)

    def after(self, written: asyncio.Future[None], callback: Written) -> None:
        """``callback(error or None)`` once ``written`` (a loop turn's ledger write, from
        ``intent``) is done.

        Not by ``written.add_done_callback`` alone: a done callback is scheduled only when
        the future is resolved, one loop iteration after the write. The ledger scheduled
        its write (``call_soon``) when that write's first line was queued, before
        ``intent`` returned; a ``call_soon`` made now runs after it in the same iteration
        (the loop runs ready callbacks in the order they were scheduled), so the requests
        leave in the iteration that writes their intents. One call per write, however
        many records wait on it."""
        if written is self._turn_of:
            self._turn.append(callback)
            return
        self._turn_of, self._turn = written, [callback]
        written.get_loop().call_soon(self._written, written, self._turn)

    def _written(self, written: asyncio.Future[None], callbacks: list[Written]) -> None:
        if written is self._turn_of:
            self._turn_of = None
        if not written.done():  # pragma: no cover - the write ran first (see ``after``)
            written.add_done_callback(lambda _: self._written(written, callbacks))
            return
        # Never cancelled by the ledger; if it were, the intent is not known written.
        error = asyncio.CancelledError() if written.cancelled() else written.exception()
        for callback in callbacks:
            callback(error)

    # --- the slow path ----------------------------------------------------------------

    async def prepare(self, record: Record) -> str | Result:
        """Before a record's intent, off the callback path: its key, or its final Result
        (ok, found stored by a crashed run's intent; failed, no identity). Probes the
        topic's ListMessages on its first record (ListMessagesUnavailable stops the run)."""
        if record.identity is None:
            result = result_for(record, FAILED)
            result.error_code = "NO_IDENTITY"
            result.error_msg = (
                "--exactly-once needs a record identity (records read from inputs have one;"
                " a Record built by hand needs identity set)"
            )
            return result
        if record.topic not in self._probed:
            async with self._probing:
                if record.topic not in self._probed:
                    await self.reconciler.probe(record.topic)
                    self._probed.add(record.topic)
        key = self.key(record)
        outcome = self._resumed.pop(record.identity, None) if self._resumed else None
        if outcome is None or isinstance(outcome, NotFound):
            return key  # nothing of it stored: sent under its key (the intent's, unchanged)
        if outcome.intent.key != key:
            # The stored copy is of the record that stood at this input line when the
            # crashed run sent it: this one is another (the input changed, --force).
            self.figures.stale += 1
            return key
        return self.reconciled(result_for(record, FAILED), outcome)

    async def check(self, record: Record, key: str, at: int, gate: Gate) -> Outcome | None:
        """An attempt of ``record`` (intent written at ``at`` under ``key``) ended in doubt
        just now: whether it is stored. None when the run stopped first (``gate``)."""
        assert record.identity is not None
        self.figures.in_doubt += 1
        intent = Intent(record.seq, record.identity, record.topic, key, at)
        try:
            return await self.reconciler.check(
                intent, settled_at_ms=time.time_ns() // 1_000_000, gate=gate
            )
        except CheckStopped:
            return None

    def reconciled(self, result: Result, outcome: Found | Ambiguous) -> Result:
        """``result`` (the record's last attempt) made its ok line from ``outcome``."""
        for name, value in reconciled_fields(outcome).items():
            setattr(result, name, value)
        if isinstance(outcome, Found):
            result.error_code = result.error_msg = None
        else:
            self.figures.duplicates_at_server += 1
        self.figures.reconciled += 1
        return result

    # --- resume -----------------------------------------------------------------------

    async def resume(self) -> None:
        """Check every intent a crashed run left without an outcome (``intents``), before
        anything is sent: one wait of --reconcile-after (counted from now: the crashed
        process's attempts all ended before this run began), then the queries,
        ``concurrency`` at a time. Each topic's ListMessages is probed first."""
        crashed, self._crashed = self._crashed, {}
        if not crashed:
            return
        began = time.monotonic()
        intents = []
        for obj in crashed.values():
            try:
                intents.append(Intent.from_line(obj))
            except ValueError as exc:
                raise LedgerError(
                    f"the ledger holds an intent line that is not whole: {exc}"
                ) from None
        for topic in dict.fromkeys(i.topic for i in intents):
            await self.reconciler.probe(topic)
            self._probed.add(topic)
        outcomes = await self.reconciler.reconcile_all(
            intents, settled_at_ms=time.time_ns() // 1_000_000
        )
        self._resumed.update(outcomes)
        self.figures.resumed_intents = len(outcomes)
        self.figures.resumed_found = sum(not isinstance(o, NotFound) for o in outcomes.values())
        self.figures.resume_s = time.monotonic() - began

    def stored(self) -> dict[str, Found | Ambiguous]:
        """The checked intents whose record was found stored and has not come by yet:
        what a distributed run's driver hands its shards (``settled``). Those not found
        need nothing: their records are sent as any other."""
        return {i: o for i, o in self._resumed.items() if not isinstance(o, NotFound)}

    # --- reporting --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The stats document's exactly-once figures."""
        f, c = self.figures, self.reconciler.counters
        return {
            "reconciled": f.reconciled,
            "duplicates_at_server": f.duplicates_at_server,
            "reconcile_queries": c.queries,
            "reconcile_wait_s": round(c.waited_s, 3),
            "reconcile_checks": c.checks,
            "reconcile_in_doubt": f.in_doubt,
            "reconcile_resumed_intents": f.resumed_intents,
            "reconcile_resumed_found": f.resumed_found,
            "reconcile_resume_s": round(f.resume_s, 3),
        }

    def lines(self, *, summary: bool, complete: bool) -> list[str]:
        """For stderr after the run: the figures (``summary``), and warnings (always) about
        crashed intents that found no record: ``complete`` when the whole input was read."""
        f, c = self.figures, self.reconciler.counters
        out = []
        if summary:
            out.append(
                f"exactly-once: {f.reconciled:,} reconciled (found stored after a lost answer"
                f" or a crash), {f.duplicates_at_server:,} duplicates at the server,"
                f" {c.queries:,} ListMessages queries for {c.checks:,} records in doubt"
                + (
                    # Checks wait side by side: their sum is no stretch of the run's time.
                    f", each after {c.waited_s / c.checks:.1f} s on average for the index"
                    if c.checks
                    else ""
                )
            )
        if f.duplicates_at_server:
            out.append(
                f"warning: {f.duplicates_at_server:,} records are stored more than once at the"
                " server (DUPLICATE_AT_SERVER in the ledger names the copies): their key was"
                " already stored before this run's check"
            )
        unclaimed = len(self._resumed)
        if complete and unclaimed:
            found = sum(not isinstance(o, NotFound) for o in self._resumed.values())
            out.append(
                f"warning: {unclaimed:,} records in doubt from the crashed run are no longer in"
                f" the input (it changed; --force); {found:,} of them are stored at the server"
            )
        if f.stale:
            out.append(
                f"warning: {f.stale:,} records in doubt from the crashed run were stored, but"
                " their input lines now hold other records (the input changed; --force):"
                " those were sent, and the stored copies are of records no longer in the input"
            )
        return out


@contextlib.asynccontextmanager
async def open_write_ahead(
    target: Target,
    credentials: Credentials,
    options: SendOptions,
    ledger: LineWriter,
    ledger_path: str,
    intents: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    salt: str | None = None,
    settled: Mapping[str, Outcome] | None = None,
) -> AsyncIterator[WriteAhead]:
    """The run's WriteAhead, its ListMessages session closed on leaving. Call once the
    ledger's run line is written (the salt is read from the ledger's first one, unless
    ``salt`` is given: a shard's part takes the salt of the run's merged ledger)."""
    reconcile = ReconcileOptions(after_s=options.reconcile_after)
    salt = ledger_salt(ledger_path) if salt is None else salt
    async with Reconciler(target, credentials, reconcile, tls=options.tls) as reconciler:
        yield WriteAhead(reconciler, ledger, salt=salt, intents=intents, settled=settled)
