"""Pacing accuracy of ``bulksend send --rate R`` over a 10 s run against ``bulksend serve``.

    python benchmarks/bench_rate.py [--rates 100,1000,5000] [--seconds 10]

For each R, sends R x seconds records and reports the achieved rate over the run (messages
sent after the first, over the time from the first send to the last), its error against R,
and the largest burst: the most sends in any 10 ms window, against the R/100 a perfectly
smooth pacer would put there.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).parent))
from common import write_messages


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", default="100,1000,5000")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    server = subprocess.Popen(
        [
            "taskset",
            "-c",
            "1",
            sys.executable,
            "-m",
            "bulksend",
            "serve",
            "--port",
            "0",
            "--keep",
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        print(
            f"{'target msg/s':>12} {'achieved':>10} {'error':>8} {'max in 10 ms':>13} {'smooth':>7}"
        )
        for rate in (float(r) for r in args.rates.split(",")):
            n = int(rate * args.seconds)
            with tempfile.TemporaryDirectory() as d:
                data, out = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
                write_messages(data, n)
                subprocess.run(
                    [
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
                        "p",
                        "--instance-id",
                        "i",
                        "--rate",
                        str(rate),
                        "--out",
                        str(out),
                        "--quiet",
                    ],
                    check=True,
                    env=os.environ,
                )
                # intended_at/queue_ms are ms-grained; started_at too: use intended + queue.
                starts = sorted(
                    r["started_at"] for r in map(orjson.loads, out.read_bytes().splitlines())
                )
            span_s = (starts[-1] - starts[0]) / 1000
            achieved = (n - 1) / span_s
            windows = collections.Counter(s // 10 for s in starts)
            print(
                f"{rate:>12,.0f} {achieved:>10,.1f} {100 * (achieved / rate - 1):>+7.2f}% "
                f"{max(windows.values()):>13} {rate / 100:>7.0f}"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
