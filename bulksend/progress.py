"""Live progress: one line redrawn in place on a terminal, a status line every
``--progress-interval`` seconds elsewhere. A reporter: it reads a run's figures and
formats them; it never touches a record.

On a terminal the line is drawn with rich and fits the terminal's width, whatever it is
now: the parts give way in a fixed order of importance (``fit``), and the bar takes the
room that is left. Off a terminal the status lines keep every part.

How far a ``send`` has got, and when it will end (the pure functions below):

* **total**: the records the inputs hold. Exact once reading has ended (the reader runs
  at most a bounded buffer ahead of the sends, so that is shortly before the end). Until
  then, for plain JSONL and CSV files, their newlines, counted in a thread within
  ``LINE_COUNT_BUDGET_S``: a record takes at least one line, so lines never understate
  it. Otherwise (gzip, a JSON array, a count that took too long) records per input byte,
  taken where a 1 MiB chunk of input ended (all its records read) — never from the
  bytes alone, which run up to a chunk ahead of the records: on a 3 MB input the bytes
  said 100 % with 2,200 of 30,000 records left. A pipe: unknown.
* **share done**: done / total, never 100 % before the last record is done.
* **rate**: records *sent* (ok or failed) per second over the last ``RATE_WINDOW_S``;
  skipped and invalid records take no time and would inflate it (a --resume counted
  36,285 msg/s while 14,508 were sent).
* **ETA**: the records left over that rate.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from bulksend.record import Item
from bulksend.sources import Inputs

#: Seconds of sends the live rate is measured over.
RATE_WINDOW_S = 10.0
#: Seconds the inputs' newlines may take to count (~1 GB/s from the page cache).
LINE_COUNT_BUDGET_S = 5.0
_COUNT_CHUNK = 8 << 20
#: What may come before a JSON array's ``[``: whitespace and a UTF-8 BOM's bytes.
_BLANK = b" \t\r\n\xef\xbb\xbf"
#: The bar's width on a terminal: at least this, or none; at most that.
BAR_MIN, BAR_MAX = 10, 40
_GAP = "  "


# --- how far, how fast, how long: pure ----------------------------------------------------


def estimate_total(
    read: int,
    finished: bool,
    lines: int | None = None,
    aligned: tuple[int, int] | None = None,
    bytes_total: int | None = None,
) -> tuple[int | None, bool]:
    """(records the inputs hold, whether that is exact). ``read``: records read so far;
    ``finished``: reading has ended; ``lines``: the inputs' newlines, if counted;
    ``aligned``: (records, bytes) where the reader last moved on to a new chunk (every
    record of those bytes read); ``bytes_total``: the inputs' size."""
    if finished:
        return read, True
    if lines is not None:
        return max(lines, read), False
    if aligned is not None and bytes_total:
        records, at = aligned
        if records and at:
            return max(read, round(records * bytes_total / at)), False
    return None, False


def share_done(done: int, total: int | None, exact: bool) -> float | None:
    """done / total in 0..1; below 1 until the last record is done (an estimate may fall
    short of the truth)."""
    if not total:
        return None
    share = min(done / total, 1.0)
    if not (exact and done >= total):
        share = min(share, 0.999)
    return share


def eta_s(done: int, total: int | None, rate: float) -> float | None:
    """Seconds until the last record is done at ``rate`` records/s; None: unknown."""
    if total is None or rate <= 0:
        return None
    return max(0, total - done) / rate


class RateWindow:
    """Events per second over the last ``window_s``, from (time, running count) samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, count: int) -> None:
        samples = self._samples
        samples.append((at, count))
        # Keep one sample at or before the window's start, so the window is whole.
        while len(samples) > 2 and samples[1][0] <= at - self.window_s:
            samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


# --- what a line holds, and what fits ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a progress line. ``keep``: 0 is kept longest when the line must
    shorten; the highest goes first (the rightmost of equals)."""

    text: str
    keep: int = 0
    style: str = ""


def width_of(parts: Sequence[Part]) -> int:
    return sum(len(p.text) for p in parts) + len(_GAP) * max(0, len(parts) - 1)


def fit(parts: Sequence[Part], width: int) -> list[Part]:
    """``parts`` less the least important ones, until they fit in ``width`` columns (what
    is left may still be wider: the caller cuts it with an ellipsis)."""
    kept = list(parts)
    while len(kept) > 1 and width_of(kept) > width:
        drop = max(range(len(kept)), key=lambda i: (kept[i].keep, i))
        if kept[drop].keep == 0:
            break
        del kept[drop]
    return kept


