"""A whole ``bulksend load`` run as one library call: a schedule -> synthetic messages ->
Sender -> ledger, stats, per-second series, thresholds, HTML report.

An open model, as wrk2 and k6's arrival-rate executors have it: every message has an
intended send time from the schedule (``RampPacer``) whatever the server does. When all
``max_in_flight`` workers are busy the sender keeps the schedule and sends late; nothing is
dropped or re-timed, and latency is measured from the intended time (corrected) beside
the actual send (service) — see ``bulksend.stats.LoadStats``.

``run_load(job)`` is what ``bulksend load`` calls: the one run harness (``bulksend.run``)
with what a load adds to it — the live series, its threshold windows and progress line (a
ticker), the threshold verdicts in the stats and after the summary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio
import orjson

from bulksend.config import Credentials, RetryPolicy, SendOptions, Target
from bulksend.credentials import CredentialRefresher
from bulksend.job import public_url
from bulksend.progress import Display, LoadView
from bulksend.result import FAILED, Result
from bulksend.run import End, Hooks, Live, Outputs, Plan, Ticker, run
from bulksend.sinks import LineWriter
from bulksend.stages import RampPacer, Stages
from bulksend.stats import LoadStats
from bulksend.synthetic import MessageSpec, Synthetic
from bulksend.thresholds import Threshold, Verdict, check, figures_of, verdicts_json
from bulksend.timeseries import Bucket, Row, Timeseries

#: Exit code when a threshold fails (k6's).
EXIT_THRESHOLD = 99
#: Seconds between the live hooks' looks at the run (series lines, threshold windows).
TICK_S = 0.25
#: Past this share of late sends a load is behind its schedule and says so, with the cause.
BEHIND_LATE_SHARE = 0.01
#: A process that used this share of a CPU core while it sent was held back by its own CPU.
BUSY_CPU_SHARE = 0.9
#: How far (ms) a message's intended time predicted from its neighbour's may be off: the
#: ledger's times are whole ms, taken from two clocks a few µs apart.
_PREDICTION_SLACK_MS = 2


def default_options() -> SendOptions:
    """A load's sender: 256 in flight, no retries (a retry would hold a worker and blur
    the latency of the schedule being measured), and a target that stops answering is
    measured, not waited out (``ride_outages``)."""
    return SendOptions(concurrency=256, retry=RetryPolicy(max_retries=0), ride_outages=False)


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
    #: Start a non-empty ``out`` ledger again (refused without it).
    overwrite: bool = False
    #: ``HOST:PORT``: serve Prometheus text at /metrics while the run goes.
    metrics_addr: str | None = None
    #: Renews temporary credentials during the run (``credentials.Auth.refresher``).
    refresher: CredentialRefresher | None = field(default=None, compare=False)

    def outputs(self) -> Outputs:
        return Outputs(
            out=self.out,
            stats=self.stats,
            html=self.html,
            timeseries=self.timeseries,
            overwrite=self.overwrite,
            progress=self.progress,
            progress_interval_s=self.progress_interval_s,
            drain_timeout_s=self.drain_timeout_s,
            metrics_addr=self.metrics_addr,
        )

    def plan(self, pacer: RampPacer) -> Plan:
        return Plan(
            command="load",
            target=self.target,
            credentials=self.credentials,
            options=self.options,
            settings=self.settings(),
            schedule=pacer,
            resumable=False,
            backpressure=False,
            refresher=self.refresher,
        )

    def settings(self) -> dict[str, Any]:
        """The run's settings for its run line and HTML report (no secret in any).
        ``thresholds`` as given: ``bulksend report`` judges them again from the ledger."""
        o, t, m = self.options, self.target, self.message
        settings: dict[str, Any] = {
            "target": public_url(t.url) if t is not None else "embedded",
            "project_id": t.project_id if t is not None else None,
            "instance_id": t.instance_id if t is not None else None,
            "auth": self.credentials.mode,
            "stages": ",".join(f"{at:g}s:{rate:g}" for at, rate in self.stages.points),
            "scheduled": self.stages.total,
            "max_in_flight": o.concurrency,
            "topics": list(m.topics),
            "body": (
                f"template ({len(m.template)} chars)"
                if m.template is not None
                else f"{m.body_size} bytes"
            ),
            "keys": m.keys or None,
            "timeout": o.timeout,
            "max_retries": o.retry.max_retries,
            "thresholds": [th.text for th in self.thresholds],
            "abort_on_fail": self.abort_on_fail,
            "out": self.out,
            "stats": self.stats,
            "html": self.html,
            "timeseries": self.timeseries,
            "metrics_addr": self.metrics_addr,
        }
        return {k: v for k, v in settings.items() if v is not None}


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


@dataclass
class Pace:
    """How the generator fared while it sent: its CPU time and the wall time it ran, and
    every ``TICK_S`` whether all the requests allowed in flight were busy and how late the
    event loop woke the look."""

    cpu_s: float = 0.0
    wall_s: float = 0.0
    samples: int = 0
    pool_full: int = 0
    max_lag_s: float = 0.0

    @classmethod
    def busiest(cls, paces: Sequence[Pace]) -> Pace:
        """The shards' paces of a distributed load as one: the CPU share of the busiest
        shard (one that cannot keep up holds its share of the schedule back, whatever the
        others do), the pool's samples added up, the longest lag."""
        shares = [p.cpu_s / p.wall_s for p in paces if p.wall_s > 0]
        return cls(
            cpu_s=max(shares, default=0.0),
            wall_s=1.0 if shares else 0.0,
            samples=sum(p.samples for p in paces),
            pool_full=sum(p.pool_full for p in paces),
            max_lag_s=max((p.max_lag_s for p in paces), default=0.0),
        )


