"""An overloaded ``bulksend load`` says so: when its sends fall behind the schedule it still
sends and accounts for every scheduled message, reports the late share and the rate it
achieved, and names what held it back (a full pool, its own CPU, or neither), so that
latency measured from the intended time is not taken for the target's."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bulksend.load import Pace, behind_schedule
from tests.cli_helpers import bulksend, read_jsonl, target
from tests.serve_helpers import start_server_subprocess

pytestmark = pytest.mark.timeout(120)


def test_a_load_the_pool_cannot_carry_reports_its_late_share_and_why(tmp_path: Path) -> None:
    """Every answer takes 40 ms and 2 may be in flight: at most 50 msg/s, a quarter of the
    200 msg/s scheduled, whatever the machine's speed."""
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    with start_server_subprocess("--latency", "40") as (_, url):
        proc = bulksend("load", *target(url), "--rate", "200", "--duration", "1s", "--max-in-flight", "2",
                        "--quiet", "--out", str(out), "--stats", str(stats))  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # late is not failed: every message went, ok
    snap = orjson.loads(stats.read_bytes())
    assert (snap["total"], snap["ok"], len(read_jsonl(out))) == (200, 200, 200)  # none dropped
    assert snap["late"] >= 150, snap
    assert snap["send_rate_msg_s"] < 0.5 * snap["intended_rate_msg_s"], snap
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("behind schedule")]
    share = 100 * snap["late"] / snap["total"]
    assert f"{share:.1f} % of sends late" in line, line
    assert f"sent {snap['send_rate_msg_s']:,.0f}/s of {snap['intended_rate_msg_s']:,.0f}/s" in line
    assert "--max-in-flight 2" in line and "the target answered too slowly" in line, line


def _snapshot(total: int, late: int) -> dict[str, float]:
    return {
        "total": total,
        "late": late,
        "late_after_ms": 10.0,
        "intended_rate_msg_s": 20000.0,
        "send_rate_msg_s": 13549.4,
    }


@pytest.mark.parametrize(
    ("pace", "cause"),
    [
        # The process used a whole core: the client could not keep up.
        (Pace(cpu_s=9.9, wall_s=10.0, samples=40, pool_full=40), "the client was the bottleneck"),
        # Waiting, with every request allowed in flight busy: the target (or the limit).
        (Pace(cpu_s=2.0, wall_s=10.0, samples=40, pool_full=30), "the target answered too slowly"),
        # Neither: something else held the event loop up.
        (Pace(cpu_s=5.0, wall_s=10.0, samples=40, pool_full=3, max_lag_s=0.4), "held up"),
        # No sample at all (a run shorter than a tick): no claim about the pool.
        (Pace(cpu_s=0.1, wall_s=0.2), "held up"),
    ],
)
def test_behind_schedule_names_the_cause(pace: Pace, cause: str) -> None:
    line = behind_schedule(_snapshot(1000, 999), pace, max_in_flight=256)
    assert line is not None and cause in line, line
    assert "99.9 % of sends late" in line and "sent 13,549/s of 20,000/s" in line


def test_an_embedded_server_shares_the_blame_for_the_cpu() -> None:
    busy = Pace(cpu_s=10.0, wall_s=10.0, samples=40, pool_full=40)
    line = behind_schedule(_snapshot(1000, 999), busy, max_in_flight=256, embedded=True)
    assert line is not None and "the client and its --embedded server were the bottleneck" in line


@pytest.mark.parametrize(("total", "late"), [(0, 0), (1000, 0), (1000, 10)])
def test_within_one_percent_late_is_on_schedule(total: int, late: int) -> None:
    busy = Pace(cpu_s=10.0, wall_s=10.0, samples=40, pool_full=40)
    assert behind_schedule(_snapshot(total, late), busy, max_in_flight=256) is None


def test_a_distributed_load_blames_the_busiest_shard_not_the_driver() -> None:
    # The driver sends nothing: its own pace (0 % CPU, no samples) said "held up by other
    # work" whatever the shards met. The busiest shard decides.
    shards = [
        Pace(cpu_s=2.0, wall_s=10.0, samples=40, pool_full=0),
        Pace(cpu_s=9.9, wall_s=10.0, samples=40, pool_full=1),
    ]
    line = behind_schedule(_snapshot(1000, 999), Pace.busiest(shards), max_in_flight=64, shards=2)
    assert line is not None and "the busiest shard was the bottleneck" in line, line
    assert "99 % of a CPU core" in line and "add workers" in line, line
    full = [Pace(cpu_s=1.0, wall_s=10.0, samples=40, pool_full=35)] * 2
    line = behind_schedule(_snapshot(1000, 999), Pace.busiest(full), max_in_flight=64, shards=2)
    assert line is not None and "the target answered too slowly" in line, line


def test_a_lost_worker_is_named_as_why_a_distributed_load_fell_behind() -> None:
    calm = [Pace(cpu_s=1.0, wall_s=10.0, samples=40, pool_full=0)] * 2
    line = behind_schedule(
        _snapshot(1000, 999), Pace.busiest(calm), max_in_flight=64, shards=2, lost=1
    )
    assert line is not None and "a worker was lost" in line, line
    assert "held up" not in line
