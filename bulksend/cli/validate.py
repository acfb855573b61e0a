"""``bulksend validate INPUT...``: parse and check the inputs exactly as ``send`` would,
send nothing. Prints each problem as ``path:line: message``, then a count line; exit 0
when clean, 1 when any record is invalid, 2 when an input cannot be opened."""

from __future__ import annotations

import argparse
import os
import sys

from bulksend.cli import EXIT_OK, EXIT_SOME_FAILED
from bulksend.record import Invalid
from bulksend.sources import FORMATS, Inputs


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``validate`` subcommand to ``bulksend``'s subparsers."""
    parser = sub.add_parser(
        "validate",
        help="check input files without sending anything",
        description="Parse and check input files as `send` would, without sending. "
        "Prints each problem as path:line: message. Exit 0 if all records are valid, "
        "1 if any is not, 2 if an input cannot be opened.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="JSONL (.jsonl/.ndjson/.json) or CSV (.csv) file, optionally .gz; - for stdin",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="input format for every INPUT (default: from the extension; stdin: jsonl)",
    )
    parser.add_argument(
        "--topic", default=None, help="topic of records that name none (default: none)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate ``args.inputs``; the exit code. InputOpenError propagates (exit 2)."""
    problems = records = 0
    write = sys.stdout.write
    try:
        with Inputs(args.inputs, fmt=args.format, default_topic=args.topic) as inputs:
            for item in inputs:
                records += 1
                if type(item) is Invalid:
                    problems += 1
                    write(f"{item.source}: {item.error}\n")
        write(f"{_count(problems, 'problem')} in {_count(records, 'record')}\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (say `| head`) left: stop quietly, and keep Python's final flush of
        # stdout from failing again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_SOME_FAILED
    return EXIT_OK if problems == 0 else EXIT_SOME_FAILED


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
