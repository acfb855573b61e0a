"""The pure pieces of ``bulksend load``: synthetic messages, the per-second series, the load's
stats and the rule that says when a live second is final."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest

from bulksend.errors import ConfigError
from bulksend.load import LoadJob, LoadOutcome, _Live, _LoadHooks
from bulksend.record import KEYS
from bulksend.result import FAILED, OK, Result
from bulksend.run import End
from bulksend.stages import RampPacer, Stages
from bulksend.stats import LATE_MS, LoadStats
from bulksend.synthetic import (
    MAX_BODY_BYTES,
    SOURCE,
    MessageSpec,
    Synthetic,
    filler,
    read_template,
)
from bulksend.thresholds import Threshold, check
from bulksend.timeseries import LatencyBins, Timeseries

T0 = 1_700_000_000_000  # an epoch ms on a whole second


def result(
    seq: int,
    intended: int | None,
    started: int,
    done: int,
    *,
    status: str = OK,
    queue: float | None = None,
    http: int | None = 200,
    code: str | None = None,
) -> Result:
    return Result(
        seq=seq,
        source=SOURCE,
        id=None,
        status=status,
        http_status=http,
        attempts=1,
        latency_ms=float(done - started),
        error_code=code,
        started_at=started,
        done_at=done,
        intended_at=intended,
        queue_ms=float(started - intended) if queue is None and intended is not None else queue,
    )


# --- synthetic ---------------------------------------------------------------------------


def test_records_stop_at_the_limit_in_seq_order_with_round_robin_topics_and_keys() -> None:
    spec = MessageSpec(topics=("a", "b", "c"), body_size=10, keys=4)
    records = list(Synthetic(spec).records(lambda: 7))
    assert [r.seq for r in records] == list(range(7))
    assert [r.topic for r in records] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [r.properties for r in records][:5] == [((KEYS, f"k{i % 4}"),) for i in range(5)]
    assert all(
        r.source == SOURCE and r.body == filler(10) and len(r.body.encode()) == 10 for r in records
    )


def test_records_are_made_lazily_and_follow_a_changing_limit() -> None:
    limit = [3]
    it = Synthetic(MessageSpec()).records(lambda: limit[0])
    assert [next(it).seq for _ in range(3)] == [0, 1, 2]
    limit[0] = 5
    assert [r.seq for r in it] == [3, 4]


def test_template_fills_placeholders_and_keeps_other_braces() -> None:
    spec = MessageSpec(template='{"n": {seq}, "at": {ts}, "id": "{uuid}", "x": {"y": "{other}"}}')
    bodies = [r.body for r in Synthetic(spec).records(lambda: 2)]
    docs = [json.loads(b.replace('"{other}"', '"kept"')) for b in bodies]
    assert [d["n"] for d in docs] == [0, 1]
    assert all(abs(d["at"] - T0) < 10**12 for d in docs)
    assert len({d["id"] for d in docs}) == 2 and all(uuid.UUID(d["id"]) for d in docs)
    assert '"{other}"' in bodies[0]


def test_no_keys_and_a_one_byte_body() -> None:
    [record] = Synthetic(MessageSpec(body_size=1)).records(lambda: 1)
    assert record.body == "a" and record.properties == ()


# An empty body: RocketMQ (and `bulksend serve`) refuse every such message, so a load of
# them measures nothing but 400s.
@pytest.mark.parametrize(
    "kwargs",
    [
        {"topics": ()},
        {"topics": ("",)},
        {"body_size": -1},
        {"body_size": 0},
        {"body_size": 5 * 2**20},
        {"keys": -1},
        {"template": ""},
    ],
)
def test_message_spec_refuses(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        MessageSpec(**kwargs)  # type: ignore[arg-type]


def test_a_body_template_that_is_no_small_text_file_is_refused(tmp_path: Path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 {seq}")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (MAX_BODY_BYTES + 1))
    for path, why in [
        ("/dev/zero", "not a regular file"),  # read without end before
        (str(latin), "not UTF-8"),
        (str(big), "larger than"),
    ]:
        with pytest.raises(ConfigError, match=why):
            read_template(path)


# --- timeseries --------------------------------------------------------------------------


def test_each_time_counts_in_its_own_second_and_in_flight_carries_over() -> None:
    ts = Timeseries()
    ts.add(result(0, T0 + 100, T0 + 100, T0 + 200))  # all in second 0
    ts.add(result(1, T0 + 900, T0 + 1100, T0 + 3500))  # intended 0, sent 1, done 3
    ts.add(result(2, T0 + 950, T0 + 1200, T0 + 1300, status=FAILED, http=503, code="DMS.503"))
    rows = list(ts.rows())
    assert [r.t for r in rows] == [T0 // 1000 + i for i in range(4)]
    assert [
        (r.bucket.intended, r.bucket.sent, r.bucket.ok, r.bucket.failed, r.in_flight) for r in rows
    ] == [
        (3, 1, 1, 0, 0),
        (0, 2, 0, 1, 1),
        (0, 0, 0, 0, 1),  # an empty second in the middle is still a row
        (0, 0, 1, 0, 0),
    ]
    assert rows[1].bucket.errors == {"DMS.503": 1} and rows[1].bucket.statuses == {"503": 1}
    line = rows[3].to_json()
    assert line["p50"] == pytest.approx(2600, rel=0.02)  # corrected: 3500 - 900
    assert line["service_p50"] == pytest.approx(2400, rel=0.02)  # from the actual send
    assert rows[1].figures()["error_rate"] == 1.0 and rows[0].figures()["rate"] == 1.0


def test_invalid_and_skipped_results_are_left_out() -> None:
    ts = Timeseries()
    ts.add(Result(seq=0, source="f:1", id=None, status="invalid"))
    ts.add(Result(seq=1, source="f:2", id=None, status="skipped"))
    assert list(ts.rows()) == []


def test_max_points_doubles_the_width_and_keeps_every_count() -> None:
    ts = Timeseries(max_points=4)
    for s in range(10):
        ts.add(result(s, T0 + s * 1000, T0 + s * 1000, T0 + s * 1000 + 5))
    rows = list(ts.rows())
    assert ts.width == 4 and len(rows) <= 4
    assert sum(r.bucket.ok for r in rows) == 10 and sum(r.bucket.intended for r in rows) == 10
    assert all(r.t % 4 == 0 and r.width == 4 for r in rows)
    assert rows[0].figures()["rate"] == pytest.approx(rows[0].bucket.ok / 4)


def test_pop_gives_the_same_rows_as_rows_in_pieces() -> None:
    rng = random.Random(7)
    results = []
    for seq in range(300):
        intended = T0 + seq * 20
        started = intended + rng.randint(0, 30)
        results.append(result(seq, intended, started, started + rng.randint(1, 2500)))
    whole, live = Timeseries(), Timeseries()
    popped = []
    for i, r in enumerate(sorted(results, key=lambda r: r.done_at or 0)):
        whole.add(r)
        live.add(r)
        if i % 37 == 0:  # pop what cannot change any more: ends before the earliest still to come
            remaining = [x.intended_at or 0 for x in results if (x.done_at or 0) > (r.done_at or 0)]
            popped += live.pop(min(remaining, default=T0 + 10**6))
    popped += live.pop(None)
    assert [row.to_json() for row in popped] == [row.to_json() for row in whole.rows()]


def test_latency_bins_are_within_two_percent() -> None:
    rng = random.Random(1)
    values = sorted(rng.lognormvariate(0, 1.5) for _ in range(5000))
    bins = LatencyBins()
    for v in values:
        bins.add(v)
    for p in (50, 90, 99, 99.9):
        exact = values[int(p / 100 * len(values) + 0.999) - 1]
        assert bins.percentile(p) == pytest.approx(exact, rel=0.02)
    assert bins.percentile(100) == values[-1] == bins.max_ms
    assert bins.mean == pytest.approx(sum(values) / len(values))
    assert LatencyBins().percentile(99) == 0.0 and LatencyBins().summary()["max"] == 0.0


# --- the load's stats ----------------------------------------------------------------------


def test_load_stats_split_corrected_and_service_latency() -> None:
    stats = LoadStats()
    for seq in range(100):
        intended = T0 + seq * 10
        queue = 500 if seq >= 90 else 0  # the last ten waited 500 ms for a worker
        stats.add(result(seq, intended, intended + queue, intended + queue + 2))
    snap = stats.snapshot()
    assert snap["service_latency_ms"]["p99"] == pytest.approx(2, rel=0.01)
    assert snap["latency_ms"]["p99"] == pytest.approx(502, rel=0.01)
    assert snap["latency_ms"]["p50"] == pytest.approx(2, rel=0.01)
    assert snap["late"] == 10 and snap["late_after_ms"] == LATE_MS
    assert snap["intended_rate_msg_s"] == 100.0
    assert snap["send_rate_msg_s"] == pytest.approx(99 / 1.49, abs=0.05)
    assert list(snap)[:9] == [
        "total",
        "ok",
        "failed",
        "invalid",
        "skipped",
        "retries",
        "elapsed_s",
        "throughput_msg_s",
        "latency_ms",
    ]


def test_exit_codes() -> None:
    def outcome(failed: int = 0, *, passed: bool = True, interrupted: bool = False) -> LoadOutcome:
        stats = LoadStats()
        stats.base.counts["failed"] = failed
        from bulksend.thresholds import check

        t = Threshold.parse("p99<1ms" if passed else "p99>1ms")
        return LoadOutcome(stats, check((t,), {"p99": 0.5}), interrupted=interrupted)

    assert outcome().exit_code == 0
    assert outcome(3).exit_code == 1
    assert outcome(3, passed=False).exit_code == 99
    assert outcome(passed=False, interrupted=True).exit_code == 130


# --- when a live second is final -------------------------------------------------------------


def test_a_second_is_final_once_every_message_intended_before_its_end_is_answered() -> None:
    pacer = RampPacer(Stages.constant(10, 5))  # a message every 100 ms
    job = LoadJob(target=None, stages=pacer.stages)
    live = _Live(job, pacer, writer=None)
    now = T0 + 10_000
    assert live.final_before_ms(now) is None  # message 0 not answered: nothing is final
    # Message 1 (due 100 ms) answered before message 0: still nothing.
    live.add(result(1, T0 + 100, T0 + 100, T0 + 105))
    assert live.final_before_ms(now) is None
    live.add(result(0, T0, T0, T0 + 3000))
    # 0 and 1 answered; message 2 is due at T0 + 200: final before that (less the slack).
    assert live.final_before_ms(now) == T0 + 200 - 2
    for seq in range(2, 12):
        live.add(result(seq, T0 + seq * 100, T0 + seq * 100, T0 + seq * 100 + 1))
    assert live.final_before_ms(now) == T0 + 1200 - 2
    assert live.final_before_ms(T0 + 700) == T0 + 700  # never past the wall clock
    live.tick(now)
    assert [row.t for row in [live.last_row] if row] == [T0 // 1000]  # second 0 only
    for seq in range(12, 50):
        live.add(result(seq, T0 + seq * 100, T0 + seq * 100, T0 + seq * 100 + 1))
    assert live.final_before_ms(now) == now  # every scheduled message answered


def test_abort_judges_whole_seconds_only() -> None:
    pacer = RampPacer(Stages.constant(10, 5))
    job = LoadJob(
        target=None,
        stages=pacer.stages,
        thresholds=(Threshold.parse("p99<100ms"),),
        abort_on_fail=True,
    )
    live = _Live(job, pacer, writer=None)
    start = T0 + 500  # the run starts half way through a second
    for seq in range(50):
        slow = 400 if seq >= 25 else 1  # from 2.5 s in, answers take 400 ms
        at = start + seq * 100
        live.add(result(seq, at, at, at + slow))
    live.tick(T0 + 60_000)
    assert live.failing is not None
    second, verdicts = live.failing
    assert second == T0 // 1000 + 3  # the first whole second holding the slow answers
    assert verdicts[0].threshold.text == "p99<100ms" and not verdicts[0].passed


def test_a_threshold_that_stopped_the_run_is_kept_as_failed() -> None:
    # --abort-on-fail stopped the run on a second's p99 (exit 99); the whole run's p99 would
    # pass. The archived stats must not read as a pass.
    job = LoadJob(
        target=None,
        stages=Stages.constant(10, 5),
        thresholds=(Threshold.parse("p99<100ms"), Threshold.parse("error_rate<0.1")),
        abort_on_fail=True,
    )
    outcome = LoadOutcome(LoadStats())
    hooks = _LoadHooks(job, RampPacer(job.stages), outcome)
    outcome.aborted_at = T0 // 1000 + 3
    outcome.aborted_by = [
        v for v in check(job.thresholds, {"p99": 400.0, "error_rate": 0}) if not v.passed
    ]
    latency = {"p50": 1.0, "p90": 2.0, "p99": 5.0, "p99_9": 6.0, "max": 7.0, "mean": 1.5}
    snapshot = {"ok": 50, "failed": 0, "throughput_msg_s": 10.0, "latency_ms": latency}
    hooks.finish(snapshot, End(outcome.stats))
    assert snapshot["thresholds"] == {
        "p99<100ms": {
            "ok": False,
            "value": 5.0,
            "failed_at": T0 // 1000 + 3,
            "failed_value": 400.0,
        },
        "error_rate<0.1": {"ok": True, "value": 0.0},
    }
    assert outcome.exit_code == 99
