"""One run of records through a Sender, whatever kind: ``send``, ``load`` and a shard of
either are all ``run(plan, outputs, items, stats, hooks)``, in this fixed order:

1. open every output before the first send (``Sinks``): lock the ledger, refuse to
   overwrite one, open the line files, check that ``--stats``/``--html`` can be written;
   with ``--resume``, read the ledger back; write the run line;
2. the target (or the built-in server), a Sender, and one task group: the Sender's run,
   the signal listener, the hooks' tickers (progress, live series);
3. close the line files, then the stats document, the HTML report and the summary on
   stderr — also after an interrupt or an error, so an interrupted run still says what it
   did.

What differs between kinds comes in as values: ``Plan`` (what to send and how), ``Outputs``
(where it goes) and ``Hooks`` (observers, tickers, what to add to the stats and the
summary). A BulksendError that stops the run is raised once everything is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import anyio
import anyio.to_thread
import orjson

from bulksend.config import Credentials, SendOptions, Target
from bulksend.credentials import CredentialRefresher
from bulksend.errors import BulksendError, ConfigError, LedgerError, SinkError
from bulksend.health import TargetHealth
from bulksend.html import RunReport, render_html
from bulksend.interrupts import Interrupts
from bulksend.ledger import (
    RUN_LINE_START,
    check_inputs,
    check_target,
    read_ledger,
    write_fingerprints,
)
from bulksend.merge import SHARD_GRACE_S, settle_parts
from bulksend.pacer import Pacer
from bulksend.record import Item
from bulksend.result import FAILED, INVALID, SKIPPED, Result
from bulksend.sender import BatchSource, Items, Sender
from bulksend.sinks import (
    STDOUT,
    DocumentWriter,
    FailedWriter,
    LedgerLock,
    LineWriter,
    Place,
    ResultsWriter,
    json_document,
    locate,
)
from bulksend.stats import LoadStats, Stats
from bulksend.summary import summary_text
from bulksend.writeahead import WriteAhead, check_ledger, open_write_ahead

if TYPE_CHECKING:
    from bulksend.metrics import AttemptCounts, MetricsEndpoint
    from bulksend.observers import AttemptObserver

PROGRESS_MODES = ("auto", "bar", "lines", "off")


@dataclass(frozen=True)
class Outputs:
    """Where a run's results go, and how it shows itself. Every path may be ``-``
    (stdout, for one of them at most)."""

    #: The results ledger: one JSON line per record, the run line first.
    out: str | None = None
    #: The stats JSON document, written at the end.
    stats: str | None = None
    #: Failed and invalid records in replayable input form (send).
    failed: str | None = None
    #: A self-contained HTML report, written at the end.
    html: str | None = None
    #: One JSON line per second as the run goes (load).
    timeseries: str | None = None
    #: Skip what the ``out`` ledger holds as ok; append to it (and to ``failed``).
    resume: bool = False
    #: Start a non-empty ``out`` ledger again (without it such a ledger is refused).
    overwrite: bool = False
    #: "auto" (a bar on a terminal, a line every ``progress_interval_s`` elsewhere), "bar",
    #: "lines", "off" (no progress and no summary).
    progress: str = "auto"
    progress_interval_s: float = 5.0
    #: After a first SIGINT/SIGTERM, seconds the requests in flight get to finish.
    drain_timeout_s: float = 30.0
    #: ``HOST:PORT`` to serve Prometheus text at ``/metrics`` on while the run goes.
    metrics_addr: str | None = None

    def __post_init__(self) -> None:
        if self.progress not in PROGRESS_MODES:
            raise ConfigError(f"progress must be one of {', '.join(PROGRESS_MODES)}")
        if not (math.isfinite(self.progress_interval_s) and self.progress_interval_s > 0):
            raise ConfigError("--progress-interval must be a number of seconds above 0")
        if not (math.isfinite(self.drain_timeout_s) and self.drain_timeout_s >= 0):
            raise ConfigError("--drain-timeout must be a number of seconds, 0 or more")
        if self.resume and not self.out:
            raise ConfigError("--resume needs --out: the results ledger of the run to resume")
        if self.resume and self.out == STDOUT:
            raise ConfigError("--resume needs --out FILE: a ledger on stdout cannot be read back")
        if self.resume and self.overwrite:
            raise ConfigError("give --resume (continue the ledger) or --overwrite, not both")
        to_stdout = [flag for flag, path in self.paths() if path == STDOUT]
        if len(to_stdout) > 1:
            raise ConfigError(f"only one output can go to stdout (-): {' and '.join(to_stdout)}")

    def paths(self) -> list[tuple[str, str]]:
        """(flag, path) of every output given."""
        given = (
            ("--out", self.out),
            ("--failed", self.failed),
            ("--timeseries", self.timeseries),
            ("--stats", self.stats),
            ("--html", self.html),
        )
        return [(flag, path) for flag, path in given if path]


@dataclass(frozen=True)
class Plan:
    """What a run sends and how: everything but the records, their stats and the outputs."""

    #: The kind of run, as its run line says: "send" or "load".
    command: str
    #: None: the built-in server, started for the run (--embedded).
    target: Target | None
    credentials: Credentials = field(default_factory=Credentials)
    options: SendOptions = field(default_factory=SendOptions)
    #: The run's settings for its run line and its HTML report: JSON values, no secret.
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: The engine of the --embedded target (a given ``target`` has its own).
    engine: str = "rocketmq"
    schedule: Pacer | None = None
    #: Input files: never an output; their fingerprints are kept beside the ledger.
    inputs: tuple[str, ...] = ()
    #: --resume over inputs that changed since the ledger began.
    force: bool = False
    #: Whether ``--resume`` can continue this kind of run (a refusal to overwrite says so).
    resumable: bool = True
    #: A worker waits for its ledger line to be written before its next request (send):
    #: after a kill -9 the records the ledger misses are at most those in flight. A load's
    #: ledger is no --resume memory, and a worker waiting on it would send late.
    backpressure: bool = True
    #: Renews temporary credentials (ECS metadata) during the run: run beside the Sender,
    #: each renewal handed to ``Sender.set_credentials``.
    refresher: CredentialRefresher | None = field(default=None, compare=False)
    #: --exactly-once in a shard of a distributed run: the salt of the run's merged ledger
    #: (None: this ledger's own), so keys match across parts and resumes, and what the
    #: driver's check of that ledger's crashed intents found stored (identity -> outcome).
    key_salt: str | None = None
    settled: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def title(self) -> str:
        return f"bulksend {self.command}"


class RunStats(Protocol):
    """What the harness needs of a run's stats (``Stats``, ``LoadStats``)."""

    rate_changes: int

    @property
    def total(self) -> int: ...

    def add(self, result: Result) -> None: ...

    def finish(self) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


