"""CPU per answer of the HTTP/1.1 client's parsing (``client._H1Protocol.data_received``),
this tree against a baseline client.py measured in the same run.

    python benchmarks/bench_answer_parse.py [--answers 200000] [--rounds 7] [--baseline REV]

Each round sends ``--answers`` requests (to a wire that writes nothing) and feeds each a
SendMessage-shaped 200 answer (one packet, as nginx sends it) on one keep-alive protocol
object of each client, alternating which goes first, and takes the process's CPU time per
answer. No socket and no event loop: the figure is the per-request bookkeeping and the
parsing alone, where a per-answer callback shows. The baseline is
``git show REV:bulksend/client.py`` (default ``main``), loaded as a module of its own.
Printed: each client's median µs per answer, and the ratio this tree / baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

import bulksend.client

ROOT = Path(__file__).resolve().parent.parent

ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 05:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
    b"X-Request-Id: 0f8e6b2c6a5d4e3f9a1b2c3d4e5f6a7b\r\n\r\n%s"
)


def answer() -> bytes:
    body = orjson.dumps(
        {
            "msg_id": "C0A8011200002A9F0000000000000001",
            "queue_id": 3,
            "queue_offset": 123456,
            "broker_name": "broker-0",
        }
    )
    return ANSWER % (len(body), body)


class _Wire:
    """Stands for the socket transport: nothing is written, nothing closes."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def load_baseline(rev: str) -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:bulksend/client.py"],
        check=True,
        capture_output=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_client.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("baseline_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cpu_per_answer(client: Any, data: bytes, n: int) -> float:
    """Seconds of CPU per answer fed to one keep-alive protocol object."""
    proto = client._H1Protocol(1 << 20)
    proto.transport = _Wire()
    got: list[object] = []
    on_answer = got.append
    send, feed = proto.send, proto.data_received
    start = time.process_time()
    for _ in range(n):
        send(b"", on_answer, 10.0)  # the per-request bookkeeping; the wire writes nothing
        feed(data)
    spent = time.process_time() - start
    assert len(got) == n and all(a.status == 200 for a in got[:3])  # type: ignore[attr-defined]
    return spent / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--answers", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--baseline", default="main", help="git revision of the baseline")
    args = ap.parse_args(argv)
    base = load_baseline(args.baseline)
    data = answer()
    clients = {"this tree": bulksend.client, f"baseline ({args.baseline})": base}
    figures: dict[str, list[float]] = {name: [] for name in clients}
    for round_ in range(args.rounds):
        order = list(clients.items())
        if round_ % 2:
            order.reverse()
        for name, client in order:
            figures[name].append(cpu_per_answer(client, data, args.answers))
    medians = {name: statistics.median(values) for name, values in figures.items()}
    print(f"{args.answers} answers x {args.rounds} rounds, {len(data)} bytes each; CPU per answer")
    for name, value in medians.items():
        spread = max(figures[name]) - min(figures[name])
        print(f"  {name:<22} {value * 1e6:7.3f} µs  (spread {spread * 1e6:.3f} µs)")
    this, baseline = medians.values()
    print(f"  ratio this / baseline  {this / baseline:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
