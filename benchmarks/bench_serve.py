"""How many SendMessage requests ``bulksend serve`` accepts per CPU-second of one core, and
where that time goes.

    python benchmarks/bench_serve.py [--modes memory,store,signed] [--seconds 8]
        [--repeat 3] [--connections 64] [--baseline-src DIR] [--profile] [--profile-out F]

The server is pinned to core 0 (``taskset -c 0``), wrk to core 1, 64 keep-alive
connections, every request the same valid ~110-byte SendMessage (wrk's Lua script posts
it; ``signed``: with an SDK-HMAC-SHA256 signature made once, valid 15 minutes, verified on
every request; ``store``: journaled to SQLite, answered after its commit).

The figure is accepted messages per CPU-second the server used (/proc/PID/stat, all its
threads): it holds when other work shares the machine, where messages per second of wall
clock do not. Baselines measured in the same run, the configurations taking turns:

* nginx answering every request with a fixed JSON 200 on the same core: the C floor of
  HTTP/1.1 on this machine (kernel, loopback TCP, one recv and one send a request).
* ``--baseline-src DIR``: the same modes served from another source tree (e.g. a checkout
  of main), for before/after figures.

``--profile``: py-spy samples the first run of each mode and a summary says where the time
goes, by stage, as shares of the time a thread held the GIL (py-spy attributes time spent
in C with the GIL, the send system call included, to the Python line that called it; the
SQLite writer thread is sampled too; uvloop's recv and epoll run without the GIL). Needs
``pip install py-spy``. ``--profile-out DIR`` keeps the raw samples.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import nginx

ROOT = Path(__file__).resolve().parent.parent
PATH = "/v2/rocketmq/0a1b2c3d4e5f/instances/bench-instance/messages"
BODY = (
    '{"topic":"bench","body":"hello world 0123456789 a typical small payload",'
    '"property_list":[{"name":"KEYS","value":"k1"}]}'
)
AK, SK = "BENCHAK0000000000001", "bench-secret-key"
TWO_CORES = (os.cpu_count() or 1) >= 2
SERVER_CPU = ["taskset", "-c", "0"] if TWO_CORES else []
CLIENT_CPU = ["taskset", "-c", "1"] if TWO_CORES else []

# py-spy profile stages: (name, test on a sample's innermost frames, outermost first).
STAGES = (
    ("send system call (transport.write)", lambda f: "Connection._write" in f[-1]),
    ("SQLite commit (writer thread)", lambda f: any("SqliteJournal._write" in x for x in f)),
    ("JSON in + validation (parse_send)", lambda f: any("parse_send" in x for x in f)),
    ("store: place, msg_id, index", lambda f: any("Store." in x for x in f[-3:])),
    ("signature verification", lambda f: any("Authenticator.refuse" in x for x in f)),
    ("answer JSON + headers (App, render)", lambda f: "App." in f[-1] or "render" in f[-1]),
    ("commit wake-ups (futures, callbacks)", lambda f: "Connection._settle" in f[-1]),
    ("HTTP parsing (llhttp + callbacks)", lambda f: "Connection." in f[-1]),
    ("event loop with the GIL (uvloop)", lambda f: "Runner.run" in f[-1] or "run (uvloop" in f[-1]),
    ("handing batches to the writer thread", lambda f: "ThreadPoolExecutor" in f[-1]),
)


def py_spy() -> str:
    """py-spy from PATH or beside this Python (a venv's bin)."""
    beside = Path(sys.executable).parent / "py-spy"
    found = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if found is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far (all threads)."""
    total = 0
    for p in [pid, *children(pid)]:
        with open(f"/proc/{p}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out.extend(int(k) for k in kids)
    return out


def lua(signed: bool, hostport: str) -> str:
    headers = {"Content-Type": "application/json", "Host": hostport}
    if signed:
        from bulksend import signing

        headers = signing.sign(
            "POST", PATH, [], headers, BODY.encode(), ak=AK, sk=SK, now=time.time()
        )
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_str(BODY)}"]
    lines += [
        f"wrk.headers[{lua_str(k)}] = {lua_str(v)}" for k, v in headers.items() if k != "Host"
    ]
    return "\n".join(lines) + "\n"


def lua_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk(url: str, script: Path, seconds: float, connections: int) -> tuple[int, int]:
    """(2xx answers, other answers) of one wrk run."""
    out = subprocess.run(
        [*CLIENT_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    done = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    if done is None:
        raise SystemExit(f"wrk said: {out}")
    if errors:
        print(f"  (wrk: {errors.group(0)})", file=sys.stderr)
    n_bad = int(bad.group(1)) if bad else 0
    return int(done.group(1)) - n_bad, n_bad


@contextmanager
def serve(mode: str, src: Path, tmp: Path) -> Iterator[tuple[int, str]]:
    """``bulksend serve`` from source tree ``src`` on core 0: (pid, url)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUAWEICLOUD_SDK_")}
    env["PYTHONPATH"] = str(src)
    flags = ["--port", "0"]
    if mode == "signed":
        env.update(HUAWEICLOUD_SDK_AK=AK, HUAWEICLOUD_SDK_SK=SK)
    if mode == "store":
        db = tmp / f"bench-{time.monotonic_ns()}.db"
        flags += ["--store", str(db)]
    proc = subprocess.Popen(
        [*SERVER_CPU, sys.executable, "-m", "bulksend", "serve", *flags],
        cwd=src,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit(f"{src}: bulksend serve did not start ({proc.wait()})")
        yield proc.pid, url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


#: py-spy's sampling rate (Hz) and, per profiled mode, the share of the wall clock the
#: server was on a CPU during the sampled run (below 100%: something else had its core).
RATE = 200
CPU_SHARE: dict[Path, float] = {}


def measure(
    pid: int, url: str, script: Path, args: argparse.Namespace, profile: Path | None = None
) -> float:
    """Accepted messages per server CPU-second over one wrk run (after a 2 s warm-up).
    With ``profile``, py-spy samples whichever thread holds the GIL meanwhile."""
    wrk(url, script, 2, args.connections)
    spy = None
    if profile is not None:
        spy = subprocess.Popen(
            [py_spy(), "record", "--gil", "-r", str(RATE), "-d", f"{args.seconds:g}",
             "-p", str(pid), "-f", "raw", "-o", str(profile), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    ok, bad = wrk(url, script, args.seconds, args.connections)
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - wall0
    if spy is not None and profile is not None:
        spy.wait(timeout=60)
        CPU_SHARE[profile] = cpu / wall
    if bad:
        print(f"  ({bad} answers were not 2xx)", file=sys.stderr)
    return ok / cpu


def profile_summary(raw: Path, mode: str) -> str:
    """Where the server's time went, by stage, and the top functions. Shares of the time
    some thread held the GIL: C code that runs without it (uvloop's recv and epoll, SQLite
    writing) is not among them."""
    by_stage: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        n = int(count)
        total += n
        by_function[frames[-1]] += n
        stage = next((name for name, test in STAGES if test(frames)), "other")
        by_stage[stage] += n
    if not total:
        return "py-spy recorded no samples"
    lines = [
        f"where the time goes, {mode} (py-spy --gil: {total} samples of the thread holding "
        f"the GIL; the server used {CPU_SHARE.get(raw, 0):.0%} of its core):"
    ]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_stage.most_common()]
    lines.append("top functions (self time):")
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in by_function.most_common(12)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default="memory,store,signed")
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--baseline-src", type=Path, help="also serve from this source tree")
    p.add_argument("--profile", action="store_true", help="py-spy the first run of each mode")
    p.add_argument("--profile-out", type=Path, help="keep py-spy's raw samples in this dir")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    if not TWO_CORES:
        print("warning: fewer than 2 cores: the server and wrk share one", file=sys.stderr)
    modes = args.modes.split(",")
    trees = [("this tree", ROOT)]
    if args.baseline_src is not None:
        trees.append((f"{args.baseline_src}", args.baseline_src.resolve()))
    figures: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as d:
        tmp = Path(d)
        profiles = args.profile_out or tmp
        profiles.mkdir(parents=True, exist_ok=True)
        script = tmp / "post.lua"
        for run in range(args.repeat):
            with nginx(core=0) as url:
                script.write_text(lua(False, url.split("//", 1)[1]))
                pid = nginx_pid(url)
                figures.setdefault(("nginx (C floor)", "memory"), []).append(
                    measure(pid, url + PATH, script, args)
                )
            for mode in modes:
                for name, src in trees:
                    with serve(mode, src, tmp) as (pid, url):
                        script.write_text(lua(mode == "signed", url.split("//", 1)[1]))
                        want = args.profile and run == 0 and src == ROOT
                        profile = profiles / f"py-spy-{mode}.txt" if want else None
                        figures.setdefault((name, mode), []).append(
                            measure(pid, url + PATH, script, args, profile)
                        )
            print(f"run {run + 1}/{args.repeat} done", file=sys.stderr)
        report(figures, trees, modes, args)
        for mode in modes if args.profile else ():
            print()
            print(profile_summary(profiles / f"py-spy-{mode}.txt", mode))


def nginx_pid(url: str) -> int:
    """The pid of the nginx master listening on url's port (its worker is its child)."""
    port = url.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True)
    found = re.search(r"pid=(\d+)", out.stdout)
    if found is None:
        raise SystemExit(f"cannot find nginx on port {port}: {out.stdout}{out.stderr}")
    pid = int(found.group(1))
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return ppid if "nginx" in Path(f"/proc/{ppid}/cmdline").read_text() else pid


def report(
    figures: dict[tuple[str, str], list[float]],
    trees: list[tuple[str, Path]],
    modes: list[str],
    args: argparse.Namespace,
) -> None:
    floor = statistics.median(figures[("nginx (C floor)", "memory")])
    print(
        f"\naccepted messages per server CPU-second, one core, wrk -c{args.connections}, "
        f"{args.seconds:g} s a run, median of {args.repeat} (min-max):"
    )
    print(
        f"{'server':<34} {'mode':<8} {'msg/CPU-s':>10} {'range':>17} {'µs/msg':>7} {'vs nginx':>9}"
    )
    rows = [("nginx (C floor)", "memory")] + [(n, m) for m in modes for n, _ in trees]
    for name, mode in rows:
        values = figures[(name, mode)]
        mid = statistics.median(values)
        spread = f"{min(values):,.0f}-{max(values):,.0f}"
        print(
            f"{name:<34} {mode:<8} {mid:>10,.0f} {spread:>17} {1e6 / mid:>7.1f} {mid / floor:>8.0%}"
        )
    if len(trees) == 2:
        print()
        for mode in modes:
            new = statistics.median(figures[(trees[0][0], mode)])
            old = statistics.median(figures[(trees[1][0], mode)])
            print(f"{mode}: this tree / baseline = {new / old:.2f}x")


if __name__ == "__main__":
    main()