def behind_schedule(
    snapshot: dict[str, Any],
    pace: Pace,
    *,
    max_in_flight: int,
    embedded: bool = False,
    shards: int = 1,
    lost: int = 0,
) -> str | None:
    """A line saying that the sends fell behind the schedule and what held them back, or
    None while at most ``BEHIND_LATE_SHARE`` of them went late.

    Subtleness ahead! Behind its schedule a load still sends every message (open model) and
    measures each one's latency from its intended time, so the figures then hold the
    generator's own lag as much as the target's. Which of the two it was decides what the
    figures mean: a process busy on a whole core could not keep up (its CPU); one waiting
    with every request in flight (``--max-in-flight``) busy met a target too slow for the
    rate; neither means something else held its event loop up (another process, say).
    ``embedded``: the built-in server ran in the process too, and its CPU counts.
    ``shards``: a distributed load (``pace`` is ``Pace.busiest`` of its shards); ``lost``:
    how many of its shards ran again after their worker was lost, which sends the
    messages due meanwhile late whatever else was the case.
    """
    total, late = snapshot["total"], snapshot["late"]
    if not total or late <= BEHIND_LATE_SHARE * total:
        return None
    head = (
        f"behind schedule: {100 * late / total:.1f} % of sends late (> "
        f"{snapshot['late_after_ms']:g} ms after their intended time), sent "
        f"{snapshot['send_rate_msg_s']:,.0f}/s of {snapshot['intended_rate_msg_s']:,.0f}/s"
    )
    cpu = pace.cpu_s / pace.wall_s if pace.wall_s > 0 else 0.0
    full = pace.pool_full / pace.samples if pace.samples else 0.0
    if lost:
        cause = (
            f"a worker was lost mid-run: {lost:,} shard(s) ran again from where they stopped,"
            " and the messages due meanwhile went late"
        )
    elif cpu >= BUSY_CPU_SHARE and shards > 1:
        cause = (
            f"the busiest shard was the bottleneck: it used {100 * cpu:.0f} % of a CPU core,"
            " and the latency from the intended time includes its own lag; lower --rate, or"
            " add workers"
        )
    elif cpu >= BUSY_CPU_SHARE:
        who = "the client and its --embedded server were" if embedded else "the client was"
        cause = (
            f"{who} the bottleneck: it used {100 * cpu:.0f} % of a CPU core, and the latency"
            " from the intended time includes its own lag; lower --rate, or spread the load"
            " over several processes"
        )
    elif full >= 0.5:
        cause = (
            f"all requests allowed in flight (--max-in-flight {max_in_flight:,}) were busy"
            f" {100 * full:.0f} % of the time: the target answered too slowly for this rate"
            " with so few in flight; raise --max-in-flight, or this is the target's limit"
        )
    else:
        cause = (
            f"neither its CPU ({100 * cpu:.0f} % of a core) nor the in-flight limit was"
            f" saturated: its event loop was held up (up to {1000 * pace.max_lag_s:,.0f} ms),"
            " likely by other work on this machine"
        )
    return f"{head}; {cause}"


async def run_load(job: LoadJob, *, stderr: TextIO | None = None) -> LoadOutcome:
    """Run one load to the schedule's end (or a drain); write every output; the outcome.

    First SIGINT/SIGTERM: drain (send no more, let in-flight messages finish within
    ``drain_timeout_s``; the run ends as soon as every sent message is answered, even in a
    pause of the stages). Second SIGINT: abort at once. Whole lines only either way.
    ``--abort-on-fail`` stops the same way as a first signal.
    """
    outputs = job.outputs()
    pacer = RampPacer(job.stages)
    stats = LoadStats()
    outcome = LoadOutcome(stats)
    records = Synthetic(job.message).records(lambda: pacer.total)
    hooks = _LoadHooks(job, pacer, outcome)
    end = await run(job.plan(pacer), outputs, records, stats, hooks, stderr=stderr)
    outcome.interrupted = end.interrupted
    return outcome


