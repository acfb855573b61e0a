"""Scale-out: ``bulksend send --workers N`` against one process, on this machine.

    python benchmarks/bench_scale.py [--messages 12000] [--concurrency 16] [--rounds 3] [--nginx] [--adaptive]

Each run is a ``bulksend send`` subprocess with ``--stats``; every figure is measured in
this run, the single process (no ``--workers``) being the baseline:

* **Network-bound**, against ``bulksend serve --latency 20``: each sender waits 20 ms per
  answer, so one process with ``--concurrency C`` tops out near C / 20 ms, and a second
  worker (C more connections) should double that (the bar: ``--workers 2`` at >= 1.8x
  ``--workers 1``).
* **CPU-bound** (``--nginx``), against nginx answering at once on core 1: a sender is then
  limited by its own CPU; on a 2-core machine the second worker shares a core with nginx.
* **Start-up**: seconds from launching the command to the first message stored at the
  server (ListMessages, oldest first), wall and CPU seconds of a 200-message run, and the
  driver's and each worker's peak RSS (sampled every 50 ms with psutil, which distributed
  brings). CPU counts every process of the run (Dask's workers are children of its
  forkserver, not of the command, so they are sampled too).

* **Reading**: CPU µs per record a shard spends reading its share, whole input filtered
  against its byte span of a plain JSONL input, at 2 and 8 shards (in this process).

* **Adaptive** (``--adaptive``): ``--adaptive`` against ``bulksend serve --rate-limit 500``,
  one process and two workers (each shard runs its own AIMD): the rate each settles at.

Runs are interleaved, ``--rounds`` of each (the median shown), and the load average is
printed: the machine's other processes move every figure, ratios least.

``msg/s`` is the run's ``throughput_msg_s`` (records over the span from the first send to
the last answer, start-up excluded); ``wall`` includes start-up and the merge.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from common import nginx, write_messages

PROJECT, INSTANCE = "bench-project", "bench-instance"


@dataclass
class Row:
    name: str
    rate: float
    wall_s: float
    first_s: float | None
    cpu_s: float
    driver_mb: float
    worker_mb: list[float] = field(default_factory=list)


def _sample(
    pid: int, peaks: dict[int, float], cpu: dict[int, float], done: threading.Event
) -> None:
    """Peak RSS (MB) and CPU seconds of the process and each of its descendants, until
    ``done``. Sampled, because the worker processes are children of Dask's forkserver,
    not of the command, so its resource usage (os.wait4) does not hold them. (Not
    Popen.poll: that would reap the child before os.wait4 could.)"""
    root = psutil.Process(pid)
    while not done.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss / 2**20
                    times = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            peaks[p.pid] = max(peaks.get(p.pid, 0.0), rss)
            cpu[p.pid] = times.user + times.system
        done.wait(0.05)


def _first_store_s(url: str, topic: str, started: float) -> float | None:
    path = f"/v2/rocketmq/{PROJECT}/instances/{INSTANCE}/messages"
    query = f"?topic={topic}&limit=1&start_time=0&end_time={2**53}"
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=30) as answer:
        messages = orjson.loads(answer.read())["messages"]
    return messages[0]["store_timestamp"] / 1000 - started if messages else None


def run(
    name: str, url: str, inputs: Path, topic: str, flags: list[str], d: Path, *, stores: bool
) -> Row:
    stats = d / f"{topic}.stats.json"
    cmd = [sys.executable, "-m", "bulksend", "send", str(inputs), "--endpoint", url]
    cmd += ["--project-id", PROJECT, "--instance-id", INSTANCE, "--stats", str(stats)]
    cmd += ["--quiet", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUAWEICLOUD_", "BULKSEND_"))}
    peaks: dict[int, float] = {}
    cpu: dict[int, float] = {}
    started = time.time()
    with (d / f"{topic}.err").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    done = threading.Event()
    sampler = threading.Thread(target=_sample, args=(proc.pid, peaks, cpu, done), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - started
    sampler.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}: {(d / f'{topic}.err').read_text()}")
    figures = orjson.loads(stats.read_bytes())
    # The command's own CPU exactly (os.wait4), its descendants' as last sampled.
    cpu.pop(proc.pid, None)
    cpu_s = usage.ru_utime + usage.ru_stime + sum(cpu.values())
    driver = peaks.pop(proc.pid, 0.0)
    # Workers and Dask's forkserver: the big children (the resource tracker is a few MB).
    workers = sorted((mb for mb in peaks.values() if mb > 30), reverse=True)
    return Row(
        name,
        figures["throughput_msg_s"],
        wall,
        _first_store_s(url, topic, started) if stores else None,
        cpu_s,
        driver,
        workers,
    )


def report(title: str, rows: list[Row], n: int) -> None:
    base = rows[0]
    print(f"\n{title} ({n:,} messages)")
    print(
        f"{'':22} {'msg/s':>8} {'vs 1 proc':>9} {'wall s':>7} {'1st msg s':>9}"
        f" {'CPU µs/msg':>10} {'driver MB':>9}  children MB (workers, forkserver)"
    )
    for r in rows:
        first = f"{r.first_s:9.2f}" if r.first_s is not None else f"{'-':>9}"
        workers = " ".join(f"{mb:.0f}" for mb in r.worker_mb) or "-"
        print(
            f"{r.name:22} {r.rate:8,.0f} {r.rate / base.rate:8.2f}x {r.wall_s:7.2f} {first}"
            f" {r.cpu_s / n * 1e6:10.1f} {r.driver_mb:9.0f}  {workers}"
        )


CONFIGS = [
    ("1 process", []),
    ("--workers 1", ["--workers", "1"]),
    ("--workers 2", ["--workers", "2"]),
]


def series(
    url: str, n: int, flags: list[str], label: str, d: Path, *, stores: bool, rounds: int
) -> list[Row]:
    """Each configuration ``rounds`` times, interleaved (so a burst of load from other
    processes hits every configuration alike); the median run of each by msg/s."""
    runs: dict[str, list[Row]] = {name: [] for name, _ in CONFIGS}
    for r in range(rounds):
        for i, (name, config) in enumerate(CONFIGS):
            topic = f"{label}-{r}-{i}"
            inputs = d / f"{topic}.jsonl"
            write_messages(inputs, n, topic=topic)
            runs[name].append(run(name, url, inputs, topic, [*config, *flags], d, stores=stores))
    if rounds > 1:
        for name, rows in runs.items():
            print(f"  {name:14} msg/s per round: " + ", ".join(f"{x.rate:,.0f}" for x in rows))
    return [sorted(rows, key=lambda x: x.rate)[len(rows) // 2] for rows in runs.values()]


def read_cost(d: Path, n: int = 200_000) -> None:
    """CPU a shard spends reading its records, in this process: the whole input read and
    filtered (``ShardPlan``: what ``--ordered``, gzip and CSV inputs need) against its byte
    span (``split_inputs``: plain JSONL), the driver's pre-pass counted apart."""
    from bulksend.scaleout import split_inputs
    from bulksend.shards import ShardPlan
    from bulksend.sources import Inputs

    path = d / "read.jsonl"
    write_messages(path, n)
    print(f"\nreading a shard's records ({n:,} records, {path.stat().st_size / 2**20:.0f} MB)")
    print(
        f"  {'shards':>6} {'whole µs/rec':>13} {'span µs/rec':>12} {'ratio':>6} {'pre-pass s':>10}"
    )
    for shards in (2, 8):
        owns = ShardPlan(shards).owner(0)
        t0 = time.process_time()
        with Inputs([str(path)]) as inputs:
            mine = sum(1 for batch in inputs.batches(4096) for item in batch if owns(item))
        whole = time.process_time() - t0
        t0 = time.process_time()
        split = split_inputs((str(path),), None, shards, False)
        prepass = time.process_time() - t0
        assert split is not None
        t0 = time.process_time()
        with Inputs(split[0]) as inputs:
            spanned = sum(len(batch) for batch in inputs.batches(4096))
        span = time.process_time() - t0
        print(
            f"  {shards:6} {whole / mine * 1e6:13.2f} {span / spanned * 1e6:12.2f}"
            f" {whole / mine / (span / spanned):5.1f}x {prepass:10.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=12_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--nginx", action="store_true", help="also the CPU-bound case")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each configuration")
    ap.add_argument(
        "--adaptive", action="store_true", help="also --adaptive against a rate-limited server"
    )
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    print("(medians of interleaved rounds; other processes' load moves every figure)")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        d = Path(tmp)
        read_cost(d)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bulksend",
                "serve",
                "--port",
                "0",
                "--latency",
                "20",
                "--keep",
                "100000",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            url = server.stdout.readline().strip()
            flags = ["--concurrency", str(args.concurrency)]
            startup = series(url, 200, flags, "startup", d, stores=True, rounds=args.rounds)
            rows = series(url, args.messages, flags, "latency", d, stores=True, rounds=args.rounds)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print("\nstart-up: 200 messages (CPU: every process of the run)")
        for r in startup:
            print(
                f"  {r.name:14} first message after {r.first_s or 0:.2f} s, done after"
                f" {r.wall_s:.2f} s, {r.cpu_s:.2f} CPU s"
            )
        report(
            f"network-bound: bulksend serve --latency 20, --concurrency {args.concurrency}"
            " per process",
            rows,
            args.messages,
        )
        ratio = rows[2].rate / rows[1].rate
        print(f"--workers 2 / --workers 1: {ratio:.2f}x (bar: >= 1.8x)")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        if args.nginx:
            n = args.messages * 3
            with nginx(core=1) as url:  # nginx stores nothing: no first-message time
                rows = series(
                    url, n, ["--concurrency", "64"], "nginx", d, stores=False, rounds=args.rounds
                )
            report("CPU-bound: nginx on core 1, --concurrency 64 per process", rows, n)
            print(f"--workers 2 / --workers 1: {rows[2].rate / rows[1].rate:.2f}x")
        if args.adaptive:
            adaptive(d)


