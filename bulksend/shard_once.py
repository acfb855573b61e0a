"""``--exactly-once`` over shards: the driver's side (``scaleout.py`` calls it).

Each shard runs the normal exactly-once pipeline on its part (``writeahead.py``): an intent
in the part before a record's first request, a ListMessages check of every attempt whose
answer was lost, and, when Dask runs the shard again after its worker was lost, a check of
every intent the lost attempt left open before the new attempt sends anything. What the
driver adds, so that the shards and the merged ledger are one exactly-once ledger:

* **One salt.** Every shard derives its records' keys with the salt of the merged ledger
  (``--out``'s first run line), not of its part: a part is made anew by every run of the
  driver, and a key must be the same in every ``--resume``, distributed or not, for a
  check to recognise the stored copy as this record's.
* **The merged ledger's open intents.** A ``--resume`` after a killed driver first merges
  the parts it left (``merge.settle_parts``); the intents that no result followed, from
  those parts or from earlier runs, are then checked here, once, before any shard starts
  (one wait of ``--reconcile-after``, 8 queries at a time). Which shard owns a record is
  known only by reading the inputs, so the records found stored go to every shard
  (``ShardTask.settled``: at most the requests in flight when the run died), and the shard
  that reads one writes its ok line (``"reconciled": true``); one not found is sent as any
  other, under the same key.
* **Figures.** The shards' exactly-once figures are added up with the driver's for
  ``--stats`` and the summary.

``--out`` in an object store is refused: a shard's lines reach the store only with its
next segment upload, so the intents of a lost worker's last seconds would be lost with
it, and their records sent again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from bulksend.config import Credentials, SendOptions, Target
from bulksend.errors import ConfigError
from bulksend.reconcile import Ambiguous, Found
from bulksend.shard_task import ShardReport, ShardTask
from bulksend.sinks import LineWriter
from bulksend.writeahead import ledger_salt, open_write_ahead

__all__ = ["ShardedWriteAhead", "check_out"]


def check_out(out: str | None) -> None:
    """ConfigError for ``--out`` in an object store (see the module docstring)."""
    if out is not None and "://" in out:
        raise ConfigError(
            f"--exactly-once with --workers/--cluster needs --out in a file on storage every"
            f" worker reaches, not {out.split('://', 1)[0]}://: a shard uploads its ledger"
            " part every few seconds, so a lost worker would take its last intents with it"
            " and their records would be sent again"
        )


class ShardedWriteAhead:
    """The driver's part of one distributed ``--exactly-once`` run, made once the merged
    ledger is open and its run line written (``run.Sinks.begin``)."""

    def __init__(
        self,
        options: SendOptions,
        ledger: LineWriter,
        ledger_path: str,
        intents: dict[str, dict[str, Any]],
    ) -> None:
        self.options = options
        self._ledger, self._path, self._intents = ledger, ledger_path, intents
        self.salt = ledger_salt(ledger_path)
        self.settled: dict[str, Found | Ambiguous] = {}
        #: The driver's own figures (its check of the merged ledger's intents).
        self._figures: dict[str, Any] = {}

    async def settle(self, target: Target, credentials: Credentials) -> None:
        """Check the merged ledger's open intents before any shard starts (nothing to do
        on a first run)."""
        if not self._intents:
            return
        async with open_write_ahead(
            target,
            credentials,
            self.options,
            self._ledger,
            self._path,
            self._intents,
            salt=self.salt,
        ) as write_ahead:
            await write_ahead.resume()
            self.settled = write_ahead.stored()
            self._figures = write_ahead.snapshot()

    def task(self, task: ShardTask) -> ShardTask:
        """``task`` with the run's salt and what the check found stored."""
        return replace(task, key_salt=self.salt, settled=self.settled or None)

    def figures(self, reports: Iterable[ShardReport]) -> dict[str, Any]:
        """The run's exactly-once figures: the driver's and every shard's, added up."""
        total: dict[str, Any] = dict(self._figures)
        for report in reports:
            for name, value in (report.exactly_once or {}).items():
                total[name] = total.get(name, 0) + value
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in total.items()}

    @staticmethod
    def lines(figures: dict[str, Any], *, summary: bool) -> list[str]:
        """For stderr after the summary, as a single run says them (``WriteAhead.lines``)."""
        if not figures:
            return []
        out = []
        reconciled, duplicates = (
            figures.get("reconciled", 0),
            figures.get("duplicates_at_server", 0),
        )
        if summary:
            out.append(
                f"exactly-once: {reconciled:,} reconciled (found stored after a lost answer"
                f" or a crash), {duplicates:,} duplicates at the server,"
                f" {figures.get('reconcile_queries', 0):,} ListMessages queries for"
                f" {figures.get('reconcile_checks', 0):,} records in doubt"
            )
        if duplicates:
            out.append(
                f"warning: {duplicates:,} records are stored more than once at the server"
                " (DUPLICATE_AT_SERVER in the ledger names the copies): their key was"
                " already stored before this run's check"
            )
        return out
