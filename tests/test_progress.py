"""The progress display: how far, how fast and how long as pure functions (tables), what
fits in a line, and the real thing in a pseudo-terminal of 80 columns — one line redrawn
in place, never wider than the terminal — for send and load."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from bulksend.progress import (
    LoadView,
    Part,
    RateWindow,
    SendView,
    count_lines,
    estimate_total,
    eta_s,
    fit,
    render,
    share_done,
    width_of,
)
from tests.cli_helpers import write_jsonl

pytestmark = pytest.mark.timeout(120)


# --- pure: totals, shares, rates, ETA -------------------------------------------------------


@pytest.mark.parametrize(
    ("read", "finished", "lines", "aligned", "bytes_total", "expected"),
    [
        # Reading has ended: the count is exact, whatever was estimated before.
        (30_000, True, 31_000, (10_000, 1 << 20), 3 << 20, (30_000, True)),
        # The inputs' lines bound the records (blank lines, a CSV header: more lines).
        (500, False, 30_000, None, 3 << 20, (30_000, False)),
        # ... but never below what has been read.
        (31_000, False, 30_000, None, None, (31_000, False)),
        # No line count (gzip, an array): records per byte where a chunk ended.
        (12_000, False, None, (10_000, 1 << 20), 3 << 20, (30_000, False)),
        # The bytes alone say nothing: the first chunk is still being parsed (the old bar
        # said 100 % here for a file under 1 MiB).
        (2_000, False, None, None, 1 << 19, (None, False)),
        # A pipe: no size, no count.
        (2_000, False, None, (1_000, 1 << 20), None, (None, False)),
        (0, False, None, None, None, (None, False)),
    ],
)
def test_estimate_total(
    read: int,
    finished: bool,
    lines: int | None,
    aligned: tuple[int, int] | None,
    bytes_total: int | None,
    expected: tuple[int | None, bool],
) -> None:
    assert estimate_total(read, finished, lines, aligned, bytes_total) == expected


@pytest.mark.parametrize(
    ("done", "total", "exact", "expected"),
    [
        (0, 30_000, False, 0.0),
        (15_000, 30_000, False, 0.5),
        # 2,200 of 30,000 left: 92.7 %, not 100 %.
        (27_800, 30_000, True, 27_800 / 30_000),
        # An estimate that fell short never shows 100 %...
        (30_500, 30_000, False, 0.999),
        (30_000, 30_000, False, 0.999),
        # ... the exact total, all done, does.
        (30_000, 30_000, True, 1.0),
        (10, None, False, None),
        (0, 0, True, None),
    ],
)
def test_share_done(done: int, total: int | None, exact: bool, expected: float | None) -> None:
    assert share_done(done, total, exact) == expected


@pytest.mark.parametrize(
    ("done", "total", "rate", "expected"),
    [
        (27_800, 30_000, 1_100.0, 2.0),
        (0, 30_000, 0.0, None),  # nothing sent yet: no rate, no ETA
        (10, None, 100.0, None),
        (31_000, 30_000, 100.0, 0.0),
    ],
)
def test_eta(done: int, total: int | None, rate: float, expected: float | None) -> None:
    assert eta_s(done, total, rate) == expected


def test_rate_window_counts_the_last_seconds_only() -> None:
    window = RateWindow(window_s=10.0)
    assert window.rate() == 0.0
    window.add(0.0, 0)
    assert window.rate() == 0.0
    for t in range(1, 31):  # 100/s for 20 s, then 1,000/s for 10 s
        window.add(float(t), 100 * min(t, 20) + 1_000 * max(0, t - 20))
    assert window.rate() == pytest.approx(1_000.0)
    window.add(31.0, 12_000)  # stalled: no sends for a second
    assert window.rate() == pytest.approx(9_000 / 10)


def test_the_rate_is_of_records_sent_not_skipped() -> None:
    """A resume skips 21,777 records at reading speed: the shown rate is the sent ones'."""
    view = SendView(
        done=36_285, ok=14_508, failed=0, invalid=0, retrying=0, in_flight=64,
        elapsed=1.0, rate=14_508.0, total=50_000, exact=False,
    )  # fmt: skip
    assert "14,508 msg/s" in view.status_line() and "36,285 msg/s" not in view.status_line()


def test_count_lines(tmp_path: Path) -> None:
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b'{"body": 1}\n\n{"body": 2}\n{"body": 3}')  # blank line, no last \n
    csv = tmp_path / "b.csv"
    csv.write_bytes(b"topic,body\nt,1\nt,2\n")
    array = tmp_path / "c.json"
    array.write_bytes(b'\xef\xbb\xbf  [{"body": 1}, {"body": 2}]\n')
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(b"")
    assert count_lines([str(plain)]) == 4
    assert count_lines([str(plain), str(csv)]) == 7
    for unbounded in ([str(array)], [str(gz)], ["-"], [str(tmp_path / "missing.jsonl")]):
        assert count_lines([str(plain), *unbounded]) is None


# --- what fits ------------------------------------------------------------------------------


def _view(**kw: object) -> SendView:
    base: dict[str, object] = {
        "done": 1_234_567, "ok": 1_234_000, "failed": 567, "invalid": 12, "retrying": 3,
        "in_flight": 1_024, "elapsed": 3_725.0, "rate": 14_508.0, "target_rate": 15_000.0,
        "total": 30_000_000, "exact": False,
    }  # fmt: skip
    base.update(kw)
    return SendView(**base)  # type: ignore[arg-type]