def adaptive(d: Path, limit: int = 500, n: int = 6000) -> None:
    """``--adaptive`` against ``bulksend serve --rate-limit``: one process, then two
    workers each running its own AIMD. The rate the run settles at is that of the second
    half of its answers (ledger ``done_at``)."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bulksend",
            "serve",
            "--port",
            "0",
            "--rate-limit",
            str(limit),
            "--seed",
            "4",
            "--keep",
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    print(f"\n--adaptive against bulksend serve --rate-limit {limit} ({n:,} messages)")
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        for name, config in CONFIGS[::2]:
            topic = f"adaptive-{len(name)}"
            inputs, out = d / f"{topic}.jsonl", d / f"{topic}.out.jsonl"
            write_messages(inputs, n, topic=topic)
            flags = [*config, "--adaptive", "--max-retries", "10", "--out", str(out)]
            run(name, url, inputs, topic, flags, d, stores=False)
            figures = orjson.loads((d / f"{topic}.stats.json").read_bytes())
            done = sorted(orjson.loads(line)["done_at"] for line in out.read_bytes().splitlines())
            half = done[len(done) // 2 :]
            settled = len(half) / ((half[-1] - half[0]) / 1000)
            print(
                f"  {name:14} settled at {settled:,.0f} msg/s, ok {figures['ok']:,}, failed"
                f" {figures['failed']:,}, 429s retried {figures['retries']:,},"
                f" rate changes {figures['rate_changes']}"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
