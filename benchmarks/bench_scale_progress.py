"""How a shard's progress report should reach the driver: Dask's channels, measured.

    python benchmarks/bench_scale_progress.py [--reports 2000]

A shard reports its counts once a second. On a LocalCluster of one worker, a task sends
``--reports`` reports through each channel as fast as it can, from its own thread as a
shard does; the figure is the task thread's cost per report (what the shard's sending
loop loses) and the time until the driver has seen the last one:

* ``Worker.log_event`` + ``Client.subscribe_topic``: batched on the worker's stream to
  the scheduler, which forwards to the subscribed client (what bulksend uses);
* ``distributed.Queue.put``: one scheduler round trip per report;
* ``distributed.Variable.set``: one scheduler round trip per report; the driver polls.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from distributed import Client, LocalCluster, Queue, Variable, get_worker


def via_log_event(n: int) -> float:
    worker = get_worker()
    start = time.thread_time()
    for i in range(n):
        worker.log_event("bench-progress", {"shard": 0, "i": i, "ok": i, "failed": 0})
    return (time.thread_time() - start) / n


def via_queue(n: int) -> float:
    q = Queue("bench-progress-q")
    start = time.thread_time()
    for i in range(n):
        q.put({"shard": 0, "i": i, "ok": i, "failed": 0})
    return (time.thread_time() - start) / n


def via_variable(n: int) -> float:
    v = Variable("bench-progress-v")
    start = time.thread_time()
    for i in range(n):
        v.set({"shard": 0, "i": i, "ok": i, "failed": 0})
    return (time.thread_time() - start) / n


async def main(n: int) -> None:
    async with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
            asynchronous=True,
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        seen: list[Any] = []
        all_seen = asyncio.Event()

        def on_event(event: tuple[float, Any]) -> None:
            seen.append(event[1])
            if len(seen) >= n:
                all_seen.set()

        client.subscribe_topic("bench-progress", on_event)
        print(f"{'channel':28} {'µs CPU/report':>14} {'last seen after s':>18}")
        for name, fn in (
            ("log_event + subscribe_topic", via_log_event),
            ("Queue.put", via_queue),
            ("Variable.set", via_variable),
        ):
            seen.clear()
            all_seen.clear()
            q = Queue("bench-progress-q", client=client)
            started = time.perf_counter()
            cost = await client.submit(fn, n, pure=False)
            if name.startswith("log_event"):
                await asyncio.wait_for(all_seen.wait(), 60)
            elif name == "Queue.put":
                await q.get(batch=n)
            elapsed = time.perf_counter() - started
            print(f"{name:28} {cost * 1e6:14.1f} {elapsed:18.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reports", type=int, default=2000)
    asyncio.run(main(ap.parse_args().reports))
