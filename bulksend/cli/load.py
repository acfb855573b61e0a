"""``bulksend load [target options] [options]``: flags -> LoadJob -> run_load -> exit code."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from bulksend.cli import run_async
from bulksend.cli._cluster import add_cluster_options, resolve_cluster
from bulksend.cli.options import (
    Resolver,
    add_target_options,
    help_epilog,
    resolve_auth,
    resolve_metrics_addr,
    resolve_send_options,
    resolve_target,
    to_bool,
)
from bulksend.config import RetryPolicy, parse_duration
from bulksend.errors import ConfigError
from bulksend.load import LoadJob, run_load
from bulksend.stages import Stages
from bulksend.synthetic import DEFAULT_TOPIC, MessageSpec, read_template
from bulksend.thresholds import Threshold


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "load",
        help="open-model load test: synthetic messages at a scheduled rate",
        description="Send synthetic messages at a scheduled rate (constant or ramped) whatever the "
        "server does, measure latency from each message's intended send time (and, beside it, "
        "from the actual send), check thresholds. Exit 0 all ok and thresholds pass, 1 some "
        "message failed, 99 a threshold failed, 2 usage or config error, 130 interrupted.",
        epilog=help_epilog("load"),
    )
    add_target_options(p)
    g = p.add_argument_group("schedule")
    g.add_argument("--rate", type=float, metavar="R", help="messages/s, constant (with --duration)")
    g.add_argument("--duration", metavar="D", help="how long at --rate: seconds, or 30s, 5m, 1h")
    g.add_argument(
        "--stages",
        metavar="T:R,...",
        help='rate points joined by linear ramps, e.g. "0s:100,30s:1000,90s:1000"; '
        "the run stops at the last point",
    )
    g.add_argument(
        "--max-in-flight",
        type=int,
        metavar="N",
        help="requests in flight at most (default 256); past it sends go out late, counted",
    )
    g = p.add_argument_group("messages")
    g.add_argument(
        "--topic",
        action="append",
        metavar="TOPIC",
        help=f"topic; repeat for several, used round robin (default {DEFAULT_TOPIC})",
    )
    g.add_argument(
        "--body-size", type=int, metavar="BYTES", help="body of this many bytes (default 256)"
    )
    g.add_argument(
        "--body-template",
        metavar="FILE",
        help="body from this file with {seq}, {ts} (epoch ms) and {uuid} filled in",
    )
    g.add_argument(
        "--keys",
        type=int,
        metavar="N",
        help="KEYS property out of N distinct values (default none)",
    )
    g = p.add_argument_group("thresholds")
    g.add_argument(
        "--threshold",
        action="append",
        metavar="EXPR",
        help="e.g. 'p99<200ms', 'p90<=50ms', 'error_rate<0.01', 'rate>=950' (also p50, "
        "p99.9, p99.99, max, mean; units ms or s); repeatable; any fail: exit 99",
    )
    g.add_argument(
        "--abort-on-fail",
        action="store_true",
        default=None,
        help="stop (drain) at the first whole second in which a threshold fails",
    )
    g = p.add_argument_group("outputs")
    g.add_argument(
        "--out",
        metavar="FILE",
        help="results: one JSON line per message (intended_at included; - for stdout)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace a non-empty --out ledger (without it, one is refused)",
    )
    g.add_argument("--stats", metavar="FILE", help="run statistics as JSON")
    g.add_argument("--html", metavar="FILE", help="a self-contained HTML report with charts")
    g.add_argument(
        "--timeseries", metavar="FILE", help="one JSON line per second, written as the run goes"
    )
    g.add_argument(
        "--quiet", action="store_true", default=None, help="no progress line and no summary"
    )
    g.add_argument(
        "--progress-interval",
        type=float,
        metavar="S",
        help="off a terminal, seconds between progress lines (default 5)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        metavar="S",
        help="on SIGINT/SIGTERM, seconds to let in-flight messages finish (default 30)",
    )
    g.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics while running (:PORT: every"
        " interface)",
    )
    g = p.add_argument_group("requests")
    g.add_argument("--timeout", type=float, metavar="S", help="seconds per attempt (default 30)")
    g.add_argument("--max-retries", type=int, metavar="N", help="retries per message (default 0)")
    g.add_argument(
        "--backoff-base", type=float, metavar="S", help="backoff base, seconds (default 0.2)"
    )
    g.add_argument(
        "--backoff-max", type=float, metavar="S", help="backoff cap, seconds (default 20)"
    )
    # --- scale-out (Dask): bulksend.scaleout; distributed is imported only when used ---
    add_cluster_options(p)
    # --- end scale-out ---
    p.set_defaults(func=run)


_NONE: tuple[str, ...] = ()


def _strings(value: Any) -> tuple[str, ...]:
    """A list from the flags or the config file, or a comma-separated string from the env."""
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split(",") if s.strip())
    if isinstance(value, Sequence):
        return tuple(str(v) for v in value)
    raise ValueError(value)


def _stages(r: Resolver) -> Stages:
    stages = r.get("stages", str, None)
    rate = r.get("rate", float, None)
    duration = r.get("duration", str, None)
    if stages is not None:
        if rate is not None or duration is not None:
            raise ConfigError("give either --stages or --rate with --duration, not both")
        return Stages.parse(stages)
    if rate is None or duration is None:
        raise ConfigError("a schedule is needed: --rate R --duration D, or --stages T:R,T:R,...")
    return Stages.constant(rate, parse_duration(str(duration)))


def _message(r: Resolver) -> MessageSpec:
    template = r.get("body_template", str, None)
    size = r.get("body_size", int, None)
    if template is not None and size is not None:
        raise ConfigError("give either --body-size or --body-template, not both")
    return MessageSpec(
        topics=r.get("topic", _strings, (DEFAULT_TOPIC,)),
        body_size=256 if size is None else size,
        template=read_template(template) if template is not None else None,
        keys=r.get("keys", int, 0),
    )


def build_job(args: argparse.Namespace) -> LoadJob:
    r = Resolver.build(args, os.environ)
    embedded = r.get("embedded", to_bool, False)
    sending = resolve_send_options(r)
    in_flight = r.get("max_in_flight", int, 256)
    if in_flight < 1:
        raise ConfigError("--max-in-flight must be >= 1")
    retry = RetryPolicy(
        max_retries=r.get("max_retries", int, 0),
        backoff_base=sending.retry.backoff_base,
        backoff_max=sending.retry.backoff_max,
    )
    target = None if embedded else resolve_target(r)
    stages = _stages(r)
    auth = resolve_auth(r)
    return LoadJob(
        target=target,
        stages=stages,
        credentials=auth.credentials,
        refresher=auth.refresher,
        # A dead target is what a load measures: each message fails when due, never
        # waited out as a backfill waits out an outage (see load.default_options).
        options=dataclasses.replace(
            sending, concurrency=in_flight, rate=0.0, retry=retry, ride_outages=False
        ),
        message=_message(r),
        thresholds=tuple(Threshold.parse(t) for t in r.get("threshold", _strings, _NONE)),
        abort_on_fail=r.get("abort_on_fail", to_bool, False),
        out=r.get("out", str, None),
        stats=r.get("stats", str, None),
        html=r.get("html", str, None),
        timeseries=r.get("timeseries", str, None),
        progress="off" if r.get("quiet", to_bool, False) else "auto",
        progress_interval_s=r.get("progress_interval", float, 5.0),
        drain_timeout_s=r.get("drain_timeout", float, 30.0),
        overwrite=r.get("overwrite", to_bool, False),
        metrics_addr=resolve_metrics_addr(r),
    )


def run(args: argparse.Namespace) -> int:
    job = build_job(args)
    # --- scale-out (Dask) ---
    cluster = resolve_cluster(args, os.environ)
    if cluster is not None:
        from bulksend.scaleout import run_distributed_load

        return run_async(run_distributed_load(job, cluster)).exit_code
    # --- end scale-out ---
    return run_async(run_load(job)).exit_code
