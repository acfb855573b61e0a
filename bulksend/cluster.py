"""One ``send`` or ``load`` run over many worker processes and machines, on Dask distributed.

``run_distributed(job, ClusterSpec(workers=N))`` (``ClusterSpec`` is in ``shards``) starts
a LocalCluster of N single-threaded worker processes on 127.0.0.1; ``ClusterSpec(address=
...)`` uses a running scheduler (one shard per worker thread unless ``shards``). The driver
(this module, the only one that imports Dask) opens the run's outputs as a single run
does (``run.Sinks``: the ledger locked, a non-empty one refused without ``--resume`` or
``--overwrite``, the run line written), then:

1. prepares ``OUT.parts/`` (``merge.py``): a fresh run clears it; ``--resume`` first
   finishes what a killed driver left (a merge cut short is undone, leftover parts are
   merged into ``--out``);
2. cuts plain JSONL inputs into one byte span per shard (``split_inputs``) and submits one
   plain Dask task per shard (``shard_task.run_shard``), each the run harness
   (``run.run``) over its own records at its share of ``--rate``, and shows one progress
   line from the counts the shards post to Dask's event log;
3. merges the parts into ``--out`` (each line with ``"shard": i``) and ``--failed``, adds
   the shards' stats (latency histograms added, never averaged), and ends as a single run
   ends (``run._finish``: ``--stats``, ``--html``, the summary).

``run_distributed_load`` does the same for a ``load``: shard ``i`` of ``n`` sends messages
``i, i + n, ...`` of the one schedule, and the driver builds the load's stats, series,
verdicts and report from the merged lines.

A worker lost mid-run costs nothing but time: Dask runs its shard again elsewhere and the
shard resumes from its part. The first SIGINT/SIGTERM asks every shard to drain (a
``distributed.Event``), then merges; a second one, or a drain past its deadline, leaves
the parts for ``--resume``. ``--embedded`` runs the built-in server here in the driver,
and the workers send to it over loopback.

``distributed`` is imported inside the functions that need it, so ``bulksend`` without
``--workers``/``--cluster`` never loads it (~1.3 s of imports).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import multiprocessing
import os
import secrets
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from bulksend.config import Credentials, Target
from bulksend.errors import (
    BulksendError,
    ClusterError,
    ConfigError,
    InputOpenError,
    LedgerError,
    SinkError,
)
from bulksend.html import RunReport
from bulksend.identity import input_keys
from bulksend.interrupts import Interrupts
from bulksend.job import Outcome, SendJob
from bulksend.load import LoadJob, LoadOutcome
from bulksend.merge import Parts, merge_parts, parts_dir, recover, wait_for_writers
from bulksend.result import FAILED, INVALID, OK, Result
from bulksend.run import End, Hooks, Plan, Sinks, _finish
from bulksend.server.embedded import target_or_embedded
from bulksend.shard_task import (
    REPORT_INTERVAL_S,
    LoadShardTask,
    Progress,
    ShardReport,
    ShardTask,
    run_shard,
)
from bulksend.shards import ClusterSpec, ShardPlan, shard_rate
from bulksend.sinks import STDOUT
from bulksend.sources import Inputs, Span, format_for
from bulksend.spans import split_jsonl
from bulksend.stages import RampPacer
from bulksend.stats import LoadStats, Stats
from bulksend.summary import progress_line

if TYPE_CHECKING:
    from distributed import Client, Future

#: How long a driver waits for a scheduler's first worker, and for its comm to connect.
CONNECT_TIMEOUT_S = 30.0
#: A distributed load's schedule starts this many seconds after the driver submits it.
LOAD_LEAD_S = 1.0
#: Past the shards' own drain deadline, how long the driver waits for their reports.
REPORT_GRACE_S = 10.0
#: Dask's housekeeping, slowed to what a few long tasks need. A shard is one task that
#: runs for the whole job: the statistical profiler (a stack sample every 10 ms), the
#: 20 ms event-loop tick and the 0.5 s system monitor only cost CPU the senders need.
#: Measured on a LocalCluster of 2 workers, each running one task: 12-14 % of a core with
#: Dask's defaults, 3 % with these. (Set in the driver; Nannies hand it to their workers.)
QUIET_DASK = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


async def run_distributed(
    job: SendJob, cluster: ClusterSpec, *, stderr: TextIO | None = None
) -> Outcome:
    """Run ``job`` sharded over ``cluster``; every output as a single run writes it."""
    err = stderr or sys.stderr
    _check(job, cluster)
    outputs = job.outputs()
    with Inputs(job.inputs, fmt=job.fmt, default_topic=job.topic):
        pass  # every input opens (or the run stops, exit 2) before a cluster starts
    plan = _with_cluster(job.plan(), cluster)
    stats = Stats()
    end = End(stats)
    said = _Shards(job.progress)
    hooks = _SendHooks(said)
    report = RunReport() if job.html else None
    # The run's outputs as a single run opens them: --out locked, a non-empty one refused
    # without --resume/--overwrite, --failed/--stats/--html checked before anything starts.
    sinks = Sinks(outputs, plan)
    parts: Parts | None = None
    try:
        parts = _prepare(job, sinks, err)
        await sinks.begin(plan, outputs, err)
        if await _execute(job, cluster, parts, end, said, report.add if report else None, err):
            for shard in said.reports:
                shard.stats.add_to(stats)
    except BulksendError as exc:
        end.error = end.error or exc
    finally:
        if parts is not None and not job.out:
            parts.remove()  # a temporary ledger (merging removed it already if it ran)
        await _finish(plan, outputs, stats, hooks, sinks, report, end, err)
    if end.error is not None:
        raise end.error
    return Outcome(stats, end.interrupted)


async def run_distributed_load(
    job: LoadJob, cluster: ClusterSpec, *, stderr: TextIO | None = None
) -> LoadOutcome:
    """Run the load ``job`` sharded over ``cluster``: shard ``i`` of ``n`` sends messages
    ``i, i + n, ...`` of the schedule at their due times from one epoch, so the merged
    stream is the schedule one process would keep. The driver builds the stats, the
    series (``--timeseries``, written at the end), the thresholds' verdicts and the HTML
    report from the merged ledger lines: every figure is of the whole run, never an
    average of the shards'."""
    from bulksend.load import _LoadHooks

    err = stderr or sys.stderr
    if job.abort_on_fail:
        raise ConfigError(
            "--abort-on-fail judges each second as it ends, in one process: with"
            " --workers/--cluster the thresholds are judged on the whole run at its end"
        )
    if STDOUT in (job.out, job.timeseries):
        raise ConfigError(
            "--workers/--cluster need --out and --timeseries in files: they are written from"
            " the shards' parts"
        )
    if cluster.address is not None and not job.out:
        raise ConfigError(
            "--cluster needs --out on storage every worker reaches: shards write parts beside it"
        )
    outputs = job.outputs()
    pacer = RampPacer(job.stages)
    plan = _with_cluster(job.plan(pacer), cluster)
    stats = LoadStats()
    outcome = LoadOutcome(stats)
    end = End(stats)
    said = _Shards(job.progress)

    class ShardedLoadHooks(_LoadHooks):
        async def epilogue(self, snapshot: dict[str, Any], end: End) -> list[str]:
            return [*await super().epilogue(snapshot, end), *said.lines()]

    hooks = ShardedLoadHooks(job, pacer, outcome)
    report = RunReport() if job.html else None
    sinks = Sinks(outputs, plan)
    if hooks.live is not None:
        hooks.live.writer = sinks.timeseries  # written at the end, from the merged lines
    observers = [stats.add, *hooks.observers(), *([report.add] if report else [])]

    def on_result(result: Result) -> None:
        for observe in observers:
            observe(result)

    parts: Parts | None = None
    try:
        parts = _prepare(job, sinks, err)
        await sinks.begin(plan, outputs, err)
        await _execute(job, cluster, parts, end, said, on_result, err)
    except BulksendError as exc:
        end.error = end.error or exc
    finally:
        if parts is not None and not job.out:
            parts.remove()
        await _finish(plan, outputs, stats, hooks, sinks, report, end, err)
    outcome.interrupted = end.interrupted
    if end.error is not None:
        raise end.error
    return outcome