@dataclass(frozen=True, slots=True)
class SendView:
    """What a send's progress line shows."""

    done: int
    ok: int
    failed: int
    invalid: int
    retrying: int
    in_flight: int
    elapsed: float
    #: Records sent (ok or failed) per second, lately.
    rate: float
    target_rate: float = 0.0
    total: int | None = None
    exact: bool = False
    note: str | None = None

    @property
    def share(self) -> float | None:
        return share_done(self.done, self.total, self.exact)

    @property
    def eta(self) -> float | None:
        return eta_s(self.done, self.total, self.rate)

    def _of_total(self) -> str:
        return f"{'' if self.exact else '~'}{self.total:,}"

    def parts(self) -> list[Part]:
        """The terminal line's parts, most important first within each rank."""
        parts = []
        share = self.share
        if share is not None:
            parts.append(Part(f"{share * 100:.1f}%", 0, "bold"))
            parts.append(Part(f"{self.done:,}/{self._of_total()}", 0))
        else:
            parts.append(Part(f"{self.done:,} done", 0))
        parts.append(Part(f"{self.rate:,.0f} msg/s", 0))
        if self.target_rate:
            parts.append(Part(f"target {self.target_rate:,.0f}", 5))
        eta = self.eta
        if eta is not None:
            parts.append(Part(f"ETA {clock(eta)}", 1, "cyan"))
        if self.failed:
            parts.append(Part(f"failed {self.failed:,}", 1, "red"))
        if self.invalid:
            parts.append(Part(f"invalid {self.invalid:,}", 2, "yellow"))
        if self.retrying:
            parts.append(Part(f"retrying {self.retrying:,}", 3))
        parts.append(Part(f"in-flight {self.in_flight:,}", 4))
        parts.append(Part(f"ok {self.ok:,}", 6, "green"))
        parts.append(Part(f"elapsed {clock(self.elapsed)}", 5))
        if self.note:
            parts.append(Part(self.note, 0, "bold yellow"))
        return parts

    def status_line(self) -> str:
        """Off a terminal: every figure, in the order status lines have always had."""
        parts = []
        share = self.share
        if share is not None:
            parts.append(f"{share * 100:5.1f}% of {self._of_total()}")
        parts.append(f"{self.done:,} done")
        target = f" (target {self.target_rate:,.0f})" if self.target_rate else ""
        parts.append(f"{self.rate:,.0f} msg/s{target}")
        parts.append(
            f"ok {self.ok:,} failed {self.failed:,} invalid {self.invalid:,} "
            f"retrying {self.retrying:,} in-flight {self.in_flight:,}"
        )
        eta = self.eta
        if eta is not None:
            parts.append(f"ETA {clock(eta)}")
        parts.append(f"elapsed {clock(self.elapsed)}")
        if self.note:
            parts.append(self.note)
        return _GAP.join(parts)


@dataclass(frozen=True, slots=True)
class LoadView:
    """What a load's progress line shows. Latencies in ms, of the last whole second
    (None: nothing answered ok in it)."""

    elapsed: float
    duration: float
    target_rate: float
    sent_rate: float
    p50: float | None
    p99: float | None
    failed: int
    in_flight: int
    late: int

    @property
    def share(self) -> float:
        return min(1.0, self.elapsed / self.duration) if self.duration > 0 else 1.0

    def _latency(self, name: str, value: float | None) -> str:
        return f"{name} {value:,.1f} ms" if value is not None else f"{name} - ms"

    def parts(self) -> list[Part]:
        return [
            Part(f"{self.elapsed:.1f}/{self.duration:g} s", 0, "bold"),
            Part(f"target {self.target_rate:,.0f}/s", 2),
            Part(f"sent {self.sent_rate:,.0f}/s", 0),
            Part(self._latency("p50", self.p50), 3),
            Part(self._latency("p99", self.p99), 1),
            Part(f"errors {self.failed:,}", 1 if self.failed else 4, "red" if self.failed else ""),
            Part(f"in-flight {self.in_flight:,}", 4),
            Part(f"late {self.late:,}", 2 if self.late else 5, "yellow" if self.late else ""),
        ]

    def status_line(self) -> str:
        return (
            f"{self.elapsed:6.1f}/{self.duration:g} s  target {self.target_rate:,.0f}/s  "
            f"sent {self.sent_rate:,.0f}/s  {self._latency('p50', self.p50)}  "
            f"{self._latency('p99', self.p99)}  errors {self.failed:,}  "
            f"in-flight {self.in_flight:,}  late {self.late:,}"
        )


