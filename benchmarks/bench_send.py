"""One core at full speed, measured side by side in one run (issue 9's table and load ladder).

    python benchmarks/bench_send.py [--messages 100000] [--seconds 5] [--paced-seconds 8]
        [--rates 2000,5000,8000,15000] [--load-rate 20000] [--load-seconds 30]
        [--ladder 5000,10000,15000,20000,25000] [--ladder-seconds 10]
        [--sdk-messages 5000] [--skip sdk,aiohttp,tls,ladder,...] [--baseline CMD]

nginx (installed if missing) runs on core 1 and answers every POST with a SendMessage-shaped
200, over plain TCP and over TLS (a throwaway CA from trustme), so the figures are the
client's. Every client runs on core 0 (taskset) as its own process; CPU is that process's
user + system time (getrusage), start-up included, divided by the messages it sent.

* wrk (C) and hey (Go, unsigned) are the baselines, measured in the same run: a shared
  machine's noise moves them as much as bulksend, so the ratios (× wrk, × hey) are the
  figures to compare across runs.
* bulksend runs as a user would: signed (AK/SK), a results ledger (--out) and --stats on.
  Paced rows give the achieved rate and the p99 of queue_ms (how late each message went
  past its intended time) from the ledger; load rows what ``bulksend load --stats`` says.
* The machine line: cores, the load average before and after, the CPU stolen by the
  hypervisor during the run, and what one sleep and wake-up of a process costs in CPU
  here (a paced client sleeps between messages: on a VM this is most of its extra CPU).

``--baseline CMD`` also measures another bulksend executable (say, main's installed in a
venv of its own) on the unpaced, TLS, --rate 8,000 and load rows, and at every step of the
load ladder, right after this tree's run of it (a list such as ``--ladder
20000,20000,20000`` repeats a step: this machine's noise is best read over several).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).parent))
from common import Measured, ensure_debian_package, measure, nginx, tls_files, write_messages

TARGET = ["--project-id", "bench-project", "--instance-id", "bench-instance"]
CORE = ["taskset", "-c", "0"]
BODY = orjson.dumps(
    {"topic": "bench", "body": "x" * 256, "property_list": [{"name": "KEYS", "value": "k1"}]}
)


@dataclass
class Row:
    name: str
    run: Measured
    notes: str = ""
    #: Requests the run made, when they are not ``run.messages`` (wrk, hey: what they report).
    done: int | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def messages(self) -> int:
        return self.done if self.done is not None else self.run.messages

    @property
    def cpu_us(self) -> float:
        return self.run.cpu_s / max(1, self.messages) * 1e6

    @property
    def rate(self) -> float:
        return self.messages / self.run.wall_s


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.env = {
            **os.environ,
            "HUAWEICLOUD_SDK_AK": "BENCHAK0000000000000",
            "HUAWEICLOUD_SDK_SK": "bench-secret-key",
        }
        self.rows: list[Row] = []
        self.ladder: list[Row] = []
        self.files: dict[int, Path] = {}
        (work / "body.json").write_bytes(BODY)

    def messages(self, n: int) -> Path:
        if n not in self.files:
            self.files[n] = self.work / f"messages-{n}.jsonl"
            write_messages(self.files[n], n)
        return self.files[n]

    def skip(self, what: str) -> bool:
        return what in self.args.skip

    # --- baselines -----------------------------------------------------------------------

    def wrk(self, url: str, name: str) -> None:
        script = self.work / "post.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {orjson.dumps(BODY.decode()).decode()}\n"
        )
        cmd = [*CORE, "wrk", "-t1", "-c64", f"-d{self.args.seconds:g}s", "-s", str(script), url]
        run = measure(name, cmd, 1)
        summary = next(line for line in run.output.splitlines() if "requests in" in line)
        self.rows.append(
            Row(name, run, "64 connections, unsigned POST", done=int(summary.split()[0]))
        )

    def hey(self, url: str, name: str, rate: float = 0.0) -> None:
        cmd = [
            *CORE,
            "hey",
            "-z",
            f"{self.args.seconds:g}s",
            "-c",
            "64",
            "-cpus",
            "1",
            "-m",
            "POST",
        ]
        cmd += ["-T", "application/json", "-D", str(self.work / "body.json")]
        if rate:
            cmd += ["-q", f"{rate / 64:g}"]
        run = measure(name, [*cmd, url], 1)
        done = sum(
            int(line.split()[1])
            for line in run.output.splitlines()
            if line.strip().startswith("[") and "responses" in line
        )
        note = f"64 workers, unsigned POST{f', -q {rate / 64:g} each' if rate else ''}"
        row = Row(name, run, note, done=done)
        if rate:
            achieved = done / self.args.seconds
            row.notes += f"; achieved {achieved:,.0f}/s ({100 * (achieved / rate - 1):+.1f} %)"
        self.rows.append(row)

    # --- bulksend ------------------------------------------------------------------------

    def send(
        self,
        url: str,
        name: str,
        n: int,
        *flags: str,
        program: Sequence[str] = (),
        concurrency: int = 64,
    ) -> Row:
        out = self.work / "out.jsonl"
        out.unlink(missing_ok=True)
        cmd = [
            *CORE,
            *(program or [sys.executable, "-m", "bulksend"]),
            "send",
            str(self.messages(n)),
        ]
        cmd += ["--endpoint", url, *TARGET, "--quiet", "--concurrency", str(concurrency)]
        cmd += ["--out", str(out), "--stats", str(self.work / "stats.json"), *flags]
        run = measure(name, cmd, n, self.env)
        stats = orjson.loads((self.work / "stats.json").read_bytes())
        if stats["ok"] != n:
            raise SystemExit(f"{name}: {stats['ok']:,} of {n:,} ok")
        row = Row(name, run, f"c={concurrency}, signed, ledger + stats")
        if "--rate" in flags:
            rate = float(flags[flags.index("--rate") + 1])
            achieved, queue_p99 = paced_figures(out)
            row.extra = {"rate": rate, "achieved": achieved, "queue_p99": queue_p99}
            row.notes += (
                f"; achieved {achieved:,.0f}/s ({100 * (achieved / rate - 1):+.2f} %),"
                f" queue_ms p99 {queue_p99:.2f}"
            )
        self.rows.append(row)
        return row

    def load(
        self, url: str, name: str, rate: float, seconds: float, program: Sequence[str] = ()
    ) -> Row:
        stats_path = self.work / "load-stats.json"
        (self.work / "load.jsonl").unlink(
            missing_ok=True
        )  # a load refuses a ledger that holds results
        cmd = [*CORE, *(program or [sys.executable, "-m", "bulksend"]), "load", "--endpoint", url]
        cmd += TARGET
        cmd += ["--rate", f"{rate:g}", "--duration", f"{seconds:g}s", "--quiet"]
        cmd += ["--stats", str(stats_path), "--out", str(self.work / "load.jsonl")]
        run = measure(name, cmd, int(rate * seconds), self.env, ok_codes=(0, 1))
        s = orjson.loads(stats_path.read_bytes())
        row = Row(name, run, done=s["total"])
        row.extra = {
            "rate": rate,
            "achieved": s["send_rate_msg_s"],
            "late": s["late"] / max(1, s["total"]),
            "p99": s["latency_ms"]["p99"],
            "svc_p99": s["service_latency_ms"]["p99"],
            "failed": s["failed"],
            # The machine's 1-minute load average as the run ended: beside each figure.
            "load_avg": os.getloadavg()[0],
        }
        row.notes = (
            f"max in flight 256; sent {s['send_rate_msg_s']:,.0f}/s"
            f" ({100 * (s['send_rate_msg_s'] / rate - 1):+.2f} %), late {100 * row.extra['late']:.2f} %,"
            f" p99 {s['latency_ms']['p99']:,.1f} ms (service {s['service_latency_ms']['p99']:,.1f})"
        )
        return row

    # --- others --------------------------------------------------------------------------

    def aiohttp(self, url: str) -> None:
        n = min(self.args.messages, 20_000)
        cmd = [*CORE, sys.executable, "benchmarks/aiohttp_sender.py", url, str(self.messages(n))]
        run = measure("aiohttp", cmd, n, self.env)
        self.rows.append(Row("aiohttp+uvloop+orjson+signing", run, "64 tasks, no ledger"))

    def sdk(self, url: str) -> None:
        n = self.args.sdk_messages
        for threads, name in ((1, "official SDK, sync"), (64, "official SDK, 64 threads")):
            cmd = [*CORE, sys.executable, "benchmarks/sdk_sender.py", url, str(n), str(threads)]
            self.rows.append(Row(name, measure(name, cmd, n, self.env), "signed by the SDK"))


def paced_figures(ledger: Path) -> tuple[float, float]:
    """Achieved rate (sends after the first over the span of the sends) and the p99 of
    queue_ms, from a paced run's ledger."""
    starts, queued = [], []
    with ledger.open("rb") as fh:
        for line in fh:
            r = orjson.loads(line)
            starts.append(r["started_at"])
            queued.append(r["queue_ms"] or 0.0)
    starts.sort()
    queued.sort()
    span = (starts[-1] - starts[0]) / 1000
    return (len(starts) - 1) / span, queued[int(0.99 * (len(queued) - 1))]


