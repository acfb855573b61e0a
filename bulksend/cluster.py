"""The Dask side of a distributed run (``scaleout.py`` is the driver): a cluster to run
on (``connect``: a new LocalCluster of single-threaded worker processes on 127.0.0.1, or
a running scheduler), and the shards in flight (``ShardRun``: submitted as plain Dask
tasks, watched, asked to drain through a ``distributed.Event``, their counts gathered
from Dask's event log into one progress line and, with ``--metrics-addr``, the driver's
/metrics).

This is the only module that imports Dask, inside the functions that need it.
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
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import anyio

from bulksend.config import Credentials, Target
from bulksend.errors import BulksendError, ClusterError, ConfigError
from bulksend.interrupts import Interrupts
from bulksend.job import SendJob
from bulksend.load import LoadJob
from bulksend.merge import SHARD_GRACE_S, Parts
from bulksend.progress import SendView
from bulksend.result import FAILED, INVALID, OK
from bulksend.shard_task import (
    REPORT_INTERVAL_S,
    LoadShardTask,
    Progress,
    ShardReport,
    ShardTask,
    run_shard,
)
from bulksend.shards import ClusterSpec, ShardPlan, shard_rate
from bulksend.sources import Span

if TYPE_CHECKING:
    from distributed import Client, Future

    from bulksend.metrics import ShardedFigures

#: How long a driver waits for a scheduler's first worker, and for its comm to connect.
CONNECT_TIMEOUT_S = 30.0
#: A distributed load's schedule starts this many seconds after the driver submits it.
LOAD_LEAD_S = 1.0
REPORT_GRACE_S = SHARD_GRACE_S
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


@contextlib.asynccontextmanager
async def connect(cluster: ClusterSpec) -> AsyncIterator[tuple[Client, str, int, str | None]]:
    """A client of a new LocalCluster or of the scheduler at ``cluster.address``; the
    scheduler's address, the worker threads it has, and the dashboard address."""
    import dask
    from distributed import Client, LocalCluster

    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(dask.config.set(QUIET_DASK))
        # A client closing its comm to a scheduler logs that (with a traceback, at INFO)
        # once the run is over, after the summary of a run that went well.
        logging.getLogger("distributed.batched").addFilter(_no_comm_closed)
        if cluster.workers is not None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                # Worker processes forked from one process that imported Dask once,
                # rather than each spawned to import it again: the cluster is up in about
                # half the time (measured: 2.0-2.5 s against 3.5-4.4 s for 2 workers on a
                # busy 2-core machine), and a restarted worker is back sooner too.
                stack.enter_context(
                    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
                )
            with _deaf_to_ctrl_c(), warnings.catch_warnings():
                # When the dashboard's port is taken Dask picks another and warns, three
                # lines with a path into site-packages; the line bulksend prints on start
                # gives the dashboard's actual address.
                warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
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


