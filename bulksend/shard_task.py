"""What a Dask worker runs for one shard: the normal pipeline (``bulksend.run``, the harness
``send`` and ``load`` use) over the shard's own records, writing the shard's ledger part
(``merge.py`` has the layout).

``run_shard(task)`` is a plain Dask task. It runs its own event loop (uvloop) in the
worker's thread and reads the shard's records: its byte spans of the inputs when the
driver could split them (``spans.split_jsonl``), else the whole inputs filtered by
``task.plan``. It sends them at its share of the rate on its slots of the run's grid
(``shards.SlotSchedule``) and returns a ``ShardReport`` (its stats, hdrh-encoded).
Progress goes to the driver through Dask's event log (``Worker.log_event``: batched on the
worker's stream to the scheduler, no extra round trip), with the shard's live figures when
the driver serves ``/metrics`` (``metrics.post_of``: ~0.3 kB more); a stop comes as a
``distributed.Event`` the driver sets, and drains the shard as a first SIGINT drains a run.

**A shard that runs again resumes from its part.** Dask re-runs a shard whose worker was
lost; the new attempt reads the part first (cutting a torn last line), counts every result
line in it as this run's, and sends only the records that have none. A record that
finally failed in the lost attempt is not sent again in the same run (it had its retries;
``--resume`` retries it), so the part, and the merged ledger, hold one line per record.
Re-sends are then at most the requests the lost worker had in flight; with ``--exactly-once``
none, as the harness checks the intents the lost attempt left open in the part before the new
attempt sends anything (``shard_once.py`` has the driver's side). The part is written
under the harness's ledger lock; a second attempt (its lost worker may still be running)
first waits for that lock to be free.

``LoadShardTask`` is one shard of a ``load``: messages ``index, index + shards, ...`` of
the run's schedule (``shards.InterleavedPacer``), every message's line in its part.
"""

from __future__ import annotations

import io
import itertools
import os
import secrets
import time
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import orjson

from bulksend.config import Credentials, SendOptions, Target
from bulksend.errors import BulksendError, LedgerError
from bulksend.ledger import read_ledger
from bulksend.load import LoadJob, Pace, watch_pace
from bulksend.merge import RESULT_STATUSES, ShardStats, wait_for_part
from bulksend.metrics import AttemptCounts, RunFigures, post_of
from bulksend.observers import AttemptObserver
from bulksend.reconcile import Ambiguous, Found
from bulksend.record import Item
from bulksend.remote import ShardSegments
from bulksend.result import SKIPPED, Result, result_for
from bulksend.run import End, Hooks, Live, Outputs, Plan, Ticker, run
from bulksend.shards import InterleavedPacer, ShardPlan, SlotSchedule
from bulksend.sources import Inputs, Span
from bulksend.stages import RampPacer
from bulksend.stats import LoadStats, Stats
from bulksend.synthetic import Synthetic

#: Seconds between a shard's progress reports and between its looks for a stop.
REPORT_INTERVAL_S = 1.0
STOP_POLL_S = 0.5

#: A progress report: counts and gauges, msgpack-able (Dask's event log carries it).
Progress = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ShardTask:
    """Everything one shard needs; picklable (it travels to a worker). ``credentials``
    keeps its secrets out of any repr, hence out of Dask's logs."""

    index: int
    plan: ShardPlan
    #: Paths as given (every shard reads them whole and keeps its records), or this
    #: shard's spans of them (every record in a span is the shard's).
    inputs: tuple[str | Span, ...]
    fmt: str | None
    topic: str | None
    target: Target
    credentials: Credentials
    #: The run's options with ``rate`` already this shard's share.
    options: SendOptions
    #: The run's total rate (the slot grid's step) and the grid's origin, wall-clock s.
    total_rate: float
    epoch: float
    part: str
    failed_part: str | None
    #: ``--resume``: the merged ledger of earlier runs (its ok records are skipped).
    previous: str | None
    drain_timeout_s: float = 30.0
    #: The driver serves /metrics (``--metrics-addr``): post the shard's figures.
    metrics: bool = False
    #: Dask names of the progress topic and the stop event (None outside Dask).
    progress_topic: str | None = None
    stop_event: str | None = None
    #: ``--out`` in an object store (``remote.py``): the URLs under which this shard
    #: uploads its part's and failed part's segments (``part`` and ``failed_part`` then
    #: only name the local files, made in a temporary directory of the worker), and the
    #: seconds between uploads.
    segments: str | None = None
    failed_segments: str | None = None
    segment_interval_s: float = 5.0
    #: --exactly-once (``options.exactly_once``): the salt of the keys, the merged ledger's
    #: (``writeahead.ledger_salt`` of ``--out``), and the records its crashed intents were
    #: found stored by the driver's check before any shard started (identity -> outcome;
    #: at most the requests in flight when the run crashed). This shard writes the ok line
    #: of those it owns when its input reaches them.
    key_salt: str | None = None
    settled: Mapping[str, Found | Ambiguous] | None = None

    @property
    def split(self) -> bool:
        """The inputs are this shard's spans: no record in them is another shard's."""
        return any(isinstance(p, Span) for p in self.inputs)


