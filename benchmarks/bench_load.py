"""bulksend load against bulksend serve: achieved rate vs target, and latency under stalls;
and what the load path's own parts cost per message.

    python benchmarks/bench_load.py [--duration 30] [--screenshot docs/report-screenshot.png]
    python benchmarks/bench_load.py --parts [--baseline-src DIR]

``--parts`` measures only the load path's own work per message, on core 0, in a process
of its own, best of 7 rounds of CPU time: the pacer's due time, the synthetic message, the
stats (``LoadStats.add``), the live series (``_Live.add``, on whenever progress, a
``--timeseries`` file or ``--abort-on-fail`` is) and the HTML report's observer
(``RunReport.add``, with ``--html``). With ``--baseline-src DIR`` (a directory holding
another ``bulksend`` package, say main's: ``git archive main bulksend | tar -x -C DIR``)
the same parts of that version are measured in the same run, alternately, and the ratio
printed.

The server (``bulksend serve``) runs on core 1 and the load on core 0 (taskset), each a
process of its own. Three measurements:

1. ``--rate`` (2,000 msg/s) for ``--duration`` (30 s): target, achieved send rate, answers/s.
2. The highest rate one core sustains: 5-second probes upwards from 4,000 msg/s in steps
   of 2,000, then 1,000, then runs of ``--duration`` down from the best probe in steps of
   1,000 until one holds; a rate is sustained when the send rate is within 1% of it and
   at most 5% of the sends are late (a VM's hiccup of 50 ms makes 1% late at 10,000/s). That rate is then run for ``--duration``.
3. A server that holds every answer for 1 s every 5 s (``--stall 5s:1s``), at
   ``--stall-rate`` (500 msg/s) with ``--stall-in-flight`` (16) requests in flight at most,
   so that in a stall the pool fills and the sends due meanwhile wait. The true latency of each message, from its intended
   send time, is known from the stall schedule: the wait to the end of the stall it was
   due in (0 outside one) plus the median service time. The corrected p99 should be near
   the true p99; the uncorrected (service) p99 is printed beside it.

With ``--screenshot PNG`` the stall run's HTML report is opened in headless Chromium and
a screenshot written there (the README's picture: docs/report-screenshot.png).
"""

from __future__ import annotations

import argparse
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

TARGET = ["--project-id", "bench-project", "--instance-id", "bench-instance"]
CHROMIUM = "/usr/bin/chromium"


@contextmanager
def server(*flags: str, core: int = 1) -> Iterator[tuple[str, float]]:
    """``bulksend serve`` on ``core``: its URL and (about) when it started (epoch s)."""
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "bulksend", "serve", "--host", "127.0.0.1",
           "--port", "0", *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready:
            raise SystemExit("bulksend serve printed no URL in 30 s")
        url = proc.stdout.readline().strip()
        # The stall clock starts when the server builds its app, a few ms before it prints.
        yield url, time.time()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Run:
    rate: float
    duration: float
    stats: dict[str, Any]
    cpu_s: float
    ledger: Path

    @property
    def sustained(self) -> bool:
        s = self.stats
        return s["send_rate_msg_s"] >= 0.99 * self.rate and s["late"] <= 0.05 * s["total"]

    def row(self, name: str) -> str:
        s, lat, svc = self.stats, self.stats["latency_ms"], self.stats["service_latency_ms"]
        return (f"{name:<24} {self.rate:>8,.0f} {self.duration:>5.0f} {s['send_rate_msg_s']:>9,.1f} "
                f"{s['throughput_msg_s']:>9,.1f} {100 * s['send_rate_msg_s'] / self.rate:>6.2f}% "
                f"{s['late']:>7,} {lat['p50']:>8.2f} {lat['p99']:>8.2f} {svc['p50']:>8.2f} {svc['p99']:>8.2f} "
                f"{1e6 * self.cpu_s / max(1, s['total']):>8.1f}")  # fmt: skip


HEADER = (
    f"{'':24} {'target':>8} {'s':>5} {'sent/s':>9} {'answers/s':>9} {'vs tgt':>7} {'late':>7} "
    f"{'p50 ms':>8} {'p99 ms':>8} {'svc p50':>8} {'svc p99':>8} {'CPU µs/msg':>8}"
)
NOTE = "(latency ms: p50/p99 from the intended send time; svc = from the actual send; CPU incl. start-up)"  # fmt: skip