def test_fit_drops_the_least_important_first() -> None:
    parts = [Part("a" * 10, 0), Part("b" * 10, 2), Part("c" * 10, 1), Part("d" * 10, 2)]
    assert fit(parts, 100) == parts
    assert [p.text[0] for p in fit(parts, 34)] == ["a", "b", "c"]  # rightmost of equals
    assert [p.text[0] for p in fit(parts, 22)] == ["a", "c"]
    assert [p.text[0] for p in fit(parts, 5)] == ["a"]  # rank 0 stays, to be cut


@pytest.mark.parametrize("width", [45, 60, 79, 119, 200])
def test_a_send_line_fits_and_keeps_what_matters(width: int) -> None:
    view = _view()
    kept = fit(view.parts(), width)
    texts = [p.text for p in kept]
    assert width_of(kept) <= width
    assert texts[:3] == ["4.1%", "1,234,567/~30,000,000", "14,508 msg/s"]
    if width >= 60:
        assert "ETA 33:02" in texts
    if width >= 79:
        assert "failed 567" in texts
    if width >= 200:
        assert len(kept) == len(view.parts())


def test_the_status_line_off_a_terminal_keeps_every_figure() -> None:
    line = _view(note="target unreachable since 12:00:00 (refused), probing").status_line()
    assert line == (
        "  4.1% of ~30,000,000  1,234,567 done  14,508 msg/s (target 15,000)  "
        "ok 1,234,000 failed 567 invalid 12 retrying 3 in-flight 1,024  ETA 33:02  "
        "elapsed 1:02:05  target unreachable since 12:00:00 (refused), probing"
    )
    unknown = _view(total=None).status_line()
    assert unknown.startswith("1,234,567 done  14,508 msg/s") and "ETA" not in unknown


def test_the_load_line() -> None:
    view = LoadView(
        elapsed=12.34, duration=30, target_rate=1_000, sent_rate=998, p50=1.25, p99=None,
        failed=0, in_flight=3, late=0,
    )  # fmt: skip
    assert view.status_line() == (
        "  12.3/30 s  target 1,000/s  sent 998/s  p50 1.2 ms  p99 - ms  errors 0  "
        "in-flight 3  late 0"
    )
    assert [p.text for p in fit(view.parts(), 40)] == ["12.3/30 s", "sent 998/s", "p99 - ms"]


def test_render_never_wider_than_asked() -> None:
    from rich.console import Console

    long_note = "target unreachable since 12:00:00 (connection to 10.0.0.1:443 refused)" * 3
    for width in (20, 40, 79, 120):
        for view in (_view(), _view(note=long_note), _view(total=None)):
            console = Console(width=width + 10, file=open(os.devnull, "w"), color_system=None)  # noqa: SIM115
            with console.capture() as cap:
                console.print(render(view.parts(), view.share, width))
            lines = cap.get().rstrip("\n").split("\n")
            assert len(lines) == 1 and len(lines[0].rstrip()) <= width, (width, lines)


# --- in a pseudo-terminal of 80 columns -----------------------------------------------------

_CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _run_in_pty(args: list[str], cols: int = 80) -> tuple[int, str]:
    """Run ``python -m bulksend ARGS`` with stderr on a pseudo-terminal ``cols`` wide;
    its exit code and what it drew there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulksend", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    drawn = b""
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                drawn += chunk
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(master)
    return proc.returncode, drawn.decode()


def _frames(drawn: str) -> tuple[list[str], str]:
    """The live line's frames (each redraw starts with a carriage return and an erase of
    the line) and what follows them (the summary), control sequences stripped."""
    live, _, rest = drawn.partition("\x1b[?25h")  # the cursor shown again: Live stopped
    frames = [_CSI.sub("", f) for f in live.split("\r\x1b[2K")]
    return [f for f in frames if f.strip()], _CSI.sub("", rest)


def test_send_progress_is_one_line_redrawn_in_place_at_80_columns(tmp_path: Path) -> None:
    # 3,000 records of ~100 bytes at 1,500/s: a 2 s run, ~8 redraws.
    data = write_jsonl(
        tmp_path / "in.jsonl", [{"topic": "t", "body": "x" * 90 + str(i)} for i in range(3_000)]
    )
    code, drawn = _run_in_pty(["send", str(data), "--embedded", "--rate", "1500"])
    assert code == 0, drawn
    frames, after = _frames(drawn)
    assert len(frames) >= 4, drawn
    for frame in frames[:-1]:
        assert "\n" not in frame, frame  # redrawn in place: no line left behind
    for frame in frames:
        assert len(frame.rstrip("\r\n")) < 80, frame
    # Records, not bytes: a share, the records of the total, a rate of sent records, an ETA.
    middle = frames[len(frames) // 2]
    assert re.search(r"\d+\.\d%\s+[\d,]+/~?3,000\s+[\d,]+ msg/s", middle), middle
    assert "ETA" in " ".join(frames)
    shares = [float(m.group(1)) for f in frames if (m := re.search(r"([\d.]+)%", f))]
    assert shares == sorted(shares) and max(shares) < 100.0
    assert "records      3,000" in after and after.count("bulksend send") == 1


def test_load_progress_fits_80_columns(tmp_path: Path) -> None:
    code, drawn = _run_in_pty(
        ["load", "--embedded", "--rate", "300", "--duration", "3s", "--threshold", "p99<5s"]
    )
    assert code == 0, drawn
    frames, after = _frames(drawn)
    assert len(frames) >= 2, drawn
    for frame in frames:
        assert len(frame.rstrip("\r\n")) < 80 and "sent" in frame, frame
    assert all("\n" not in f for f in frames[:-1])
    assert "threshold pass  p99<5s" in after
