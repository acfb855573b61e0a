"""``bulksend report RESULTS... [--html FILE] [--json]``: ledgers -> rebuilt stats -> the
summary table (or the stats JSON, byte for byte what the run's ``--stats`` wrote) on stdout."""

from __future__ import annotations

import argparse
import sys

import orjson

from bulksend.cli import EXIT_OK
from bulksend.html import RunReport, write_html_report
from bulksend.report import rebuild, summary_text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="summarise results ledgers (send or load); --html for a chart report",
        description="Read one or more results ledgers (--out of send or load), streaming, and print "
        "the summary table, or with --json the stats JSON the run's --stats wrote.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results ledgers (JSON lines)")
    p.add_argument(
        "--html", metavar="FILE", help="also write a self-contained HTML report with charts"
    )
    p.add_argument("--json", action="store_true", help="print the stats JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = RunReport() if args.html else None
    rebuilt = rebuild(args.results, observers=[report.add] if report is not None else [])
    snapshot = rebuilt.snapshot
    for where in rebuilt.read.torn:
        print(f"bulksend: ignored a torn last line at {where}", file=sys.stderr)
    if report is not None:
        title = "bulksend load" if rebuilt.load else "bulksend send"
        settings = {
            "ledgers": args.results,
            "kind": "load" if rebuilt.load else "send",
            "lines read": rebuilt.read.lines,
        }
        write_html_report(args.html, report, snapshot, title=title, settings=settings)
    if args.json:
        # As sinks.write_json writes --stats, so the two files compare equal byte for byte.
        sys.stdout.buffer.write(
            orjson.dumps(snapshot, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        )
        sys.stdout.buffer.write(b"\n")
    else:
        title = "bulksend report (load)" if rebuilt.load else "bulksend report"
        sys.stdout.write(summary_text(snapshot, title=title) + "\n")
    sys.stdout.flush()
    return EXIT_OK
