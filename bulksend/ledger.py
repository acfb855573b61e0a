"""Results ledgers read back, and the input fingerprints that keep a resume honest.

A ledger (``--out``) holds one JSON line per record result, plus two kinds of line that are
not results: ``{"status": "run", "at", "command", "settings"}`` written first by every run
(``--resume`` runs too), and ``{"status": "intent", "seq", "identity", "topic", "key",
"at"}`` written before a record is sent by an exactly-once run. Both readers here know them.

* ``read_ledger(path)``, for ``--resume``: the identities of the records with an ``ok``
  line (``LedgerState.done``), and the intents no result has followed yet
  (``LedgerState.intents``). Only the last line can be torn (a crash inside the one write
  that holds it); it is ignored and cut off so appended lines start clean. Memory: about
  one bit per input line for the ok records (``IdentitySet``), not one string each.
* ``read_results(paths)``, for ``bulksend report``: every result of one or more ledgers as
  ``Result`` values, streamed; run lines' contents are kept in ``ReadState.runs``.
* ``fingerprint``, ``check_inputs``, ``write_fingerprints``: beside the ledger,
  ``{out}.inputs.json`` keeps a fingerprint of each regular-file input, keyed by its
  canonical path (``sources.canonical_input``); a resume over an input whose content
  changed is refused (``LedgerError``, exit 2) unless ``force``, and so is a resume over a
  pipe, a FIFO, a device or stdin: they can be read only once, so nothing can show that
  they hold what the ledger was written from.

**Identity.** A result line's ``identity`` (``sources.input_key`` of its input, ``:``, its
first physical line) is what ``--resume`` matches. A line written before identities
existed has none: it is matched by its ``source`` (``path:line``) with the path made
canonical, relative paths against the current directory. That is right when the resume is
started where the first run was, as it normally is; elsewhere the old records are not
recognised and are sent again (never skipped wrongly: a different file at the same path
fails its fingerprint). The old reading of ``id`` as identity is gone: it merged records
that shared an id.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import orjson

from bulksend.errors import InputOpenError, LedgerError
from bulksend.identity import canonical_input, input_key, input_keys
from bulksend.record import Item
from bulksend.result import FAILED, INVALID, OK, SKIPPED, Result

__all__ = [
    "INTENT",
    "RUN",
    "IdentitySet",
    "LedgerState",
    "ReadState",
    "check_inputs",
    "fingerprint",
    "fingerprints_path",
    "first_run_at",
    "read_ledger",
    "read_results",
    "write_fingerprints",
]

#: ``status`` of the lines that are not results.
INTENT: Final = "intent"
RUN: Final = "run"
#: How a run line begins, as ``run.run_line`` writes it (orjson keeps the keys in order).
RUN_LINE_START: Final = b'{"status":"run",'

#: Lines per page of an IdentitySet's bitmap: 2**19 (64 KiB pages).
_PAGE_SHIFT: Final = 19
_PAGE_MASK: Final = (1 << _PAGE_SHIFT) - 1


def _is_line(text: str) -> bool:
    """Whether ``text`` is a line number as identities write it (no sign, no leading 0)."""
    return text.isdigit() and text.isascii() and len(text) < 16 and (text[0] != "0" or text == "0")


class IdentitySet:
    """A set of record identities that costs about one bit per input line.

    An identity ``KEY:LINE`` (one colon, decimal line) is a bit in a bitmap of its key,
    kept in 64 KiB pages so a few far-apart lines cost pages, not a bitmap up to the
    highest line. Any other string (a JSON array element's ``KEY:LINE:COLUMN``) goes to a
    plain set. A Python set of the strings would cost ~100 bytes per identity: 10 GB for
    the 100 million ok records of a big backfill, against ~12 MB here.
    """

    __slots__ = ("_count", "_other", "_pages")

    def __init__(self) -> None:
        self._pages: dict[str, dict[int, bytearray]] = {}
        self._other: set[str] = set()
        self._count = 0

    def add(self, identity: str) -> None:
        key, _, line = identity.rpartition(":")
        if ":" in key or not key or not _is_line(line):
            if identity not in self._other:
                self._other.add(identity)
                self._count += 1
            return
        n = int(line)
        pages = self._pages.get(key)
        if pages is None:
            pages = self._pages[key] = {}
        page = pages.get(n >> _PAGE_SHIFT)
        if page is None:
            page = pages[n >> _PAGE_SHIFT] = bytearray(1 << (_PAGE_SHIFT - 3))
        at, bit = (n & _PAGE_MASK) >> 3, 1 << (n & 7)
        if not page[at] & bit:
            page[at] |= bit
            self._count += 1

    def has_input(self, key: str) -> bool:
        """Whether any identity of the input ``key`` (``input_key``) is in the set."""
        return key in self._pages or any(x.startswith(f"{key}:") for x in self._other)

    def __contains__(self, identity: object) -> bool:
        # The path every record of a resumed run takes: as few calls as the checks allow.
        if type(identity) is not str:
            return False
        key, _, line = identity.rpartition(":")
        pages = self._pages.get(key)
        if pages is None or not _is_line(line):
            return identity in self._other
        n = int(line)
        page = pages.get(n >> _PAGE_SHIFT)
        return page is not None and bool(page[(n & _PAGE_MASK) >> 3] >> (n & 7) & 1)

    def __len__(self) -> int:
        return self._count


@dataclass(slots=True)
class LedgerState:
    """What an existing ledger says about the records already handled."""

    #: Identities of the records with an ok line.
    done_identities: IdentitySet = field(default_factory=IdentitySet)
    #: identity -> the last intent line's fields, for intents no result line followed.
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Whole lines read, of every kind.
    lines: int = 0
    #: Ok lines without an identity (written before identities), matched by source.
    legacy: int = 0
    #: Bytes of a torn last line (ignored, and cut off when ``repair``).
    torn_bytes: int = 0
    #: The run lines, in order (one per run: a few).
    runs: list[dict[str, Any]] = field(default_factory=list)

    def done(self, item: Item) -> bool:
        """Whether ``item`` already has an ok line (False for an item with no identity)."""
        return item.identity is not None and item.identity in self.done_identities


def fingerprints_path(out: str) -> str:
    return f"{out}.inputs.json"


class _Identities:
    """A ledger line's identity, with the fallback for lines that have none."""

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}  # a path as an old ledger wrote it -> its key

    def of(self, obj: dict[str, Any]) -> tuple[str | None, bool]:
        """(identity or None, whether it was rebuilt from ``source``)."""
        identity = obj.get("identity")
        if isinstance(identity, str):
            return identity, False
        source = obj.get("source")
        if not isinstance(source, str):
            return None, False
        path, _, line = source.rpartition(":")
        if not path or path == "-" or not (line.isascii() and line.isdigit()):
            return None, False
        key = self._keys.get(path)
        if key is None:
            key = self._keys[path] = input_key(path)
        return f"{key}:{line}", True


