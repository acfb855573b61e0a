"""``bulksend send INPUT... [options]``: flags -> SendJob -> run_send -> exit code."""

from __future__ import annotations

import argparse
import os

from bulksend.cli import run_async
from bulksend.cli.options import (
    Resolver,
    add_pipeline_options,
    add_target_options,
    resolve_credentials,
    resolve_send_options,
    resolve_target,
    to_bool,
)
from bulksend.job import SendJob, run_send


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("send", help="send records from files (JSONL, CSV, .gz, - for stdin)",
                       description="Send every record of the inputs to SendMessage; one result per record.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="paths; - is stdin; .gz is read transparently")
    p.add_argument("--format", choices=("jsonl", "csv"), help="force the input format (default: by extension)")
    p.add_argument("--topic", help="topic for records that name none")
    add_target_options(p)
    add_pipeline_options(p)
    g = p.add_argument_group("outputs")
    g.add_argument("--out", metavar="FILE", help="results: one JSON line per input record")
    g.add_argument("--stats", metavar="FILE", help="run statistics as JSON")
    g.add_argument("--failed", metavar="FILE", help="failed and invalid records, replayable as input")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress and no summary")
    g.add_argument("--key-from-id", action="store_true", default=None,
                   help="set KEYS to the record id where a record has no KEYS")
    g.add_argument("--drain-timeout", type=float, metavar="S",
                   help="on SIGINT/SIGTERM, seconds to let in-flight records finish (default 30)")
    p.set_defaults(func=run)


def build_job(args: argparse.Namespace) -> SendJob:
    r = Resolver.build(args, os.environ)
    embedded = r.get("embedded", to_bool, False)
    return SendJob(
        inputs=tuple(args.inputs),
        target=None if embedded else resolve_target(r),
        credentials=resolve_credentials(r),
        options=resolve_send_options(r, key_from_id=r.get("key_from_id", to_bool, False)),
        fmt=r.get("format", str, None),
        topic=r.get("topic", str, None),
        out=r.get("out", str, None),
        stats=r.get("stats", str, None),
        failed=r.get("failed", str, None),
        progress="off" if r.get("quiet", to_bool, False) else "auto",
        drain_timeout_s=r.get("drain_timeout", float, 30.0),
    )


def run(args: argparse.Namespace) -> int:
    job = build_job(args)
    return run_async(run_send(job)).exit_code
