"""The ``bulksend`` command: one small module per subcommand, each turning flags into one
library call and its outcome into an exit code. BulksendError becomes a one-line message
and exit 2 here, and only here; nothing else prints a traceback to the user."""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
from collections.abc import Coroutine, Sequence
from typing import Any, TextIO, TypeVar, cast

from bulksend import __version__
from bulksend.errors import BulksendError
from bulksend.sinks import reopen_closed_std
from bulksend.summary import printable

T = TypeVar("T")

#: Exit codes shared by every subcommand.
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop where it is installed (about twice the stdlib loop's
    requests per CPU second on this workload), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


class _Formatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own, so that the epilog's tables
    (credential variables, exit codes) keep their lines, and a long description still
    wraps to the terminal."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            lead = line[: len(line) - len(line.lstrip())]
            lines.append(
                textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent + lead)
                if line.strip()
                else ""
            )
        return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # one line, exit 2, as for every usage error
        self.exit(EXIT_USAGE, f"bulksend: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from bulksend.cli import load, report, send, serve, validate

    parser = _Parser(
        prog="bulksend", description="Send messages to the DMS RocketMQ SendMessage API."
    )
    parser.add_argument("--version", action="version", version=f"bulksend {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (send, validate, serve, load, report):
        module.register(sub)
    # Each subcommand reads only its own options from the environment and a config file,
    # and a config file may name any subcommand's (see cli/options.py): record both.
    options = {
        name: frozenset(
            a.dest for a in p._actions if a.option_strings and a.default != argparse.SUPPRESS
        )
        for name, p in sub.choices.items()
    }
    for p in sub.choices.values():
        p.set_defaults(config_options=options)
    return parser


class _Outliving:
    """stderr for a run that must outlive its reader: a terminal that hangs up (or a pipe
    whose reader went) fails every later write, and a progress line or the summary must
    not end a backfill that is sending fine (it did: exit 1 at the next progress line).
    After the first failed write, the rest is dropped: nobody is there to read it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except OSError:
                self._gone = True
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except OSError:
                self._gone = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    reopen_closed_std()
    stderr = sys.stderr
    sys.stderr = cast(TextIO, _Outliving(stderr))
    try:
        return _main(argv)
    finally:
        sys.stderr = stderr  # as it was, for a caller that runs main() in its own process


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        code: int = args.func(args)
    except BulksendError as exc:
        return _error(exc)
    except BaseExceptionGroup as group:
        # A task group may wrap our error; one BulksendError inside is still just that.
        first = group.exceptions[0]
        if len(group.exceptions) == 1 and isinstance(first, BulksendError):
            return _error(first)
        if group.subgroup(KeyboardInterrupt) is not None:
            return EXIT_INTERRUPTED
        raise
    except KeyboardInterrupt:
        # A SIGINT before a run's own handlers are in (while modules load, the target
        # starts): nothing was sent yet, nothing to say.
        return EXIT_INTERRUPTED
    return code


def _error(exc: BulksendError) -> int:
    # A message may quote a server (an authentication failure carries its error_msg):
    # its control characters are shown, never obeyed by the terminal.
    print(f"bulksend: error: {printable(str(exc))}", file=sys.stderr)
    return exc.exit_code
