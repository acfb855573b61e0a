"""``bulksend report RESULTS... [--html FILE] [--json]``: ledgers (``-`` is stdin) -> rebuilt
stats -> the summary table (or the stats JSON, byte for byte what the run's ``--stats``
wrote) on stdout."""

from __future__ import annotations

import argparse
import sys

from bulksend.cli import EXIT_OK
from bulksend.html import RunReport, render_html
from bulksend.report import rebuild
from bulksend.sinks import DocumentWriter, json_document, stdout_closed
from bulksend.summary import summary_text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="summarise results ledgers (send or load); --html for a chart report",
        description="Read one or more results ledgers (--out of send or load), streaming, and print "
        "the summary table, or with --json the stats JSON the run's --stats wrote.",
    )
    p.add_argument(
        "results", nargs="+", metavar="RESULTS", help="results ledgers (JSON lines); - is stdin"
    )
    p.add_argument(
        "--html", metavar="FILE", help="also write a self-contained HTML report with charts"
    )
    p.add_argument("--json", action="store_true", help="print the stats JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Checked before a long ledger is read, as a run checks its outputs before sending.
    if (closed := stdout_closed()) is not None:
        raise closed
    page = DocumentWriter(args.html) if args.html else None
    report = RunReport() if page is not None else None
    rebuilt = rebuild(args.results, observers=[report.add] if report is not None else [])
    snapshot = rebuilt.snapshot
    for where in rebuilt.read.torn:
        print(f"bulksend: ignored a torn last line at {where}", file=sys.stderr)
    if rebuilt.ok_twice:
        print(
            f"bulksend: warning: {rebuilt.ok_twice:,} records are ok more than once in these"
            " ledgers (a ledger given twice, or two runs on one ledger): the counts hold each"
            " line",
            file=sys.stderr,
        )
    if page is not None and report is not None:
        title = "bulksend load" if rebuilt.load else "bulksend send"
        settings = {
            "ledgers": args.results,
            "kind": "load" if rebuilt.load else "send",
            "lines read": rebuilt.read.lines,
        }
        page.write(
            render_html(
                report, snapshot, title=title, settings=settings, runs=rebuilt.read.runs
            ).encode()
        )
    if args.json:
        # As the run wrote --stats, so the two compare equal byte for byte.
        sys.stdout.buffer.write(json_document(snapshot))
    else:
        title = "bulksend report (load)" if rebuilt.load else "bulksend report"
        sys.stdout.write(summary_text(snapshot, title=title) + "\n")
    sys.stdout.flush()
    return EXIT_OK
