"""Results ledgers read back: ``bulksend report``.

* ``read_results(paths)`` streams one or more ledgers (send or load; ``-`` is stdin) as
  ``Result`` values, one line at a time, in bounded memory. A run line (``"status": "run"``,
  each run's first, with its settings) is not a Result: it is kept in ``ReadState.runs``. A
  torn last line (a crash inside its write) is ignored; any other line that is not a Result
  is a ``LedgerError``.
* ``rebuild(paths)`` feeds every Result to the same classes the run used, so the figures
  equal the run's ``--stats`` exactly: a ledger whose every record comes from ``bulksend
  load`` (source ``"load"``) gets ``LoadStats``' keys, any other the ``send`` keys; a load's
  thresholds (from its run line) are judged again on them.

What a ledger cannot give back: a ``send --resume`` run's skipped records (not written
again) and an ``--adaptive`` run's ``rate_changes`` (not per record).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bulksend.ledger import IdentitySet, ReadState, read_results
from bulksend.result import OK, Result
from bulksend.stats import LoadStats
from bulksend.synthetic import SOURCE as LOAD_SOURCE
from bulksend.thresholds import Threshold, check, figures_of, verdicts_json


@dataclass
class Rebuilt:
    """A ledger's stats, rebuilt: ``snapshot`` is the run's ``--stats`` document."""

    stats: LoadStats
    #: Every record came from ``bulksend load``.
    load: bool
    read: ReadState
    #: Records with more than one ok line (a ledger given twice, two runs on one ledger at
    #: once): each such line counts in the stats, as it did in its run's.
    ok_twice: int = 0

    @property
    def snapshot(self) -> dict[str, Any]:
        if not self.load:
            return self.stats.base.snapshot()
        snap = self.stats.snapshot()
        if thresholds := self.thresholds():
            snap["thresholds"] = verdicts_json(check(thresholds, figures_of(snap)))
        return snap

    def thresholds(self) -> tuple[Threshold, ...]:
        """The thresholds of the load runs read, as given, each once, in order."""
        texts: dict[str, None] = {}
        for run in self.read.runs:
            settings = run.get("settings")
            if run.get("command") == "load" and isinstance(settings, dict):
                for text in settings.get("thresholds") or ():
                    texts.setdefault(str(text))
        return tuple(Threshold.parse(text) for text in texts)


def rebuild(paths: Sequence[str], *, observers: Iterable[Callable[[Result], None]] = ()) -> Rebuilt:
    """One pass over the ledgers: their stats, each Result also handed to ``observers``
    (the HTML report's ``add``)."""
    stats = LoadStats()
    read = ReadState()
    hooks = tuple(observers)
    load = True
    any_line = False
    ok_seen, ok_twice = IdentitySet(), 0
    for result in read_results(paths, read):
        any_line = True
        if result.source != LOAD_SOURCE:
            load = False
        if result.status == OK and result.identity is not None:
            # One bit a line (as --resume keeps them): a million-line ledger, ~128 KB.
            if result.identity in ok_seen:
                ok_twice += 1
            else:
                ok_seen.add(result.identity)
        stats.add(result)
        for hook in hooks:
            hook(result)
    stats.finish()
    return Rebuilt(stats, load and any_line, read, ok_twice)
