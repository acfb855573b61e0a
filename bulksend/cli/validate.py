"""``bulksend validate INPUT...``: parse and check the inputs exactly as ``send`` would,
send nothing. Prints the problems grouped by kind, then a count line; exit 0 when clean, 1
when any record is invalid, 2 when an input cannot be opened.

A problem met once is one line, ``path:line: message``. A kind met more often is a heading
with its count and the first few places::

    4,000 records: topic is missing and no default topic (--topic) is given
      day1.jsonl:1: topic is missing and no default topic (--topic) is given
      day1.jsonl:2: topic is missing and no default topic (--topic) is given
      day1.jsonl:3: topic is missing and no default topic (--topic) is given
      ... and 3,997 more

Messages that differ only in their numbers (a column, an index) are one kind: the heading
shows ``N`` for them. ``--all`` prints every problem on its own line instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Final, TextIO

from bulksend.cli import EXIT_OK, EXIT_SOME_FAILED
from bulksend.record import Invalid
from bulksend.sources import FORMATS, Inputs

#: Places shown under a kind's heading.
EXAMPLES: Final = 3
#: Kinds kept apart; problems of any further kind are only counted (memory stays bounded
#: however varied the problems of a huge input are).
MAX_KINDS: Final = 1000
_NUMBER: Final = re.compile(r"\b\d+\b")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``validate`` subcommand to ``bulksend``'s subparsers."""
    parser = sub.add_parser(
        "validate",
        help="check input files without sending anything",
        description="Parse and check input files as `send` would, without sending. "
        "Prints each problem as path:line: message, problems of one kind grouped under a "
        "count with their first places. Exit 0 if all records are valid, 1 if any is not, "
        "2 if an input cannot be opened.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="JSONL (.jsonl/.ndjson/.json, or a .json holding one JSON array) or CSV (.csv) "
        "file, optionally .gz; - for stdin",
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
    parser.add_argument(
        "--all",
        action="store_true",
        help="print every problem on its own line, as it is found, instead of grouping them",
    )
    parser.set_defaults(func=run)


@dataclass
class _Kind:
    pattern: str
    count: int = 0
    same: bool = True  # every message of the kind is the first one
    first: list[tuple[str, str]] = field(default_factory=list)  # (source, message)


@dataclass
class Problems:
    """Problems grouped by kind, in order of first appearance, in bounded memory."""

    kinds: dict[str, _Kind] = field(default_factory=dict)
    #: Problems of kinds past MAX_KINDS, and how many such kinds were dropped.
    other: int = 0
    total: int = 0

    def add(self, source: str, message: str) -> None:
        self.total += 1
        pattern = _NUMBER.sub("N", message)
        kind = self.kinds.get(pattern)
        if kind is None:
            if len(self.kinds) >= MAX_KINDS:
                self.other += 1
                return
            kind = self.kinds[pattern] = _Kind(pattern)
        kind.count += 1
        if len(kind.first) < EXAMPLES:
            kind.first.append((source, message))
        if kind.same and message != kind.first[0][1]:
            kind.same = False

    def write(self, out: TextIO) -> None:
        for kind in self.kinds.values():
            if kind.count == 1:
                source, message = kind.first[0]
                out.write(f"{source}: {message}\n")
                continue
            heading = kind.first[0][1] if kind.same else kind.pattern
            out.write(f"{kind.count:,} records: {heading}\n")
            for source, message in kind.first:
                out.write(f"  {source}: {message}\n")
            if kind.count > len(kind.first):
                out.write(f"  ... and {kind.count - len(kind.first):,} more\n")
        if self.other:
            out.write(
                f"{self.other:,} more records with problems of other kinds (--all lists them)\n"
            )


def run(args: argparse.Namespace) -> int:
    """Validate ``args.inputs``; the exit code. InputOpenError propagates (exit 2)."""
    records = 0
    out = sys.stdout
    problems = Problems()
    try:
        with Inputs(args.inputs, fmt=args.format, default_topic=args.topic) as inputs:
            for item in inputs:
                records += 1
                if type(item) is Invalid:
                    if args.all:
                        problems.total += 1
                        out.write(f"{item.source}: {item.error}\n")
                    else:
                        problems.add(item.source, item.error)
        problems.write(out)
        out.write(f"{_count(problems.total, 'problem')} in {_count(records, 'record')}\n")
        out.flush()
    except BrokenPipeError:
        # The reader (say `| head`) left: stop quietly, and keep Python's final flush of
        # stdout from failing again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_SOME_FAILED
    return EXIT_OK if problems.total == 0 else EXIT_SOME_FAILED


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
