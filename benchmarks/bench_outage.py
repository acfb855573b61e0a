"""Unreachable and failing targets, as a user meets them: figures for fail-fast and outages.

    python benchmarks/bench_outage.py [--records 1000] [--cases refused,tls,outage,long]
        [--program "/other/checkout/.venv/bin/python -m bulksend"]

Every case runs the real CLI (``--program``, default this checkout's ``python -m bulksend``)
against ``bulksend serve`` subprocesses on 127.0.0.1 and prints, per case: exit code, wall
seconds to exit, HTTP attempts made (the ledger's ``attempts`` summed), the ledger's lines by
status, and the last line of stderr.

* ``refused``: nothing listens on the port.
* ``tls``: an HTTPS server whose certificate a private CA (trustme) signed; no --ca-bundle.
* ``outage``: a run paced over ~10 s (--max-retries 3 --backoff-max 0.2); a quarter of the
  way in, the server is stopped (SIGTERM) and started again on the same port and SQLite
  store 4 s later. Duplicates = rows stored - distinct bodies stored.
* ``long``: the same, with the server down for good (--outage-timeout 3 where the program
  has the flag); then the server comes back and ``--resume`` finishes the run.

An unknown host is not measured here: resolving it would ask a DNS server off this machine
(the tests fake the resolver instead).
"""

from __future__ import annotations

import argparse
import collections
import shlex
import signal
import sqlite3
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
from common import free_port

TARGET = ["--project-id", "bench-project", "--instance-id", "bench-instance"]


@dataclass
class Figures:
    case: str
    code: int
    wall_s: float
    attempts: int
    statuses: dict[str, int]
    last_line: str
    extra: dict[str, object] = field(default_factory=dict)

    def row(self) -> str:
        statuses = " ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())) or "-"
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (
            f"{self.case:<16} exit {self.code:<3} {self.wall_s:6.1f} s  attempts {self.attempts:<6}"
            f" {statuses}  {extra}\n{'':<17}stderr: {self.last_line[:150]}"
        )


def ledger(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return [r for r in lines if r.get("status") not in ("run", "intent")]


def summarize(case: str, proc: subprocess.CompletedProcess[str], wall: float, out: Path) -> Figures:
    results = ledger(out)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return Figures(
        case,
        proc.returncode,
        wall,
        sum(int(r.get("attempts") or 0) for r in results),  # type: ignore[call-overload]
        dict(collections.Counter(str(r["status"]) for r in results)),
        last,
    )


def write_records(path: Path, n: int) -> None:
    path.write_bytes(
        b"".join(
            orjson.dumps({"topic": "t", "body": f"m{i}", "id": f"r{i}"}) + b"\n" for i in range(n)
        )
    )


def start_server(program: Sequence[str], *flags: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*program, "serve", "--host", "127.0.0.1", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url:
        stop(proc)
        raise RuntimeError("bulksend serve printed no URL")
    return proc, url


@contextmanager
def server(program: Sequence[str], *flags: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc, url = start_server(program, *flags)
    try:
        yield proc, url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def timed(
    cmd: Sequence[str], timeout: float = 900
) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def has_flag(program: Sequence[str], flag: str) -> bool:
    return (
        flag in subprocess.run([*program, "send", "--help"], capture_output=True, text=True).stdout
    )


def case_refused(program: Sequence[str], data: Path, d: Path) -> Figures:
    out = d / "refused.jsonl"
    url = f"http://127.0.0.1:{free_port()}"
    proc, wall = timed(
        [*program, "send", str(data), "--endpoint", url, *TARGET, "--out", str(out), "--quiet"]
    )
    return summarize("refused", proc, wall, out)


def case_tls(program: Sequence[str], data: Path, d: Path) -> Figures:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    pem = d / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    out = d / "tls.jsonl"
    with server(program, "--port", "0", "--tls-cert", str(pem), "--tls-key", str(pem)) as (_, url):
        proc, wall = timed(
            [*program, "send", str(data), "--endpoint", url, *TARGET, "--out", str(out), "--quiet"]
        )
    return summarize("tls, no CA", proc, wall, out)


def stored(store: Path) -> tuple[int, int]:
    with sqlite3.connect(store) as db:
        rows, distinct = db.execute(
            "SELECT count(*), count(DISTINCT body) FROM messages"
        ).fetchone()
    return int(rows), int(distinct)


def case_outage(
    program: Sequence[str], d: Path, *, down_s: float | None, name: str
) -> list[Figures]:
    """Stop the server a quarter of the way in; restart it after ``down_s`` (None: never,
    then ``--resume`` once it is back)."""
    n, rate = 4000, 400
    data = d / f"{name}.in.jsonl"
    write_records(data, n)
    out, store = d / f"{name}.jsonl", d / f"{name}.sqlite"
    port = free_port()
    flags = ["--port", str(port), "--store", str(store)]
    send = [
        *program, "send", str(data), "--endpoint", f"http://127.0.0.1:{port}", *TARGET,
        "--out", str(out), "--rate", str(rate), "--concurrency", "16",
        "--max-retries", "3", "--backoff-base", "0.05", "--backoff-max", "0.2",
        "--progress-interval", "1",
    ]  # fmt: skip
    if down_s is None and has_flag(program, "--outage-timeout"):
        send += ["--outage-timeout", "3"]
    figures = []
    srv, _ = start_server(program, *flags)
    try:
        t0 = time.monotonic()
        sender = subprocess.Popen(
            send, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while len(ledger(out)) < n // 4 and time.monotonic() < deadline and sender.poll() is None:
            time.sleep(0.05)
    finally:
        stop(srv)
    stopped_at = time.monotonic()
    if down_s is not None:
        time.sleep(down_s)
        with server(program, *flags):
            _, err = sender.communicate(timeout=600)
    else:
        _, err = sender.communicate(timeout=600)
    wall = time.monotonic() - t0
    proc = subprocess.CompletedProcess(send, sender.returncode, "", err)
    f = summarize(name, proc, wall, out)
    f.extra["exit_after_stop_s"] = round(t0 + wall - stopped_at, 1)
    if down_s is not None:
        rows, distinct = stored(store)
        f.extra.update(stored=rows, distinct=distinct, duplicates=rows - distinct)
    figures.append(f)
    if down_s is None:
        with server(program, *flags):
            proc, wall = timed([*send, "--resume", "--quiet"])
        r = summarize(f"{name} --resume", proc, wall, out)
        rows, distinct = stored(store)
        r.extra.update(stored=rows, distinct=distinct, duplicates=rows - distinct)
        figures.append(r)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=1000, help="records for refused and tls")
    ap.add_argument("--cases", default="refused,tls,outage,long")
    ap.add_argument("--program", default=f"{sys.executable} -m bulksend")
    args = ap.parse_args()
    program = shlex.split(args.program)
    cases = args.cases.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        d = Path(tmp)
        data = d / "in.jsonl"
        write_records(data, args.records)
        rows: list[Figures] = []
        if "refused" in cases:
            rows.append(case_refused(program, data, d))
        if "tls" in cases:
            rows.append(case_tls(program, data, d))
        if "outage" in cases:
            rows += case_outage(program, d, down_s=4.0, name="outage 4s")
        if "long" in cases:
            rows += case_outage(program, d, down_s=None, name="outage for good")
        print(f"program: {args.program}")
        for f in rows:
            print(f.row())


if __name__ == "__main__":
    main()