@dataclass(slots=True)
class ShardReport:
    """What a shard hands back to the driver."""

    index: int
    stats: ShardStats
    #: Result lines an earlier attempt of this shard had written (0 on a first attempt).
    resumed: int = 0
    #: The shard stopped early because the driver asked (a drain).
    stopped: bool = False
    #: What stopped the shard (auth failure, a sink error); its stats are still good.
    error: BulksendError | None = None
    #: --exactly-once: the shard's figures (``WriteAhead.snapshot``), added up by the driver.
    exactly_once: dict[str, Any] | None = None
    #: A load shard: how its generator fared, for the driver's "behind schedule" line.
    pace: Pace | None = None


@dataclass(frozen=True, slots=True)
class LoadShardTask:
    """One shard of a ``load --workers``: every ``shards``-th message of the schedule from
    message ``index`` (``shards.InterleavedPacer``); picklable."""

    index: int
    shards: int
    #: The run's job, its target resolved (the driver's --embedded server).
    job: LoadJob
    #: Wall-clock s at which the whole schedule starts.
    epoch: float
    part: str
    progress_topic: str | None = None
    stop_event: str | None = None


def run_shard(task: ShardTask | LoadShardTask) -> ShardReport:
    """The Dask task: one shard, start to end, on its own event loop in this thread."""
    from bulksend.cli import run_async

    publish, should_stop = _dask_hooks(task)
    if isinstance(task, LoadShardTask):
        return run_async(run_load_shard_async(task, publish=publish, should_stop=should_stop))
    return run_async(run_shard_async(task, publish=publish, should_stop=should_stop))


def _dask_hooks(
    task: ShardTask | LoadShardTask,
) -> tuple[Callable[[Progress], None] | None, Callable[[float], bool] | None]:
    """Progress through the worker's event log; stop when the driver sets the stop event
    or when the run no longer wants this task (its driver went away)."""
    from distributed import Event, get_worker

    worker = get_worker()
    key = worker.get_current_task()
    topic = task.progress_topic
    event = Event(task.stop_event) if task.stop_event else None

    def publish(progress: Progress) -> None:
        if topic is not None:
            worker.log_event(topic, progress)

    def should_stop(timeout: float) -> bool:
        if event is None:
            time.sleep(timeout)
        elif event.wait(timeout):
            return True
        ts = worker.state.tasks.get(key)
        return ts is None or ts.state not in ("executing", "long-running")

    return publish, should_stop


