"""Results ledgers read back: ``bulksend report`` and the load's own stats.

* ``read_results(paths)`` streams one or more ledgers (send or load) as ``Result`` values,
  one line at a time, in bounded memory. A torn last line (a crash inside its write) is
  ignored; any other line that is not a Result is a ``LedgerError``.
* ``LoadStats`` is ``Stats`` plus the open-model split, as wrk2 reports it: ``latency_ms``
  is the corrected latency, from each message's intended send time (``latency_ms +
  queue_ms`` of the Result), and ``service_latency_ms`` the uncorrected one, from the
  actual send. Under a stall the first shows what a user waiting on a schedule saw; the
  second hides it (coordinated omission: the sends that would have measured the stall
  never went out during it).
* ``rebuild(paths)`` feeds every Result to the same classes the run used, so the figures
  equal the run's ``--stats`` exactly: a ledger whose every record comes from ``bulksend
  load`` (source ``"load"``) gets ``LoadStats``' keys, any other the ``send`` keys.

What a ledger cannot give back: a ``send --resume`` run's skipped records (not written
again) and an ``--adaptive`` run's ``rate_changes`` (not per record).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bulksend.ledger import ReadState, read_results
from bulksend.result import OK, Result
from bulksend.stats import Latencies, Stats
from bulksend.summary import summary_table
from bulksend.synthetic import SOURCE as LOAD_SOURCE

#: A send whose first attempt started more than this after its intended time is ``late``:
#: it waited for a free worker (the pool was full) or for a client too busy to keep up.
#: Below it is the event loop's ordinary wake-up jitter on a busy two-core machine.
LATE_MS = 10.0


class LoadStats:
    """``Stats`` of a paced run with corrected and service latency; see the module docstring.

    ``late`` counts records that went out more than ``LATE_MS`` after their intended time;
    ``intended_rate_msg_s`` and ``send_rate_msg_s`` are the schedule's and the actual sends'
    average rates (between the first and the last of each).
    """

    def __init__(self) -> None:
        self.base = Stats()
        self.corrected = Latencies()
        self.late = 0
        self.intended = _Span()
        self.sent = _Span()

    def add(self, result: Result) -> None:
        self.base.add(result)
        if result.intended_at is not None:
            self.intended.add(result.intended_at)
        if result.started_at is not None:
            self.sent.add(result.started_at)
        queue = result.queue_ms or 0.0
        if queue > LATE_MS:
            self.late += 1
        if result.status == OK and result.latency_ms is not None:
            self.corrected.add_ms(result.latency_ms + queue)

    def finish(self) -> None:
        self.base.finish()

    def snapshot(self) -> dict[str, Any]:
        """``Stats.snapshot()``'s keys, ``latency_ms`` corrected, plus the load's own."""
        snap = self.base.snapshot()
        snap["service_latency_ms"] = snap["latency_ms"]
        snap["latency_ms"] = self.corrected.summary()
        snap["late"] = self.late
        snap["late_after_ms"] = LATE_MS
        snap["intended_rate_msg_s"] = self.intended.rate()
        snap["send_rate_msg_s"] = self.sent.rate()
        return snap


@dataclass(slots=True)
class _Span:
    """Count, first and last of a series of epoch-ms times."""

    count: int = 0
    first: int | None = None
    last: int | None = None

    def add(self, at: int) -> None:
        self.count += 1
        if self.first is None or at < self.first:
            self.first = at
        if self.last is None or at > self.last:
            self.last = at

    def rate(self) -> float:
        """Events per second between the first and the last (n events, n - 1 gaps)."""
        if self.first is None or self.last is None or self.last <= self.first:
            return 0.0
        return round((self.count - 1) / ((self.last - self.first) / 1000.0), 1)


@dataclass
class Rebuilt:
    """A ledger's stats, rebuilt: ``snapshot`` is the run's ``--stats`` document."""

    stats: LoadStats
    #: Every record came from ``bulksend load``.
    load: bool
    read: ReadState

    @property
    def snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot() if self.load else self.stats.base.snapshot()


def rebuild(paths: Sequence[str], *, observers: Iterable[Callable[[Result], None]] = ()) -> Rebuilt:
    """One pass over the ledgers: their stats, each Result also handed to ``observers``
    (the HTML report's ``add``)."""
    stats = LoadStats()
    read = ReadState()
    hooks = tuple(observers)
    load = True
    any_line = False
    for result in read_results(paths, read):
        any_line = True
        if result.source != LOAD_SOURCE:
            load = False
        stats.add(result)
        for hook in hooks:
            hook(result)
    stats.finish()
    return Rebuilt(stats, load and any_line, read)


def summary_text(snapshot: dict[str, Any], *, title: str) -> str:
    """``summary_table`` plus, for a load, the uncorrected latency, late sends and rates."""
    table = summary_table(snapshot, title=title)
    if "service_latency_ms" not in snapshot:
        return table
    svc = snapshot["service_latency_ms"]
    # summary_table aligns its values after the longest label it printed.
    width = 11 if snapshot.get("http_status") else 10
    rows = [
        (
            "service ms",
            f"p50 {svc['p50']:.1f}  p90 {svc['p90']:.1f}  p99 {svc['p99']:.1f}  "
            f"max {svc['max']:.1f}  mean {svc['mean']:.1f}  (from the actual send)",
        ),
        (
            "late",
            f"{snapshot['late']:,}  (sent > {snapshot['late_after_ms']:g} ms after the intended time)",
        ),
        (
            "rate",
            f"intended {snapshot['intended_rate_msg_s']:,.1f}/s  sent {snapshot['send_rate_msg_s']:,.1f}/s",
        ),
    ]
    lines = table.splitlines()
    at = next(
        (i for i, line in enumerate(lines) if line.lstrip().startswith("latency ms")),
        len(lines) - 1,
    )
    lines[at] += "  (from the intended send time)"
    extra = [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join([*lines[: at + 1], *extra, *lines[at + 1 :]])