@dataclass
class Live:
    """What a ticker sees of a running run."""

    plan: Plan
    outputs: Outputs
    sender: Sender
    stats: RunStats
    err: TextIO
    interrupts: Interrupts
    #: The --timeseries file, opened before the first send, for the hook that writes it.
    timeseries: LineWriter | None = None

    def drain(self) -> None:
        """Stop the run as a first SIGINT does (e.g. a threshold failed)."""
        self.interrupts.drain()


@dataclass
class End:
    """How a run ended."""

    stats: RunStats
    #: A signal stopped it (exit 130).
    interrupted: bool = False
    #: It stopped before its end: a signal, a hook's drain, or an error that drained it.
    stopped_early: bool = False
    #: Requests in flight were abandoned without a result (drain timeout, second signal).
    cut_off: bool = False
    #: What stopped the run, raised by ``run`` once everything is written.
    error: BulksendError | None = None
    #: --resume: which records the ledger already held as ok (None: none).
    done: Callable[[Item], bool] | None = None
    #: The target's outages, when it had any: ``outages``, ``downtime_s``, ``probes``.
    outages: dict[str, Any] | None = None
    #: --exactly-once: the run's intents and checks (their figures go in the stats).
    write_ahead: WriteAhead | None = None


Ticker = Callable[[], Coroutine[Any, Any, None]]