async def run_shard_async(
    task: ShardTask,
    *,
    publish: Callable[[Progress], None] | None = None,
    should_stop: Callable[[float], bool] | None = None,
) -> ShardReport:
    """One shard on the running loop. ``publish`` gets a progress report every second;
    ``should_stop(timeout)`` is polled in a thread and must block up to ``timeout`` s."""
    stats = Stats()
    report = ShardReport(task.index, ShardStats())
    plan = Plan(
        command="send",
        target=task.target,
        credentials=task.credentials,
        options=task.options,
        # The part's run line: the driver's own, in --out, holds the run's settings.
        settings={"shard": task.index, "shards": task.plan.shards},
        schedule=SlotSchedule(task.total_rate, task.plan.shards, task.index, task.epoch),
        key_salt=task.key_salt,
        settled=task.settled,
    )
    try:
        remote = _segments(task)
    except BulksendError as exc:
        report.error = exc
        return report
    part = remote.part if remote is not None else task.part
    failed_part = remote.failed_part if remote is not None else task.failed_part
    # Always a resume of the part: a first attempt finds it empty.
    outputs = Outputs(
        out=part,
        failed=failed_part,
        resume=True,
        progress="off",
        drain_timeout_s=task.drain_timeout_s,
    )
    try:
        previous = task.previous
        if remote is not None:
            # What earlier attempts of this shard uploaded becomes the local part.
            await anyio.to_thread.run_sync(remote.download)
            if previous is not None:
                previous = await anyio.to_thread.run_sync(remote.previous, previous)
        await anyio.to_thread.run_sync(wait_for_part, part, task.drain_timeout_s + 5.0)
        earlier = _read_part(part, stats)
        report.resumed = len(earlier)
        before: Container[str] = (
            read_ledger(previous, repair=False).done_identities if previous else ()
        )
        with Inputs(task.inputs, fmt=task.fmt, default_topic=task.topic) as inputs:
            owns = None if task.split else task.plan.owner(task.index)
            items = _OwnRecords(inputs, owns, earlier, before, stats)
            hooks: Hooks = _ShardHooks(
                task.index, inputs, report, publish, should_stop, task.metrics
            )
            if remote is not None:
                hooks = remote.hooks(hooks)
            end = await run(plan, outputs, items, stats, hooks, stderr=io.StringIO())
            if end.write_ahead is not None:
                report.exactly_once = end.write_ahead.snapshot()
    except BulksendError as exc:
        report.error = exc
    finally:
        if remote is not None:
            try:
                # The shard's last lines (drained or stopped by an error: each is a result).
                await anyio.to_thread.run_sync(remote.upload)
            except BulksendError as exc:
                report.error = report.error or exc
            finally:
                remote.close()
    report.stats = ShardStats.from_stats(stats)
    return report


def _segments(task: ShardTask) -> ShardSegments | None:
    """The shard's parts as uploaded segments, when ``--out`` is in an object store."""
    if task.segments is None:
        return None
    names = (os.path.basename(task.part), task.failed_part and os.path.basename(task.failed_part))
    return ShardSegments(task.segments, task.failed_segments, names, task.segment_interval_s)


async def run_load_shard_async(
    task: LoadShardTask,
    *,
    publish: Callable[[Progress], None] | None = None,
    should_stop: Callable[[float], bool] | None = None,
) -> ShardReport:
    """One shard of a distributed load on the running loop: its messages of the schedule
    into its part (every message's line: the driver builds the run's stats, series and
    report from the merged lines). A re-run attempt sends only what the part lacks."""
    job = task.job
    stats = LoadStats()
    report = ShardReport(task.index, ShardStats())
    whole = RampPacer(job.stages)
    pacer = InterleavedPacer(whole, task.index, task.shards, task.epoch)
    plan = Plan(
        command="load",
        target=job.target,
        credentials=job.credentials,
        options=job.options,
        settings={"shard": task.index, "shards": task.shards},
        schedule=pacer,
        resumable=False,
        backpressure=False,
    )
    outputs = Outputs(
        out=task.part, resume=True, progress="off", drain_timeout_s=job.drain_timeout_s
    )
    try:
        await anyio.to_thread.run_sync(wait_for_part, task.part, job.drain_timeout_s + 5.0)
        earlier = _read_part(task.part, stats)
        report.resumed = len(earlier)
        mine = itertools.islice(
            Synthetic(job.message).records(lambda: whole.total), task.index, None, task.shards
        )
        records = (r for r in mine if r.identity not in earlier)
        metrics = job.metrics_addr is not None
        report.pace = Pace()
        hooks = _ShardHooks(task.index, None, report, publish, should_stop, metrics)
        # The Sender's clock starts at its first message: that is the shard's first due.
        if (delay := pacer.first_due() - time.time()) > 0:
            await anyio.sleep(delay)
        await run(plan, outputs, records, stats, hooks, stderr=io.StringIO())
    except BulksendError as exc:
        report.error = exc
    report.stats = ShardStats.from_stats(stats.base)
    return report