def load(url: str, rate: float, duration: float, workdir: Path, *extra: str) -> Run:
    """``bulksend load`` on core 0 as its own process; its stats and CPU time."""
    stats, ledger = workdir / f"stats-{rate:g}.json", workdir / f"ledger-{rate:g}.jsonl"
    ledger.unlink(missing_ok=True)  # a load refuses a ledger that holds results
    wrapper = (
        "import resource,subprocess,sys;rc=subprocess.call(sys.argv[1:]);"
        "u=resource.getrusage(resource.RUSAGE_CHILDREN);print(rc,u.ru_utime+u.ru_stime)"
    )
    cmd = [sys.executable, "-c", wrapper, "taskset", "-c", "0", sys.executable, "-m", "bulksend", "load",
           "--endpoint", url, *TARGET, "--rate", f"{rate:g}", "--duration", f"{duration:g}s", "--quiet",
           "--stats", str(stats), "--out", str(ledger), *extra]  # fmt: skip
    rc, cpu = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.split()
    if rc not in ("0", "1"):
        raise SystemExit(f"bulksend load exited {rc}")
    return Run(rate, duration, orjson.loads(stats.read_bytes()), float(cpu), ledger)


def highest_sustained(url: str, workdir: Path, probe_s: float, ceiling: float) -> float:
    best, rate, step = 0.0, 4000.0, 2000.0
    while rate <= ceiling:
        run = load(url, rate, probe_s, workdir)
        print(f"  probe {rate:>8,.0f} msg/s: sent {run.stats['send_rate_msg_s']:,.1f}/s, "
              f"late {run.stats['late']:,} of {run.stats['total']:,} -> "
              f"{'sustained' if run.sustained else 'not sustained'}", flush=True)  # fmt: skip
        if run.sustained:
            best = rate
            rate += step
        elif step > 1000:
            rate, step = rate - step + 1000, 1000
            if rate <= best:
                break
        else:
            break
    return best


def true_latencies(ledger: Path, started: float, every: float, stall: float) -> list[float]:
    """Each ok message's latency from its intended time had the client never fallen behind:
    the wait to the end of the stall it was due in, plus the median service time (ms)."""
    lines = [orjson.loads(line) for line in ledger.read_bytes().splitlines()]
    ok = [r for r in lines if r["status"] == "ok"]
    service = sorted(r["latency_ms"] for r in ok)[len(ok) // 2]
    out = []
    for r in ok:
        since = r["intended_at"] / 1000 - started
        k = math.floor(since / every)
        wait = (k * every + stall - since) if k >= 1 and since - k * every < stall else 0.0
        out.append(wait * 1000 + service)
    return sorted(out)


def percentile(values: list[float], p: float) -> float:
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


def screenshot(html: Path, png: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-chromium-") as profile:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={png.resolve()}", "--window-size=1400,2400",
                        html.resolve().as_uri()],
                       check=True, capture_output=True, env={**os.environ, "HOME": profile})  # fmt: skip


#: Run in a process of its own with PYTHONPATH at the version measured: prints one JSON
#: object, µs of CPU per message for each part (the parts' API is the same in every version).
PARTS_PROBE = """
import itertools, json, sys, time
from bulksend.html import RunReport
from bulksend.load import LoadJob, _Live
from bulksend.result import Result
from bulksend.stages import RampPacer, Stages
from bulksend.stats import LoadStats
from bulksend.synthetic import MessageSpec, Synthetic

N = 50_000
T0 = 1_764_540_000_000
stages = Stages.constant(20_000, 30)
# What a load at 20,000/s reports: ok answers, a few ms each, 20 per ms of wall time.
results = [Result(seq=i, source="load", id=None, identity=f"load:{i}", status="ok", http_status=200,
                  msg_id="0123456789ABCDEF0123456789ABCDEF", queue_id=0, queue_offset=0,
                  broker_name="broker-0", attempts=1, latency_ms=1.234 + (i % 100) / 10,
                  request_id="abcdef0123456789abcdef0123456789", started_at=T0 + i // 20,
                  done_at=T0 + i // 20 + 2, intended_at=T0 + i // 20, queue_ms=0.123)
           for i in range(N)]

def pacer():
    due = RampPacer(stages).due_at
    for n in range(N):
        due(n)

def synthetic():
    p = RampPacer(stages)
    for _ in itertools.islice(Synthetic(MessageSpec()).records(lambda: p.total), N):
        pass

def observer(make):
    def run():
        add = make().add
        for r in results:
            add(r)
    return run

parts = {
    "pacer due time": pacer,
    "synthetic message": synthetic,
    "stats (LoadStats.add)": observer(LoadStats),
    "live series (_Live.add)": observer(lambda: _Live(LoadJob(None, stages), RampPacer(stages), None)),
    "HTML report (RunReport.add)": observer(RunReport),
}
import bulksend
assert bulksend.__file__.startswith(sys.argv[2]), bulksend.__file__
out = {}
for name, run in parts.items():
    best = float("inf")
    for _ in range(int(sys.argv[1])):
        t = time.process_time()
        run()
        best = min(best, time.process_time() - t)
    out[name] = best / N * 1e6
print(json.dumps(out))
"""