def _with_cluster(plan: Plan, cluster: ClusterSpec) -> Plan:
    """The run line's settings, with where the run went."""
    where: dict[str, Any] = (
        {"workers": cluster.workers} if cluster.workers else {"cluster": cluster.address}
    )
    if cluster.shards:
        where["shards"] = cluster.shards
    return replace(plan, settings={**plan.settings, **where})


async def _execute(
    job: SendJob | LoadJob,
    cluster: ClusterSpec,
    parts: Parts,
    end: End,
    shards_said: _Shards,
    on_result: Callable[[Result], None] | None,
    err: TextIO,
) -> bool:
    """Start or reach the cluster, run every shard, merge their parts (each result line
    to ``on_result``). False when shards were abandoned: their parts stay unmerged."""
    async with _connect(cluster) as (client, address, threads, dashboard):
        shards = cluster.shards or threads
        err.write(_started_line(address, cluster, shards, dashboard))
        if shards > threads:
            # A shard holds its worker thread to the end: the rest wait their turn.
            paced = f", so the run paces at most {threads}/{shards} of its rate"
            err.write(
                f"bulksend: {shards} shards on {threads} worker thread(s): at most {threads}"
                f" run at a time{paced}\n"
            )
        err.flush()
        split = None
        if isinstance(job, SendJob):
            split = await anyio.to_thread.run_sync(
                split_inputs, job.inputs, job.fmt, shards, job.options.ordered
            )
        engine = job.engine if isinstance(job, SendJob) else "rocketmq"
        async with target_or_embedded(job.target, job.credentials, engine) as (
            target,
            credentials,
        ):
            if job.target is None:
                _check_embedded_reach(address)
            run = _Run(client, job, shards, parts, err)
            try:
                tasks: Sequence[ShardTask | LoadShardTask] = (
                    run.tasks(job, target, credentials, split)
                    if isinstance(job, SendJob)
                    else run.load_tasks(replace(job, target=target, credentials=credentials))
                )
                finished = await run.execute(tasks, shards_said.reports)
            finally:
                end.interrupted = run.interrupted
                end.stopped_early = run.interrupted or run.error is not None
            if run.error is not None:
                end.error = run.error
    if not finished:
        shards_said.abandoned = parts.directory if job.out else None
        end.cut_off = True
        return False
    failed = job.failed if isinstance(job, SendJob) else None
    merge_parts(parts, out=job.out, failed=failed, on_result=on_result)
    return True