# --- the machine -------------------------------------------------------------------------


def steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7], sum(fields)


def wake_cost_us() -> float:
    """CPU (µs) one sleep and wake-up of a process costs on core 0: ~100 µs of work done
    back to back, then again with a 1 ms sleep after each, the difference per sleep."""
    probe = (
        "import time\n"
        "def work():\n"
        "    x = 0\n"
        "    for i in range(3000): x += i * i\n"
        "def run(sleep):\n"
        "    t = time.process_time()\n"
        "    for _ in range(1500):\n"
        "        work()\n"
        "        if sleep: time.sleep(0.001)\n"
        "    return time.process_time() - t\n"
        "run(False)\n"
        "busy, slept = min(run(False) for _ in range(3)), min(run(True) for _ in range(3))\n"
        "print((slept - busy) / 1500 * 1e6)\n"
    )
    out = subprocess.run([*CORE, sys.executable, "-c", probe], capture_output=True, text=True)
    return float(out.stdout.strip())


@contextmanager
def machine_note() -> Iterator[list[str]]:
    lines: list[str] = []
    load_before = os.getloadavg()
    steal0 = steal_ticks()
    wake = wake_cost_us()
    yield lines
    steal1 = steal_ticks()
    load_after = os.getloadavg()
    stolen = (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])
    lines.append(
        f"machine: {os.cpu_count()} cores; load average {load_before[0]:.2f} before,"
        f" {load_after[0]:.2f} after (1 min); {100 * stolen:.1f} % of CPU time stolen by the"
        f" hypervisor during the run; one sleep + wake-up costs ~{wake:.0f} µs CPU on core 0"
    )