def parts(src: Path, rounds: int) -> dict[str, float]:
    """The load path's parts of the ``bulksend`` package in ``src``: µs CPU per message."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = ["taskset", "-c", "0", sys.executable, "-c", PARTS_PROBE, str(rounds), str(src)]
    # cwd too: ``python -c`` puts the working directory first on sys.path, before PYTHONPATH.
    out = subprocess.run(
        cmd, env=env, cwd=src, check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return dict(orjson.loads(out))


def parts_table(ours: dict[str, float], base: dict[str, float] | None) -> str:
    head = f"{'part (µs CPU per message)':30} {'this tree':>10}"
    if base is not None:
        head += f" {'baseline':>10} {'ratio':>7}"
    lines = [head, "-" * len(head)]
    totals = [0.0, 0.0]
    for name, us in ours.items():
        line = f"{name:30} {us:>10.2f}"
        totals[0] += us
        if base is not None:
            totals[1] += base[name]
            line += f" {base[name]:>10.2f} {us / base[name]:>6.2f}×"
        lines.append(line)
    total = f"{'all of them':30} {totals[0]:>10.2f}"
    if base is not None:
        total += f" {totals[1]:>10.2f} {totals[0] / totals[1]:>6.2f}×"
    return "\n".join([*lines, total])


def main_parts(baseline_src: Path | None, repeats: int) -> None:
    """Each version ``repeats`` times, alternately; the best figure of each part."""
    here = Path(__file__).resolve().parent.parent
    load_before = os.getloadavg()[0]
    ours: dict[str, float] = {}
    base: dict[str, float] | None = {} if baseline_src is not None else None
    for _ in range(repeats):
        for name, us in parts(here, 7).items():
            ours[name] = min(us, ours.get(name, us))
        if base is not None and baseline_src is not None:
            for name, us in parts(baseline_src, 7).items():
                base[name] = min(us, base.get(name, us))
    print(parts_table(ours, base))
    print(
        f"(load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; CPU time,"
        " best of 7 rounds x {repeats} processes per version)".replace("{repeats}", str(repeats))
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--duration", type=float, default=30.0, help="seconds of each measured run (default 30)"
    )
    ap.add_argument(
        "--rate", type=float, default=2000.0, help="the fixed-rate run's target (default 2000)"
    )
    ap.add_argument(
        "--probe", type=float, default=5.0, help="seconds of each probe of the search (default 5)"
    )
    ap.add_argument(
        "--ceiling", type=float, default=40000.0, help="highest rate probed (default 40000)"
    )
    ap.add_argument(
        "--stall-rate", type=float, default=500.0, help="rate of the stall run (default 500)"
    )
    ap.add_argument(
        "--stall-in-flight",
        type=int,
        default=16,
        help="--max-in-flight of the stall run (default 16: the pool fills in a stall)",
    )
    ap.add_argument(
        "--screenshot", type=Path, help="write the stall run's HTML report screenshot here (PNG)"
    )
    ap.add_argument(
        "--parts", action="store_true", help="only the load path's parts, per message (CPU)"
    )
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="with --parts: a directory holding another bulksend package to measure too",
    )
    args = ap.parse_args()
    if args.parts:
        main_parts(args.baseline_src, 3)
        return
    with tempfile.TemporaryDirectory(prefix="bench-load-") as d:
        work = Path(d)
        with server() as (url, _):
            fixed = load(url, args.rate, args.duration, work)
            print("searching for the highest rate one core sustains ...", flush=True)
            best = highest_sustained(url, work, args.probe, args.ceiling)
            # A 5-second probe can pass at a rate that a longer run cannot keep up (the
            # server's store grows, its collector pauses): step down until the run holds.
            top = None
            while best > 0:
                top = load(url, best, args.duration, work)
                if top.sustained:
                    break
                print(
                    f"  {best:,.0f} msg/s not sustained for {args.duration:g} s: trying {best - 1000:,.0f}"
                )
                best -= 1000
        every, stall = 5.0, 1.0
        html = work / "stall.html"
        with server("--stall", f"{every:g}s:{stall:g}s") as (url, started):
            stalled = load(
                url,
                args.stall_rate,
                args.duration,
                work,
                "--html",
                str(html),
                "--max-in-flight",
                str(args.stall_in_flight),
            )
        truth = true_latencies(stalled.ledger, started, every, stall)
        print()
        print(HEADER)
        print(NOTE)
        print(fixed.row(f"fixed {args.rate:,.0f}/s"))
        if top is not None:
            print(top.row("highest sustained"))
        print(stalled.row("--stall 5s:1s"))
        lat, svc = stalled.stats["latency_ms"], stalled.stats["service_latency_ms"]
        print()
        print(
            f"stall run ({args.stall_rate:,.0f} msg/s, at most {args.stall_in_flight} in flight, "
            "server holding answers 1 s in every 5 s):"
        )
        for name, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0)):
            print(f"  {name}: true {percentile(truth, p):8.1f} ms   corrected {lat[name]:8.1f} ms   "
                  f"uncorrected {svc[name]:8.1f} ms")  # fmt: skip
        if args.screenshot:
            screenshot(html, args.screenshot)
            print(f"\nscreenshot of the stall run's HTML report: {args.screenshot}")


if __name__ == "__main__":
    main()
