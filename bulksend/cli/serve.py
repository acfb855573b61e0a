"""``bulksend serve``: flags and environment -> ServerOptions -> ``run_server`` until a signal.

The base URL is the first line on stdout, printed once the socket accepts connections.
First SIGINT/SIGTERM: stop accepting, finish in-flight requests, exit 0. A second one
cuts the connections still open and exits 130.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from bulksend.cli import EXIT_INTERRUPTED, EXIT_OK, run_async
from bulksend.errors import ConfigError
from bulksend.server import RunningServer, ServerOptions, Stall, run_server

ENV_AK = "HUAWEICLOUD_SDK_AK"
ENV_SK = "HUAWEICLOUD_SDK_SK"
ENV_TOKEN = "HUAWEICLOUD_SDK_AUTH_TOKEN"


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a probability: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _stall(text: str) -> Stall:
    try:
        return Stall.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any) -> None:
    """Add the ``serve`` subcommand to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run a SendMessage-compatible server (for tests and benchmarks)",
        description=(
            "Serve the DMS RocketMQ SendMessage/ListMessages API on HOST:PORT, print its URL "
            f"first on stdout, run until SIGINT/SIGTERM. Auth from the environment: {ENV_AK} and "
            f"{ENV_SK} (SDK-HMAC-SHA256 signatures), {ENV_TOKEN} (X-Auth-Token); none: unsigned."
        ),
    )
    d = ServerOptions()
    a = p.add_argument
    a("--host", default=d.host, help="address to listen on (default %(default)s)")
    a("--port", type=int, default=d.port, help="port; 0 picks a free one (default %(default)s)")
    a(
        "--queues",
        type=int,
        default=d.queues,
        help="queues per topic per broker (default %(default)s)",
    )
    a("--brokers", type=int, default=d.brokers, help="brokers (default %(default)s)")
    a("--store", metavar="FILE", help="keep messages in this SQLite file across restarts")
    a(
        "--keep",
        type=int,
        default=d.keep,
        metavar="N",
        help="in memory: newest messages ListMessages can see; 0 = all (default %(default)s)",
    )
    a(
        "--commit-interval",
        type=float,
        default=d.commit_interval_s * 1000,
        metavar="MS",
        help="--store: least time between two batch commits; 0: whenever the writer is free "
        "(default %(default)s)",
    )
    a("--seed", type=int, help="seed for every random misbehaviour (default: drawn, printed)")
    a("--rate-limit", type=float, metavar="R", help="SendMessage requests/s; over it 429 APIG.0308")
    a("--rate-burst", type=float, metavar="N", help="token bucket size (default max(1, R))")
    a("--latency", type=float, default=0.0, metavar="MS", help="delay every SendMessage answer")
    a(
        "--latency-jitter",
        type=float,
        default=0.0,
        metavar="MS",
        help="add uniform(0, MS) to each answer's delay",
    )
    a(
        "--stall",
        type=_stall,
        metavar="EVERY:FOR",
        help="every EVERY hold all answers for FOR, e.g. 10s:1s or 500ms:200ms",
    )
    a("--error-rate", type=_probability, default=0.0, metavar="P", help="answer 503 (not stored)")
    a(
        "--drop-rate",
        type=_probability,
        default=0.0,
        metavar="P",
        help="close the connection without answering (not stored)",
    )
    a(
        "--hang-rate",
        type=_probability,
        default=0.0,
        metavar="P",
        help="never answer, keep the connection open (not stored)",
    )
    a(
        "--garbage-rate",
        type=_probability,
        default=0.0,
        metavar="P",
        help="answer 200 with a body that is not JSON (stored)",
    )
    a(
        "--no-msgid-rate",
        type=_probability,
        default=0.0,
        metavar="P",
        help="answer 200 JSON without msg_id (stored)",
    )
    a(
        "--lose-answer-rate",
        type=_probability,
        default=0.0,
        metavar="P",
        help="store the message, then drop the connection without its answer",
    )
    a(
        "--lose-answer-hang",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="... or rather send that answer S seconds late (default 0: drop)",
    )
    a("--max-body", type=int, metavar="BYTES", help="413 for request bodies over BYTES")
    a("--retry-after-date", action="store_true", help="send Retry-After as an HTTP date")
    a("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    a("--tls-key", metavar="FILE", help="... and this private key (PEM)")
    a(
        "--shutdown-grace",
        type=float,
        default=d.shutdown_grace_s,
        metavar="S",
        help="on SIGTERM, how long in-flight requests may take (default %(default)s)",
    )
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> ServerOptions:
    """The ServerOptions the flags and the environment ask for; ConfigError if invalid."""
    return ServerOptions(
        host=args.host,
        port=args.port,
        queues=args.queues,
        brokers=args.brokers,
        store_path=args.store,
        keep=args.keep or None,
        commit_interval_s=args.commit_interval / 1000,
        ak=env.get(ENV_AK) or None,
        sk=env.get(ENV_SK) or None,
        token=env.get(ENV_TOKEN) or None,
        seed=args.seed,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        latency_ms=args.latency,
        latency_jitter_ms=args.latency_jitter,
        stall=args.stall,
        error_rate=args.error_rate,
        drop_rate=args.drop_rate,
        hang_rate=args.hang_rate,
        garbage_rate=args.garbage_rate,
        no_msgid_rate=args.no_msgid_rate,
        lose_answer_rate=args.lose_answer_rate,
        lose_answer_hang_s=args.lose_answer_hang,
        max_body=args.max_body,
        retry_after_date=args.retry_after_date,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        shutdown_grace_s=args.shutdown_grace,
    )


def _announce(server: RunningServer) -> None:
    """What the server does, on stderr; never a secret."""
    o = server.options

    def say(text: str) -> None:
        print(f"bulksend serve: {text}", file=sys.stderr)

    if o.ak is not None:
        say(f"verifying SDK-HMAC-SHA256 signatures (AK {o.ak[:4]}...)")
    if o.token is not None:
        say("requiring X-Auth-Token")
    if o.ak is None and o.token is None:
        say(
            f"accepting UNSIGNED requests (set {ENV_AK} and {ENV_SK}, or {ENV_TOKEN}, "
            "to require auth)"
        )
    if o.store_path is not None:
        say(f"storing in {o.store_path} ({server.store.total} messages from earlier runs)")
    if server.seed is not None:
        say(f"misbehaving on purpose, --seed {server.seed}")
    sys.stderr.flush()


async def serve(options: ServerOptions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0
    current: list[RunningServer] = []

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1 and current:
            current[0].abort()

    async with run_server(options) as server:
        current.append(server)
        # Handlers before the URL: whoever reads the URL may signal at once.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            print(server.url, flush=True)
            _announce(server)
            await stop.wait()
            await server.shutdown()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return EXIT_INTERRUPTED if signals > 1 else EXIT_OK


def run(args: argparse.Namespace) -> int:
    # A server process keeps up to --keep messages (a million) in memory: every full
    # collection of the cyclic garbage collector walks them, and with CPython's default
    # thresholds one came every ~40,000 requests (50 ms each at 300,000 messages, ~1 µs a
    # request in all). Cycles are rare here and die young: full collections once in a
    # hundred times as many requests. Only in this process: in-process servers
    # (run_server, --embedded) leave their host's collector alone.
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1000)
    return run_async(serve(options_from_args(args, os.environ)))