class Hooks:
    """What one kind of run adds to the harness; every method has a do-nothing default."""

    def observers(self) -> list[Callable[[Result], None]]:
        """Called with every Result, on the event loop: they must not block."""
        return []

    def tickers(self, live: Live) -> list[Ticker]:
        """Coroutines run beside the Sender until it ends (progress, live series)."""
        return []

    def attempt_observers(self) -> list[AttemptObserver]:
        """Given to the Sender: called with every attempt's Result (a shard counts its
        requests by code for the driver's /metrics); they must be quick."""
        return []

    def finish(self, snapshot: dict[str, Any], end: End) -> None:
        """The sends are over: add to the stats document before it is written; the line
        files are still open."""

    async def epilogue(self, snapshot: dict[str, Any], end: End) -> list[str]:
        """Lines for stderr after the summary (printed even with progress off)."""
        return []


async def run(
    plan: Plan,
    outputs: Outputs,
    items: Items | BatchSource,
    stats: RunStats,
    hooks: Hooks | None = None,
    *,
    stderr: TextIO | None = None,
) -> End:
    """Run ``items`` through a Sender to the end (or to a drain); write every output;
    how it ended. Raises the BulksendError that stopped it, once everything is written."""
    err = stderr or sys.stderr
    hooks = hooks or Hooks()
    end = End(stats)
    # Bound before the outputs are opened: a port in use refuses the run untouched.
    endpoint = _bind_metrics(outputs.metrics_addr) if outputs.metrics_addr else None
    try:
        sinks = Sinks(outputs, plan)
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        raise
    report = RunReport() if outputs.html else None
    attempts = _attempt_counts() if endpoint is not None else None
    try:
        end.done = await sinks.begin(plan, outputs, err)
        if endpoint is not None and outputs.progress != "off":
            err.write(f"bulksend: metrics at {endpoint.url}\n")
        observers = [*hooks.observers(), *([report.add] if report is not None else [])]
        watching = hooks.attempt_observers()
        async with (
            _target(plan) as (target, creds),
            _write_ahead(plan, sinks, target, creds) as write_ahead,
            Sender(
                target,
                creds,
                plan.options,
                schedule=plan.schedule,
                observers=[*([attempts] if attempts is not None else ()), *watching],
                write_ahead=write_ahead,
            ) as sender,
        ):
            end.write_ahead = write_ahead
            services = _services(plan, sender, stats, err, endpoint, attempts)
            await _pump(
                plan, outputs, sender, items, stats, observers, hooks, sinks, end, err, services
            )
    except BulksendError as exc:
        end.error = end.error or exc
    except asyncio.CancelledError:
        # Cancelled from outside: a SIGINT that came before the run's own handlers were
        # in (asyncio's runner then cancels the main task), or a library caller. What was
        # written is summed up as an interrupted run's.
        end.interrupted = True
        raise
    finally:
        if endpoint is not None:
            endpoint.close()
        await _finish(plan, outputs, stats, hooks, sinks, report, end, err)
    if end.error is not None:
        raise end.error
    return end


def _bind_metrics(addr: str) -> MetricsEndpoint:
    # prometheus_client (and aiohttp's server) are imported only by runs that serve metrics.
    from bulksend.metrics import MetricsEndpoint

    return MetricsEndpoint.bind(addr)


def _attempt_counts() -> AttemptCounts:
    from bulksend.metrics import AttemptCounts

    return AttemptCounts()


