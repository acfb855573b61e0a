"""A whole ``send`` run as one library call: inputs -> Sender -> ledger, stats, progress.

``run_send(job)`` is what ``bulksend send`` calls: it opens the inputs and hands them to the
one run harness (``bulksend.run``) with what a send adds to it — the progress bar or status
lines, and after an interrupt how many records were not sent and the command that resumes
the run. Library users who want only the pipeline use ``Sender`` directly.
"""

from __future__ import annotations

import os
import shlex
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.to_thread

from bulksend.config import Credentials, SendOptions, Target
from bulksend.credentials import CredentialRefresher
from bulksend.errors import BulksendError
from bulksend.progress import (
    Display,
    RateWindow,
    ReadCounter,
    SendView,
    count_lines,
    estimate_total,
)
from bulksend.record import Item
from bulksend.result import FAILED, INVALID, OK
from bulksend.run import End, Hooks, Live, Outputs, Plan, Ticker, run
from bulksend.sinks import STDOUT
from bulksend.sources import Inputs
from bulksend.stats import Stats

#: After an interrupt, the inputs are read again to count the records not sent, for at
#: most this long (about a million JSONL records); past it the count is a lower bound.
COUNT_BUDGET_S = 5.0


@dataclass(frozen=True)
class SendJob:
    """Everything one ``bulksend send`` run needs. ``target`` None means --embedded."""

    inputs: tuple[str, ...]
    target: Target | None
    #: The engine of the --embedded target (a given ``target`` has its own).
    engine: str = "rocketmq"
    credentials: Credentials = field(default_factory=Credentials)
    options: SendOptions = field(default_factory=SendOptions)
    fmt: str | None = None
    topic: str | None = None
    #: The results ledger; ``-`` is stdout.
    out: str | None = None
    stats: str | None = None
    failed: str | None = None
    #: A self-contained HTML report of the run (charts, errors, settings).
    html: str | None = None
    #: "auto" (bar on a terminal, a line every few seconds elsewhere), "bar", "lines", "off".
    progress: str = "auto"
    progress_interval_s: float = 5.0
    drain_timeout_s: float = 30.0
    #: Skip records the existing ``out`` ledger holds as ok; append to it.
    resume: bool = False
    #: Resume even though an input changed since the ledger was written.
    force: bool = False
    #: Start a non-empty ``out`` ledger again (refused without it or ``resume``).
    overwrite: bool = False
    #: The command's arguments that repeat this run (``send`` first, no program name),
    #: for the resume command an interrupted run prints; None: not known (library use).
    command_line: tuple[str, ...] | None = None
    #: ``HOST:PORT``: serve Prometheus text at /metrics while the run goes.
    metrics_addr: str | None = None
    #: Renews temporary credentials during the run (``credentials.Auth.refresher``).
    refresher: CredentialRefresher | None = field(default=None, compare=False)

    def outputs(self) -> Outputs:
        return Outputs(
            out=self.out,
            stats=self.stats,
            failed=self.failed,
            html=self.html,
            resume=self.resume,
            overwrite=self.overwrite,
            progress=self.progress,
            progress_interval_s=self.progress_interval_s,
            drain_timeout_s=self.drain_timeout_s,
            metrics_addr=self.metrics_addr,
        )

    def plan(self) -> Plan:
        return Plan(
            command="send",
            target=self.target,
            credentials=self.credentials,
            options=self.options,
            settings=self.settings(),
            engine=self.engine,
            inputs=self.inputs,
            force=self.force,
            refresher=self.refresher,
        )

    def settings(self) -> dict[str, Any]:
        """The run's settings for its run line and HTML report (no secret in any)."""
        o, t = self.options, self.target
        settings: dict[str, Any] = {
            "inputs": list(self.inputs),
            "format": self.fmt,
            "topic": self.topic,
            "target": public_url(t.url) if t is not None else "embedded",
            "project_id": t.project_id if t is not None else None,
            "instance_id": t.instance_id if t is not None else None,
            "engine": t.engine if t is not None else self.engine,
            "auth": self.credentials.mode,
            "concurrency": o.concurrency,
            "rate": o.rate,
            "timeout": o.timeout,
            "max_retries": o.retry.max_retries,
            "backoff_base": o.retry.backoff_base,
            "backoff_max": o.retry.backoff_max,
            "ordered": o.ordered,
            "order_by": o.order_by,
            "on_key_failure": o.on_key_failure if o.ordered else None,
            "adaptive": o.adaptive,
            "exactly_once": o.exactly_once,
            "reconcile_after": o.reconcile_after if o.exactly_once else None,
            "key_from_id": o.key_from_id,
            "insecure": o.tls.insecure,
            "ca_bundle": o.tls.ca_bundle,
            "resume": self.resume,
            "force": self.force,
            "out": self.out,
            "stats": self.stats,
            "failed": self.failed,
            "html": self.html,
            "metrics_addr": self.metrics_addr,
        }
        return {k: v for k, v in settings.items() if v is not None}


