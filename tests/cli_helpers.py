"""Run the ``bulksend`` CLI as a user does: a subprocess, real files, the real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from tests.serve_helpers import AUTH_ENV, INSTANCE_ID, PROJECT_ID

SECRET_ENV = (
    *AUTH_ENV,
    "CLOUD_SDK_AK",
    "CLOUD_SDK_SK",
    "HUAWEICLOUD_SDK_SECURITY_TOKEN",
    "HUAWEICLOUD_SDK_PROJECT_ID",
)


def bulksend(
    *args: str,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = 120.0,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m bulksend ARGS``; the test's secrets and BULKSEND_* variables removed
    unless ``env`` sets them (BULKSEND_METADATA_URL=off stays: see conftest.py)."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in SECRET_ENV and (not k.startswith("BULKSEND_") or k == "BULKSEND_METADATA_URL")
    }
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bulksend", *args],
        env=clean,
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


#: Senders started by spawn_send, killed after each test (conftest) so that a failed
#: assertion never leaves one running past its test.
SPAWNED: list[subprocess.Popen[str]] = []


def spawn_send(*args: str) -> subprocess.Popen[str]:
    """``bulksend send ARGS`` started in the background (to be killed mid-run, say)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulksend", "send", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    SPAWNED.append(proc)
    return proc


def reap_spawned() -> None:
    while SPAWNED:
        proc = SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def target(url: str) -> list[str]:
    return ["--endpoint", url, "--project-id", PROJECT_ID, "--instance-id", INSTANCE_ID]


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file; of a ledger, its results (each run's first line, its
    settings with ``"status": "run"``, is left out)."""
    lines = (orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip())
    return [obj for obj in lines if obj.get("status") != "run"]


def wait_for_lines(path: Path, n: int, deadline_s: float = 60) -> None:
    """Wait (bounded) until the file holds at least n lines, so a signal lands mid-run."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {n} lines")


def accepted(url: str) -> int:
    """Messages ``bulksend serve`` at ``url`` has accepted (its /metrics)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("bulksend_serve_messages_accepted_total "):
                return int(float(line.split()[1]))
    raise AssertionError("no accepted-messages metric")


def interrupt(cmd: Sequence[str], out: Path, lines: int, *, stdin: Any = None) -> tuple[int, str]:
    """Run ``cmd``, SIGINT it once ``out`` holds ``lines`` lines; its exit code and stderr."""
    proc = subprocess.Popen(
        cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_lines(out, lines)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def no_traceback(proc: subprocess.CompletedProcess[str]) -> bool:
    return "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


# A child's ru_maxrss starts at its parent's peak when it is forked (Linux keeps the old
# mm's high-water mark across exec), and pytest's own RSS may be large by then: so measure
# from a small middleman whose only child is the measured command.
_PEAK_RSS_RUNNER = """
import resource, subprocess, sys
with open(sys.argv[1], "wb") as out:
    code = subprocess.run(sys.argv[2:], stdout=out).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run_measuring_peak_rss(
    cmd: Sequence[str], stdout_path: Path, timeout: float = 300.0
) -> tuple[int, float, str]:
    """Run cmd; its exit code, its peak RSS in MB, and its stderr. Stdout goes to a file."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_RUNNER, str(stdout_path), *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    code, peak_kib = map(int, done.stdout.split())
    return code, peak_kib / 1024, done.stderr  # ru_maxrss is in KiB on Linux


def kill_driver_group_once(args: Sequence[str], ready: Callable[[], bool]) -> None:
    """Start ``bulksend ARGS`` (a distributed driver) in a process group of its own, wait
    (bounded) until ``ready()``, then SIGKILL the group: the driver and its workers, as a
    crash of the machine's session would. Credentials come from the server's defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUAWEICLOUD_SDK_")}
    driver = subprocess.Popen(
        [sys.executable, "-m", "bulksend", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the driver and its worker processes: one group
    )
    try:
        deadline = time.monotonic() + 90
        while not ready():
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
