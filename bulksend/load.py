"""A whole ``bulksend load`` run as one library call: a schedule -> synthetic messages ->
Sender -> ledger, stats, per-second series, thresholds, HTML report.

An open model, as wrk2 and k6's arrival-rate executors have it: every message has an
intended send time from the schedule (``RampPacer``) whatever the server does. When all
``max_in_flight`` workers are busy the sender keeps the schedule and sends late; nothing is
dropped or re-timed, and latency is measured from the intended time (corrected) beside
the actual send (service) — see ``bulksend.report.LoadStats``.

``run_load(job)`` is what ``bulksend load`` calls. Progress, the live series and the
threshold windows are hooks around the run, never inside a worker (STYLE habit 9).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson

from bulksend.config import Credentials, RetryPolicy, SendOptions, Target
from bulksend.errors import BulksendError
from bulksend.html import RunReport, write_html_report
from bulksend.interrupts import Interrupts
from bulksend.job import target_or_embedded
from bulksend.record import Item, Record
from bulksend.report import LoadStats, summary_text
from bulksend.result import FAILED, Result
from bulksend.sender import Sender
from bulksend.sinks import LineWriter, ResultsWriter, write_json
from bulksend.stages import RampPacer, Stages
from bulksend.synthetic import MessageSpec, Synthetic
from bulksend.thresholds import Threshold, Verdict, check, figures_of
from bulksend.timeseries import Bucket, Row, Timeseries

#: Exit code when a threshold fails (k6's).
EXIT_THRESHOLD = 99
#: Seconds between the live hooks' looks at the run (series lines, threshold windows).
TICK_S = 0.25
#: How far (ms) a message's intended time predicted from its neighbour's may be off: the
#: ledger's times are whole ms, taken from two clocks a few µs apart.
_PREDICTION_SLACK_MS = 2


def default_options() -> SendOptions:
    """A load's sender: 256 in flight, no retries (a retry would hold a worker and blur
    the latency of the schedule being measured)."""
    return SendOptions(concurrency=256, retry=RetryPolicy(max_retries=0))


@dataclass(frozen=True)
class LoadJob:
    """Everything one ``bulksend load`` run needs. ``target`` None means --embedded."""

    target: Target | None
    stages: Stages
    credentials: Credentials = field(default_factory=Credentials)
    #: ``concurrency`` is --max-in-flight.
    options: SendOptions = field(default_factory=default_options)
    message: MessageSpec = field(default_factory=MessageSpec)
    thresholds: tuple[Threshold, ...] = ()
    #: Stop (a drain) at the first whole second in which a threshold fails.
    abort_on_fail: bool = False
    out: str | None = None
    stats: str | None = None
    html: str | None = None
    timeseries: str | None = None
    #: "auto": the live line in place on a terminal, a line every progress_interval_s
    #: elsewhere; "off": nothing but threshold verdicts.
    progress: str = "auto"
    progress_interval_s: float = 5.0
    drain_timeout_s: float = 30.0

    def settings(self) -> dict[str, Any]:
        """The run's settings as the HTML report shows them (no secret in any)."""
        o = self.options
        return {
            "target": self.target.url if self.target is not None else "embedded server",
            "schedule": ",".join(f"{t:g}s:{r:g}" for t, r in self.stages.points),
            "messages scheduled": self.stages.total,
            "max in flight": o.concurrency,
            "topics": self.message.topics,
            "body": (
                f"template ({len(self.message.template)} chars)"
                if self.message.template is not None
                else f"{self.message.body_size} bytes"
            ),
            "distinct keys": self.message.keys or "none",
            "timeout per attempt (s)": o.timeout,
            "max retries": o.retry.max_retries,
            "auth": self.credentials.mode,
            "thresholds": [t.text for t in self.thresholds] or "none",
            "abort on fail": self.abort_on_fail,
        }