def _services(
    plan: Plan,
    sender: Sender,
    stats: RunStats,
    err: TextIO,
    endpoint: MetricsEndpoint | None,
    attempts: AttemptCounts | None,
) -> list[Ticker]:
    """What runs beside the Sender whatever the kind of run: /metrics, the credentials'
    renewal."""
    services: list[Ticker] = []
    if endpoint is not None and attempts is not None:
        from bulksend.metrics import RunFigures

        assert isinstance(stats, Stats | LoadStats)
        figures = RunFigures(stats, sender, attempts)
        services.append(lambda: endpoint.serve(figures))
    refresher = plan.refresher
    if refresher is not None:

        def warn(line: str) -> None:
            # On a terminal the progress line is redrawn in place: clear it first.
            err.write(("\r\x1b[2K" if err.isatty() else "") + f"bulksend: warning: {line}\n")
            err.flush()

        services.append(lambda: refresher.run(sender.set_credentials, on_error=warn))
    return services


def outage_figures(health: TargetHealth) -> dict[str, Any] | None:
    """The ``--stats`` keys of the target's outages (None: it had none). An outage still
    going on counts up to now."""
    if not health.outages:
        return None
    downtime = health.downtime_s
    if health.down and health.since is not None:
        downtime += max(0.0, time.time() - health.since)
    return {"outages": health.outages, "downtime_s": round(downtime, 3), "probes": health.probes}


def _write_ahead(
    plan: Plan, sinks: Sinks, target: Target, creds: Credentials
) -> AbstractAsyncContextManager[WriteAhead | None]:
    """--exactly-once's WriteAhead (None without it), on the ledger Sinks checked."""
    if not plan.options.exactly_once:
        return contextlib.nullcontext(None)
    assert sinks.ledger is not None and sinks.ledger_place is not None
    return open_write_ahead(
        target,
        creds,
        plan.options,
        sinks.ledger,
        sinks.ledger_place.real,
        sinks.intents,
        salt=plan.key_salt,
        settled=plan.settled,
    )


def _target(plan: Plan) -> AbstractAsyncContextManager[tuple[Target, Credentials]]:
    if plan.target is not None:
        return contextlib.nullcontext((plan.target, plan.credentials))
    # The server's modules are imported only for --embedded.
    from bulksend.server.embedded import target_or_embedded

    return target_or_embedded(None, plan.credentials, plan.engine)


async def _pump(
    plan: Plan,
    outputs: Outputs,
    sender: Sender,
    items: Items | BatchSource,
    stats: RunStats,
    observers: list[Callable[[Result], None]],
    hooks: Hooks,
    sinks: Sinks,
    end: End,
    err: TextIO,
    services: list[Ticker],
) -> None:
    ledger, failed = sinks.ledger, sinks.failed
    backpressure = plan.backpressure

    def on_result(item: Item, result: Result) -> Awaitable[None] | None:
        stats.add(result)
        for observe in observers:
            observe(result)
        if failed is not None and result.status in (FAILED, INVALID):
            failed.add(item, result)
        # A skipped record's line is already in the ledger (its earlier ok): it is
        # counted, not written again, so the ledger holds each ok exactly once.
        if ledger is None or result.status == SKIPPED:
            return None
        written = ledger.add(result)
        # The worker waits for its line (all lines of a loop turn go in one write); a
        # failed write fails this future, and the worker stops with the SinkError.
        return written if backpressure and result.attempts else None

    interrupts = Interrupts(sender, outputs.drain_timeout_s)
    live = Live(plan, outputs, sender, stats, err, interrupts, sinks.timeseries)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(interrupts.listen)
            for ticker in [*services, *hooks.tickers(live)]:
                tg.start_soon(ticker)
            with interrupts.scope:
                task = asyncio.current_task()
                requests = task.cancelling() if task is not None else 0
                try:
                    if end.write_ahead is not None:
                        await end.write_ahead.resume()  # before anything new is sent
                    await sender.run(items, on_result, done=end.done)
                except BulksendError as exc:
                    # Kept, not raised through the task group: the CLI's boundary
                    # expects the error itself, not an ExceptionGroup around it.
                    end.error = exc
                except BaseExceptionGroup as group:
                    end.error = _one_error(group)
                if end.error is not None and task is not None:
                    _drop_stray_cancel(task, requests)
            tg.cancel_scope.cancel()
    finally:
        end.interrupted = interrupts.interrupted
        end.cut_off = interrupts.cut_off
        end.stopped_early = interrupts.draining or sender.stopping or end.error is not None
        end.outages = outage_figures(sender.health)
        stats.rate_changes = sender.rate_changes


