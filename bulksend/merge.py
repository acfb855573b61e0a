"""Shards' outputs back into one run's: ledger parts into the one ``--out``, failed parts
into the one ``--failed``, each shard's stats into one ``Stats``. No Dask in here.

Beside ``--out`` a distributed run keeps ``OUT.parts/``::

    shard-0000-of-0002.jsonl   shard 0's ledger: a run line per attempt, then one Result
                               line per record it finished
    failed-0000-of-0002.jsonl  its failed and invalid records, in input form (``--failed``)
    MERGING                    only while the driver merges (see below)

**Merging** appends every ledger part to ``--out`` with ``"shard": i`` added to each line
(the parts' run lines left out), then removes the directory. An ``--exactly-once`` run's
intent lines are kept, each before its record's result as in a part, so the merged ledger
is what one process writes: a later ``--resume`` reconciles the intents it left open. The lines are not parsed: orjson never writes a raw newline
inside a line, so ``}\\n`` occurs only at a line's end, and one ``bytes.replace`` per 1 MiB
chunk tags every line in it (C speed; parsing is only done to feed an ``--html`` report).

**Crash safety.** Before it appends anything the merge writes ``MERGING`` with the sizes
``--out`` and ``--failed`` had; the directory goes only after both are appended and
fsynced. A driver killed midway leaves the marker: ``recover`` cuts both files back to
those sizes, so the next merge appends the parts once, never twice.

**Stats.** ``ShardStats`` is a shard's ``Stats`` in a form that crosses processes; the
latency HdrHistogram travels encoded (hdrh's compressed form) and histograms are *added*,
never averaged, so the merged percentiles are exactly those of one histogram of all the
shards' values.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import orjson
from hdrh.histogram import HdrHistogram

from bulksend.errors import LedgerError, SinkError
from bulksend.ledger import RUN_LINE_START
from bulksend.result import FAILED, INVALID, OK, Result
from bulksend.sinks import write_json
from bulksend.stats import Stats

#: Bytes read from a part at a time.
CHUNK_BYTES = 1 << 20
#: Statuses of result lines; other lines (a run's settings, an exactly-once intent) are
#: not a record's result.
RESULT_STATUSES = frozenset({OK, FAILED, INVALID})
_PART = re.compile(r"^(shard|failed)-(\d{4,})-of-(\d{4,})\.jsonl$")
_MARKER = "MERGING"
#: Every name bulksend writes in a parts directory: the parts, their locks and input
#: fingerprints (``run.Sinks`` keeps them beside a ledger), the merge marker.
_OWN = re.compile(
    r"^(?:(?:shard|failed)-\d{4,}-of-\d{4,}\.jsonl(?:\.lock|\.inputs\.json)?|MERGING)$"
)
#: How a result line begins (``Result``'s first field).
_RESULT_LINE = b'{"seq":'
#: Past the shards' own drain deadline, how long a driver waits for them: for their
#: reports, and for a shard of an earlier run to let go of its part before a merge.
SHARD_GRACE_S = 10.0


def parts_dir(out: str) -> str:
    """Where the shards of a run with ``--out OUT`` write their parts."""
    return f"{out}.parts"


@dataclass(frozen=True, slots=True)
class Parts:
    """The parts directory of one run."""

    directory: str

    def ledger(self, index: int, shards: int) -> str:
        return os.path.join(self.directory, f"shard-{index:04d}-of-{shards:04d}.jsonl")

    def failed(self, index: int, shards: int) -> str:
        return os.path.join(self.directory, f"failed-{index:04d}-of-{shards:04d}.jsonl")

    @property
    def marker(self) -> str:
        return os.path.join(self.directory, _MARKER)

    def exists(self) -> bool:
        return os.path.isdir(self.directory)

    def found(self, kind: str) -> list[tuple[int, str]]:
        """The ``kind`` ("shard" or "failed") parts present, as (index, path), by index;
        whatever shard count the run that wrote them had."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LedgerError(f"cannot list {self.directory}: {exc.strerror or exc}") from None
        found = []
        for name in names:
            m = _PART.match(name)
            if m is not None and m.group(1) == kind:
                found.append((int(m.group(2)), os.path.join(self.directory, name)))
        return sorted(found)

    def foreign(self) -> list[str]:
        """Names in the directory that bulksend does not write there."""
        try:
            return sorted(n for n in os.listdir(self.directory) if not _OWN.match(n))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LedgerError(f"cannot list {self.directory}: {exc.strerror or exc}") from None

    def create(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create {self.directory}: {exc.strerror or exc}") from None

    def remove(self) -> None:
        """Remove the directory: renamed first (atomic), so a crash during the removal
        leaves no half-deleted parts under the name a resume looks for."""
        if not self.exists():
            return
        doomed = f"{self.directory}.merged-{os.getpid()}"
        try:
            os.replace(self.directory, doomed)
        except OSError as exc:
            raise SinkError(f"cannot remove {self.directory}: {exc.strerror or exc}") from None
        shutil.rmtree(doomed, ignore_errors=True)


def wait_for_part(part: str, timeout: float) -> None:
    """Wait up to ``timeout`` s until no run holds the ledger lock of ``part`` (the lock
    ``run.Sinks`` takes, ``PART.lock`` beside it): a second attempt of a shard whose lost
    worker may still be running, or a driver about to merge, waits for the writer to end.
    LedgerError past the timeout. The lock is only looked at, not kept: the harness takes
    it when it opens the part."""
    path = f"{os.path.realpath(part)}.lock"
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # never written, or its writer ended (the harness removes the lock file)
    except OSError as exc:
        raise LedgerError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LedgerError(
                        f"{path}: a shard of an earlier attempt still writes this part"
                    ) from None
                time.sleep(0.2)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


def wait_for_writers(parts: Parts, timeout: float) -> None:
    """Wait until no shard holds a part of ``parts`` (one left running by a killed driver
    would otherwise append behind a merge)."""
    for _, path in parts.found("shard"):
        wait_for_part(path, timeout)


# --- stats ------------------------------------------------------------------------------


@dataclass(slots=True)
class ShardStats:
    """One shard's ``Stats``, picklable, with its latency histogram hdrh-encoded."""

    counts: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    http_status: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    first_start: int | None = None
    last_done: int | None = None
    rate_changes: int = 0
    latency: bytes = b""

    @classmethod
    def from_stats(cls, stats: Stats) -> ShardStats:
        hist = stats.latency.histogram()
        return cls(
            counts=dict(stats.counts),
            retries=stats.retries,
            http_status=dict(stats.http_status),
            errors=dict(stats.errors),
            first_start=stats.first_start,
            last_done=stats.last_done,
            rate_changes=stats.rate_changes,
            latency=hist.encode() if hist.get_total_count() else b"",
        )

    def add_to(self, stats: Stats) -> None:
        """Add these figures to ``stats`` (counts summed, histograms added, span widened)."""
        stats.counts.update(self.counts)
        stats.retries += self.retries
        stats.http_status.update(self.http_status)
        stats.errors.update(self.errors)
        stats.rate_changes += self.rate_changes
        if self.first_start is not None:
            stats.first_start = min(stats.first_start or self.first_start, self.first_start)
        if self.last_done is not None:
            stats.last_done = max(stats.last_done or self.last_done, self.last_done)
        if self.latency:
            stats.latency.histogram().add(HdrHistogram.decode(self.latency))


def merge_stats(shards: Iterable[ShardStats]) -> Stats:
    """One ``Stats`` of every shard's figures."""
    stats = Stats()
    for shard in shards:
        shard.add_to(stats)
    return stats


# --- ledger parts -----------------------------------------------------------------------


@dataclass(slots=True)
class Merged:
    """What a merge appended."""

    lines: Counter[int] = field(default_factory=Counter)
    #: Bytes of torn last lines dropped (a shard killed inside a write).
    torn_bytes: int = 0


def merge_parts(
    parts: Parts,
    *,
    out: str | None,
    failed: str | None,
    on_result: Callable[[Result], None] | None = None,
) -> Merged:
    """Append every ledger part to ``out`` (tagged with its shard) and every failed part to
    ``failed``, then remove ``parts``. ``on_result`` sees each result line (for --html).
    Run ``recover`` first if a merge may have been cut short."""
    if os.path.exists(parts.marker):
        raise LedgerError(f"{parts.marker}: an earlier merge was cut short; --resume finishes it")
    merged = Merged()
    if not parts.exists():
        return merged
    # Absolute paths: a --resume run from another directory must cut back these files,
    # not files of the same names in its own working directory.
    sizes = {
        "out": _absolute(out),
        "out_size": _size(out),
        "failed": _absolute(failed),
        "failed_size": _size(failed),
    }
    write_json(parts.marker, sizes)
    with _Appender(out) as dst:
        for index, path in parts.found("shard"):
            merged.lines[index] += _copy_tagged(path, dst, index, on_result, merged)
    with _Appender(failed) as dst:
        for _, path in parts.found("failed"):
            _copy_lines(path, dst, merged)
    parts.remove()
    return merged


def part_results(parts: Parts) -> Iterator[Result]:
    """Every result line the ledger parts hold, read a chunk at a time (a part may hold
    millions); a torn last line is left out, as a merge leaves it out."""
    merged = Merged()
    for _, path in parts.found("shard"):
        for block in _whole_lines(path, merged):
            for line in block.splitlines():
                obj = orjson.loads(line)
                if obj.get("status") in RESULT_STATUSES:
                    yield Result.from_dict(obj)


def recover(parts: Parts) -> bool:
    """Undo a merge that was cut short (its ``MERGING`` marker is there): cut ``--out`` and
    ``--failed`` back to their sizes before it, and drop the marker, so that the parts can
    be merged again. True if there was one to undo."""
    try:
        with open(parts.marker, "rb") as fh:
            state = orjson.loads(fh.read())
    except FileNotFoundError:
        return False
    except (OSError, orjson.JSONDecodeError) as exc:
        raise LedgerError(f"cannot read {parts.marker}: {exc}") from None
    for key in ("out", "failed"):
        path, size = state.get(key), state.get(f"{key}_size")
        if isinstance(path, str) and isinstance(size, int) and _size(path) > size:
            try:
                os.truncate(path, size)
            except OSError as exc:
                raise LedgerError(f"cannot cut {path} back: {exc.strerror or exc}") from None
    os.unlink(parts.marker)
    return True


def settle_parts(
    out: str,
    failed: str | None,
    *,
    resume: bool,
    overwrite: bool,
    resumable: bool = True,
    wait_s: float,
    say: Callable[[str], None],
) -> None:
    """What a run on the ledger ``out`` does with ``OUT.parts/`` that an earlier distributed
    run left (its driver killed, or the run abandoned), whether this run is distributed or
    not: with ``--resume`` finish that run first (undo a merge cut short, wait for shards
    still writing, merge the parts into ``out`` and ``failed``), so the records its shards
    sent are done and not sent again; with ``--overwrite`` drop the parts; else refuse, as
    for a non-empty ledger. Call it holding ``out``'s lock."""
    parts = Parts(parts_dir(out))
    if not parts.exists():
        return
    foreign = parts.foreign()
    if foreign:
        # Not ours to merge or to delete (a later run removes the directory whole).
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3:,} more" if len(foreign) > 3 else ""
        )
        raise LedgerError(
            f"{parts.directory} holds files bulksend did not write there ({shown}): move them"
            " away, or give another --out"
        )
    if resume:
        if recover(parts):
            say(f"bulksend: undid a merge of {parts.directory} that was cut short")
        cut_torn_tail(out, say)
        wait_for_writers(parts, wait_s)
        merged = merge_parts(parts, out=out, failed=failed)
        if merged.lines:
            say(
                f"bulksend: merged {sum(merged.lines.values()):,} results a previous run left"
                f" in {parts.directory}"
            )
    elif (parts.found("shard") or os.path.exists(parts.marker)) and not overwrite:
        fix = "add --resume to continue it, or --overwrite" if resumable else "add --overwrite"
        raise LedgerError(
            f"{parts.directory} holds the results of an unfinished run: {fix} to start again"
        )
    else:
        parts.remove()