class _Shards:
    """What the shards said, for the lines after the summary."""

    def __init__(self, progress: str) -> None:
        self.progress = progress
        self.reports: list[ShardReport] = []
        #: The parts directory left for --resume when shards were abandoned mid-run.
        self.abandoned: str | None = None

    def lines(self) -> list[str]:
        if self.progress == "off":
            return []
        lines = []
        resumed = sum(r.resumed for r in self.reports)
        if resumed:
            lines.append(
                f"bulksend: {resumed:,} results came from shards' attempts on a lost worker"
            )
        if self.abandoned:
            lines.append(
                f"bulksend: shards were abandoned mid-run; their parts stay in {self.abandoned}"
                " and --resume continues from them"
            )
        return lines


class _SendHooks(Hooks):
    def __init__(self, shards: _Shards) -> None:
        self.shards = shards

    async def epilogue(self, snapshot: dict[str, Any], end: End) -> list[str]:
        return self.shards.lines()


def split_inputs(
    inputs: tuple[str, ...], fmt: str | None, shards: int, ordered: bool
) -> list[tuple[Span, ...]] | None:
    """Each shard's spans of ``inputs`` (shard i: span i of every input), so that a shard
    reads only its part; None when every shard must read the inputs whole and keep its
    records: one shard, ``--ordered`` (a key's records go by hash, wherever they are), or
    an input that is not a plain JSONL regular file (gzip, CSV, a JSON array, a FIFO).

    One pre-pass over the inputs in the driver, at disk speed (``spans.py``), against every
    shard parsing every record (3.5 µs of CPU a record, per shard)."""
    if shards < 2 or ordered:
        return None
    for path in inputs:
        try:
            if format_for(path, fmt) != "jsonl" or path.lower().endswith(".gz"):
                return None
            if not stat.S_ISREG(os.stat(path).st_mode):
                return None
        except (OSError, InputOpenError):
            return None
    per_shard: list[list[Span]] = [[] for _ in range(shards)]
    seq = 0
    for path, key in zip(inputs, input_keys(inputs), strict=True):
        try:
            spans = split_jsonl(path, shards, first_seq=seq, key=key, fmt=fmt)
        except InputOpenError:
            return None  # a JSON array: read whole
        for mine, span in zip(per_shard, spans, strict=True):
            mine.append(span)
        seq = spans[-1].first_seq + (spans[-1].records or 0)
    return [tuple(spans) for spans in per_shard]


# --- before ------------------------------------------------------------------------------