def _drop_stray_cancel(task: asyncio.Task[Any], requests: int) -> None:
    """Python before 3.12.3 (python/cpython#116720): an asyncio.TaskGroup whose child
    fails while it waits in ``__aexit__`` (a worker stopped by a failed ledger write)
    leaves its own cancel request on the parent task. anyio would take that stray request
    for a cancellation from outside and end the run with CancelledError."""
    while task.cancelling() > requests:
        task.uncancel()


def _one_error(group: BaseExceptionGroup[BaseException]) -> BulksendError:
    """Several workers stopped by one cause (each waited on the same failed ledger
    write): that cause. Anything else is not ours to translate."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    if leaves and all(isinstance(e, BulksendError) for e in leaves):
        first = leaves[0]
        assert isinstance(first, BulksendError)
        return first
    raise group


async def _finish(
    plan: Plan,
    outputs: Outputs,
    stats: RunStats,
    hooks: Hooks,
    sinks: Sinks,
    report: RunReport | None,
    end: End,
    err: TextIO,
) -> None:
    """Everything after the sends; a failure to write is kept in ``end.error`` (the first
    one wins) and the other outputs are still written."""

    def keep(exc: BulksendError) -> None:
        if end.error is None:
            end.error = exc

    stats.finish()
    snapshot = stats.snapshot()
    if end.outages:
        snapshot.update(end.outages)
    if end.write_ahead is not None:
        snapshot.update(end.write_ahead.snapshot())
    if sinks.begun:
        try:
            hooks.finish(snapshot, end)  # may still write to a line file (the last seconds)
        except BulksendError as exc:
            keep(exc)
    try:
        sinks.close()
    except BulksendError as exc:
        keep(exc)
    if not sinks.begun:
        return  # refused before the run: nothing was sent, nothing to report
    if sinks.stats is not None:
        try:
            sinks.stats.write(json_document(snapshot))
        except BulksendError as exc:
            keep(exc)
    if sinks.html is not None and report is not None:
        page = await anyio.to_thread.run_sync(
            lambda: render_html(report, snapshot, title=plan.title, settings=plan.settings)
        )
        try:
            sinks.html.write(page.encode())
        except BulksendError as exc:
            keep(exc)
    if outputs.progress != "off":
        title = plan.title + (" (interrupted)" if end.interrupted else "")
        err.write(summary_text(snapshot, title=title) + "\n")
    if end.write_ahead is not None:
        complete = not end.stopped_early
        for line in end.write_ahead.lines(summary=outputs.progress != "off", complete=complete):
            err.write(line + "\n")
    for line in await hooks.epilogue(snapshot, end):
        err.write(line + "\n")
    err.flush()


class Sinks:
    """Every output of a run, opened (or checked, for the documents written at the end)
    before the first send. A refusal undoes what it made: no empty ledger is left behind."""

    def __init__(self, outputs: Outputs, plan: Plan) -> None:
        self.ledger: ResultsWriter | None = None
        self.ledger_place: Place | None = None
        self.lock: LedgerLock | None = None
        self.failed: FailedWriter | None = None
        self.timeseries: LineWriter | None = None
        self.stats: DocumentWriter | None = None
        self.html: DocumentWriter | None = None
        #: --resume: intents no result followed (identity -> intent line), for --exactly-once.
        self.intents: dict[str, dict[str, Any]] = {}
        #: Lines for stderr from opening the outputs, written by ``begin``.
        self.said: list[str] = []
        #: The run line is written: from here on the run has outputs to finish.
        self.begun = False
        self._created: list[str] = []
        try:
            for flag, path in outputs.paths():
                if "://" in path:
                    # Only a --workers/--cluster send writes an object store URL (from its
                    # shards' uploaded segments, bulksend.remote): a ledger here is
                    # appended, locked and cut back, which an object does not allow.
                    raise ConfigError(
                        f"{flag} {path}: outputs go to an object store only from send"
                        " --workers/--cluster with --out there too (one process writes files)"
                    )
            places = {flag: locate(path) for flag, path in outputs.paths()}
            if plan.options.exactly_once:
                check_ledger(places.get("--out"))
            _check_apart(places, plan.inputs)
            if outputs.out:
                self._open_ledger(outputs, plan, places["--out"])
            if outputs.failed:
                self.failed = FailedWriter(self._making(places["--failed"]), append=outputs.resume)
            if outputs.timeseries:
                self.timeseries = LineWriter(self._making(places["--timeseries"]))
            if outputs.stats:
                self.stats = DocumentWriter(outputs.stats)
            if outputs.html:
                self.html = DocumentWriter(outputs.html)
        except BaseException:
            with contextlib.suppress(BulksendError):
                self.close()
            for path in self._created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise

    def _making(self, place: Place) -> str:
        """The path to open; remembered for undoing when it does not exist yet."""
        if place.regular and not place.ino:
            self._created.append(place.real)
        return place.path

    def _open_ledger(self, outputs: Outputs, plan: Plan, place: Place) -> None:
        path = place.path
        if place.kind == "stdout":
            self.ledger = ResultsWriter(STDOUT)
            return
        if outputs.resume and not place.regular:
            raise ConfigError(f"--resume needs the ledger in a regular file; {path} is not one")
        if not place.regular:
            # A FIFO or a device is written in place: no lock, no sidecar beside it.
            self.ledger = ResultsWriter(path, append=True)
            return
        # Opened before it is locked and without truncating: a run refused below has not
        # touched the ledger of the run that holds it.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._making(place)
        try:
            fd = os.open(place.real, flags, 0o644)
        except OSError as exc:
            raise SinkError(f"cannot open {path} for writing: {exc.strerror or exc}") from None
        try:
            self.lock = LedgerLock(place, fd)
            size = os.fstat(fd).st_size
            fresh = not outputs.resume
            if size and fresh and not outputs.overwrite and not _only_run_lines(place.real, size):
                raise LedgerError(_refusal(path, size, plan.resumable))
            other = _first_command(place.real) if size and outputs.resume else None
            if other is not None and other != plan.command:
                # A load's synthetic lines and a send's records would read as one run.
                raise LedgerError(
                    f"{path} was written by bulksend {other}: bulksend {plan.command} cannot"
                    " resume it; give another --out, or --overwrite to start it again"
                )
            # Parts of a distributed run on this ledger are its results too, whether
            # this run is distributed or not. Settled before the ledger is cut: a
            # refusal here leaves it as it was.
            settle_parts(
                path,
                outputs.failed if outputs.failed != STDOUT else None,
                resume=outputs.resume,
                overwrite=outputs.overwrite,
                resumable=plan.resumable,
                wait_s=outputs.drain_timeout_s + SHARD_GRACE_S,
                say=self.said.append,
            )
            if size and fresh:
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        self.ledger = ResultsWriter(path, fd=fd)
        self.ledger_place = place

    async def begin(
        self, plan: Plan, outputs: Outputs, err: TextIO
    ) -> Callable[[Item], bool] | None:
        """With --resume, read the ledger back (what it holds as ok); keep the inputs'
        fingerprints beside it; write the run line. Which records are done, if any."""
        done = None
        prints: dict[str, str] | None = None
        if outputs.progress != "off":
            err.writelines(f"{line}\n" for line in self.said)
        place = self.ledger_place
        if place is not None:
            if outputs.resume:
                state = await anyio.to_thread.run_sync(read_ledger, place.real)
                check_inputs(place.real, plan.inputs, force=plan.force, state=state)
                if not plan.force:
                    check_target(place.path, plan.settings, state.runs)
                done = state.done if state.done_identities else None
                self.intents = state.intents
                if state.intents and not plan.options.exactly_once:
                    err.write(
                        f"bulksend: warning: {place.path} holds {len(state.intents):,} records"
                        " in doubt from an --exactly-once run that crashed; without"
                        " --exactly-once they are sent again, and the server may then hold"
                        " them twice\n"
                    )
                if state.torn_bytes and outputs.progress != "off":
                    err.write(
                        f"bulksend: ignored a torn last line ({state.torn_bytes} bytes) in {place.path}\n"
                    )
            if plan.inputs:
                prints = write_fingerprints(place.real, plan.inputs)
        if self.ledger is not None:
            self.ledger.write_now(run_line(plan, prints))
        self.begun = True
        return done

    def close(self) -> None:
        """Write what is pending and close every line file; release the lock. Raises the
        first write error once all are closed."""
        first: BulksendError | None = None
        for sink in (self.ledger, self.failed, self.timeseries):
            if sink is None:
                continue
            try:
                sink.close()
            except BulksendError as exc:
                first = first or exc
        if self.lock is not None:
            self.lock.release()
        if first is not None:
            raise first


def _only_run_lines(path: str, size: int) -> bool:
    """Whether the ledger holds nothing but run lines: runs that stopped before their
    first send (a cluster not reached, a refused start). Such a ledger is no one's
    results, and a new run may start it again. Only a small one is read."""
    if size > 1 << 20:
        return False
    try:
        with open(path, "rb") as fh:
            data = fh.read(size)
    except OSError:
        return False  # unread, it is kept: the refusal says what to do
    return all(line.startswith(RUN_LINE_START) for line in data.splitlines() if line.strip())


def _first_command(path: str) -> str | None:
    """The command of the ledger's first run line (``send``, ``load``), or None when its
    first line is none (a ledger from before run lines) or cannot be read."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(1 << 20)
    except OSError:
        return None
    if not first.startswith(RUN_LINE_START):
        return None
    try:
        command = orjson.loads(first).get("command")
    except orjson.JSONDecodeError:
        return None
    return command if isinstance(command, str) else None