# --- report ------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    wrk = next((r for r in rows if r.name == "wrk"), None)
    hey = next((r for r in rows if r.name == "hey"), None)
    head = (
        f"{'client':34} {'messages':>9} {'msg/s':>8} {'CPU µs/msg':>10} {'× wrk':>6}"
        f" {'× hey':>6} {'RSS MB':>7}  notes"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        vs_wrk = f"{r.cpu_us / wrk.cpu_us:6.1f}" if wrk else "     -"
        vs_hey = f"{r.cpu_us / hey.cpu_us:6.2f}" if hey else "     -"
        lines.append(
            f"{r.name:34} {r.messages:>9,} {r.rate:>8,.0f} {r.cpu_us:>10.1f} {vs_wrk}"
            f" {vs_hey} {r.run.peak_rss_mb:>7.0f}  {r.notes}"
        )
    return "\n".join(lines)


def ladder_table(rows: list[Row], hey: Row | None = None) -> str:
    """One line per step; ``× hey`` is CPU per message against hey's unpaced run."""
    head = (
        f"{'client':>9} {'target msg/s':>12} {'achieved':>9} {'vs target':>9} {'late %':>7}"
        f" {'CPU µs/msg':>10} {'× hey':>6} {'p99 ms':>9} {'svc p99':>8} {'failed':>7}  load avg"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        e = r.extra
        vs_hey = f"{r.cpu_us / hey.cpu_us:6.2f}" if hey else "     -"
        lines.append(
            f"{r.name:>9} {e['rate']:>12,.0f} {e['achieved']:>9,.0f}"
            f" {100 * (e['achieved'] / e['rate'] - 1):>+8.2f}% {100 * e['late']:>7.2f}"
            f" {r.cpu_us:>10.1f} {vs_hey} {e['p99']:>9,.1f} {e['svc_p99']:>8,.1f}"
            f" {e['failed']:>7,.0f}  {e['load_avg']:.2f}"
        )
    return "\n".join(lines)


def verdicts(b: Bench) -> list[str]:
    """Issue 9's targets against this run's figures (µs targets are for a quiet machine:
    compare the × wrk ratios across machines)."""
    rows = {r.name: r for r in b.rows}
    out = []

    def say(ok: bool, text: str) -> None:
        out.append(f"  [{'met' if ok else 'NOT met'}] {text}")

    unpaced, tls = rows.get("bulksend send"), rows.get("bulksend send, TLS")
    if unpaced:
        say(unpaced.cpu_us <= 35, f"unpaced ≤ 35 µs/msg: {unpaced.cpu_us:.1f}")
    if tls:
        say(tls.cpu_us <= 45, f"TLS ≤ 45 µs/msg: {tls.cpu_us:.1f}")
    rss = max((r.run.peak_rss_mb for r in b.rows if r.name.startswith("bulksend")), default=0.0)
    say(rss <= 100, f"peak RSS ≤ 100 MB (c ≤ 1,024): {rss:.0f} MB")
    for r in b.rows:
        e = r.extra
        if "queue_p99" in e and e["rate"] >= 5000 and unpaced and r.name.startswith("bulksend"):
            ratio = r.cpu_us / unpaced.cpu_us
            say(ratio <= 1.25, f"--rate {e['rate']:,.0f}: CPU ≤ 1.25× unpaced: {ratio:.2f}×")
            say(abs(e["achieved"] / e["rate"] - 1) <= 0.01, f"--rate {e['rate']:,.0f}: achieved ±1 %:"
                f" {100 * (e['achieved'] / e['rate'] - 1):+.2f} %")  # fmt: skip
            say(
                e["queue_p99"] <= 2.0,
                f"--rate {e['rate']:,.0f}: queue_ms p99 ≤ 2: {e['queue_p99']:.2f}",
            )
    load = rows.get(f"bulksend load {b.args.load_rate:,.0f}/s")
    if load:
        e = load.extra
        say(abs(e["achieved"] / e["rate"] - 1) <= 0.01 and e["late"] < 0.01,
            f"load {e['rate']:,.0f}/s for {b.args.load_seconds:g} s: achieved"
            f" {100 * (e['achieved'] / e['rate'] - 1):+.2f} %, late {100 * e['late']:.2f} %")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=100_000, help="unpaced runs (default 100,000)")
    ap.add_argument("--seconds", type=float, default=5.0, help="wrk and hey runs (default 5)")
    ap.add_argument("--paced-seconds", type=float, default=8.0, help="each --rate run (default 8)")
    ap.add_argument("--rates", default="2000,5000,8000,15000", help="send --rate rows")
    ap.add_argument("--load-rate", type=float, default=20_000.0)
    ap.add_argument("--load-seconds", type=float, default=30.0)
    ap.add_argument("--ladder", default="5000,10000,15000,20000,25000")
    ap.add_argument("--ladder-seconds", type=float, default=10.0)
    ap.add_argument("--sdk-messages", type=int, default=5_000)
    ap.add_argument(
        "--skip", default="", help="comma-separated: tls,paced,load,ladder,aiohttp,sdk,c1024"
    )
    ap.add_argument("--baseline", metavar="CMD", help="another bulksend executable to measure too")
    args = ap.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    for binary, package in (("wrk", "wrk"), ("hey", "hey"), ("nginx", "nginx-light")):
        ensure_debian_package(binary, package)
    with tempfile.TemporaryDirectory(prefix="bench-send-") as d, machine_note() as machine:
        work = Path(d)
        b = Bench(args, work)
        base = [args.baseline] if args.baseline else []
        started = time.monotonic()
        with nginx(core=1) as url:
            b.wrk(url + "/", "wrk")
            b.hey(url + "/", "hey")
            b.send(url, "bulksend send", args.messages)
            if args.baseline:
                b.send(url, "baseline send", args.messages, program=base)
            if not b.skip("c1024"):
                b.send(url, "bulksend send, c=1024", args.messages, concurrency=1024)
            if not b.skip("paced"):
                for rate in (float(r) for r in args.rates.split(",")):
                    n = int(rate * args.paced_seconds)
                    b.send(url, f"bulksend send --rate {rate:,.0f}", n, "--rate", f"{rate:g}")
                if args.baseline:
                    n = int(8000 * args.paced_seconds)
                    b.send(url, "baseline send --rate 8,000", n, "--rate", "8000", program=base)
                b.hey(url + "/", "hey -q (paced 8,000/s)", rate=8000)
            if not b.skip("load"):
                name = f"bulksend load {args.load_rate:,.0f}/s"
                b.rows.append(b.load(url, name, args.load_rate, args.load_seconds))
                if args.baseline:
                    name = f"baseline load {args.load_rate:,.0f}/s"
                    b.rows.append(b.load(url, name, args.load_rate, args.load_seconds, base))
            if not b.skip("ladder"):
                # With --baseline each step runs both, back to back: a shared machine's
                # noise then moves the two alike.
                for rate in (float(r) for r in args.ladder.split(",")):
                    b.ladder.append(b.load(url, "bulksend", rate, args.ladder_seconds))
                    if args.baseline:
                        b.ladder.append(b.load(url, "baseline", rate, args.ladder_seconds, base))
            if not b.skip("aiohttp"):
                b.aiohttp(url)
            if not b.skip("sdk"):
                b.sdk(url)
        if not b.skip("tls"):
            server_pem, ca = tls_files(work)
            with nginx(core=1, tls=server_pem) as url:
                b.wrk(url + "/", "wrk, TLS")
                b.hey(url + "/", "hey, TLS")
                b.send(url, "bulksend send, TLS", args.messages, "--ca-bundle", str(ca))
                if args.baseline:
                    b.send(url, "baseline send, TLS", args.messages, "--ca-bundle", str(ca),
                           program=base)  # fmt: skip
        took = time.monotonic() - started
    print()
    print(table(b.rows))
    if b.ladder:
        print(f"\nload ladder ({args.ladder_seconds:g} s each, bulksend load, max in flight 256):")
        print(ladder_table(b.ladder, next((r for r in b.rows if r.name == "hey"), None)))
    print("\ntargets (issue 9):")
    print("\n".join(verdicts(b)))
    print()
    print("\n".join(machine))
    print(f"(the whole run took {took:.0f} s; CPU per message includes each process's start-up)")


if __name__ == "__main__":
    main()