def _check(job: SendJob, cluster: ClusterSpec) -> None:
    if "-" in job.inputs:
        raise ConfigError("--workers/--cluster cannot read stdin (-): workers read the inputs")
    if STDOUT in (job.out, job.failed):
        raise ConfigError(
            "--workers/--cluster need --out and --failed in files: the shards' parts are"
            " merged into them"
        )
    if cluster.address is not None and not job.out:
        raise ConfigError(
            "--cluster needs --out on storage every worker reaches: shards write parts beside it"
        )


def _prepare(job: SendJob | LoadJob, sinks: Sinks, err: TextIO) -> Parts:
    """The parts directory of this run, made ready; see the module docstring."""
    resume = isinstance(job, SendJob) and job.resume
    failed = job.failed if isinstance(job, SendJob) else None
    if not job.out:
        # --workers without --out: the parts are the run's only ledger; workers are local.
        return Parts(tempfile.mkdtemp(prefix="bulksend-parts-"))
    if sinks.ledger_place is None:
        raise ConfigError(f"--workers/--cluster need --out in a regular file; {job.out} is not one")
    parts = Parts(parts_dir(job.out))
    if resume:
        if recover(parts) and job.progress != "off":
            err.write(f"bulksend: undid a merge of {parts.directory} that was cut short\n")
        _cut_torn_tail(job.out, err)
        wait_for_writers(parts, job.drain_timeout_s + REPORT_GRACE_S)
        merged = merge_parts(parts, out=job.out, failed=failed)
        if merged.lines and job.progress != "off":
            err.write(
                f"bulksend: merged {sum(merged.lines.values()):,} results a previous run left"
                f" in {parts.directory}\n"
            )
    elif parts.found("shard") and not job.overwrite:
        raise LedgerError(
            f"{parts.directory} holds the results of an unfinished run: add --resume to"
            " continue it, or --overwrite to start again"
        )
    else:
        parts.remove()
    parts.create()
    return parts


