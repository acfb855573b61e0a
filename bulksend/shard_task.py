"""What a Dask worker runs for one shard: the normal pipeline over the shard's own records,
writing the shard's ledger part (``merge.py`` has the layout).

``run_shard(task)`` is a plain Dask task. It runs its own event loop (uvloop) in the
worker's thread, reads the inputs and keeps the records ``task.plan`` gives its shard,
sends them with a ``Sender`` paced at its share of the rate, and returns a
``ShardReport`` (its stats, hdrh-encoded). Progress goes to the driver through Dask's
event log (``Worker.log_event``: batched on the worker's stream to the scheduler, no extra
round trip); a stop comes as a ``distributed.Event`` the driver sets.

**A shard that runs again resumes from its part.** Dask re-runs a shard whose worker was
lost; the new attempt reads the part first (cutting a torn last line), counts every result
line in it as this run's, and sends only the records that have none. A record that
finally failed in the lost attempt is not sent again in the same run (it had its retries;
``--resume`` retries it), so the part, and the merged ledger, hold one line per record.
Re-sends are then at most the requests the lost worker had in flight. An exclusive
``flock`` on the part keeps two attempts (a lost worker that is still running) from
writing it at once.

Subtleness ahead! This module is the adapter to today's run harness: ``Inputs`` over whole
files, ``Sender.run`` with ``on_result``/``done``, ``ResultsWriter``/``FailedWriter`` and
the identity rule of ``ledger.py``. When the shared harness (``run.py``, ``Outputs``) and
byte-range ``Inputs`` spans land, ``_pipeline`` becomes one call of that harness with a
span, and ``_identity_of`` reads the ledger line's ``identity``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from bulksend.config import Credentials, SendOptions, Target
from bulksend.errors import BulksendError, LedgerError
from bulksend.interrupts import Interrupts
from bulksend.ledger import read_ledger
from bulksend.merge import RESULT_STATUSES, PartLock, ShardStats
from bulksend.record import Item
from bulksend.result import FAILED, INVALID, SKIPPED, Result
from bulksend.sender import Sender
from bulksend.shards import ShardPlan, SlotSchedule
from bulksend.sinks import FailedWriter, ResultsWriter
from bulksend.sources import Inputs
from bulksend.stats import Stats

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
    inputs: tuple[str, ...]
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
    #: Dask names of the progress topic and the stop event (None outside Dask).
    progress_topic: str | None = None
    stop_event: str | None = None


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


def run_shard(task: ShardTask) -> ShardReport:
    """The Dask task: one shard, start to end, on its own event loop in this thread."""
    from bulksend.cli import run_async

    publish, should_stop = _dask_hooks(task)
    return run_async(run_shard_async(task, publish=publish, should_stop=should_stop))


def _dask_hooks(
    task: ShardTask,
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
    with PartLock(task.part) as lock:
        await asyncio.to_thread(lock.acquire_blocking, task.drain_timeout_s + 5.0)
        stats = Stats()
        earlier = _read_part(task.part, stats)
        before = (
            read_ledger(task.previous, repair=False).done_identities if task.previous else set()
        )
        report = ShardReport(task.index, ShardStats(), resumed=len(earlier))
        try:
            await _pipeline(task, stats, earlier, before, report, publish, should_stop)
        except BulksendError as exc:
            report.error = exc
        stats.finish()
        report.stats = ShardStats.from_stats(stats)
        return report


async def _pipeline(
    task: ShardTask,
    stats: Stats,
    earlier: set[str],
    before: set[str],
    report: ShardReport,
    publish: Callable[[Progress], None] | None,
    should_stop: Callable[[float], bool] | None,
) -> None:
    def done(item: Item) -> bool:
        ident = item.identity
        return ident in earlier or ident in before

    ledger = ResultsWriter(task.part, append=True)
    failed = FailedWriter(task.failed_part, append=True) if task.failed_part else None

    def on_result(item: Item, result: Result) -> asyncio.Future[None] | None:
        if result.status == SKIPPED:
            if item.identity not in earlier:
                stats.add(result)  # ok in an earlier run; this attempt's own are counted
            return None
        stats.add(result)
        if failed is not None and result.status in (FAILED, INVALID):
            failed.add(item, result)
        written = ledger.add(result)
        # Wait for the line before the next request, as a single run does: a kill -9
        # then costs no more re-sends than the requests in flight.
        return written if result.attempts else None

    try:
        with Inputs(task.inputs, fmt=task.fmt, default_topic=task.topic) as inputs:
            own = _OwnRecords(inputs, task.plan.owner(task.index))
            pacer = SlotSchedule(task.total_rate, task.plan.shards, task.index, task.epoch)
            async with Sender(
                task.target, task.credentials, task.options, schedule=pacer
            ) as sender:

                def progress() -> Progress:
                    c = sender.counters
                    return {
                        "shard": task.index,
                        **{k: stats.counts[k] for k in ("ok", "failed", "invalid", "skipped")},
                        "total": stats.total,
                        "in_flight": c.in_flight,
                        "retrying": c.retrying,
                        "rate": sender.schedule.rate,
                        "bytes_read": inputs.bytes_read,
                        "bytes_total": inputs.bytes_total,
                    }

                with Interrupts(sender, task.drain_timeout_s) as interrupts:
                    async with asyncio.TaskGroup() as tg:
                        helpers = []
                        if publish is not None:
                            helpers.append(tg.create_task(_report(publish, progress)))
                        if should_stop is not None:
                            helpers.append(tg.create_task(_watch(should_stop, interrupts, report)))
                        try:
                            await interrupts.guard(sender.run(own, on_result, done=done))
                        except BulksendError as exc:
                            # Kept, not raised through the task group (which would wrap
                            # it in an ExceptionGroup): the shard reports it with its stats.
                            report.error = exc
                        finally:
                            for helper in helpers:
                                helper.cancel()
                stats.rate_changes = sender.rate_changes
                if publish is not None:
                    publish(progress())
    finally:
        for sink in (ledger, failed):
            if sink is not None:
                sink.close()


async def _report(publish: Callable[[Progress], None], progress: Callable[[], Progress]) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL_S)
        publish(progress())


async def _watch(
    should_stop: Callable[[float], bool], interrupts: Interrupts, report: ShardReport
) -> None:
    # should_stop blocks up to its timeout: the loop polls at that pace.
    while True:
        if await asyncio.to_thread(should_stop, STOP_POLL_S):
            break
    report.stopped = True
    interrupts.drain()


class _OwnRecords:
    """The shard's records of ``inputs``, batched as ``Sender`` reads a file source."""

    def __init__(self, inputs: Inputs, owns: Callable[[Item], bool]) -> None:
        self._inputs = inputs
        self._owns = owns

    def batches(self, n: int) -> Iterator[list[Item]]:
        owns = self._owns
        for batch in self._inputs.batches(n):
            own = [item for item in batch if owns(item)]
            if own:
                yield own


def _identity_of(line: dict[str, Any]) -> str:
    """A ledger line's record identity, by the rule ``ledger.read_ledger`` applies."""
    ident = line.get("id")
    return str(ident) if ident is not None else str(line.get("source"))


def _read_part(path: str, stats: Stats) -> set[str]:
    """The identities of the records an earlier attempt finished in this part, each
    result also added to ``stats``; a torn last line is cut off."""
    found: set[str] = set()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below; truncated after
    except FileNotFoundError:
        return found
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger part {path}: {exc.strerror or exc}") from None
    good_end = torn = 0
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                torn = len(line)
                break
            good_end += len(line)
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise LedgerError(f"{path}:{lineno}: not a results line") from None
            if isinstance(obj, dict) and obj.get("status") in RESULT_STATUSES:
                stats.add(Result.from_dict(obj))
                found.add(_identity_of(obj))
    if torn:
        os.truncate(path, good_end)
    return found
