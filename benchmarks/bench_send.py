"""bulksend send against the official SDK, same local server, same run.

    python benchmarks/bench_send.py [--messages 100000] [--sdk-messages 10000]

Server: nginx (Debian, installed if missing) on core 1, answering every POST with a
SendMessage-shaped 200, so the figures are the client's. Clients run on core 0 (taskset).
bulksend runs as a user would: signing (AK/SK), a results ledger (--out) and --stats on.
Prints messages/s, client CPU µs per message (user + sys) and peak RSS, and the CPU ratio
against the SDK's sync client measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, nginx, table, write_messages


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument(
        "--sdk-messages", type=int, default=10_000, help="the SDK is ~10x slower: fewer messages"
    )
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    env = {
        **os.environ,
        "HUAWEICLOUD_SDK_AK": "BENCHAK0000000000000",
        "HUAWEICLOUD_SDK_SK": "bench-secret-key",
    }
    with tempfile.TemporaryDirectory(prefix="bench-send-") as d, nginx(core=1) as url:
        data = Path(d) / "messages.jsonl"
        write_messages(data, args.messages)
        rows = []
        sdk_sync = measure(
            "SDK sync",
            [
                "taskset",
                "-c",
                "0",
                sys.executable,
                "benchmarks/sdk_sender.py",
                url,
                str(args.sdk_messages),
                "1",
            ],
            args.sdk_messages,
            env,
        )
        rows.append(sdk_sync)
        rows.append(
            measure(
                "SDK 64-thread pool",
                [
                    "taskset",
                    "-c",
                    "0",
                    sys.executable,
                    "benchmarks/sdk_sender.py",
                    url,
                    str(args.sdk_messages),
                    "64",
                ],
                args.sdk_messages,
                env,
            )
        )
        cmd = [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-m",
            "bulksend",
            "send",
            str(data),
            "--endpoint",
            url,
            "--project-id",
            "bench-project",
            "--instance-id",
            "bench-instance",
            "--quiet",
            "--concurrency",
            str(args.concurrency),
            "--out",
            f"{d}/results.jsonl",
            "--stats",
            f"{d}/stats.json",
        ]
        rows.append(measure(f"bulksend c={args.concurrency}", cmd, args.messages, env))
        print(table(rows, sdk_sync))
        stats = orjson.loads(Path(f"{d}/stats.json").read_bytes())
        lines = Path(f"{d}/results.jsonl").read_bytes().count(b"\n")
        print(f"bulksend ledger: {lines:,} lines; ok: {stats['ok']:,} of {args.messages:,}")


if __name__ == "__main__":
    main()
