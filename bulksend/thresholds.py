"""Pass/fail criteria on a load's figures, as k6 has them: ``--threshold 'p99<200ms'``.

A threshold is ``METRIC OP VALUE``:

* latency metrics ``p50``, ``p90``, ``p99``, ``p99.9`` (or ``p99_9``), ``p99.99`` (or
  ``p99_99``), ``max``, ``mean``: the corrected latency (from each message's intended send time), in ``ms`` (the default) or
  ``s``;
* ``error_rate``: failed / (ok + failed), a fraction (``0.01`` is 1%);
* ``rate``: answers (ok + failed) per second;

and ``OP`` one of ``<``, ``<=``, ``>``, ``>=``, ``==``. Figures are plain dicts with those
keys (``figures_of``): the end-of-run stats or one second's window (``--abort-on-fail``).
A latency figure is absent when no answer was ok: a threshold on it then fails (nothing
measured it), with no value. Pure: parsing and comparing only.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bulksend.errors import ConfigError

LATENCY_METRICS = ("p50", "p90", "p99", "p99_9", "p99_99", "max", "mean")
METRICS = (*LATENCY_METRICS, "error_rate", "rate")
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}
_SYNTAX = re.compile(
    r"^\s*([a-z_][a-z0-9_.]*)\s*(<=|>=|==|<|>)\s*([0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*([a-z]*)\s*$",
    re.I,
)
_UNIT_MS = {"": 1.0, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True, slots=True)
class Threshold:
    """``metric op value``; latency values in milliseconds. ``text`` is as the user wrote it."""

    metric: str
    op: str
    value: float
    text: str

    @classmethod
    def parse(cls, text: str) -> Threshold:
        match = _SYNTAX.match(text)
        if match is None:
            raise ConfigError(
                f"--threshold {text!r}: want METRIC OP VALUE, e.g. 'p99<200ms', 'error_rate<0.01'"
            )
        metric, op, number, unit = match.groups()
        metric = metric.lower().replace(".", "_")
        unit = unit.lower()
        if metric not in METRICS:
            raise ConfigError(
                f"--threshold {text!r}: unknown metric {metric!r} (one of {', '.join(METRICS)})"
            )
        value = float(number)
        if metric in LATENCY_METRICS:
            if unit not in _UNIT_MS:
                raise ConfigError(f"--threshold {text!r}: latency units are ms or s, not {unit!r}")
            value *= _UNIT_MS[unit]
        elif unit:
            raise ConfigError(f"--threshold {text!r}: {metric} takes a plain number, not {unit!r}")
        return cls(metric, op, value, text.strip())

    def passes(self, figures: Mapping[str, float]) -> bool:
        return _OPS[self.op](figures[self.metric], self.value)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One threshold checked against one set of figures. ``actual`` None: the figures had
    no such value (no ok answer to measure a latency), and the threshold failed."""

    threshold: Threshold
    actual: float | None
    passed: bool

    def line(self) -> str:
        word = "pass" if self.passed else "FAIL"
        metric = self.threshold.metric
        if self.actual is None:
            return f"{word}  {self.threshold.text}  (no ok answer to measure {metric})"
        unit = " ms" if metric in LATENCY_METRICS else ""
        return f"{word}  {self.threshold.text}  (actual {metric} = {self.actual:g}{unit})"

    def to_json(self) -> dict[str, Any]:
        """The verdict as ``--stats`` keeps it under ``thresholds``."""
        return {"ok": self.passed, "value": self.actual}


def check(thresholds: tuple[Threshold, ...], figures: Mapping[str, float]) -> list[Verdict]:
    """Every threshold against ``figures``, in the given order."""
    return [
        Verdict(t, figures[t.metric], t.passes(figures))
        if t.metric in figures
        else Verdict(t, None, False)
        for t in thresholds
    ]


def verdicts_json(verdicts: list[Verdict]) -> dict[str, dict[str, Any]]:
    """``{"<expr as given>": {"ok": bool, "value": number | null}}``, in the given order."""
    return {v.threshold.text: v.to_json() for v in verdicts}


def figures_of(snapshot: Mapping[str, Any]) -> dict[str, float]:
    """The threshold metrics of a stats snapshot (``LoadStats.snapshot()``'s keys); no
    latency metric when no answer was ok."""
    done = snapshot["ok"] + snapshot["failed"]
    latency = snapshot["latency_ms"] if snapshot["ok"] else {}
    return {
        **{k: float(v) for k, v in latency.items() if k in LATENCY_METRICS},
        "error_rate": snapshot["failed"] / done if done else 0.0,
        "rate": float(snapshot["throughput_msg_s"]),
    }