def _cut_torn_tail(path: str, err: TextIO) -> None:
    """Cut a torn last line off the ledger (a single-process run killed inside a write),
    so that merged lines start clean. Reads only the tail."""
    try:
        with open(path, "r+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            end = size
            while end > 0:
                start = max(0, end - 65536)
                fh.seek(start)
                block = fh.read(end - start)
                nl = block.rfind(b"\n")
                if nl >= 0:
                    end = start + nl + 1
                    break
                end = start
            if end < size:
                fh.truncate(end)
                err.write(f"bulksend: ignored a torn last line ({size - end} bytes) in {path}\n")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SinkError(f"cannot repair {path}: {exc.strerror or exc}") from None


@contextlib.asynccontextmanager
async def _connect(cluster: ClusterSpec) -> AsyncIterator[tuple[Client, str, int, str | None]]:
    """A client of a new LocalCluster or of the scheduler at ``cluster.address``; the
    scheduler's address, the worker threads it has, and the dashboard address."""
    import dask
    from distributed import Client, LocalCluster

    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(dask.config.set(QUIET_DASK))
        if cluster.workers is not None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                # Worker processes forked from one process that imported Dask once,
                # rather than each spawned to import it again: the cluster is up in about
                # half the time (measured: 2.0-2.5 s against 3.5-4.4 s for 2 workers on a
                # busy 2-core machine), and a restarted worker is back sooner too.
                stack.enter_context(
                    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
                )
            with _deaf_to_ctrl_c():
                local = await stack.enter_async_context(
                    LocalCluster(
                        n_workers=cluster.workers,
                        threads_per_worker=1,
                        processes=True,
                        host="127.0.0.1",
                        dashboard_address=cluster.dashboard_address,
                        # Dask's own chatter (worker restarts and such) would break the one
                        # progress line; errors still show.
                        silence_logs=logging.ERROR,
                        asynchronous=True,
                    )
                )
            client = await stack.enter_async_context(Client(local, asynchronous=True))
            dashboard = local.dashboard_link if cluster.dashboard_address else None
            address = str(local.scheduler_address)
        else:
            assert cluster.address is not None
            try:
                client = await stack.enter_async_context(
                    Client(cluster.address, asynchronous=True, timeout=CONNECT_TIMEOUT_S)
                )
                await client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(
                    f"cannot use the Dask scheduler at {cluster.address}: {exc}"
                ) from None
            dashboard = client.dashboard_link
            address = cluster.address
        threads = sum((await client.nthreads()).values())
        await _check_versions(client)
        yield client, address, threads, dashboard


@contextlib.contextmanager
def _deaf_to_ctrl_c() -> Iterator[None]:
    """Worker processes started in here ignore SIGINT, as the forkserver they come from
    does (an ignored signal stays ignored across fork and exec, and Python then installs
    no KeyboardInterrupt handler). Ctrl-C on a terminal signals the whole foreground
    process group: the driver alone must get it, and drain the shards through Dask
    rather than see every worker die mid-request."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


async def _check_versions(client: Client) -> None:
    """Every worker must run this bulksend: a shard pickled here is unpickled there."""
    from importlib.metadata import version

    mine = version("bulksend")

    # A nested function travels by value (cloudpickle): it runs even where bulksend is
    # missing. It also imports the shard's code, so that no shard pays for it on its clock.
    def probe() -> str:
        import importlib.metadata

        import bulksend.shard_task  # noqa: F401

        return importlib.metadata.version("bulksend")

    theirs = await client.run(probe, on_error="return")
    for worker, found in sorted(theirs.items()):
        if isinstance(found, BaseException):
            raise ClusterError(f"Dask worker {worker} cannot load bulksend: {found}")
        if found != mine:
            raise ClusterError(f"Dask worker {worker} runs bulksend {found}, this is {mine}")


def _started_line(address: str, cluster: ClusterSpec, shards: int, dashboard: str | None) -> str:
    where = (
        f"a LocalCluster of {cluster.workers} worker process(es)"
        if cluster.workers is not None
        else f"the Dask scheduler at {address}"
    )
    line = f"bulksend: {shards} shard(s) on {where}"
    if dashboard:
        line += f"; dashboard {dashboard}"
        if importlib.util.find_spec("bokeh") is None:
            line += " (needs bokeh: pip install 'bulksend[dashboard]')"
    return line + "\n"


def _check_embedded_reach(address: str) -> None:
    host = urlsplit(address).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(
            "--embedded serves on 127.0.0.1 of this machine: it needs --workers, or a "
            "--cluster whose scheduler and workers run here"
        )


# --- during ------------------------------------------------------------------------------


class _Run:
    """The shards of one run in flight: submit, watch, stop."""

    def __init__(
        self, client: Client, job: SendJob | LoadJob, shards: int, parts: Parts, err: TextIO
    ):
        self.client, self.job, self.shards, self.parts, self.err = client, job, shards, parts, err
        token = secrets.token_hex(6)
        self.token = token
        self.topic = f"bulksend-progress-{token}"
        self.stop_name = f"bulksend-stop-{token}"
        self.interrupted = False
        self.error: BulksendError | None = None
        self._stop_wanted = asyncio.Event()
        self.progress = _ClusterProgress(job, shards, err)

    def load_tasks(self, job: LoadJob) -> list[LoadShardTask]:
        """One task per shard of a load; ``job.target`` is the resolved target."""
        # The schedule starts a moment from now: every shard is running by then (a task
        # reaches an idle worker in tens of ms), so no shard starts behind it.
        epoch = time.time() + LOAD_LEAD_S
        n = self.shards
        return [
            LoadShardTask(
                index=i,
                shards=n,
                job=job,
                epoch=epoch,
                part=os.path.abspath(self.parts.ledger(i, n)),
                progress_topic=self.topic,
                stop_event=self.stop_name,
            )
            for i in range(n)
        ]

    def tasks(
        self,
        job: SendJob,
        target: Target,
        credentials: Credentials,
        split: list[tuple[Span, ...]] | None,
    ) -> list[ShardTask]:
        """One task per shard; ``split``: each shard's spans of the inputs (None: every
        shard reads them whole)."""
        n = self.shards
        plan = ShardPlan(n, ordered=job.options.ordered, order_by=job.options.order_by)
        options = replace(job.options, rate=shard_rate(job.options.rate, n))
        epoch = time.time()
        return [
            ShardTask(
                index=i,
                plan=plan,
                # As given, so that sources (and identities) read as in a single-process run;
                # LocalCluster workers share the driver's working directory.
                inputs=job.inputs if split is None else split[i],
                fmt=job.fmt,
                topic=job.topic,
                target=target,
                credentials=credentials,
                options=options,
                total_rate=job.options.rate,
                epoch=epoch,
                part=os.path.abspath(self.parts.ledger(i, n)),
                failed_part=os.path.abspath(self.parts.failed(i, n)) if job.failed else None,
                previous=os.path.abspath(job.out) if job.resume and job.out else None,
                drain_timeout_s=job.drain_timeout_s,
                progress_topic=self.topic,
                stop_event=self.stop_name,
            )
            for i in range(n)
        ]

    def stop(self) -> None:
        """Interrupts' hook (and a failed shard's): ask every shard to drain."""
        self._stop_wanted.set()

    async def execute(
        self, tasks: Sequence[ShardTask | LoadShardTask], reports: list[ShardReport]
    ) -> bool:
        """Run the shards to the end; True when every shard reported (False: abandoned)."""
        from distributed import Event

        client = self.client
        stop_event = Event(self.stop_name, client=client)
        client.subscribe_topic(self.topic, self.progress.update)
        futures = [
            client.submit(run_shard, t, key=f"bulksend-shard-{t.index}-{self.token}", pure=False)
            for t in tasks
        ]
        finished = False
        interrupts = Interrupts(self, self.job.drain_timeout_s + REPORT_GRACE_S)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(interrupts.listen)
                tg.start_soon(self._forward_stop, stop_event)
                if self.progress.mode != "off":
                    tg.start_soon(self.progress.run)
                with interrupts.scope:
                    await self._gather(futures, reports)
                    finished = len(reports) == len(futures)
                tg.cancel_scope.cancel()
        finally:
            self.progress.close()
            self.interrupted = interrupts.interrupted
            client.unsubscribe_topic(self.topic)
            if not finished:
                await client.cancel(futures)
        return finished

    async def _forward_stop(self, stop_event: Any) -> None:
        await self._stop_wanted.wait()
        await stop_event.set()

    async def _gather(self, futures: list[Future[ShardReport]], reports: list[ShardReport]) -> None:
        from distributed import KilledWorker, as_completed

        index = {f.key: i for i, f in enumerate(futures)}
        async for future in as_completed(futures):
            try:
                report: ShardReport = await future
            except KilledWorker:
                self._fail(
                    ClusterError(
                        f"shard {index[future.key]} lost its worker too many times"
                        " (Dask's distributed.scheduler.allowed-failures); --resume continues it"
                    )
                )
                continue
            except BulksendError as exc:
                self._fail(exc)
                continue
            except Exception as exc:
                self._fail(
                    ClusterError(
                        f"shard {index[future.key]} failed on its worker: {type(exc).__name__}: {exc}"
                    )
                )
                continue
            reports.append(report)
            if report.error is not None:
                self._fail(report.error)

    def _fail(self, exc: BulksendError) -> None:
        if self.error is None:
            self.error = exc
        self.stop()


class _ClusterProgress:
    """One progress line for all shards, from the latest report of each."""

    def __init__(self, job: SendJob | LoadJob, shards: int, stream: TextIO) -> None:
        mode = job.progress
        self.mode = ("bar" if stream.isatty() else "lines") if mode == "auto" else mode
        self.interval = 0.25 if self.mode == "bar" else job.progress_interval_s
        rate = job.options.rate if isinstance(job, SendJob) else job.stages.mean_rate
        self.shards, self.stream, self.rate = shards, stream, rate
        self.latest: dict[int, Progress] = {}
        #: When the first result came: the rate is over sending time, not the cluster's start.
        self.started: float | None = None

    def update(self, event: tuple[float, Progress]) -> None:
        msg = event[1]
        self.latest[int(msg["shard"])] = msg
        if self.started is None and msg.get("total"):
            # A shard's first report counts up to a report interval of sends: dated from
            # its arrival, the first line's rate would be many times the real one.
            self.started = time.monotonic() - REPORT_INTERVAL_S

    def line(self) -> str:
        got = list(self.latest.values())

        def total(key: str) -> int:
            return sum(int(m.get(key) or 0) for m in got)

        fractions = [m["bytes_read"] / m["bytes_total"] for m in got if m.get("bytes_total")]
        return (
            progress_line(
                done=total("total"),
                ok=total(OK),
                failed=total(FAILED),
                invalid=total(INVALID),
                retrying=total("retrying"),
                in_flight=total("in_flight"),
                elapsed=time.monotonic() - self.started if self.started is not None else 0.0,
                fraction=sum(fractions) / self.shards if fractions else None,
                rate_target=self.rate,
                bar=self.mode == "bar",
            )
            + f"  shards {len(got)}/{self.shards}"
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            prefix, end = ("\r\x1b[2K", "") if self.mode == "bar" else ("", "\n")
            self.stream.write(prefix + self.line() + end)
            self.stream.flush()

    def close(self) -> None:
        if self.mode == "bar":
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