class _LoadHooks(Hooks):
    def __init__(self, job: LoadJob, pacer: RampPacer, outcome: LoadOutcome) -> None:
        self.job, self.pacer, self.outcome = job, pacer, outcome
        need_live = bool(job.timeseries) or job.abort_on_fail or job.progress != "off"
        self.live: _Live | None = _Live(job, pacer, None) if need_live else None
        self.pace = Pace()

    def observers(self) -> list[Callable[[Result], None]]:
        return [self.live.add] if self.live is not None else []

    def tickers(self, live: Live) -> list[Ticker]:
        watch = [lambda: watch_pace(live, self.pace)]
        if self.live is None:
            return watch
        # The run opened the --timeseries file before the first send; the series writes it.
        self.live.writer = live.timeseries
        series = self.live
        return [*watch, lambda: _tick(self.job, live, series, self.outcome)]

    def finish(self, snapshot: dict[str, Any], end: End) -> None:
        if self.live is not None:
            self.live.flush()
        outcome = self.outcome
        outcome.verdicts = check(self.job.thresholds, figures_of(snapshot))
        if not self.job.thresholds:
            return
        kept = verdicts_json(outcome.verdicts)
        # A threshold that stopped the run (--abort-on-fail, exit 99) failed, whatever the
        # whole run's figure: kept so, with the second and the value that failed it.
        for verdict in outcome.aborted_by:
            kept[verdict.threshold.text].update(
                ok=False, failed_at=outcome.aborted_at, failed_value=verdict.actual
            )
        snapshot["thresholds"] = kept

    async def epilogue(self, snapshot: dict[str, Any], end: End) -> list[str]:
        lines = []
        outcome = self.outcome
        cut_short = end.stopped_early or end.cut_off
        scheduled = self.pacer.total
        if end.interrupted and self.job.progress != "off":
            left = max(0, scheduled - snapshot["total"])
            lines.append(f"interrupted: {left:,} of {scheduled:,} scheduled messages not sent")
        if outcome.aborted_at is not None:
            lines.append(
                f"stopped early: a threshold failed in the second starting "
                f"{time.strftime('%H:%M:%S', time.gmtime(outcome.aborted_at))} UTC: "
                + "; ".join(v.line() for v in outcome.aborted_by)
            )
        # A load cut short is judged on the part that ran: the verdicts say so.
        note = (
            f"  (run cut short: judged on {snapshot['total']:,} of {scheduled:,} messages)"
            if cut_short
            else ""
        )
        lines += [f"threshold {verdict.line()}{note}" for verdict in outcome.verdicts]
        behind = self.behind(snapshot)
        if behind is not None:
            lines.append(behind)
        return lines

    def behind(self, snapshot: dict[str, Any]) -> str | None:
        return behind_schedule(
            snapshot,
            self.pace,
            max_in_flight=self.job.options.concurrency,
            embedded=self.job.target is None,
        )


async def watch_pace(run_: Live, pace: Pace) -> None:
    """Every TICK_S, how the generator fares (``Pace``); its CPU over the whole send (the
    process's: in a Dask worker of several threads, its other shards' too)."""
    cpu0, start = time.process_time(), time.monotonic()
    last = start
    sender, limit = run_.sender, run_.plan.options.concurrency
    try:
        while True:
            await anyio.sleep(TICK_S)
            now = time.monotonic()
            pace.max_lag_s = max(pace.max_lag_s, now - last - TICK_S)
            last = now
            pace.samples += 1
            if sender.counters.in_flight >= limit:
                pace.pool_full += 1
    finally:
        pace.cpu_s = time.process_time() - cpu0
        pace.wall_s = time.monotonic() - start


async def _tick(job: LoadJob, run_: Live, live: _Live, outcome: LoadOutcome) -> None:
    """Every TICK_S: emit final seconds, judge them (--abort-on-fail), show progress."""
    sender, err = run_.sender, run_.err
    stats = run_.stats
    assert isinstance(stats, LoadStats)
    tty = job.progress != "off" and err.isatty()
    every = 1.0 if tty else job.progress_interval_s
    display = Display(err, terminal=tty) if job.progress != "off" else None
    start = time.monotonic()
    shown_at = start
    last_dispatched, last_at = 0, start
    sent_rate = 0.0
    try:
        while True:
            await anyio.sleep(TICK_S)
            now = time.monotonic()
            live.tick(time.time_ns() // 1_000_000)
            if live.failing is not None and outcome.aborted_at is None:
                outcome.aborted_at, outcome.aborted_by = live.failing
                run_.drain()
            if now - last_at >= 1.0:
                dispatched = sender.counters.dispatched
                sent_rate = (dispatched - last_dispatched) / (now - last_at)
                last_dispatched, last_at = dispatched, now
            if display is not None and now - shown_at >= every:
                shown_at = now
                view = _view(now - start, live, sent_rate, stats, sender.counters.in_flight)
                display.show(view.parts(), view.share, view.status_line())
    finally:
        if display is not None:
            display.close()


def _view(
    elapsed: float, live: _Live, sent_rate: float, stats: LoadStats, in_flight: int
) -> LoadView:
    recent = live.recent(int(time.time()))
    latency = recent.latency if recent is not None and recent.latency.count else None
    return LoadView(
        elapsed=elapsed,
        duration=live.pacer.duration,
        target_rate=live.pacer.rate_at(elapsed),
        sent_rate=sent_rate,
        p50=latency.percentile(50) if latency is not None else None,
        p99=latency.percentile(99) if latency is not None else None,
        failed=stats.base.counts[FAILED],
        in_flight=in_flight,
        late=stats.late,
    )