def cut_torn_tail(path: str, say: Callable[[str], None]) -> None:
    """Cut a torn last line off the ledger (a run killed inside a write), so that merged
    lines start clean. Reads only the tail."""
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
                say(f"bulksend: ignored a torn last line ({size - end} bytes) in {path}")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SinkError(f"cannot repair {path}: {exc.strerror or exc}") from None


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def _size(path: str | None) -> int:
    if path is None:
        return 0
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise SinkError(f"cannot read {path}: {exc.strerror or exc}") from None


class _Appender:
    """An O_APPEND file descriptor (or nowhere, for None), fsynced on a clean exit."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _Appender:
        if self.path is not None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as exc:
                raise SinkError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        return self

    def write(self, data: bytes) -> None:
        if self.fd is None or not data:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def __exit__(self, et: object, e: object, tb: object) -> None:
        if self.fd is None:
            return
        try:
            if et is None:
                os.fsync(self.fd)
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(self.fd)
            self.fd = None


def _whole_lines(path: str, merged: Merged) -> Iterable[bytes]:
    """The file's whole lines, a chunk of them at a time; a torn last line is dropped."""
    carry = b""
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                data = carry + chunk if carry else chunk
                end = data.rfind(b"\n") + 1
                carry = data[end:]
                if end:
                    yield data[:end]
    except OSError as exc:
        raise LedgerError(f"cannot read {path}: {exc.strerror or exc}") from None
    merged.torn_bytes += len(carry)


