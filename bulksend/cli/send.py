"""``bulksend send INPUT... [options]``: flags -> SendJob -> run_send -> exit code."""

from __future__ import annotations

import argparse
import os

from bulksend.cli import run_async
from bulksend.cli._cluster import add_cluster_options, resolve_cluster
from bulksend.cli.options import (
    Resolver,
    add_pipeline_options,
    add_target_options,
    help_epilog,
    resolve_auth,
    resolve_engine,
    resolve_metrics_addr,
    resolve_send_options,
    resolve_target,
    to_bool,
)
from bulksend.job import SendJob, run_send


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "send",
        help="send records from files (JSONL, CSV, .gz, - for stdin)",
        description="Send every record of the inputs to SendMessage; one result per record.",
        epilog=help_epilog("send"),
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="paths; - is stdin; .gz is read transparently"
    )
    p.add_argument(
        "--format", choices=("jsonl", "csv"), help="force the input format (default: by extension)"
    )
    p.add_argument("--topic", help="topic for records that name none")
    add_target_options(p)
    add_pipeline_options(p)
    g = p.add_argument_group("outputs")
    g.add_argument(
        "--out", metavar="FILE", help="results: one JSON line per input record (- for stdout)"
    )
    g.add_argument("--stats", metavar="FILE", help="run statistics as JSON")
    g.add_argument("--html", metavar="FILE", help="a self-contained HTML report of the run")
    g.add_argument(
        "--failed", metavar="FILE", help="failed and invalid records, replayable as input"
    )
    g.add_argument("--quiet", action="store_true", default=None, help="no progress and no summary")
    g.add_argument(
        "--progress-interval",
        type=float,
        metavar="S",
        help="off a terminal, seconds between status lines (default 5)",
    )
    g.add_argument(
        "--key-from-id",
        action="store_true",
        default=None,
        help="set KEYS to the record id where a record has no KEYS",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        metavar="S",
        help="on SIGINT/SIGTERM, seconds to let in-flight records finish (default 30)",
    )
    g.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics while running (:PORT: every"
        " interface)",
    )
    g = p.add_argument_group("reliability")
    g.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="skip records the --out ledger holds as ok; append the rest to it",
    )
    g.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="with --resume: go on even though an input changed since the ledger began",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start a non-empty --out ledger again (without it, or --resume, it is refused)",
    )
    g.add_argument(
        "--ordered",
        action="store_true",
        default=None,
        help="records with the same KEYS go one at a time, in input order",
    )
    g.add_argument(
        "--order-by", metavar="FIELD", help="with --ordered: key on topic, id, tags or a property"
    )
    g.add_argument(
        "--on-key-failure",
        choices=("continue", "skip"),
        help="with --ordered: after a record finally fails, send the rest of its key or skip them",
    )
    g.add_argument(
        "--adaptive",
        action="store_true",
        default=None,
        help="on 429, lower the rate multiplicatively and recover additively (AIMD)",
    )
    g.add_argument(
        "--exactly-once",
        action="store_true",
        default=None,
        help="each record stored once, lost answers and crashes included: an intent in"
        " the --out ledger before each send, a ListMessages check before any re-send",
    )
    g.add_argument(
        "--reconcile-after",
        type=float,
        metavar="S",
        help="with --exactly-once: seconds after an attempt before ListMessages is asked"
        " about it, for the broker's key index (default 3)",
    )
    # --- scale-out (Dask): bulksend.scaleout; distributed is imported only when used ---
    add_cluster_options(p)
    # --- end scale-out ---
    p.set_defaults(func=lambda args: run(args, p))


def build_job(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> SendJob:
    r = Resolver.build(args, os.environ)
    embedded = r.get("embedded", to_bool, False)
    target = None if embedded else resolve_target(r)
    engine = resolve_engine(r)
    auth = resolve_auth(r)
    return SendJob(
        inputs=tuple(args.inputs),
        target=target,
        engine=engine,
        credentials=auth.credentials,
        refresher=auth.refresher,
        options=resolve_send_options(
            r,
            key_from_id=r.get("key_from_id", to_bool, False),
            ordered=r.get("ordered", to_bool, False) or r.get("order_by", str, None) is not None,
            order_by=r.get("order_by", str, None),
            on_key_failure=r.get("on_key_failure", str, "continue"),
            adaptive=r.get("adaptive", to_bool, False),
            exactly_once=r.get("exactly_once", to_bool, False),
            reconcile_after=r.get("reconcile_after", float, 3.0),
        ),
        fmt=r.get("format", str, None),
        topic=r.get("topic", str, None),
        out=r.get("out", str, None),
        stats=r.get("stats", str, None),
        failed=r.get("failed", str, None),
        html=r.get("html", str, None),
        progress="off" if r.get("quiet", to_bool, False) else "auto",
        progress_interval_s=r.get("progress_interval", float, 5.0),
        drain_timeout_s=r.get("drain_timeout", float, 30.0),
        resume=r.get("resume", to_bool, False),
        force=r.get("force", to_bool, False),
        overwrite=r.get("overwrite", to_bool, False),
        metrics_addr=resolve_metrics_addr(r),
        command_line=command_line(parser, args) if parser is not None else None,
    )


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """The arguments that give ``parser`` back ``args``: the flags the user typed, in the
    parser's order (the environment and a --config file are read again by the rerun)."""
    words = [parser.prog.split()[-1]]
    for action in parser._actions:  # argparse keeps no public list of a parser's actions
        value = getattr(args, action.dest, None)
        if value is None or isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            if value is True:
                words.append(flag)
        elif isinstance(value, list):
            for v in value:
                words += [flag, _word(v)]
        else:
            words += [flag, _word(value)]
    return tuple(words)


def _word(value: object) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    job = build_job(args, parser)
    # --- scale-out (Dask) ---
    cluster = resolve_cluster(args, os.environ)
    if cluster is not None:
        from bulksend.scaleout import run_distributed

        return run_async(run_distributed(job, cluster)).exit_code
    # --- end scale-out ---
    return run_async(run_send(job)).exit_code
