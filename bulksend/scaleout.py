"""One ``send`` or ``load`` run over many worker processes and machines, on Dask distributed.

``run_distributed(job, ClusterSpec(workers=N))`` (``ClusterSpec`` is in ``shards``) starts
a LocalCluster of N single-threaded worker processes on 127.0.0.1; ``ClusterSpec(address=
...)`` uses a running scheduler (one shard per worker thread unless ``shards``). The driver
(this module) opens the run's outputs as a single run does (``run.Sinks``: the ledger locked, a non-empty one refused without ``--resume`` or
``--overwrite``, the run line written), then:

1. prepares ``OUT.parts/`` (``merge.py``): a fresh run clears it; ``--resume`` first
   finishes what a killed driver left (a merge cut short is undone, leftover parts are
   merged into ``--out``);
2. cuts plain JSONL inputs into one byte span per shard (``split_inputs``) and submits one
   plain Dask task per shard (``shard_task.run_shard``), each the run harness
   (``run.run``) over its own records at its share of ``--rate``, and shows one progress
   line from the counts the shards post to Dask's event log (with ``--metrics-addr``,
   their figures' sum at /metrics, served from the start to the last output written);
   with ``--exactly-once``, the merged ledger's open intents are checked first and every
   shard keys its records with that ledger's salt (``shard_once.py``);
3. merges the parts into ``--out`` (each line with ``"shard": i``) and ``--failed``, adds
   the shards' stats (latency histograms added, never averaged), and ends as a single run
   ends (``run._finish``: ``--stats``, ``--html``, the summary).

With ``--out`` in an object store (``s3://...``), the run writes local copies of its
outputs, the shards upload their parts as segments, and the driver merges and publishes
them (``remote.RemoteLedger``).

``run_distributed_load`` does the same for a ``load``: shard ``i`` of ``n`` sends messages
``i, i + n, ...`` of the one schedule, and the driver builds the load's stats, series,
threshold windows, verdicts and report from the parts' lines as they grow.

A worker lost mid-run costs nothing but time: Dask runs its shard again elsewhere and the
shard resumes from its part. The first SIGINT/SIGTERM asks every shard to drain (a
``distributed.Event``), then merges; a second one, or a drain past its deadline, leaves
the parts for ``--resume``. ``--embedded`` runs the built-in server here in the driver,
and the workers send to it over loopback.

Dask itself is ``cluster.py``'s (the cluster, the shards in flight, their progress line);
the CLI imports this module only when ``--workers``/``--cluster`` is given, so ``bulksend``
without them never loads Dask (~1.3 s of imports).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any, TextIO

import anyio
import anyio.to_thread
import orjson

from bulksend.cluster import (
    ShardRun,
    check_embedded_reach,
    connect,
    started_line,
)
from bulksend.errors import BulksendError, ConfigError, InputOpenError, LedgerError
from bulksend.html import RunReport
from bulksend.identity import input_keys
from bulksend.job import Outcome, SendJob
from bulksend.load import TICK_S, LoadJob, LoadOutcome
from bulksend.merge import RESULT_STATUSES, Parts, merge_parts, part_results, parts_dir
from bulksend.metrics import MetricsEndpoint, ShardedFigures
from bulksend.remote import RemoteLedger, is_url, last_line
from bulksend.result import Result
from bulksend.run import End, Hooks, Plan, Sinks, _finish
from bulksend.server.embedded import target_or_embedded
from bulksend.shard_once import ShardedWriteAhead, check_out
from bulksend.shard_task import LoadShardTask, ShardReport, ShardTask
from bulksend.shards import ClusterSpec
from bulksend.sinks import STDOUT
from bulksend.sources import Inputs, Span, format_for
from bulksend.spans import split_jsonl
from bulksend.stages import RampPacer
from bulksend.stats import LoadStats, Stats

__all__ = ["ClusterSpec", "run_distributed", "run_distributed_load", "split_inputs"]


async def run_distributed(
    job: SendJob, cluster: ClusterSpec, *, stderr: TextIO | None = None
) -> Outcome:
    """Run ``job`` sharded over ``cluster``; every output as a single run writes it, and
    ``--metrics-addr`` served here, in the driver, for the whole run."""
    async with _DriverMetrics.serving(job.metrics_addr, load=False) as metrics:
        return await _run_send(job, cluster, metrics, stderr or sys.stderr)


async def _run_send(
    job: SendJob, cluster: ClusterSpec, metrics: _DriverMetrics, err: TextIO
) -> Outcome:
    _check(job, cluster)
    with Inputs(job.inputs, fmt=job.fmt, default_topic=job.topic):
        pass  # every input opens (or the run stops, exit 2) before a cluster starts
    plan = _with_cluster(job.plan(), cluster)
    remote: RemoteLedger | None = None
    if is_url(job.out):
        assert job.out is not None
        # --out in an object store: the run writes local copies (remote.py), the driver
        # publishes them; the run line says where the parts of this run are.
        remote = RemoteLedger(job.out, job.failed, resume=job.resume, overwrite=job.overwrite)
        plan = replace(plan, settings={**plan.settings, "parts": remote.generation})
        job = replace(
            job,
            out=remote.ledger,
            failed=remote.failed,
            stats=remote.document(job.stats),
            html=remote.document(job.html),
        )
    try:
        return await _send(job, cluster, plan, remote, metrics, err)
    finally:
        if remote is not None:
            remote.close()


async def _send(
    job: SendJob,
    cluster: ClusterSpec,
    plan: Plan,
    remote: RemoteLedger | None,
    metrics: _DriverMetrics,
    err: TextIO,
) -> Outcome:
    outputs = job.outputs()
    stats = Stats()
    end = End(stats)
    said = _Shards(job.progress)
    hooks = _SendHooks(said, job.progress)
    report = RunReport() if job.html else None
    if remote is not None:
        await anyio.to_thread.run_sync(remote.open)  # its lock, refusal, local copies
    # The run's outputs as a single run opens them: --out locked, a non-empty one refused
    # without --resume/--overwrite, --failed/--stats/--html checked before anything starts.
    sinks = Sinks(outputs, plan)
    parts: Parts | None = None
    try:
        parts = await _prepare(job, sinks, err, remote)
        await sinks.begin(plan, outputs, err)
        if remote is not None:
            assert sinks.ledger_place is not None
            await anyio.to_thread.run_sync(remote.begin, last_line(sinks.ledger_place.real))
        if job.options.exactly_once:
            # Sinks checked the ledger (a regular file) and read its open intents.
            assert sinks.ledger is not None and sinks.ledger_place is not None
            hooks.once = ShardedWriteAhead(
                job.options, sinks.ledger, sinks.ledger_place.real, sinks.intents
            )
        metrics.say(job.progress, err)
        on_result = report.add if report else None
        if await _execute(
            job,
            cluster,
            parts,
            end,
            said,
            on_result,
            err,
            metrics=metrics,
            remote=remote,
            once=hooks.once,
        ):
            for shard in said.reports:
                shard.stats.add_to(stats)
        elif said.abandoned:
            # Not every shard reported: the summary counts what the parts hold, which
            # is what --resume will find done.
            if remote is not None:
                await anyio.to_thread.run_sync(remote.count, stats)  # the uploaded parts
            else:
                for result in part_results(parts):
                    stats.add(result)
    except BulksendError as exc:
        end.error = end.error or exc
    finally:
        if parts is not None and not job.out:
            parts.remove()  # a temporary ledger (merging removed it already if it ran)
        await _finish(plan, outputs, stats, hooks, sinks, report, end, err)
    if remote is not None and sinks.begun:
        try:
            await anyio.to_thread.run_sync(remote.upload_documents)
        except BulksendError as exc:
            end.error = end.error or exc
    if end.error is not None:
        raise end.error
    return Outcome(stats, end.interrupted)


async def run_distributed_load(
    job: LoadJob, cluster: ClusterSpec, *, stderr: TextIO | None = None
) -> LoadOutcome:
    """Run the load ``job`` sharded over ``cluster``: shard ``i`` of ``n`` sends messages
    ``i, i + n, ...`` of the schedule at their due times from one epoch, so the merged
    stream is the schedule one process would keep. The driver reads the shards' parts as
    they grow (``_PartsWatch``) and builds from their lines what one process builds from
    its results: the stats, the per-second series (``--timeseries``), the windows of
    ``--abort-on-fail`` (a failing second drains every shard), the verdicts and the HTML
    report: every figure is of the whole run, never an average of the shards'. The driver
    serves ``--metrics-addr`` for the whole run."""
    async with _DriverMetrics.serving(job.metrics_addr, load=True) as metrics:
        return await _run_load(job, cluster, metrics, stderr or sys.stderr)


async def _run_load(
    job: LoadJob, cluster: ClusterSpec, metrics: _DriverMetrics, err: TextIO
) -> LoadOutcome:
    from bulksend.load import Pace, _LoadHooks, behind_schedule

    _check_outputs(cluster, {"--out": job.out, "--timeseries": job.timeseries})
    if is_url(job.out):
        # The driver reads a load's parts as they grow: they must be files it reaches.
        raise ConfigError(
            "load --workers/--cluster needs --out in a file (the driver reads the parts as"
            " they grow); an object store URL is for send"
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

        def behind(self, snapshot: dict[str, Any]) -> str | None:
            # The driver sends nothing: the shards' paces say what held the sends back.
            return behind_schedule(
                snapshot,
                Pace.busiest([r.pace for r in said.reports if r.pace is not None]),
                max_in_flight=job.options.concurrency,
                shards=max(2, len(said.reports)),
                lost=sum(r.resumed > 0 for r in said.reports),
            )

    hooks = ShardedLoadHooks(job, pacer, outcome)
    report = RunReport() if job.html else None
    sinks = Sinks(outputs, plan)
    if hooks.live is not None:
        hooks.live.writer = sinks.timeseries
    observers = [stats.add, *hooks.observers(), *([report.add] if report else [])]
    parts: Parts | None = None
    try:
        parts = await _prepare(job, sinks, err)
        watch = _PartsWatch(parts, observers, hooks.live, outcome, end)
        await sinks.begin(plan, outputs, err)
        metrics.say(job.progress, err)
        await _execute(job, cluster, parts, end, said, None, err, watch=watch, metrics=metrics)
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


class _PartsWatch:
    """The driver's live view of a distributed load: every ``TICK_S`` it reads the lines
    the shards appended to their parts since the last look (whole lines only: a line
    being written waits for the next look), gives each result to ``observers``, lets the
    live series (``load._Live``) emit the seconds that are final and judge them, and on a
    failing second (``--abort-on-fail``) asks every shard to drain, as one process drains
    itself. The message seqs are the schedule's, so the series knows which seconds are
    final exactly as in one process.

    The parts are files on storage the driver reaches (for ``--cluster``, ``--out``'s).
    """

    def __init__(
        self,
        parts: Parts,
        observers: list[Callable[[Result], None]],
        live: Any,
        outcome: LoadOutcome,
        end: End,
    ) -> None:
        self.parts, self.observers, self.live = parts, observers, live
        self.outcome, self.end = outcome, end
        #: Bytes of whole lines read so far, by part path.
        self.offsets: dict[str, int] = {}

    async def run(self, shards: ShardRun) -> None:
        while True:
            await anyio.sleep(TICK_S)
            self.poll()
            if self.live is None:
                continue
            self.live.tick(time.time_ns() // 1_000_000)
            if self.live.failing is not None and self.outcome.aborted_at is None:
                self.outcome.aborted_at, self.outcome.aborted_by = self.live.failing
                self.end.stopped_early = True
                shards.stop()

    def poll(self) -> None:
        """Read what the parts gained since the last look."""
        observers = self.observers
        for _, path in self.parts.found("shard"):
            for result in self._new_results(path):
                for observe in observers:
                    observe(result)

    def _new_results(self, path: str) -> list[Result]:
        offset = self.offsets.get(path, 0)
        try:
            with open(path, "rb") as fh:
                # A re-run shard cuts a torn last line off its part: never one read here.
                fh.seek(offset)
                data = fh.read()
        except OSError as exc:
            raise LedgerError(
                f"cannot read the ledger part {path}: {exc.strerror or exc}"
            ) from None
        whole = data[: data.rfind(b"\n") + 1]
        self.offsets[path] = offset + len(whole)
        results = []
        for line in whole.splitlines():
            obj = orjson.loads(line)
            if isinstance(obj, dict) and obj.get("status") in RESULT_STATUSES:
                results.append(Result.from_dict(obj))
        return results


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
    *,
    watch: _PartsWatch | None = None,
    metrics: _DriverMetrics,
    remote: RemoteLedger | None = None,
    once: ShardedWriteAhead | None = None,
) -> bool:
    """Start or reach the cluster, run every shard, merge their parts (each result line
    to ``on_result``). False when shards were abandoned: their parts stay unmerged.
    ``remote``: the shards upload their parts as segments, merged from there. ``once``:
    --exactly-once, the merged ledger's open intents checked before any shard starts."""
    async with connect(cluster) as (client, address, threads, dashboard):
        shards = cluster.shards or threads
        if job.progress != "off":
            err.write(started_line(address, cluster, shards, dashboard))
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
                check_embedded_reach(address)
            if once is not None:
                await once.settle(target, credentials)
            run = ShardRun(client, job, shards, parts, err, figures=metrics.figures)
            try:
                tasks: Sequence[ShardTask | LoadShardTask] = (
                    run.tasks(job, target, credentials, split)
                    if isinstance(job, SendJob)
                    else run.load_tasks(replace(job, target=target, credentials=credentials))
                )
                if remote is not None:
                    tasks = [_uploading(t, remote, cluster, job) for t in tasks]
                if once is not None:
                    tasks = [once.task(t) for t in tasks if isinstance(t, ShardTask)]
                finished = await run.execute(
                    tasks, shards_said.reports, watch=watch.run if watch is not None else None
                )
            finally:
                end.interrupted = run.interrupted
                end.stopped_early |= run.interrupted or run.error is not None
                if watch is not None:
                    watch.poll()  # the lines written since its last look
            if run.error is not None:
                end.error = run.error
    if not finished:
        where = f"{remote.url}.parts" if remote is not None else parts.directory
        shards_said.abandoned = where if job.out else None
        end.cut_off = True
        return False
    if remote is not None:
        await anyio.to_thread.run_sync(remote.finish, on_result)
        return True
    failed = job.failed if isinstance(job, SendJob) else None
    merge_parts(parts, out=job.out, failed=failed, on_result=on_result)
    return True


def _uploading(
    task: ShardTask | LoadShardTask,
    remote: RemoteLedger,
    cluster: ClusterSpec,
    job: SendJob | LoadJob,
) -> ShardTask:
    """A shard's task that uploads its parts as segments of ``remote``'s generation."""
    assert isinstance(task, ShardTask) and isinstance(job, SendJob)
    n = task.plan.shards
    return replace(
        task,
        segments=remote.segments("shard", task.index, n),
        failed_segments=remote.segments("failed", task.index, n) if job.failed else None,
        segment_interval_s=cluster.segment_interval_s,
        # Every shard downloads the merged ledger of earlier runs (its ok records skip).
        previous=remote.url if job.resume else None,
    )


class _DriverMetrics:
    """The driver's ``/metrics`` (``--metrics-addr``): the sum of what the shards post
    (``metrics.ShardedFigures``), answered from before the outputs are opened (a port in
    use refuses the run untouched, as in one process) until every output is written, so
    that the last figures are there to scrape while the driver merges and writes."""

    def __init__(
        self, endpoint: MetricsEndpoint | None = None, figures: ShardedFigures | None = None
    ) -> None:
        self.endpoint, self.figures = endpoint, figures

    @classmethod
    @contextlib.asynccontextmanager
    async def serving(cls, addr: str | None, *, load: bool) -> AsyncIterator[_DriverMetrics]:
        if not addr:
            yield cls()
            return
        endpoint, figures = MetricsEndpoint.bind(addr), ShardedFigures(load=load)
        async with endpoint.serving(figures):
            yield cls(endpoint, figures)

    def say(self, progress: str, err: TextIO) -> None:
        if self.endpoint is not None and progress != "off":
            err.write(f"bulksend: metrics at {self.endpoint.url}\n")


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
    def __init__(self, shards: _Shards, progress: str) -> None:
        self.shards, self.progress = shards, progress
        #: --exactly-once: the driver's part of it (set once the ledger is open).
        self.once: ShardedWriteAhead | None = None
        self._once_figures: dict[str, Any] = {}

    def finish(self, snapshot: dict[str, Any], end: End) -> None:
        if self.once is not None:
            self._once_figures = self.once.figures(self.shards.reports)
            snapshot.update(self._once_figures)

    async def epilogue(self, snapshot: dict[str, Any], end: End) -> list[str]:
        once = ShardedWriteAhead.lines(self._once_figures, summary=self.progress != "off")
        return [*once, *self.shards.lines()]


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
    if job.options.exactly_once:
        check_out(job.out)
    _check_outputs(cluster, {"--out": job.out, "--failed": job.failed})


def _check_outputs(cluster: ClusterSpec, merged: dict[str, str | None]) -> None:
    """``merged``: the outputs written from the shards' parts (``--out`` first), by flag."""
    if STDOUT in merged.values():
        raise ConfigError(
            f"--workers/--cluster need {' and '.join(merged)} in files: they are written"
            " from the shards' parts"
        )
    if cluster.address is not None and not merged["--out"]:
        raise ConfigError(
            "--cluster needs --out on storage every worker reaches: shards write parts beside it"
        )


async def _prepare(
    job: SendJob | LoadJob, sinks: Sinks, err: TextIO, remote: RemoteLedger | None = None
) -> Parts:
    """The parts directory of this run, made ready. What an earlier run left in it was
    settled when ``--out`` was opened (``run.Sinks``: merged with ``--resume``, dropped
    with ``--overwrite``, else the run refused). With ``remote``, the local directory the
    uploaded segments are merged through, once a ``--resume`` merged what an earlier
    driver left in the store (``remote.RemoteLedger.merge_left``)."""
    if remote is not None:
        resume = isinstance(job, SendJob) and job.resume
        merged_left = await anyio.to_thread.run_sync(remote.merge_left) if resume else 0
        if merged_left and job.progress != "off":
            err.write(
                f"bulksend: merged {merged_left:,} results a previous run left in"
                f" {remote.url}.parts\n"
            )
        return remote.parts
    if not job.out:
        # --workers without --out: the parts are the run's only ledger; workers are local.
        return Parts(tempfile.mkdtemp(prefix="bulksend-parts-"))
    if sinks.ledger_place is None:
        raise ConfigError(f"--workers/--cluster need --out in a regular file; {job.out} is not one")
    parts = Parts(parts_dir(job.out))
    parts.create()
    return parts