@dataclass
class LoadOutcome:
    stats: LoadStats
    verdicts: list[Verdict] = field(default_factory=list)
    interrupted: bool = False
    #: The window (epoch second) and verdicts that stopped the run (--abort-on-fail).
    aborted_at: int | None = None
    aborted_by: list[Verdict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """130 interrupted; 99 a threshold failed (at the end or in a window); 1 some
        message failed; else 0."""
        if self.interrupted:
            return 130
        if self.aborted_by or not all(v.passed for v in self.verdicts):
            return EXIT_THRESHOLD
        return 0 if self.stats.base.counts[FAILED] == 0 else 1


class _Live:
    """The live per-second series: which seconds are final, the --timeseries file, and the
    --abort-on-fail windows.

    Subtleness ahead! A second's figures are final only when no answer still to come can
    fall in it. Messages are dispatched in seq order at non-decreasing intended times, and
    a message is sent and answered after its intended time; so once every message up to
    seq ``n - 1`` is answered and message ``n`` is intended at ``T`` or later, every second
    ending at or before ``T`` is complete. ``n`` is the lowest seq not yet answered; its
    intended time is predicted from message ``n - 1``'s (known) plus the schedule's gap.
    """

    def __init__(self, job: LoadJob, pacer: RampPacer, writer: LineWriter | None) -> None:
        self.series = Timeseries()
        self.pacer = pacer
        self.writer = writer
        self.thresholds = job.thresholds if job.abort_on_fail else ()
        self.next_seq = 0
        self._waiting: dict[int, int] = {}  # answered seqs above next_seq -> intended_at
        self._last_intended = 0
        self.first_intended: int | None = None
        self.last_row: Row | None = None
        self.failing: tuple[int, list[Verdict]] | None = None

    def add(self, result: Result) -> None:
        self.series.add(result)
        intended = result.intended_at if result.intended_at is not None else 0
        if result.seq == 0:
            self.first_intended = intended
        if result.seq != self.next_seq:
            self._waiting[result.seq] = intended
            return
        self._last_intended = intended
        self.next_seq += 1
        while self.next_seq in self._waiting:
            self._last_intended = self._waiting.pop(self.next_seq)
            self.next_seq += 1

    def final_before_ms(self, now_ms: int) -> int | None:
        """Epoch ms before which every second is complete (None: none is yet)."""
        n = self.next_seq
        if n == 0:
            return None
        gap_s = self.pacer.due_at(n) - self.pacer.due_at(n - 1)
        if math.isinf(gap_s):
            return now_ms  # every scheduled message is answered
        predicted = self._last_intended + round(gap_s * 1000.0)
        return min(now_ms, predicted - _PREDICTION_SLACK_MS)

    def tick(self, now_ms: int) -> None:
        before = self.final_before_ms(now_ms)
        if before is not None:
            self._emit(self.series.pop(before), judge=True)

    def flush(self) -> None:
        """The run is over: every remaining second, as it stands."""
        self._emit(self.series.pop(None), judge=False)

    def _whole(self, row: Row) -> bool:
        """Whether ``row`` lies wholly inside the schedule: the first and the last second
        hold only a fraction of a second's sends, and would fail a rate threshold."""
        if self.first_intended is None:
            return False
        end = self.first_intended + self.pacer.duration * 1000.0
        return self.first_intended <= row.t * 1000 and (row.t + row.width) * 1000 <= end

    def recent(self, now_s: int) -> Bucket | None:
        """The last whole second's answers so far (a peek: it may not be final)."""
        t = now_s - 1
        if self.last_row is not None and self.last_row.t == t:
            return self.last_row.bucket
        return self.series.get(t)

    def _emit(self, rows: list[Row], *, judge: bool) -> None:
        for row in rows:
            self.last_row = row
            if self.writer is not None:
                self.writer.write(orjson.dumps(row.to_json(), option=orjson.OPT_APPEND_NEWLINE))
            if judge and self.thresholds and self.failing is None and self._whole(row):
                failed = [v for v in check(self.thresholds, row.figures()) if not v.passed]
                if failed:
                    self.failing = (row.t, failed)


def _progress_line(
    elapsed: float,
    duration: float,
    target: float,
    sent_rate: float,
    recent: Bucket | None,
    failed: int,
    in_flight: int,
    late: int,
) -> str:
    if recent is not None and recent.latency.count:
        lat = f"p50 {recent.latency.percentile(50):,.1f} ms  p99 {recent.latency.percentile(99):,.1f} ms"
    else:
        lat = "p50 - ms  p99 - ms"
    return (
        f"{elapsed:6.1f}/{duration:g} s  target {target:,.0f}/s  sent {sent_rate:,.0f}/s  {lat}  "
        f"errors {failed:,}  in-flight {in_flight:,}  late {late:,}"
    )


async def run_load(job: LoadJob, *, stderr: TextIO | None = None) -> LoadOutcome:
    """Run one load to the schedule's end (or a drain); write every output; the outcome.

    First SIGINT/SIGTERM: drain (send no more, let in-flight messages finish within
    ``drain_timeout_s``; the run ends as soon as every sent message is answered, even in a
    pause of the stages). Second SIGINT: abort at once. Whole lines only either way.
    ``--abort-on-fail`` stops the same way as a first signal.
    """
    err = stderr or sys.stderr
    pacer = RampPacer(job.stages)
    stats = LoadStats()
    outcome = LoadOutcome(stats)
    report = RunReport() if job.html else None
    ledger = ResultsWriter(job.out) if job.out else None
    series_file = LineWriter(job.timeseries) if job.timeseries else None
    need_live = series_file is not None or job.abort_on_fail or job.progress != "off"
    live = _Live(job, pacer, series_file) if need_live else None
    records = Synthetic(job.message).records(lambda: pacer.total)
    stopped_by: BulksendError | None = None
    try:
        async with (
            target_or_embedded(job.target, job.credentials) as (target, creds),
            Sender(target, creds, job.options, schedule=pacer) as sender,
        ):
            stopped_by = await _pump(
                job, sender, records, stats, live, report, ledger, outcome, err
            )
    finally:
        stats.finish()
        if live is not None:
            live.flush()
        for sink in (ledger, series_file):
            if sink is not None:
                sink.close()
        snapshot = stats.snapshot()
        outcome.verdicts = check(job.thresholds, figures_of(snapshot))
        if job.stats:
            write_json(job.stats, snapshot)
        if report is not None and job.html:
            write_html_report(
                job.html, report, snapshot, title="bulksend load", settings=job.settings()
            )
        if job.progress != "off":
            err.write(summary_text(snapshot, title="bulksend load") + "\n")
        if outcome.aborted_at is not None:
            err.write(
                f"stopped early: a threshold failed in the second starting "
                f"{time.strftime('%H:%M:%S', time.gmtime(outcome.aborted_at))} UTC: "
                + "; ".join(v.line() for v in outcome.aborted_by)
                + "\n"
            )
        for verdict in outcome.verdicts:
            err.write(f"threshold {verdict.line()}\n")
        err.flush()
    if stopped_by is not None:
        raise stopped_by
    return outcome


async def _pump(
    job: LoadJob,
    sender: Sender,
    records: Iterator[Record],
    stats: LoadStats,
    live: _Live | None,
    report: RunReport | None,
    ledger: ResultsWriter | None,
    outcome: LoadOutcome,
    err: TextIO,
) -> BulksendError | None:
    """Consume every Result; the BulksendError that ended the run early (returned, not
    raised, so that the task group does not wrap it for the CLI's boundary)."""
    stopped_by: BulksendError | None = None

    def on_result(_: Item, result: Result) -> None:
        stats.add(result)
        if live is not None:
            live.add(result)
        if report is not None:
            report.add(result)
        if ledger is not None:
            # Not awaited, unlike send's: a load's ledger is no --resume memory, and a
            # worker waiting for its line would send its next message late.
            ledger.add(result)

    with Interrupts(sender, job.drain_timeout_s) as interrupts:
        async with asyncio.TaskGroup() as tg:
            ticker = (
                tg.create_task(_tick(job, sender, stats, live, outcome, err, interrupts.drain))
                if live is not None
                else None
            )
            try:
                await interrupts.guard(sender.run(records, on_result))
            except BulksendError as exc:
                stopped_by = exc
            finally:
                if ticker is not None:
                    ticker.cancel()
    outcome.interrupted = interrupts.interrupted
    return stopped_by


async def _tick(
    job: LoadJob,
    sender: Sender,
    stats: LoadStats,
    live: _Live,
    outcome: LoadOutcome,
    err: TextIO,
    drain: Callable[[], None],
) -> None:
    """Every TICK_S: emit final seconds, judge them (--abort-on-fail), show progress."""
    loop = asyncio.get_running_loop()
    tty = job.progress != "off" and err.isatty()
    every = 1.0 if tty else job.progress_interval_s
    start = loop.time()
    shown_at = start
    last_dispatched, last_at = 0, start
    sent_rate = 0.0
    try:
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            live.tick(time.time_ns() // 1_000_000)
            if live.failing is not None and outcome.aborted_at is None:
                outcome.aborted_at, outcome.aborted_by = live.failing
                drain()
            if now - last_at >= 1.0:
                dispatched = sender.counters.dispatched
                sent_rate = (dispatched - last_dispatched) / (now - last_at)
                last_dispatched, last_at = dispatched, now
            if job.progress != "off" and now - shown_at >= every:
                shown_at = now
                c = sender.counters
                line = _progress_line(
                    now - start,
                    live.pacer.duration,
                    live.pacer.rate_at(now - start),
                    sent_rate,
                    live.recent(int(time.time())),
                    stats.base.counts[FAILED],
                    c.in_flight,
                    stats.late,
                )
                err.write(("\r\x1b[2K" + line) if tty else line + "\n")
                err.flush()
    finally:
        if tty:
            err.write("\r\x1b[2K")
            err.flush()
