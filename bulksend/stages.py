"""A load's rate over time: ``--rate R --duration D`` or ``--stages "0s:100,30s:1000,90s:1000"``.

Both become ``Stages``: points (time, rate) joined by straight lines, the rate linear between
neighbouring points and the run over at the last point. Pure: no clock inside, no sleep.

Message ``n`` (0-based) is due at the time ``t`` where the expected count reaches ``n``:
``integral of rate(s) ds from 0 to t = n`` (the constant-rate pacer's ``n / rate``, extended
to ramps, so a ramp starts with no burst either). On a segment from ``(t0, r0)`` with slope
``a`` holding ``m`` messages past its start, ``r0*τ + a*τ²/2 = m`` is a quadratic in ``τ``,
solved as ``τ = 2m / (r0 + sqrt(r0² + 2am))`` — the root that is non-negative, written
without the cancellation ``(-r0 + sqrt(...)) / a`` suffers when ``a`` is tiny, and valid
for ``a = 0`` (``m / r0``) and ``r0 = 0`` (``sqrt(2m / a)``) alike. A segment whose rate is 0
at both ends holds no message: the schedule pauses there.

The schedule holds ``total = ceil(integral over the whole run)`` messages, all due before the
last point; ``due_at(n)`` for ``n >= total`` is ``math.inf`` (never).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field

from bulksend.config import parse_duration
from bulksend.errors import ConfigError

#: Below this many messages a rounding error in the integral is not a message: keeps
#: ``ceil(200.0000000001)`` from inventing a 201st message in a 200-message schedule.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Stages:
    """Points ``(seconds since start, messages/s)``, linear between them, over at the last.

    Times strictly increase from 0; rates are finite and >= 0; at least two points; the
    whole schedule holds at least one message. ``ConfigError`` otherwise.
    """

    points: tuple[tuple[float, float], ...]
    #: Messages expected before each point (the running integral), computed once.
    _cumulative: tuple[float, ...] = field(init=False, repr=False, compare=False)
    #: Each segment as ``(t0, t1, r0, slope)``, and ``total``: computed once, since the
    #: pacer asks for a due time per message (a load of 20,000/s asks 20,000 times a second).
    _segments: tuple[tuple[float, float, float, float], ...] = field(
        init=False, repr=False, compare=False
    )
    _total: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        points = self.points
        if len(points) < 2:
            raise ConfigError(
                "stages need at least two points, a start and an end (e.g. 0s:100,60s:100)"
            )
        if points[0][0] != 0:
            raise ConfigError(f"the first stage point must be at 0s, not {points[0][0]:g}s")
        for t, r in points:
            if not (math.isfinite(t) and math.isfinite(r)) or r < 0:
                raise ConfigError(f"stage point {t:g}s:{r:g}: rates must be finite and >= 0")
        for (t0, _), (t1, _) in itertools.pairwise(points):
            if t1 <= t0:
                raise ConfigError(
                    f"stage points must be in increasing time order: {t1:g}s comes after {t0:g}s"
                )
        cumulative = [0.0]
        for (t0, r0), (t1, r1) in itertools.pairwise(points):
            cumulative.append(cumulative[-1] + (r0 + r1) / 2 * (t1 - t0))
        object.__setattr__(self, "_cumulative", tuple(cumulative))
        segments = tuple(
            (t0, t1, r0, (r1 - r0) / (t1 - t0)) for (t0, r0), (t1, r1) in itertools.pairwise(points)
        )
        object.__setattr__(self, "_segments", segments)
        object.__setattr__(self, "_total", max(0, math.ceil(cumulative[-1] - _EPSILON)))
        if self.total == 0:
            raise ConfigError("these stages send no message: every rate is 0")

    @classmethod
    def constant(cls, rate: float, duration_s: float) -> Stages:
        """``rate`` messages/s for ``duration_s`` seconds."""
        if rate <= 0 or duration_s <= 0:
            raise ConfigError("--rate and --duration must be > 0")
        return cls(((0.0, rate), (duration_s, rate)))

    @classmethod
    def parse(cls, text: str) -> Stages:
        """``"0s:100,30s:1000,90s:1000"``: comma-separated ``TIME:RATE`` points."""
        points = []
        for part in text.split(","):
            when, sep, rate = part.strip().rpartition(":")
            if not sep:
                raise ConfigError(
                    f"--stages wants TIME:RATE points (e.g. 0s:100,30s:1000), got {part!r}"
                )
            try:
                value = float(rate)
            except ValueError:
                raise ConfigError(
                    f"--stages: {rate!r} in {part!r} is not a rate (messages/s)"
                ) from None
            points.append((parse_duration(when), value))
        return cls(tuple(points))

    @property
    def duration(self) -> float:
        """Seconds from the first point to the last."""
        return self.points[-1][0]

    @property
    def total(self) -> int:
        """Messages in the whole schedule."""
        return self._total

    @property
    def mean_rate(self) -> float:
        """Messages/s averaged over the whole schedule."""
        return self._cumulative[-1] / self.duration

    def rate_at(self, t: float) -> float:
        """The target rate ``t`` seconds after the start (0 outside the schedule)."""
        points = self.points
        if t < 0 or t >= points[-1][0]:
            return 0.0
        i = bisect.bisect_right(points, t, key=lambda p: p[0]) - 1
        (t0, r0), (t1, r1) = points[i], points[i + 1]
        return r0 + (r1 - r0) * (t - t0) / (t1 - t0)

    def expected(self, t: float) -> float:
        """Messages expected to be due before ``t`` (the integral of the rate from 0 to t)."""
        points = self.points
        if t <= 0:
            return 0.0
        if t >= points[-1][0]:
            return self._cumulative[-1]
        i = bisect.bisect_right(points, t, key=lambda p: p[0]) - 1
        (t0, r0), (t1, r1) = points[i], points[i + 1]
        tau = t - t0
        slope = (r1 - r0) / (t1 - t0)
        return self._cumulative[i] + r0 * tau + slope * tau * tau / 2

    def due_at(self, n: int) -> float:
        """Seconds after the start at which message ``n`` is due; ``math.inf`` past the end."""
        if n >= self._total:
            return math.inf
        if n < 0:
            raise ValueError(f"message numbers start at 0, got {n}")
        return self.segment(n).due(n)

    def segment(self, n: int) -> Segment:
        """The segment message ``n`` (``0 <= n < total``) is due in."""
        cumulative = self._cumulative
        # The last segment starting at or below n: zero-rate segments (equal cumulative
        # values) are skipped, since a message cannot be due inside one.
        i = bisect.bisect_right(cumulative, n) - 1
        t0, t1, r0, slope = self._segments[i]
        return Segment(cumulative[i], min(cumulative[i + 1], self._total), t0, t1, r0, slope)


@dataclass(frozen=True, slots=True)
class Segment:
    """The messages ``lo <= n < hi`` of a schedule, due on the line from rate ``r0`` at
    ``t0`` (rising ``slope`` messages/s per second) to ``t1``."""

    lo: float
    hi: float
    t0: float
    t1: float
    r0: float
    slope: float

    def due(self, n: int) -> float:
        """Seconds after the start at which message ``n`` (in this segment) is due."""
        m = n - self.lo
        if m <= 0:
            return self.t0
        r0, slope = self.r0, self.slope
        # At a constant rate (slope 0, the common load) the root is r0 itself: no sqrt.
        root = math.sqrt(max(0.0, r0 * r0 + 2 * slope * m)) if slope else r0
        due = self.t0 + 2 * m / (r0 + root)
        return due if due < self.t1 else self.t1


#: No segment yet: holds no message.
_NONE = Segment(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


class RampPacer:
    """``Stages`` as the sender's ``Pacer`` (``bulksend.pacer.Pacer``).

    ``set_rate`` (adaptive control, a user's call) ends the ramp: from the later of now and
    the next message's due time the rate is constant until the schedule's end, so a change
    never releases a burst (as ``Schedule.set_rate``).

    ``rate``, ``total`` and ``duration`` are plain attributes, set again by ``set_rate``:
    the sender reads them once per message.
    """

    def __init__(self, stages: Stages) -> None:
        self._use(stages, 0.0, 0)

    def _use(self, stages: Stages, offset_s: float, offset_n: int) -> None:
        self.stages = stages
        self._offset_s, self._offset_n = offset_s, offset_n
        self._segment = _NONE
        #: Messages/s averaged over the schedule: always > 0, which tells the sender that
        #: the run is paced even where the ramp's own rate is momentarily 0.
        self.rate: float = stages.mean_rate
        #: Messages in the schedule; the load's message source stops there.
        self.total: int = offset_n + stages.total
        self.duration: float = offset_s + stages.duration

    def rate_at(self, elapsed: float) -> float:
        """The target rate ``elapsed`` seconds after the start."""
        return self.stages.rate_at(elapsed - self._offset_s)

    def due_at(self, sent: int) -> float:
        """Seconds after the start at which message ``sent`` is due; inf past the end."""
        n = sent - self._offset_n
        segment = self._segment
        if not segment.lo <= n < segment.hi:
            if n < 0:
                raise ValueError(f"message {sent} was due before the last rate change")
            if n >= self.stages.total:
                return math.inf
            # Messages are asked for in order: the segment found here serves until the next.
            segment = self._segment = self.stages.segment(n)
        return self._offset_s + segment.due(n)

    def wait(self, elapsed: float, sent: int) -> float:
        """Seconds until message ``sent`` is due (<= 0: now)."""
        return self.due_at(sent) - elapsed

    def set_rate(self, rate: float, elapsed: float, sent: int) -> None:
        """From now on ``rate`` messages/s, constant, to the schedule's end."""
        start = max(elapsed, self.due_at(sent))
        end = self.duration
        if rate <= 0 or not start < end:
            raise ValueError("a load's rate can only be changed to > 0 before its schedule ends")
        self._use(Stages(((0.0, rate), (end - start, rate))), start, sent)