def read_ledger(path: str, *, repair: bool = True) -> LedgerState:
    """Read a results ledger for ``--resume``; ``repair`` truncates a torn last line so
    appends start clean. A missing file is an empty ledger."""
    state = LedgerState()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; we may truncate after reading
    except FileNotFoundError:
        return state
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger {path}: {exc.strerror or exc}") from None
    identities = _Identities()
    done, intents = state.done_identities, state.intents
    good_end = 0
    with fh:
        offset = 0
        for line in fh:
            offset += len(line)
            if not line.endswith(b"\n"):
                state.torn_bytes = len(line)  # a torn last line: a crash mid-write
                break
            good_end = offset
            state.lines += 1
            if line.startswith(RUN_LINE_START):
                with contextlib.suppress(orjson.JSONDecodeError):
                    run = orjson.loads(line)
                    if isinstance(run, dict):
                        state.runs.append(run)
                continue
            # Most lines need a look only when they may be ok or an intent; once an intent
            # waits for its outcome, every line may be that outcome.
            if not intents and b'"ok"' not in line and b'"intent"' not in line:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            status = obj.get("status")
            if status == RUN:
                continue
            identity, rebuilt = identities.of(obj)
            if identity is None:
                continue
            if status == INTENT:
                intents[identity] = obj
                continue
            intents.pop(identity, None)
            if status == OK:
                done.add(identity)
                state.legacy += rebuilt
    if repair and state.torn_bytes:
        try:
            os.truncate(path, good_end)
        except OSError as exc:
            raise LedgerError(
                f"cannot cut the torn last line of {path}: {exc.strerror or exc}"
            ) from None
    return state


