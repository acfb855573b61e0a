"""``--out s3://bucket/key.jsonl``: a distributed send's ledger in an object store (any
fsspec URL; S3 or OBS through the optional ``s3fs``). An object is written whole, never
appended to, locked or cut back, so the ledger is kept as objects that are each written
once, and the driver works on a local copy. Beside the ledger object ``OUT``::

    OUT                        the merged ledger, written whole by the driver
    OUT.lock                   the driver's lock: {"host", "pid", "at"}
    OUT.inputs.json            the inputs' fingerprints, as beside a local ledger
    OUT.parts/run-<ms>-<hex>/  one generation: the parts of one driver's run
        run.jsonl              that driver's run line (its settings name the generation)
        shard-0003-of-0004/    shard 3's ledger part, per attempt of the shard:
            attempt-<ms>-<hex>/base.json         the segments it resumed from
            attempt-<ms>-<hex>/seg-000017.jsonl  its 18th segment
        failed-0003-of-0004/attempt-<ms>-<hex>/seg-000002.jsonl  its --failed part
        MERGING                --failed's size before the merge (see below)

**A shard** (``ShardSegments``) writes its part in a temporary directory of its worker,
as it would beside a local ``--out``; an uploader sends the whole lines written since
its last upload as the next segment every ``interval_s`` (``--segment-interval``, 5 s)
and once more when the shard ends (drained or not). A shard that runs again (its worker
was lost) downloads the segments of its earlier attempts into a new local part and
resumes from it as usual. So a lost worker costs the records whose lines were not
uploaded yet: at most one interval (plus one upload's duration) of the shard's sends,
plus its requests in flight.

**Each attempt of a shard writes under its own prefix.** Dask may declare a worker lost
while its process still runs (a network partition, a long GC pause, SIGSTOP): the shard
runs again elsewhere while the first attempt, when it wakes, uploads what it did since
(its requests in flight, one interval's lines). With one shared sequence of segment
names, that upload and the new attempt's would collide (a conditional write refused, the
run stopped) or one would be lost. Instead no two attempts ever write the same object,
each says in ``base.json`` which segments it resumed from, and whoever reads the shard
(a later attempt, the driver) takes the attempts in order and keeps one line per record
(``Attempts``): the lost attempt's late lines count, nothing is sent a third time. This
was chosen over "on a refused write, fetch the other segment and fold it in" because
that needs both attempts to agree on who folds what while both still write, and a
reader must still drop the records both did; here only readers decide, once.

**The driver** (``RemoteLedger``) takes the lock, downloads ``OUT`` (``--resume``),
merges the shards' segments into its copy as ``merge.py`` merges local parts, uploads the
copy whole as ``OUT`` (multipart for a large one is s3fs's), and removes the generation.

Subtleness ahead! A driver killed between uploading ``OUT`` and removing the generation
leaves parts that ``OUT`` already holds. A generation's lines enter ``OUT`` only with its
run line, whose settings say ``"parts": "<generation>"``; a resume reads the generations
``OUT`` names, removes those, and merges only the others: never a line twice. ``--failed``
is a second object, uploaded before ``OUT``: a generation not in ``OUT`` may be in the
failed object already, so ``MERGING`` keeps the failed object's size from before, and a
resume cuts its copy back to it before merging again (``merge.recover``, for objects).

**The lock** is an object created with ``If-None-Match: *`` (an S3 conditional write;
moto and S3 honour it; a store that ignores it leaves the lock advisory). No kernel drops
it when its run dies: a run on the same host whose pid is gone is taken over (with
``If-Match`` on the dead run's ETag, so two runs cannot both take it); a lock of another
host must be removed by hand, as the refusal says.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import orjson

from bulksend.errors import ConfigError, LedgerError, SinkError
from bulksend.ledger import RUN_LINE_START, fingerprints_path
from bulksend.merge import RESULT_STATUSES, Parts, merge_parts
from bulksend.result import OK, Result
from bulksend.run import End, Hooks, Live, Ticker
from bulksend.stats import Stats

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from bulksend.observers import AttemptObserver

#: Gets each result line merged (for --html).
OnResult = Callable[[Result], None] | None

#: Seconds between a shard's uploads of its new ledger lines (``--segment-interval``).
SEGMENT_INTERVAL_S = 5.0
#: Segments fetched side by side (and held in memory at once) when parts are read back.
FETCH_BATCH = 32
_SEGMENT = re.compile(r"^seg-(\d{6,})\.jsonl$")
_GENERATION = re.compile(r"^run-\d{13}-[0-9a-f]{6}$")
_ATTEMPT = re.compile(r"^attempt-\d{13}-[0-9a-f]{6}$")
#: An attempt's first object: the segments of earlier attempts it resumed from.
BASE = "base.json"


def is_url(path: str | None) -> bool:
    """Whether an output or input is an fsspec URL (``s3://...``) rather than a path."""
    return path is not None and "://" in path


class Store:
    """One object store location, its errors as ours: fsspec's calls, by fs path."""

    def __init__(self, url: str) -> None:
        import fsspec.core

        self.url = url
        try:
            fs, root = fsspec.core.url_to_fs(url)
        except ImportError as exc:
            raise ConfigError(
                f"cannot use {url}: {exc} (for s3://: pip install 'bulksend[s3]')"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"cannot use {url}: {exc}") from None
        self.fs: AbstractFileSystem = fs
        #: The URL's path on ``fs`` (``bucket/key``).
        self.root: str = root.rstrip("/")

    def _fail(self, path: str, exc: BaseException) -> LedgerError:
        return LedgerError(f"{self.fs.unstrip_protocol(path)}: {exc}")

    # Subtleness ahead! Each call below catches Exception, not OSError: fsspec's backends
    # raise their own types too (botocore's EndpointConnectionError is no OSError), and a
    # store that cannot be reached must stop the run in one line, not a traceback.

    def info(self, path: str) -> dict[str, Any] | None:
        """The object's size and ETag, or None when there is none."""
        try:
            return dict(self.fs.info(path, refresh=True))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail(path, exc) from None

    def get(self, path: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(path))
        except Exception as exc:
            raise self._fail(path, exc) from None

    def get_many(self, paths: list[str]) -> Iterator[bytes]:
        """The objects' contents in order, fetched ``FETCH_BATCH`` at a time side by
        side (fsspec's ``cat`` of a list): an hours-long run has thousands of segments,
        and one GET after another would cost a round trip each."""
        for i in range(0, len(paths), FETCH_BATCH):
            batch = paths[i : i + FETCH_BATCH]
            try:
                found = self.fs.cat(batch, on_error="raise")
            except Exception as exc:
                raise self._fail(batch[0], exc) from None
            for path in batch:
                yield bytes(found[path])

    def put(self, path: str, data: bytes, **conditions: str) -> None:
        """Write one object whole; ``conditions``: ``IfNoneMatch="*"`` (only if there is
        none; FileExistsError if there is) or ``IfMatch=etag`` (only if it is that one)."""
        try:
            self.fs.pipe_file(path, data, **conditions)
        except FileExistsError:
            raise
        except Exception as exc:
            raise self._fail(path, exc) from None

    def download(self, path: str, local: str) -> None:
        try:
            self.fs.get_file(path, local)
        except Exception as exc:
            raise self._fail(path, exc) from None

    def upload(self, local: str, path: str) -> None:
        try:
            self.fs.put_file(local, path)
        except Exception as exc:
            raise SinkError(f"cannot write {self.fs.unstrip_protocol(path)}: {exc}") from None

    def names(self, prefix: str) -> list[str]:
        """The names right under ``prefix`` (objects and "directories"), sorted."""
        try:
            self.fs.invalidate_cache(prefix)
            found = self.fs.ls(prefix, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._fail(prefix, exc) from None
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._fail(path, exc) from None
        self.fs.invalidate_cache(path)


# --- a shard ------------------------------------------------------------------------------


class _Uploader:
    """One local line file and its segments under ``prefix`` (this attempt's)."""

    def __init__(self, store: Store, prefix: str, local: str) -> None:
        self.store, self.prefix, self.local = store, prefix, local
        #: The next segment's number, and the bytes of ``local`` uploaded so far.
        self.next = 0
        self.uploaded = 0

    def start_after(self) -> None:
        """The local file holds what earlier attempts uploaded: only what is written
        after it is this attempt's to upload."""
        self.uploaded = _size(self.local)

    def upload(self) -> None:
        """The whole lines written since the last upload, as the next segment."""
        try:
            with open(self.local, "rb") as fh:
                fh.seek(self.uploaded)
                data = fh.read()
        except FileNotFoundError:
            return  # nothing written yet
        except OSError as exc:
            raise SinkError(f"cannot read {self.local}: {exc.strerror or exc}") from None
        # A line being written waits for the next upload: a segment holds whole lines.
        whole = data[: data.rfind(b"\n") + 1]
        if not whole:
            return
        path = f"{self.prefix}/seg-{self.next:06d}.jsonl"
        # Only this attempt writes under its prefix: a segment that exists is one a
        # failed try of this very upload created (its answer lost); it holds these
        # bytes, since the local file only grows.
        with contextlib.suppress(FileExistsError):
            self.store.put(path, whole, IfNoneMatch="*")
        self.next += 1
        self.uploaded += len(whole)


class ShardSegments:
    """One shard's ledger part (and failed part) in a local temporary directory, uploaded
    as segments of this attempt under ``ledger_url`` (and ``failed_url``)."""

    def __init__(
        self,
        ledger_url: str,
        failed_url: str | None,
        names: tuple[str, str | None],
        interval_s: float = SEGMENT_INTERVAL_S,
    ) -> None:
        self.store = Store(ledger_url)
        self.interval_s = interval_s
        self.attempt = new_attempt()
        self.directory = tempfile.mkdtemp(prefix="bulksend-shard-")
        self.part = os.path.join(self.directory, names[0])
        self.failed_part = os.path.join(self.directory, names[1]) if names[1] else None
        self.ledger = _Uploader(self.store, f"{self.store.root}/{self.attempt}", self.part)
        self.uploaders = [self.ledger]
        if failed_url is not None and self.failed_part is not None:
            failed_root = f"{Store(failed_url).root}/{self.attempt}"
            self.uploaders.append(_Uploader(self.store, failed_root, self.failed_part))
        #: The segments of earlier attempts this one resumed from; None once uploaded.
        self._seen: dict[str, int] | None = {}

    def download(self) -> None:
        """What earlier attempts of this shard uploaded, each record once, into the local
        ledger part (its failed records are in their attempts' failed segments already);
        then this attempt's ``base.json``, which says what it resumed from."""
        attempts = Attempts.read(self.store, self.store.root)
        with open(self.part, "wb") as fh:
            for block in attempts.ledger_blocks():
                fh.write(block)
        self.ledger.start_after()
        self._seen = attempts.counts()
        self._announce()

    def _announce(self) -> None:
        """Write this attempt's ``base.json`` before its first segment."""
        if self._seen is None:
            return
        base = f"{self.ledger.prefix}/{BASE}"
        with contextlib.suppress(FileExistsError):  # a try whose answer was lost
            self.store.put(base, orjson.dumps(self._seen), IfNoneMatch="*")
        self._seen = None

    def previous(self, url: str) -> str:
        """A local copy of the merged ledger ``url`` of earlier runs (empty if none)."""
        store = Store(url)
        local = os.path.join(self.directory, "previous.jsonl")
        if store.info(store.root) is None:
            open(local, "wb").close()
        else:
            store.download(store.root, local)
        return local

    def upload(self) -> None:
        """Every whole line not uploaded yet (the shard's end: every line is whole)."""
        self._announce()
        for uploader in self.uploaders:
            uploader.upload()

    async def run(self) -> None:
        """The uploader ticker. A failed upload is tried again at the next tick (its
        lines stay in the local part, and a store that is briefly away must not stop the
        sends); the shard's last upload, after the sends, raises what still fails."""
        while True:
            await anyio.sleep(self.interval_s)
            with contextlib.suppress(LedgerError, SinkError):
                await anyio.to_thread.run_sync(self.upload)

    def hooks(self, inner: Hooks) -> Hooks:
        return _UploadingHooks(inner, self.run)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def new_attempt() -> str:
    """An attempt's name: sorts by its start (the worker's clock), unique."""
    return f"attempt-{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(3)}"


class Attempts:
    """Every attempt of one shard in one generation: what each uploaded, and what each
    resumed from. Read by a shard run again (to resume) and by the driver (to merge or to
    count), so that both see each record once.

    Subtleness ahead! Which lines can name a record twice: attempt Y skips every record
    of the segments it downloaded (its ``base.json`` counts them per earlier attempt), so
    a record is done twice only when an earlier attempt X uploaded it in a segment Y did
    not see: *late* segments, uploaded by a lost worker still running (a partition, a GC
    pause, SIGSTOP) after Y listed. Those are at most what X had in flight plus one
    upload interval, so they are held in memory, and only when there are any are the
    lines of the attempts after X parsed (to find their records among them); every other
    segment is copied as it is, as fast as without attempts."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        segments: dict[str, list[int]],
        seen: dict[str, dict[str, int]],
    ) -> None:
        self.store, self.prefix = store, prefix
        #: Each attempt's segment numbers, and what it resumed from (per earlier attempt,
        #: the number of its segments it downloaded).
        self.segments, self.seen = segments, seen
        self.order = _in_order(seen)
        #: Records two attempts finished (filled by ``ledger_blocks``): their source, and
        #: whether the line kept is not ok (so one --failed line of it is kept too).
        self.contested: dict[str, bool] = {}

    @classmethod
    def read(cls, store: Store, prefix: str) -> Attempts:
        segments: dict[str, list[int]] = {}
        seen: dict[str, dict[str, int]] = {}
        for name in store.names(prefix):
            if _SEGMENT.match(name):
                where = store.fs.unstrip_protocol(f"{prefix}/{name}")
                raise LedgerError(
                    f"{where}: a segment of a bulksend from before attempts (they are read"
                    " from attempt-*/ only): finish that run with that version"
                )
            if not _ATTEMPT.match(name):
                continue
            listed = store.names(f"{prefix}/{name}")
            segments[name] = sorted(
                int(m.group(1)) for n in listed if (m := _SEGMENT.match(n)) is not None
            )
            seen[name] = _base(store, f"{prefix}/{name}/{BASE}") if BASE in listed else {}
        return cls(store, prefix, segments, seen)

    def counts(self) -> dict[str, int]:
        """Per attempt, the number of segments read (a later attempt's ``base.json``)."""
        return {a: segs[-1] + 1 for a, segs in self.segments.items() if segs}

    def _late(self, attempt: str, number: int) -> bool:
        later = self.order[self.order.index(attempt) + 1 :]
        return any(self.seen[y].get(attempt, 0) <= number for y in later)

    def _segments(self, late: bool | None = None) -> list[tuple[int, str]]:
        """(the attempt's place in ``order``, the segment's path), in order; only the
        late ones, or only the others."""
        return [
            (i, f"{self.prefix}/{a}/seg-{n:06d}.jsonl")
            for i, a in enumerate(self.order)
            for n in self.segments.get(a, ())
            if late is None or self._late(a, n) == late
        ]

    def ledger_blocks(self) -> Iterator[bytes]:
        """The shard's ledger lines, each record once (an ok line over any other, else
        the first), ``FETCH_BATCH`` segments at a time."""
        late = self._segments(late=True)
        if not late:
            yield from self.store.get_many([path for _, path in self._segments()])
            return
        held: dict[object, _Line] = {}
        for path, data in self._fetch([path for _, path in late]):
            passed = []
            for lineno, raw in enumerate(data.splitlines(keepends=True), 1):
                line = _Line.parse(raw, path, lineno)
                if line.key is None:
                    passed.append(raw)  # a run line: not a record's
                elif line.key in held:
                    held[line.key] = self._contest(held[line.key], line)
                else:
                    held[line.key] = line
            yield b"".join(passed)
        # The records of late lines were done again only by attempts after the one that
        # uploaded them: the lines of that attempt and of earlier ones (hours of a long
        # run, often) go as they are; only the later attempts' lines are parsed.
        first = late[0][0]
        rest = self._segments(late=False)
        yield from self.store.get_many([path for i, path in rest if i <= first])
        for path, data in self._fetch([path for i, path in rest if i > first]):
            kept = []
            for lineno, raw in enumerate(data.splitlines(keepends=True), 1):
                line = _Line.parse(raw, path, lineno)
                if line.key is not None and line.key in held:
                    held[line.key] = self._contest(held[line.key], line)
                else:
                    kept.append(raw)
            yield b"".join(kept)
        yield b"".join(line.raw for line in held.values())

    def _fetch(self, paths: list[str]) -> Iterator[tuple[str, bytes]]:
        """Each segment's URL (for an error) and its contents."""
        urls = (self.store.fs.unstrip_protocol(p) for p in paths)
        return zip(urls, self.store.get_many(paths), strict=True)

    def _contest(self, first: _Line, then: _Line) -> _Line:
        kept = then if then.ok and not first.ok else first
        if kept.source is not None:  # a --failed line is found by its source
            self.contested[kept.source] = not kept.ok
        return kept

    def failed_blocks(self, root: str) -> Iterator[bytes]:
        """The shard's --failed lines (segments under ``root``, in the same attempts),
        one per record whose kept ledger line is not ok. After ``ledger_blocks``."""
        names = [n for n in self.store.names(root) if _ATTEMPT.match(n)]
        order = [a for a in self.order if a in names] + sorted(set(names) - set(self.order))
        paths = []
        for a in order:
            listed = self.store.names(f"{root}/{a}")
            numbers = sorted(int(m.group(1)) for n in listed if (m := _SEGMENT.match(n)))
            paths += [f"{root}/{a}/seg-{n:06d}.jsonl" for n in numbers]
        if not self.contested:
            yield from self.store.get_many(paths)
            return
        wanted = dict(self.contested)
        for data in self.store.get_many(paths):
            kept = []
            for raw in data.splitlines(keepends=True):
                source = _failed_source(raw)
                if source not in wanted:
                    kept.append(raw)
                elif wanted[source]:
                    kept.append(raw)
                    wanted[source] = False  # one line of it
            yield b"".join(kept)


class _Line:
    """A ledger line, parsed: its record (identity, else seq; None for a run line)."""

    __slots__ = ("key", "ok", "raw", "source")

    def __init__(self, raw: bytes, key: object, ok: bool, source: str | None) -> None:
        self.raw, self.key, self.ok, self.source = raw, key, ok, source

    @classmethod
    def parse(cls, raw: bytes, where: str, lineno: int) -> _Line:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise LedgerError(f"{where}:{lineno}: not a results line")
        if obj.get("status") not in RESULT_STATUSES:
            return cls(raw, None, False, None)
        key = obj.get("identity") or ("seq", obj.get("seq"))
        source = obj.get("source")
        return cls(raw, key, obj.get("status") == OK, source if isinstance(source, str) else None)


def _failed_source(raw: bytes) -> str | None:
    with contextlib.suppress(orjson.JSONDecodeError):
        obj = orjson.loads(raw)
        if isinstance(obj, dict) and isinstance(obj.get("_source"), str):
            return str(obj["_source"])
    return None


def _base(store: Store, path: str) -> dict[str, int]:
    try:
        found = orjson.loads(store.get(path))
    except orjson.JSONDecodeError:
        raise LedgerError(f"{store.fs.unstrip_protocol(path)}: not an attempt's base") from None
    if not isinstance(found, dict):
        raise LedgerError(f"{store.fs.unstrip_protocol(path)}: not an attempt's base")
    return {str(k): int(v) for k, v in found.items() if isinstance(v, int)}


def _in_order(seen: dict[str, dict[str, int]]) -> list[str]:
    """The attempts, each after those it resumed from, else by name (its start): an
    attempt on a worker whose clock is behind still comes after what it read."""
    left = sorted(seen)
    order = []
    while left:
        ready = [a for a in left if not any(b in left for b in seen[a] if b != a)]
        order.append((ready or left)[0])  # a cycle cannot be written: see Attempts
        left.remove(order[-1])
    return order


class _UploadingHooks(Hooks):
    """A shard's hooks, and the uploader ticker beside them."""

    def __init__(self, inner: Hooks, uploader: Ticker) -> None:
        self.inner, self.uploader = inner, uploader

    def observers(self) -> list[Callable[[Result], None]]:
        return self.inner.observers()

    def tickers(self, live: Live) -> list[Ticker]:
        return [*self.inner.tickers(live), self.uploader]

    def attempt_observers(self) -> list[AttemptObserver]:
        return self.inner.attempt_observers()

    def finish(self, snapshot: dict[str, Any], end: End) -> None:
        self.inner.finish(snapshot, end)

    async def epilogue(self, snapshot: dict[str, Any], end: End) -> list[str]:
        return await self.inner.epilogue(snapshot, end)


# --- the driver ---------------------------------------------------------------------------


def new_generation() -> str:
    """A generation's name: sorts by its start, unique between runs."""
    return f"run-{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(3)}"


class RemoteLedger:
    """The driver's side of ``--out URL`` (see the module docstring): a lock, a local
    copy of the ledger (and of ``--failed URL``), the generations of parts."""

    def __init__(self, url: str, failed_url: str | None, *, resume: bool, overwrite: bool):
        if failed_url is not None and not is_url(failed_url):
            raise ConfigError(
                "with --out in an object store, --failed must be an object URL too: both are"
                " merged from the shards' uploaded parts"
            )
        self.url, self.failed_url = url, failed_url
        self.resume, self.overwrite = resume, overwrite
        self.store = Store(url)
        self.failed_store = Store(failed_url) if failed_url is not None else None
        self.root = self.store.root
        self.parts_root = f"{self.root}.parts"
        self.generation = new_generation()
        self.directory = tempfile.mkdtemp(prefix="bulksend-out-")
        #: The local copies the run writes (``Sinks`` opens them as --out and --failed).
        self.ledger = os.path.join(self.directory, "ledger.jsonl")
        self.failed = os.path.join(self.directory, "failed.jsonl") if failed_url else None
        #: Where the generations' segments are put together for ``merge.merge_parts``.
        self.parts = Parts(os.path.join(self.directory, "parts"))
        #: Local documents (--stats, --html) to upload at the end, to their URLs.
        self.documents: dict[str, str] = {}
        self._locked = False

    # -- before ----------------------------------------------------------------------------

    def document(self, url: str | None) -> str | None:
        """A local path for a document written at the end, uploaded to ``url`` after."""
        if not is_url(url):
            return url
        assert url is not None
        Store(url)  # an unknown protocol stops the run now
        local = os.path.join(self.directory, f"document-{len(self.documents)}")
        self.documents[local] = url
        return local

    def open(self) -> None:
        """Lock; refuse a ledger that holds results without --resume or --overwrite; make
        the local copies."""
        self._lock()
        ledger = self.store.info(self.root)
        size = int(ledger.get("size") or 0) if ledger else 0
        left = self.generations()
        if not (self.resume or self.overwrite):
            if size:
                raise LedgerError(
                    f"{self.url} already holds results ({size:,} bytes): add --resume to"
                    " continue it, or --overwrite to start again"
                )
            if left:
                raise LedgerError(
                    f"{self.url}.parts holds the results of an unfinished run: add --resume"
                    " to continue it, or --overwrite to start again"
                )
        if self.resume:
            if ledger is not None:
                self.store.download(self.root, self.ledger)
            sidecar = fingerprints_path(self.root)
            if self.store.info(sidecar) is not None:
                self.store.download(sidecar, fingerprints_path(self.ledger))
            failed = self.failed_store
            if failed is not None and self.failed and failed.info(failed.root) is not None:
                failed.download(failed.root, self.failed)
            return
        # A run started again: the object store's state as a truncated local ledger's.
        for gen in left:
            self.store.remove(f"{self.parts_root}/{gen}", recursive=True)
        self.store.remove(self.root)
        if self.failed_store is not None:
            self.failed_store.remove(self.failed_store.root)

    def _lock(self) -> None:
        path = f"{self.root}.lock"
        me = orjson.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time_ns() // 10**6}
        )
        try:
            self.store.put(path, me, IfNoneMatch="*")
            self._locked = True
            return
        except FileExistsError:
            pass
        info = self.store.info(path)
        holder: dict[str, Any] = {}
        with contextlib.suppress(LedgerError, orjson.JSONDecodeError):
            holder = orjson.loads(self.store.get(path)) if info else {}
        pid, host = holder.get("pid"), holder.get("host")
        mine = host == socket.gethostname()
        if info is not None and mine and isinstance(pid, int) and not _alive(pid):
            try:  # a dead run's lock: taken over only if it is still that one
                self.store.put(path, me, IfMatch=str(info.get("ETag")))
                self._locked = True
                return
            except (FileExistsError, LedgerError):
                pass  # taken by another run meanwhile
        raise LedgerError(
            f"{self.url} is in use by pid {pid or '?'} on {host or '?'}; if that run is"
            f" gone, remove {self.store.fs.unstrip_protocol(path)}"
        )

    def generations(self) -> list[str]:
        """The generations of parts present, oldest first."""
        return [g for g in self.store.names(self.parts_root) if _GENERATION.match(g)]

    def merge_left(self) -> int:
        """``--resume``: merge into the local copies the generations of parts an earlier
        driver left and ``OUT`` does not hold; remove those it holds. Result lines merged."""
        named = _generations_named(self.ledger)
        left = [g for g in self.generations() if g not in named]
        for gen in (g for g in self.generations() if g in named):
            self.store.remove(f"{self.parts_root}/{gen}", recursive=True)
        if not left:
            return 0
        self._cut_failed_back(left)
        base = _size(self.failed)
        lines = 0
        for gen in left:
            lines += self._merge(gen)
        self._publish(left, base)
        return lines

    def _cut_failed_back(self, gens: list[str]) -> None:
        sizes = []
        for gen in gens:
            path = f"{self.parts_root}/{gen}/MERGING"
            if self.store.info(path) is not None:
                with contextlib.suppress(orjson.JSONDecodeError):
                    size = orjson.loads(self.store.get(path)).get("failed_size")
                    if isinstance(size, int):
                        sizes.append(size)
        if sizes and self.failed is not None and _size(self.failed) > min(sizes):
            os.truncate(self.failed, min(sizes))

    def begin(self, generation_line: bytes) -> None:
        """After the run line is written: upload the inputs' fingerprints and this
        generation's run line, before any shard writes a part."""
        sidecar = fingerprints_path(self.ledger)
        if os.path.exists(sidecar):
            self.store.upload(sidecar, fingerprints_path(self.root))
        self.store.put(f"{self.parts_root}/{self.generation}/run.jsonl", generation_line)

    def segments(self, kind: str, index: int, shards: int) -> str:
        """The URL under which shard ``index`` uploads its ``kind`` part's segments."""
        return f"{self.url}.parts/{self.generation}/{kind}-{index:04d}-of-{shards:04d}"

    # -- after -----------------------------------------------------------------------------

    def finish(self, on_result: OnResult = None) -> None:
        """Every shard reported: merge this run's generation into the local copies, then
        publish them."""
        base = _size(self.failed)
        self._merge(self.generation, on_result=on_result, run_line=False)
        self._publish([self.generation], base)

    def _merge(self, gen: str, *, on_result: OnResult = None, run_line: bool = True) -> int:
        """Download generation ``gen``'s segments as parts (each record once, whatever
        attempts its shard took), append them (after its run line, when the local ledger
        does not have it yet) to the local copies."""
        prefix = f"{self.parts_root}/{gen}"
        names = self.store.names(prefix)
        if "run.jsonl" not in names:
            return 0  # its driver died before any shard began
        self.parts.remove()
        self.parts.create()
        for name in names:
            if not name.startswith("shard-"):
                continue
            attempts = Attempts.read(self.store, f"{prefix}/{name}")
            _write(os.path.join(self.parts.directory, f"{name}.jsonl"), attempts.ledger_blocks())
            failed = "failed-" + name.removeprefix("shard-")
            if failed in names:
                local = os.path.join(self.parts.directory, f"{failed}.jsonl")
                _write(local, attempts.failed_blocks(f"{prefix}/{failed}"))
        if run_line:
            with open(self.ledger, "ab") as fh:
                fh.write(self.store.get(f"{prefix}/run.jsonl"))
        merged = merge_parts(self.parts, out=self.ledger, failed=self.failed, on_result=on_result)
        return sum(merged.lines.values())

    def results(self) -> Iterator[Result]:
        """Every result this run's shards uploaded so far, each record once, read
        ``FETCH_BATCH`` segments at a time: an abandoned run's summary counts what a
        ``--resume`` will find done, as ``merge.part_results`` does for local parts."""
        prefix = f"{self.parts_root}/{self.generation}"
        for name in self.store.names(prefix):
            if not name.startswith("shard-"):
                continue
            for block in Attempts.read(self.store, f"{prefix}/{name}").ledger_blocks():
                for raw in block.splitlines():
                    try:
                        obj = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        obj = None
                    if not isinstance(obj, dict):
                        where = self.store.fs.unstrip_protocol(f"{prefix}/{name}")
                        raise LedgerError(f"{where}: holds a line that is not a results line")
                    if obj.get("status") in RESULT_STATUSES:
                        yield Result.from_dict(obj)

    def count(self, stats: Stats) -> None:
        """Add every result of ``results`` to ``stats`` (in a thread: it downloads)."""
        for result in self.results():
            stats.add(result)

    def _publish(self, gens: list[str], failed_base: int) -> None:
        """Upload the local copies whole (--failed first, the ledger last: the ledger
        names the generations it holds), then remove those generations."""
        if self.failed_store is not None and self.failed is not None:
            marker = orjson.dumps({"failed_size": failed_base})
            for gen in gens:
                self.store.put(f"{self.parts_root}/{gen}/MERGING", marker)
            if os.path.exists(self.failed):
                self.failed_store.upload(self.failed, self.failed_store.root)
        if not os.path.exists(self.ledger):
            open(self.ledger, "wb").close()
        self.store.upload(self.ledger, self.root)
        for gen in gens:
            self.store.remove(f"{self.parts_root}/{gen}", recursive=True)

    def upload_documents(self) -> None:
        for local, url in self.documents.items():
            if os.path.exists(local):
                store = Store(url)
                store.upload(local, store.root)

    def close(self) -> None:
        """Release the lock; drop the local copies."""
        if self._locked:
            self._locked = False
            with contextlib.suppress(LedgerError):
                self.store.remove(f"{self.root}.lock")
        shutil.rmtree(self.directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path is not None else 0
    except FileNotFoundError:
        return 0


def _generations_named(ledger: str) -> set[str]:
    """The generations whose run lines the ledger holds."""
    named = set()
    for line in _lines(ledger):
        if line.startswith(RUN_LINE_START):
            with contextlib.suppress(orjson.JSONDecodeError):
                settings = orjson.loads(line).get("settings") or {}
                if isinstance(settings, dict) and isinstance(settings.get("parts"), str):
                    named.add(settings["parts"])
    return named


def _write(path: str, blocks: Iterator[bytes]) -> None:
    with open(path, "wb") as fh:
        for block in blocks:
            fh.write(block)


def _lines(path: str) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            yield from fh
    except FileNotFoundError:
        return


def last_line(path: str) -> bytes:
    """The file's last line (a run line just written)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - 65536))
        tail = fh.read()
    return tail[tail.rstrip(b"\n").rfind(b"\n") + 1 :]