def _copy_tagged(
    path: str,
    dst: _Appender,
    index: int,
    on_result: Callable[[Result], None] | None,
    merged: Merged,
) -> int:
    tag = b',"shard":%d}\n' % index
    lines = 0
    for block in _whole_lines(path, merged):
        if RUN_LINE_START in block:
            # Each attempt of a shard began its part with a run line; --out has the
            # driver's own, which holds the run's settings.
            block = b"".join(
                x for x in block.splitlines(keepends=True) if not x.startswith(RUN_LINE_START)
            )
        n = block.count(b"\n")
        # Counted, not parsed (C speed): every line a whole JSON object that begins as a
        # result line does.
        starts = block.count(b"\n" + _RESULT_LINE) + block.startswith(_RESULT_LINE)
        if block.count(b"}\n") != n or starts != n:
            raise LedgerError(f"{path}: holds a line that is not a results line")
        lines += n
        dst.write(block.replace(b"}\n", tag))
        if on_result is not None:
            for line in block.splitlines():
                obj = orjson.loads(line)
                if obj.get("status") in RESULT_STATUSES:
                    on_result(Result.from_dict(obj))
    return lines


def _copy_lines(path: str, dst: _Appender, merged: Merged) -> None:
    for block in _whole_lines(path, merged):
        dst.write(block)