def first_run_at(path: str) -> int | None:
    """``at`` of the ledger's first run line: when the run that began it started (ms since
    the epoch), the same for every ``--resume`` of it and new for a ledger started again.
    None when the ledger has no run line (older than run lines) or cannot be read. The
    first run line is the first line of any ledger begun since run lines exist, so this
    reads one line; an older ledger is read up to the run line its first resume wrote."""
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if b'"run"' not in line or not line.endswith(b"\n"):
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and obj.get("status") == RUN:
                    at = obj.get("at")
                    return at if type(at) is int else None
    except OSError:
        return None
    return None


# --- bulksend report ---------------------------------------------------------------------


@dataclass(slots=True)
class ReadState:
    """What reading ledgers found beside the Results."""

    #: Result lines read.
    lines: int = 0
    #: ``path:line`` of each torn last line (ignored).
    torn: list[str] = field(default_factory=list)
    #: Each run line as written (``at``, ``command``, ``settings``), in file order.
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: Intent lines skipped (an exactly-once run's write-ahead lines).
    intents: int = 0


def read_results(paths: Sequence[str], state: ReadState | None = None) -> Iterator[Result]:
    """Every Result of the ledgers, in file order (``-`` is stdin). ``state`` collects torn
    last lines and run lines; intent lines are skipped. A line that is none of these is a
    LedgerError."""
    state = state if state is not None else ReadState()
    for path in paths:
        if path == "-":
            yield from _results(sys.stdin.buffer, "-", state)
            continue
        if "://" in path:
            fh = _open_url(path)
        else:
            try:
                fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
            except OSError as exc:
                raise LedgerError(f"cannot read the ledger {path}: {exc.strerror or exc}") from None
        with fh:
            yield from _results(fh, path, state)


def _open_url(url: str) -> BinaryIO:
    """A ledger in an object store (``--out s3://...`` of a distributed send), streamed
    through fsspec's buffered reader."""
    import fsspec

    try:
        return fsspec.open(url, "rb").open()  # type: ignore[no-any-return]
    except ImportError as exc:
        raise LedgerError(
            f"cannot read the ledger {url}: {exc} (for s3://: pip install 'bulksend[s3]')"
        ) from None
    # fsspec's backends raise their own types too (botocore's are no OSError).
    except Exception as exc:
        raise LedgerError(f"cannot read the ledger {url}: {exc}") from None


def _results(fh: BinaryIO, path: str, state: ReadState) -> Iterator[Result]:
    for lineno, line in enumerate(fh, 1):
        if not line.endswith(b"\n"):
            state.torn.append(f"{path}:{lineno}")  # only the last line can be
            break
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        status = obj.get("status") if isinstance(obj, dict) else None
        if status == RUN:
            assert isinstance(obj, dict)
            state.runs.append(obj)
            continue
        if status == INTENT:
            state.intents += 1
            continue
        if not isinstance(obj, dict) or "seq" not in obj or status is None:
            raise LedgerError(f"{path}:{lineno}: not a results line (bulksend send/load --out)")
        if (odd := _odd_field(obj)) is not None:
            raise LedgerError(
                f"{path}:{lineno}: not a results line (bad {odd}: {obj.get(odd)!r:.40})"
            )
        state.lines += 1
        yield Result.from_dict(obj)


_STATUSES: Final = frozenset({OK, FAILED, INVALID, SKIPPED})
#: Epoch milliseconds up to the year 9999, and any duration shorter than that.
_MAX_MS: Final = 253_402_300_799_999
#: Integer fields and their largest value (none is negative); ``seq`` must be there.
_INTS: Final = (
    ("seq", 2**63 - 1),
    ("http_status", 999),
    ("queue_id", 2**63 - 1),
    ("queue_offset", 2**63 - 1),
    ("attempts", 2**31 - 1),
    ("started_at", _MAX_MS),
    ("done_at", _MAX_MS),
    ("intended_at", _MAX_MS),
)
_MS: Final = ("latency_ms", "queue_ms")
_STRINGS: Final = (
    "source", "id", "identity", "msg_id", "broker_name", "error_code", "error_msg", "request_id"
)  # fmt: skip


def _odd_field(obj: dict[str, Any]) -> str | None:
    """The first field of a results line that no run writes so (a wrong type, a value out
    of range), or None. A ledger edited by hand or by another tool would otherwise end in
    a traceback deep in the stats or the HTML report's timeline (a float where an epoch ms
    is counted over, a string beside numbers being sorted). About 2 µs a line, a fifth of
    what `report` spends on one (measured over 200,000 lines: 9.5 -> 11.9 µs)."""
    if obj["status"] not in _STATUSES:
        return "status"
    get = obj.get
    for name, top in _INTS:
        value = get(name)
        if value is None and name != "seq":
            continue
        if type(value) is not int or not 0 <= value <= top:
            return name
    for name in _MS:
        value = get(name)
        if value is None:
            continue
        if type(value) not in (int, float) or not 0 <= value <= _MAX_MS:
            return name
    for name in _STRINGS:
        value = get(name)
        if value is not None and type(value) is not str:
            return name
    if get("reconciled") not in (None, True, False):
        return "reconciled"
    return None


# --- input fingerprints ------------------------------------------------------------------

_FINGERPRINT_SPAN: Final = 1 << 20
_KINDS: Final = (
    (stat.S_ISFIFO, "a pipe or FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _not_regular(path: str) -> str | None:
    """What ``path`` is when it is not a regular file (stdin for ``-``); None if it is one
    or cannot be looked at (opening the input reports that)."""
    if path == "-":
        return "stdin"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def fingerprint(path: str) -> str:
    """A cheap fingerprint of a regular file's content, for ``--resume`` to notice that an
    input changed since the results ledger was written.

    ``v1:<size>:<mtime_ns>:<sha256 of the first and the last MiB>`` (the whole file when
    it is at most 2 MiB): at most 2 MiB read whatever the file's size. Size and the tail
    catch appends and truncation, the head catches a different file, mtime catches an edit
    in the middle. A ``touch`` or a copy without ``-p`` also counts as a change: the safe
    side, --resume refuses rather than skipping the wrong records. The .gz file itself is
    fingerprinted, not its content. Raises InputOpenError if ``path`` is not a regular file
    (it is never opened then: reading a pipe here would take its records from the run) or
    cannot be read.
    """
    if "://" in path:
        return _url_fingerprint(path)
    kind = _not_regular(path)
    if kind is not None:
        raise InputOpenError(f"{path} is {kind}: only a regular file has a fingerprint")
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            digest = hashlib.sha256()
            if info.st_size <= 2 * _FINGERPRINT_SPAN:
                digest.update(f.read())
            else:
                digest.update(f.read(_FINGERPRINT_SPAN))
                f.seek(-_FINGERPRINT_SPAN, os.SEEK_END)
                digest.update(f.read(_FINGERPRINT_SPAN))
    except OSError as exc:
        raise InputOpenError(f"cannot read input {path}: {exc.strerror or exc}") from None
    return f"v1:{info.st_size}:{info.st_mtime_ns}:{digest.hexdigest()}"


def _url_fingerprint(url: str) -> str:
    """An fsspec URL's (``s3://...``) fingerprint: ``url:<size>:<ETag>`` as the store
    reports them (its last-modified time where it has no ETag), with no byte read: an
    object store replaces an object whole, and gives it a new ETag when it does."""
    import fsspec.core

    try:
        fs, where = fsspec.core.url_to_fs(url)
        info = fs.info(where)
    except (ImportError, OSError, ValueError) as exc:
        raise InputOpenError(f"cannot read input {url}: {exc}") from None
    version = info.get("ETag") or info.get("LastModified") or info.get("mtime")
    return f"url:{info.get('size')}:{version}"


def _stored_fingerprints(out: str) -> dict[str, str] | None:
    """The sidecar's fingerprints by canonical path; None if there is no sidecar. A
    sidecar from before version 2 is keyed by the paths as typed: made canonical here."""
    path = fingerprints_path(out)
    try:
        with open(path, "rb") as fh:
            doc = orjson.loads(fh.read())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise LedgerError(f"cannot read {path}: {exc}") from None
    stored = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(stored, dict):
        raise LedgerError(f"cannot read {path}: no inputs in it")
    if doc.get("version") == 2:
        return {k: v for k, v in stored.items() if isinstance(v, str)}
    return {canonical_input(k): v for k, v in stored.items() if isinstance(v, str)}


def check_inputs(
    out: str, inputs: Sequence[str], *, force: bool, state: LedgerState | None = None
) -> None:
    """Before a resume: refuse (LedgerError) an input that is not a regular file; and,
    unless ``force``, anything that would make line numbers name the wrong records:

    * an input that changed since the ledger began (its fingerprint: the sidecar's, else
      the latest run line's, so a ledger moved without its sidecar is still checked);
    * with ``state`` (the ledger read back): an input the ledger holds ok records of but
      no fingerprint of (a ledger copied without its sidecar, from before run lines held
      them): nothing shows it is the file those records came from;
    * an input the ledger holds nothing of, whose fingerprint is that of another path the
      ledger holds ok records of: the same file moved (identities go by path, so every
      record would be sent again).
    """
    for path in inputs:
        kind = _not_regular(path)
        if kind is not None:
            raise LedgerError(
                f"cannot --resume over {path}: it is {kind}, which can be read only once, so "
                f"nothing shows it holds the records {out} was written from; save it to a file "
                "and send that file"
            )
    if force:
        return
    known = _run_fingerprints(state.runs if state is not None else ())
    known.update(_stored_fingerprints(out) or {})
    given = {canonical_input(p) for p in inputs}
    for path, key in zip(inputs, input_keys(inputs), strict=True):
        before = known.get(canonical_input(path))
        if before is not None:
            now = fingerprint(path)
            if now != before:
                raise LedgerError(
                    f"input {path} changed since {out} was written (fingerprint {before[:16]}… is now "
                    f"{now[:16]}…): resuming would skip or resend the wrong records; use --force to resume anyway"
                )
            continue
        if state is None:
            continue
        done = state.done_identities
        if done.has_input(key):
            raise LedgerError(
                f"{out} holds records of {path} but no fingerprint of it (was"
                f" {fingerprints_path(out)} moved away?): nothing shows the file is the one"
                " they came from, and a resume goes by line numbers; use --force to resume"
                " anyway"
            )
        now = fingerprint(path)
        for other, print_ in known.items():
            if print_ == now and other not in given and done.has_input(input_key(other)):
                raise LedgerError(
                    f"{path} holds what {other} held when {out} was written, and records are"
                    f" known by their file's path: resuming with {path} would send every one"
                    f" again. Give {other} as the input (move the file back), or --force to"
                    " send them again"
                )


def check_target(out: str, settings: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> None:
    """Before a resume (without --force): refuse a target (endpoint, project, instance,
    engine) other than the one the ledger's latest run sent to: the backfill would be split
    between the two without a word. ``--embedded`` runs name no target to compare."""
    now = settings.get("target")
    last = runs[-1].get("settings") if runs else None
    before = last.get("target") if isinstance(last, Mapping) else None
    if not isinstance(now, str) or not isinstance(before, str) or "embedded" in (now, before):
        return
    if now != before:
        raise LedgerError(
            f"{out} was sent to {before}; this run sends to {now}: resume with the same"
            " target, or --force to send the rest there"
        )


def _run_fingerprints(runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The inputs' fingerprints the run lines hold, by canonical path: the latest wins."""
    known: dict[str, str] = {}
    for run in runs:
        prints = run.get("fingerprints")
        if isinstance(prints, dict):
            known.update({k: v for k, v in prints.items() if isinstance(v, str)})
    return known


def write_fingerprints(out: str, inputs: Sequence[str]) -> dict[str, str]:
    """Record the fingerprint of each regular-file input beside the ledger, keyed by its
    canonical path (kept for inputs not in this run). Pipes, FIFOs, devices and stdin are
    left out, never opened here; nothing is written when ``out`` itself is not a regular
    file (``/dev/stdout``, a FIFO: no sidecar beside a device). Returns this run's inputs'
    fingerprints, which its run line holds too: a ledger moved without its sidecar still
    carries them."""
    mine = {canonical_input(p): fingerprint(p) for p in inputs if _not_regular(p) is None}
    if out == "-" or _not_regular(out) is not None:
        return mine
    path = fingerprints_path(out)
    try:
        stored = _stored_fingerprints(out) or {}
    except LedgerError:
        stored = {}
    stored.update(mine)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps({"version": 2, "inputs": stored}, option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)
    except OSError as exc:
        raise LedgerError(f"cannot write {path}: {exc.strerror or exc}") from None
    return mine