def _no_comm_closed(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Batched Comm Closed")


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


def started_line(address: str, cluster: ClusterSpec, shards: int, dashboard: str | None) -> str:
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


def check_embedded_reach(address: str) -> None:
    host = urlsplit(address).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(
            "--embedded serves on 127.0.0.1 of this machine: it needs --workers, or a "
            "--cluster whose scheduler and workers run here"
        )


# --- during ------------------------------------------------------------------------------


class ShardRun:
    """The shards of one run in flight: submit, watch, stop."""

    def __init__(
        self,
        client: Client,
        job: SendJob | LoadJob,
        shards: int,
        parts: Parts,
        err: TextIO,
        *,
        figures: ShardedFigures | None = None,
    ):
        """``figures``: the driver's /metrics, fed the figures the shards post."""
        self.client, self.job, self.shards, self.parts, self.err = client, job, shards, parts, err
        token = secrets.token_hex(6)
        self.token = token
        self.topic = f"bulksend-progress-{token}"
        self.stop_name = f"bulksend-stop-{token}"
        self.interrupted = False
        self.error: BulksendError | None = None
        self._stop_wanted = asyncio.Event()
        self.progress = _ClusterProgress(job, shards, err, figures)

    def load_tasks(self, job: LoadJob) -> list[LoadShardTask]:
        """One task per shard of a load; ``job.target`` is the resolved target."""
        # The schedule starts a moment from now: every shard is running by then (a task
        # reaches an idle worker in tens of ms), so no shard starts behind it.
        epoch = time.time() + LOAD_LEAD_S
        n = self.shards
        figures = self.progress.figures
        if figures is not None:
            stages = job.stages
            # The whole schedule's rate, as one process shows it; a shard knows its share.
            figures.target_rate = lambda: stages.rate_at(time.time() - epoch)
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
                inputs=_anywhere(job.inputs) if split is None else _anywhere_spans(split[i]),
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
                metrics=self.progress.figures is not None,
                progress_topic=self.topic,
                stop_event=self.stop_name,
            )
            for i in range(n)
        ]

    def stop(self) -> None:
        """Interrupts' hook (and a failed shard's): ask every shard to drain."""
        self._stop_wanted.set()

    async def execute(
        self,
        tasks: Sequence[ShardTask | LoadShardTask],
        reports: list[ShardReport],
        *,
        watch: Callable[[ShardRun], Coroutine[Any, Any, None]] | None = None,
    ) -> bool:
        """Run the shards to the end; True when every shard reported (False: abandoned).
        ``watch`` runs beside them until then (it may ``stop`` them)."""
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
                if watch is not None:
                    tg.start_soon(watch, self)
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


def _anywhere(inputs: tuple[str, ...]) -> tuple[str, ...]:
    """Local input paths made absolute: a worker's working directory is its own (a
    ``dask worker`` started elsewhere), and a relative path there names another file,
    or none. An input's identity is of its real path, so records keep their identities;
    their ``source`` shows the absolute path. URLs go as they are."""
    return tuple(p if "://" in p else os.path.abspath(p) for p in inputs)


def _anywhere_spans(spans: tuple[Span, ...]) -> tuple[Span, ...]:
    return tuple(s if "://" in s.path else replace(s, path=os.path.abspath(s.path)) for s in spans)


class _ClusterProgress:
    """One progress line for all shards, from the latest report of each; the figures the
    reports carry go to the driver's /metrics (``figures``), when it serves them."""

    def __init__(
        self,
        job: SendJob | LoadJob,
        shards: int,
        stream: TextIO,
        figures: ShardedFigures | None = None,
    ) -> None:
        mode = job.progress
        self.mode = ("bar" if stream.isatty() else "lines") if mode == "auto" else mode
        self.interval = 0.25 if self.mode == "bar" else job.progress_interval_s
        rate = job.options.rate if isinstance(job, SendJob) else job.stages.mean_rate
        self.shards, self.stream, self.rate = shards, stream, rate
        self.latest: dict[int, Progress] = {}
        self.figures = figures
        #: When the first result came: the rate is over sending time, not the cluster's start.
        self.started: float | None = None

    def update(self, event: tuple[float, Progress]) -> None:
        msg = event[1]
        shard = int(msg["shard"])
        self.latest[shard] = msg
        if self.figures is not None and "metrics" in msg:
            self.figures.add(shard, msg["metrics"])
        if self.started is None and msg.get("total"):
            # A shard's first report counts up to a report interval of sends: dated from
            # its arrival, the first line's rate would be many times the real one.
            self.started = time.monotonic() - REPORT_INTERVAL_S

    def line(self) -> str:
        got = list(self.latest.values())

        def total(key: str) -> int:
            return sum(int(m.get(key) or 0) for m in got)

        fractions = [m["bytes_read"] / m["bytes_total"] for m in got if m.get("bytes_total")]
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        done = total("total")
        view = SendView(
            done=done,
            ok=total(OK),
            failed=total(FAILED),
            invalid=total(INVALID),
            retrying=total("retrying"),
            in_flight=total("in_flight"),
            elapsed=elapsed,
            rate=done / elapsed if elapsed > 0 else 0.0,
            target_rate=self.rate,
        )
        # The shards report bytes read, not records: the share of the inputs read leads.
        read = f"read {100 * sum(fractions) / self.shards:5.1f}%  " if fractions else ""
        return read + view.status_line() + f"  shards {len(got)}/{self.shards}"

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
