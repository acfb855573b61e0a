"""bulksend send against the official SDK, same local server, same run.

    python benchmarks/bench_send.py [--messages 100000] [--sdk-messages 10000]
        [--repeat 1] [--baseline /other/checkout/.venv/bin/bulksend]

Server: nginx (Debian, installed if missing) on core 1, answering every POST with a
SendMessage-shaped 200, so the figures are the client's. Clients run on core 0 (taskset).
bulksend runs as a user would: signing (AK/SK), a results ledger (--out) and --stats on.
Prints messages/s, client CPU µs per message (user + sys) and peak RSS, and the CPU ratio
against the SDK's sync client measured in the same run.

``--baseline CMD`` also measures another bulksend (say, main's, to check a change did not
slow the hot path), alternating with this one, ``--repeat`` times each: the rows give the
median run and the spread (min-max CPU µs/msg) says how noisy the machine was.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).parent))
from common import Measured, measure, nginx, table, write_messages


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument(
        "--sdk-messages", type=int, default=10_000, help="the SDK is ~10x slower: fewer messages"
    )
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each bulksend (median shown)")
    ap.add_argument(
        "--baseline", metavar="CMD", help="another bulksend executable to measure alongside"
    )
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

        def bulksend(program: list[str], name: str) -> list[str]:
            return [
                "taskset",
                "-c",
                "0",
                *program,
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
                f"{d}/{name}.jsonl",
                "--stats",
                f"{d}/{name}.stats.json",
            ]

        contenders = {f"bulksend c={args.concurrency}": [sys.executable, "-m", "bulksend"]}
        if args.baseline:
            contenders[f"baseline c={args.concurrency}"] = [args.baseline]
        runs: dict[str, list[Measured]] = {name: [] for name in contenders}
        for _ in range(args.repeat):  # alternate, so drift on the machine hits both alike
            for i, (name, program) in enumerate(contenders.items()):
                Path(f"{d}/run{i}.jsonl").unlink(missing_ok=True)
                runs[name].append(measure(name, bulksend(program, f"run{i}"), args.messages, env))
        rows.extend(median(measured) for measured in runs.values())
        print(table(rows, sdk_sync))
        for name, measured in runs.items():
            cpu = sorted(m.cpu_us_per_msg for m in measured)
            print(
                f"{name}: CPU µs/msg over {len(cpu)} run(s): {', '.join(f'{c:.1f}' for c in cpu)}"
            )
        if args.baseline:
            ours, base = (median(m).cpu_us_per_msg for m in runs.values())
            print(f"CPU per message, this tree / baseline: {ours / base:.3f}")
        stats = orjson.loads(Path(f"{d}/run0.stats.json").read_bytes())
        lines = Path(f"{d}/run0.jsonl").read_bytes().count(b"\n")
        print(f"bulksend ledger: {lines:,} lines; ok: {stats['ok']:,} of {args.messages:,}")


def median(measured: list[Measured]) -> Measured:
    """The run with the median CPU per message."""
    return sorted(measured, key=lambda m: m.cpu_s)[len(measured) // 2]


if __name__ == "__main__":
    main()
