"""What ``--metrics-addr`` costs a run: CPU per message with and without it, and the time
one scrape holds the run's event loop.

    python benchmarks/bench_metrics.py [--messages 100000] [--rounds 3] [--latencies 1000000]

1. ``send`` of ``--messages`` records to nginx on one core (benchmarks/common.py), run three
   ways in each of ``--rounds`` interleaved rounds: without ``--metrics-addr`` (the
   baseline), with it and nobody scraping (the attempt counter alone), and with a scraper
   asking every 0.1 s. Printed: the median CPU µs per message of each (user + sys of the
   sender alone), and its ratio to the baseline measured in the same run.
2. One scrape, in this process: a latency histogram holding ``--latencies`` values (what
   an hours-long backfill accumulates; the HdrHistogram's size does not grow with it),
   encoded as Prometheus text the way ``/metrics`` does it. Printed: µs per scrape, the
   time the run's loop is held, against hdrh's ``get_mean_value`` of the same two
   histograms (the walk over every recorded value a scrape used to make for the sum).

The machine is shared: the figures are noisy, the ratios within a round less so.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.exposition import generate_latest

from benchmarks.common import Measured, free_port, measure, nginx, write_messages
from bulksend.metrics import Figures, registry_for
from bulksend.stats import Latencies

TARGET = ["--project-id", "bench-project", "--instance-id", "bench-instance"]


class Scraper:
    """Asks ``url`` every ``every_s`` seconds in a thread until stopped; counts answers."""

    def __init__(self, url: str, every_s: float = 0.1) -> None:
        self.url, self.every_s = url, every_s
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    resp.read()
                self.answers += 1
            except OSError:
                pass  # not listening yet, or already gone

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def sends(messages: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as d, nginx() as url:
        data = Path(d) / "in.jsonl"
        write_messages(data, messages)
        base = [sys.executable, "-m", "bulksend", "send", str(data), "--endpoint", url]
        base += [*TARGET, "--quiet", "--concurrency", "64"]
        runs: dict[str, list[Measured]] = {"without": [], "--metrics-addr": [], "scraped": []}
        scrapes = 0
        for _ in range(rounds):
            runs["without"].append(measure("without", base, messages))
            runs["--metrics-addr"].append(
                measure("--metrics-addr", [*base, "--metrics-addr", "127.0.0.1:0"], messages)
            )
            port = free_port()
            with Scraper(f"http://127.0.0.1:{port}/metrics") as scraper:
                cmd = [*base, "--metrics-addr", f"127.0.0.1:{port}"]
                runs["scraped"].append(measure("scraped", cmd, messages))
            scrapes += scraper.answers
    baseline = statistics.median(m.cpu_us_per_msg for m in runs["without"])
    print(f"send, {messages:,} records to nginx, median of {rounds} interleaved rounds:")
    print(f"{'':16} {'msg/s':>9} {'CPU µs/msg':>11} {'vs without':>11}")
    for name, measured in runs.items():
        cpu = statistics.median(m.cpu_us_per_msg for m in measured)
        rate = statistics.median(m.rate for m in measured)
        print(f"{name:16} {rate:>9,.0f} {cpu:>11.2f} {cpu / baseline:>10.3f}x")
    print(f"(scraped: {scrapes} answers from /metrics over the {rounds} runs)")


class _Fixed:
    def __init__(self, figures: Figures) -> None:
        self._figures = figures

    def figures(self) -> Figures:
        return self._figures


def scrape_cost(latencies: int) -> None:
    rng = random.Random(1)
    lat = Latencies()
    for _ in range(latencies):
        lat.add_ms(rng.lognormvariate(1.0, 1.2))
    hist = lat.histogram()
    figures = Figures(
        records={"ok": latencies, "failed": 0, "invalid": 0, "skipped": 0},
        requests={"200": latencies, "503": 10, "TIMEOUT": 1},
        retries=11,
        in_flight=64,
        target_rate=1000.0,
        late=0,
        latency=hist,
        corrected=hist,
    )
    registry = registry_for(_Fixed(figures))
    text = generate_latest(registry)
    n = 200
    start = time.perf_counter()
    for _ in range(n):
        generate_latest(registry)
    per_scrape_us = (time.perf_counter() - start) / n * 1e6
    # The baseline: the sum as hdrh's mean gives it, a walk over every recorded value
    # (what a scrape did before), twice: one per histogram.
    start = time.perf_counter()
    for _ in range(3):
        hist.get_mean_value()
        hist.get_mean_value()
    walk_us = (time.perf_counter() - start) / 3 * 1e6
    print(
        f"one scrape: {per_scrape_us:,.0f} µs ({len(text):,} bytes of text; two histograms of"
        f" {latencies:,} values, max {hist.max_value / 1000:,.1f} ms); hdrh's mean of both"
        f" alone: {walk_us:,.0f} µs ({walk_us / per_scrape_us:.1f}x a whole scrape)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latencies", type=int, default=1_000_000)
    args = parser.parse_args()
    scrape_cost(args.latencies)
    sends(args.messages, args.rounds)


if __name__ == "__main__":
    main()