def public_url(url: str) -> str:
    """``url`` without user and password: a URL may carry them, a run line must not."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Outcome:
    stats: Stats
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        counts = self.stats.counts
        return 0 if counts[FAILED] == 0 and counts[INVALID] == 0 else 1


async def run_send(job: SendJob, *, stderr: TextIO | None = None) -> Outcome:
    """Run one send job to the end (or to a drain); write every output; return the outcome.

    First SIGINT/SIGTERM: drain (read no more, let in-flight records finish within
    ``drain_timeout_s``). Second SIGINT: abort at once; whole lines only either way.
    """
    outputs = job.outputs()  # checked before the inputs are opened
    stats = Stats()
    with Inputs(job.inputs, fmt=job.fmt, default_topic=job.topic) as inputs:
        counter = ReadCounter(inputs)  # the progress line's count of the records read
        end = await run(
            job.plan(), outputs, counter, stats, _SendHooks(job, counter), stderr=stderr
        )
    return Outcome(stats, end.interrupted)


class _SendHooks(Hooks):
    def __init__(self, job: SendJob, counter: ReadCounter) -> None:
        self.job = job
        self.counter = counter

    def tickers(self, live: Live) -> list[Ticker]:
        if self.job.progress == "off":
            return []
        return [_Progress(live, self.counter, self.job.inputs).run]

    async def epilogue(self, snapshot: dict[str, Any], end: End) -> list[str]:
        if not end.interrupted or self.job.progress == "off":
            return []
        unread = [p if p != STDOUT else "stdin" for p in self.job.inputs if not _rereadable(p)]
        if unread:
            return [
                f"interrupted: the rest of {', '.join(unread)} was not sent; it cannot be read "
                "again, so this run cannot be resumed (a resume needs its inputs in files)"
            ]
        answered = snapshot["total"] - snapshot["skipped"]
        return [await _unsent(self.job, end.done, answered), _resume_hint(self.job)]


class _Progress:
    """The live line on a terminal, a status line every few seconds elsewhere (see
    ``bulksend.progress``)."""

    def __init__(self, live: Live, counter: ReadCounter, paths: tuple[str, ...]) -> None:
        stream, mode = live.err, live.outputs.progress
        self.mode = ("bar" if stream.isatty() else "lines") if mode == "auto" else mode
        self.interval = 0.25 if self.mode == "bar" else live.outputs.progress_interval_s
        self.live, self.counter, self.paths, self.stream = live, counter, paths, stream
        self.rates = RateWindow()
        self.rates.add(time.monotonic(), 0)  # the first line has a rate: since the start
        self.lines: int | None = None
        self._stop_counting = threading.Event()

    def view(self, now: float) -> SendView:
        stats, sender, counter = self.live.stats, self.live.sender, self.counter
        assert isinstance(stats, Stats)
        counts = stats.counts
        self.rates.add(now, counts[OK] + counts[FAILED])
        total, exact = estimate_total(
            counter.read,
            counter.finished,
            self.lines,
            counter.aligned,
            counter.inputs.bytes_total,
        )
        return SendView(
            done=stats.total,
            ok=counts[OK],
            failed=counts[FAILED],
            invalid=counts[INVALID],
            retrying=sender.counters.retrying,
            in_flight=sender.counters.in_flight,
            elapsed=stats.elapsed(),
            rate=self.rates.rate(),
            target_rate=sender.schedule.rate,
            total=total,
            exact=exact,
            note=sender.health.note(),
        )

    async def _count_lines(self) -> None:
        self.lines = await anyio.to_thread.run_sync(
            lambda: count_lines(self.paths, stop=self._stop_counting)
        )

    async def run(self) -> None:
        display = Display(self.stream, terminal=self.mode == "bar")
        # Rates are sampled at least twice a second, whatever the interval between lines.
        tick = min(self.interval, 0.25)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._count_lines)
                shown = time.monotonic()
                while True:
                    await anyio.sleep(tick)
                    now = time.monotonic()
                    view = self.view(now)
                    if now - shown >= self.interval - 1e-3:
                        shown = now
                        display.show(view.parts(), view.share, view.status_line())
        finally:
            self._stop_counting.set()
            display.close()


def _rereadable(path: str) -> bool:
    if path == STDOUT:
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


async def _unsent(job: SendJob, done: Callable[[Item], bool] | None, answered: int) -> str:
    """How many records an interrupted run left without a result: the records of the
    inputs that the ledger did not already hold as ok, less those this run answered."""
    try:
        todo, complete = await anyio.to_thread.run_sync(_count_todo, job, done)
    except BulksendError as exc:
        return f"interrupted: the records not sent could not be counted ({exc})"
    left = max(0, todo - answered)
    if complete:
        return f"interrupted: {left:,} records not sent"
    return f"interrupted: at least {left:,} records not sent (counting them took too long)"


def _count_todo(job: SendJob, done: Callable[[Item], bool] | None) -> tuple[int, bool]:
    """Records of the inputs not done before this run; whether all were counted."""
    deadline = time.monotonic() + COUNT_BUDGET_S
    todo = 0
    with Inputs(job.inputs, fmt=job.fmt, default_topic=job.topic) as inputs:
        for batch in inputs.batches(4096):
            todo += len(batch) if done is None else sum(1 for i in batch if not done(i))
            if time.monotonic() > deadline:
                return todo, False
    return todo, True


def _resume_hint(job: SendJob) -> str:
    if job.out is None:
        return "to continue: the run had no --out ledger, so a new run sends every record again"
    if job.out == STDOUT:
        return "to continue: save the ledger it wrote to stdout in a file, then --out FILE --resume"
    if job.command_line is None:
        return f"to continue: run it again with --out {shlex.quote(job.out)} --resume"
    args = [a for a in job.command_line if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return f"to continue: {shlex.join(['bulksend', *args])}"
