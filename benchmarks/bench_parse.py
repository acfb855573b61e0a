"""CPU cost of reading and parsing input records: ``Inputs`` over a file, per record.

    python benchmarks/bench_parse.py [--records 200000] [--repeat 5] [--rounds 3]
                                     [--against DIR]

Five inputs of ``--records`` records each: string bodies (what nearly every input has, the
fast path), non-string bodies (sent as the input's own JSON text), numeric ids, one JSON
array file and one CSV file of the string-body records. Each is read whole in a child process
``--repeat`` times; the best CPU time (``time.process_time``) per record over ``--rounds``
children is reported, with the floor measured in the same run: ``orjson.loads`` of every
line of the string-body file. CPU time and a same-run floor keep the figures comparable
on a shared machine.

``--against DIR`` also measures the ``bulksend`` package found in DIR (say a checkout of
main: ``git worktree add /tmp/base main``), its children interleaved with this one's so
that both see the same machine, and prints the ratio: the before/after of a change.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time
from bulksend.sources import Inputs
path, repeat, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
best = float("inf")
for _ in range(repeat):
    started = time.process_time()
    with Inputs([path], default_topic="bench") as inputs:
        n = sum(1 for _ in inputs)
    best = min(best, time.process_time() - started)
print(best / n * 1e6 if n == expected else -n)
"""


def child(package_dir: Path, path: Path, repeat: int, expected: int) -> float:
    """Best µs of CPU per record reading ``path`` with the package in ``package_dir``; a
    negative number is the item count when it is not ``expected`` (not read as records)."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(repeat), str(expected)],
        env={**os.environ, "PYTHONPATH": str(package_dir)},
        cwd=path.parent,  # not a directory holding a bulksend package
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout)


def floor_us(path: Path, repeat: int) -> float:
    """orjson.loads alone, per line: what no reader of this format can go below."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        lines = [line for line in path.read_bytes().split(b"\n") if line]
        for line in lines:
            orjson.loads(line)
        best = min(best, (time.process_time() - started) / len(lines))
    return best * 1e6


def write_inputs(d: Path, n: int) -> dict[str, Path]:
    strings = [
        orjson.dumps(
            {"topic": "orders", "body": f'{{"order": {i}, "note": "replayed"}}', "keys": f"k{i}"}
        )
        for i in range(n)
    ]
    files = {
        "string body": strings,
        "non-string body": [
            b'{"topic":"orders","body":{"order":%d,"price":19.990,"tags":["a","b"]},"keys":"k%d"}'
            % (i, i)
            for i in range(n)
        ],
        "numeric id": [
            b'{"topic":"orders","body":"o %d","id":%d}' % (i, 10**12 + i) for i in range(n)
        ],
    }
    paths = {}
    for name, lines in files.items():
        paths[name] = d / f"{name.replace(' ', '-')}.jsonl"
        paths[name].write_bytes(b"\n".join(lines) + b"\n")
    paths["JSON array (.json)"] = d / "array.json"
    paths["JSON array (.json)"].write_bytes(b"[\n" + b",\n".join(strings) + b"\n]\n")
    # The string-body records as CSV: the body quoted, its quotes doubled.
    paths["CSV"] = d / "records.csv"
    paths["CSV"].write_text(
        "topic,body,keys\n"
        + "".join(f'orders,"{{""order"": {i}, ""note"": ""replayed""}}",k{i}\n' for i in range(n))
    )
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--against", type=Path, default=None)
    args = ap.parse_args()
    n = args.records
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_inputs(Path(tmp), n)
        floor = floor_us(paths["string body"], args.repeat)
        print(f"{n:,} records per input; best of {args.rounds} x {args.repeat} reads (CPU time)")
        head = f"{'input':<28} {'us/record':>10} {'x floor':>8}"
        if args.against:
            head += f" {'against':>10} {'this/against':>13}"
        print(head)
        print(f"{'orjson.loads alone (floor)':<28} {floor:>10.3f} {1.0:>8.2f}")
        for name, path in paths.items():
            this, other = [], []
            for _ in range(args.rounds):
                this.append(child(HERE, path, args.repeat, n))
                if args.against:
                    other.append(child(args.against, path, args.repeat, n))
            row = f"{name:<28} {_us(min(this))} {min(this) / floor:>8.2f}"
            if args.against:
                ratio = min(this) / min(other) if min(other) > 0 else float("nan")
                row += f" {_us(min(other))} {ratio:>13.3f}"
            print(row)


def _us(value: float) -> str:
    return f"{value:>10.3f}" if value >= 0 else f"{'n/a':>10}"


if __name__ == "__main__":
    main()