def _refusal(path: str, size: int, resumable: bool) -> str:
    fix = "add --resume to continue it, or --overwrite" if resumable else "add --overwrite"
    return f"{path} already holds results ({size:,} bytes): {fix} to start again"


def _check_apart(places: Mapping[str, Place], inputs: tuple[str, ...]) -> None:
    """No two outputs in one file, and no output over an input."""
    seen: dict[tuple[int, int] | str, str] = {}
    for flag, place in places.items():
        key: tuple[int, int] | str = (place.dev, place.ino) if place.ino else place.real
        if place.kind == "stdout":
            continue
        if key in seen:
            raise ConfigError(f"{seen[key]} and {flag} are the same file: {place.path}")
        seen[key] = flag
    for path in inputs:
        if path == STDOUT:
            continue
        with contextlib.suppress(OSError):
            info = os.stat(path)
            for flag, place in places.items():
                if place.ino and (place.dev, place.ino) == (info.st_dev, info.st_ino):
                    raise ConfigError(
                        f"{flag} {place.path} is also an input: writing it would destroy it"
                    )


def run_line(plan: Plan, fingerprints: Mapping[str, str] | None = None) -> bytes:
    """The ledger's first line for this run: when, what kind, its settings (no secret),
    and its inputs' fingerprints (``ledger.fingerprint``, by canonical path), so that the
    ledger alone says what it was written from."""
    line: dict[str, Any] = {
        "status": "run",
        "at": time.time_ns() // 1_000_000,
        "command": plan.command,
        "settings": plan.settings,
    }
    if fingerprints:
        line["fingerprints"] = fingerprints
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