class _ShardHooks(Hooks):
    """Progress reports to the driver, and the driver's stop request as a drain."""

    def __init__(
        self,
        index: int,
        inputs: Inputs | None,
        report: ShardReport,
        publish: Callable[[Progress], None] | None,
        should_stop: Callable[[float], bool] | None,
        metrics: bool = False,
    ) -> None:
        self.index, self.inputs, self.report = index, inputs, report
        self.publish, self.should_stop = publish, should_stop
        self.live: Live | None = None
        #: This run of the shard (Dask runs it again when its worker is lost): the driver
        #: adds up what each attempt did itself (its requests) by this token.
        self.attempt = secrets.token_hex(8)
        #: With /metrics only, as in one process: counting each attempt by code costs
        #: ~0.3 µs, and a post's figures ~1 ms a second (benchmarks/bench_metrics_post.py).
        self.attempts = AttemptCounts() if metrics else None

    def attempt_observers(self) -> list[AttemptObserver]:
        return [self.attempts] if self.attempts is not None else []

    def progress(self, live: Live) -> Progress:
        stats, sender = live.stats, live.sender
        assert isinstance(stats, Stats | LoadStats)
        base = stats.base if isinstance(stats, LoadStats) else stats
        c = sender.counters
        progress: Progress = {
            "shard": self.index,
            **{k: base.counts[k] for k in ("ok", "failed", "invalid", "skipped")},
            "total": base.total,
            "in_flight": c.in_flight,
            "retrying": c.retrying,
            "rate": sender.schedule.rate,
            "bytes_read": self.inputs.bytes_read if self.inputs is not None else 0,
            "bytes_total": self.inputs.bytes_total if self.inputs is not None else None,
        }
        if self.attempts is not None:
            # Cumulative, the results read from the part included: see
            # metrics.ShardedFigures for how the driver adds attempts up.
            figures = RunFigures(stats, sender, self.attempts).figures()
            progress["metrics"] = post_of(figures, self.attempt)
        return progress

    def tickers(self, live: Live) -> list[Ticker]:
        self.live = live
        tickers: list[Ticker] = []
        if self.publish is not None:
            tickers.append(self._report)
        if self.should_stop is not None:
            tickers.append(self._watch)
        if (pace := self.report.pace) is not None:
            tickers.append(lambda: watch_pace(live, pace))
        return tickers

    async def _report(self) -> None:
        assert self.publish is not None and self.live is not None
        while True:
            await anyio.sleep(REPORT_INTERVAL_S)
            self.publish(self.progress(self.live))

    async def _watch(self) -> None:
        assert self.should_stop is not None and self.live is not None
        # should_stop blocks up to its timeout: the loop polls at that pace.
        while not await anyio.to_thread.run_sync(self.should_stop, STOP_POLL_S):
            pass
        self.report.stopped = True
        self.live.drain()

    def finish(self, snapshot: dict[str, Any], end: End) -> None:
        # The final count, so the driver's line and /metrics end on the shard's true
        # figures. It reaches the driver before the task's result does: both go on the
        # worker's one ordered stream to the scheduler (this one first), and on to the
        # driver on its one stream from there.
        if self.publish is not None and self.live is not None:
            self.publish(self.progress(self.live))


class _OwnRecords:
    """The shard's records of ``inputs`` still to send, batched as ``Sender`` reads a file
    source: not another shard's (``owns``), not finished by an earlier attempt of this
    shard (``earlier``: counted already), not ok in an earlier run (``before``: counted
    as skipped, as a single-process ``--resume`` counts them)."""

    def __init__(
        self,
        inputs: Inputs,
        owns: Callable[[Item], bool] | None,
        earlier: Container[str],
        before: Container[str],
        stats: Stats,
    ) -> None:
        self._inputs, self._owns = inputs, owns
        self._earlier, self._before, self._stats = earlier, before, stats

    def batches(self, n: int) -> Iterator[list[Item]]:
        owns, earlier, before, add = self._owns, self._earlier, self._before, self._stats.add
        for batch in self._inputs.batches(n):
            todo = []
            for item in batch:
                if owns is not None and not owns(item):
                    continue
                ident = item.identity
                if ident in earlier:
                    continue
                if ident in before:
                    add(result_for(item, SKIPPED))
                    continue
                todo.append(item)
            if todo:
                yield todo


def _read_part(path: str, stats: Stats | LoadStats) -> set[str]:
    """The identities of the records an earlier attempt finished in this part, each
    result also added to ``stats``. (The harness cuts a torn last line when it opens the
    part; such a line is no result.)"""
    found: set[str] = set()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return found
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger part {path}: {exc.strerror or exc}") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                break
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise LedgerError(f"{path}:{lineno}: not a results line") from None
            if isinstance(obj, dict) and obj.get("status") in RESULT_STATUSES:
                stats.add(Result.from_dict(obj))
                found.add(str(obj.get("identity")))
    return found