# --- showing it ----------------------------------------------------------------------------


class Display:
    """One line redrawn in place with rich (``terminal``), else a status line per show.

    Subtleness ahead! rich's Live redraws its region with a carriage return and an erase
    of the line: a region that fills the last column wraps on some terminals and each
    redraw would then leave a line behind, so the line is made one column short."""

    def __init__(self, stream: TextIO, *, terminal: bool) -> None:
        self.stream = stream
        self._live: Live | None = None
        if terminal:
            console = Console(file=stream, force_terminal=True, highlight=False)
            self._live = Live(
                console=console,
                auto_refresh=False,  # drawn by the run's ticker, on the loop: no thread
                transient=True,
                redirect_stdout=False,  # the ledger may be on stdout
                redirect_stderr=False,
            )
            self._live.start()

    @property
    def terminal(self) -> bool:
        return self._live is not None

    def show(self, parts: Sequence[Part], share: float | None, status: str) -> None:
        if self._live is None:
            self.stream.write(status + "\n")
            self.stream.flush()
            return
        width = max(1, self._live.console.width - 1)
        self._live.update(render(parts, share, width), refresh=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def render(parts: Sequence[Part], share: float | None, width: int) -> Table:
    """The line: a bar when ``share`` is known and there is room, then the parts that fit
    (rich cuts what still overflows with an ellipsis)."""
    room_for_bar = BAR_MIN + len(_GAP) if share is not None else 0
    kept = fit(parts, width - room_for_bar)
    text = Text(no_wrap=True, overflow="ellipsis")
    for i, part in enumerate(kept):
        if i:
            text.append(_GAP)
        text.append(part.text, style=part.style)
    grid = Table.grid(padding=(0, len(_GAP)) if room_for_bar else 0)
    if room_for_bar and share is not None:
        used = width_of(kept)
        bar = max(BAR_MIN, min(BAR_MAX, width - used - len(_GAP)))
        grid.add_column(width=bar, no_wrap=True)
        grid.add_column(width=width - bar - len(_GAP), no_wrap=True, overflow="ellipsis")
        grid.add_row(ProgressBar(total=1000, completed=round(share * 1000), width=bar), text)
    else:
        grid.add_column(width=width, no_wrap=True, overflow="ellipsis")
        grid.add_row(text)
    return grid


# --- what a send reads --------------------------------------------------------------------


class ReadCounter:
    """``Inputs`` as the pool reads them (``batches``), counting what has been read: the
    records, whether reading has ended, and where the reader last moved on to a new chunk
    of input (``aligned``: records read, bytes read before it). Counted in the reader
    thread; the progress ticker only reads the numbers."""

    def __init__(self, inputs: Inputs) -> None:
        self.inputs = inputs
        self.read = 0
        self.finished = False
        self.aligned: tuple[int, int] | None = None

    def batches(self, n: int) -> Iterator[list[Item]]:
        inputs = self.inputs
        last = inputs.bytes_read
        for batch in inputs.batches(n):
            now = inputs.bytes_read
            if now != last:
                # A new chunk was read for this batch: the batches before it hold every
                # record of the bytes read before it (less a batch's worth at most).
                if last:
                    self.aligned = (self.read, last)
                last = now
            self.read += len(batch)
            yield batch
        self.finished = True


def count_lines(
    paths: Sequence[str],
    budget_s: float = LINE_COUNT_BUDGET_S,
    stop: threading.Event | None = None,
) -> int | None:
    """Newlines of the inputs (a last line without one counts too), or None when one of
    them is not a plain regular file whose lines bound its records (stdin, a pipe, gzip, a
    JSON array), or counting took longer than ``budget_s`` or was stopped (``stop`` set).
    Blocking: run in a thread."""
    deadline = time.monotonic() + budget_s
    total = 0
    for path in paths:
        if path == "-" or path.lower().endswith(".gz"):
            return None
        try:
            with open(path, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    return None
                last = b"\n"
                first = True
                while chunk := f.read(_COUNT_CHUNK):
                    if first and chunk.lstrip(_BLANK)[:1] == b"[":
                        return None  # a JSON array: many records on a line
                    first = False
                    total += chunk.count(b"\n")
                    last = chunk[-1:]
                    if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                        return None
                total += last != b"\n"
        except OSError:
            return None
    return total
