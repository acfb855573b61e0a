"""A whole ``send`` run as one library call: inputs -> Sender -> sinks, stats, progress.

``run_send(job)`` is what ``bulksend send`` calls; library users who want only the pipeline
use ``Sender`` directly. Progress and summary are hooks around the run, never inside a
worker (STYLE habit 9).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TextIO

from bulksend.config import Credentials, SendOptions, Target
from bulksend.errors import BulksendError, ConfigError
from bulksend.html import RunReport, write_html_report
from bulksend.interrupts import Interrupts
from bulksend.ledger import check_inputs, read_ledger, write_fingerprints
from bulksend.record import Item
from bulksend.result import FAILED, INVALID, OK, SKIPPED, Result
from bulksend.sender import Sender
from bulksend.sinks import FailedWriter, ResultsWriter, write_json
from bulksend.sources import Inputs
from bulksend.stats import Stats
from bulksend.summary import progress_line, summary_table

#: Identifies the built-in server's target in --embedded runs.
EMBEDDED_PROJECT = "embedded-project"
EMBEDDED_INSTANCE = "embedded-instance"


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


@contextlib.asynccontextmanager
async def target_or_embedded(
    target: Target | None, credentials: Credentials, engine: str = "rocketmq"
) -> AsyncIterator[tuple[Target, Credentials]]:
    """The given target, or (None: --embedded) the built-in server started in this process
    on a free loopback port with no auth, stopped on leaving."""
    if target is not None:
        yield target, credentials
        return
    from bulksend.server import ServerOptions, run_server

    async with run_server(ServerOptions(host="127.0.0.1", port=0)) as server:
        yield Target(server.url, EMBEDDED_PROJECT, EMBEDDED_INSTANCE, engine), Credentials()


class _Progress:
    """A live bar on a terminal, a status line every few seconds elsewhere."""

    def __init__(
        self,
        mode: str,
        interval: float,
        stats: Stats,
        sender: Sender,
        inputs: Inputs,
        stream: TextIO,
    ) -> None:
        tty = stream.isatty()
        self.mode = ("bar" if tty else "lines") if mode == "auto" else mode
        self.interval = 0.25 if self.mode == "bar" else interval
        self.stats, self.sender, self.inputs, self.stream = stats, sender, inputs, stream

    def fraction(self) -> float | None:
        """Share of the inputs' bytes read. Reading runs at most a bounded buffer (the work
        queue, one parse batch, one 1 MiB chunk) ahead of sending, so on the inputs a
        backfill has (megabytes to gigabytes) this tracks the records done; the total
        number of records is not known before the end of a stream."""
        total_bytes = self.inputs.bytes_total
        return self.inputs.bytes_read / total_bytes if total_bytes else None

    def line(self) -> str:
        s, c = self.stats, self.sender.counters
        return progress_line(
            done=s.total,
            ok=s.counts[OK],
            failed=s.counts[FAILED],
            invalid=s.counts[INVALID],
            retrying=c.retrying,
            in_flight=c.in_flight,
            elapsed=s.elapsed(),
            fraction=self.fraction(),
            rate_target=self.sender.schedule.rate,
            bar=self.mode == "bar",
            note=self.sender.health.note(),
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.mode == "bar":
                self.stream.write("\r\x1b[2K" + self.line())
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.mode == "bar":
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


async def run_send(
    job: SendJob, *, stderr: TextIO | None = None, on_signal: Callable[[], None] | None = None
) -> Outcome:
    """Run one send job to the end (or to a drain); write every output; return the outcome.

    First SIGINT/SIGTERM: drain (read no more, let in-flight records finish within
    ``drain_timeout_s``). Second SIGINT: abort at once; whole lines only either way.
    """
    err = stderr or sys.stderr
    stats = Stats()
    outcome = Outcome(stats)
    with Inputs(job.inputs, fmt=job.fmt, default_topic=job.topic) as inputs:
        done = None
        if job.out:
            if job.resume:
                check_inputs(job.out, job.inputs, force=job.force)
                state = read_ledger(job.out)
                done = state.done if state.done_identities else None
                if state.torn_bytes and job.progress != "off":
                    err.write(
                        f"bulksend: ignored a torn last line ({state.torn_bytes} bytes) in {job.out}\n"
                    )
            write_fingerprints(job.out, job.inputs)
        elif job.resume:
            raise ConfigError("--resume needs --out: the results ledger of the run to resume")
        ledger = ResultsWriter(job.out, append=job.resume) if job.out else None
        failed = FailedWriter(job.failed, append=job.resume) if job.failed else None
        sender: Sender | None = None
        report = RunReport() if job.html else None
        try:
            async with (
                target_or_embedded(job.target, job.credentials, job.engine) as (target, creds),
                Sender(target, creds, job.options) as sender,
            ):
                await _pump(job, sender, inputs, stats, report, ledger, failed, outcome, err, done)
        finally:
            stats.finish()
            if sender is not None:
                stats.rate_changes = sender.rate_changes
            for sink in (ledger, failed):
                if sink is not None:
                    sink.close()
            if job.stats:
                write_json(job.stats, stats.snapshot())
            if report is not None and job.html:
                settings = {
                    "inputs": ", ".join(job.inputs),
                    "concurrency": job.options.concurrency,
                    "rate": job.options.rate or "unpaced",
                    "max_retries": job.options.retry.max_retries,
                }
                write_html_report(
                    job.html, report, stats.snapshot(), title="bulksend send", settings=settings
                )
            if job.progress != "off":
                err.write(summary_table(stats.snapshot()) + "\n")
                err.flush()
    return outcome


async def _pump(
    job: SendJob,
    sender: Sender,
    inputs: Inputs,
    stats: Stats,
    report: RunReport | None,
    ledger: ResultsWriter | None,
    failed: FailedWriter | None,
    outcome: Outcome,
    err: TextIO,
    done: Callable[[Item], bool] | None,
) -> None:
    progress = (
        _Progress(job.progress, job.progress_interval_s, stats, sender, inputs, err)
        if job.progress != "off"
        else None
    )

    def on_result(item: Item, result: Result) -> asyncio.Future[None] | None:
        stats.add(result)
        if report is not None:
            report.add(result)
        if failed is not None and result.status in (FAILED, INVALID):
            failed.add(item, result)
        # A skipped record's line is already in the ledger (its earlier ok): it is
        # counted, not written again, so the ledger holds each ok exactly once.
        if ledger is None or result.status == SKIPPED:
            return None
        written = ledger.add(result)
        # The worker waits for its line to be written before it sends another request
        # (all lines of a loop turn go in one write): after a kill -9 the records
        # missing from the ledger, sent again by --resume, are at most those in flight.
        return written if result.attempts else None

    stopped_by: BulksendError | None = None
    with Interrupts(sender, job.drain_timeout_s) as interrupts:
        async with asyncio.TaskGroup() as tg:
            ticker = tg.create_task(progress.run()) if progress else None
            try:
                await interrupts.guard(sender.run(inputs, on_result, done=done))
            except BulksendError as exc:
                # Raised past the task group, not through it: the CLI's boundary expects
                # the error itself, not an ExceptionGroup around it.
                stopped_by = exc
            finally:
                if ticker is not None:
                    ticker.cancel()
                if progress is not None:
                    progress.close()
    outcome.interrupted = interrupts.interrupted
    if stopped_by is not None:
        raise stopped_by
