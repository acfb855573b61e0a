"""When may the next message go? Pure functions of elapsed time: no clock inside, no sleep.

A constant-rate pacer in the manner of vegeta's ``ConstantPacer``: message ``n`` (0-based) is
due at ``n / rate`` seconds after the start, so message 0 goes at once and there is no
start-up burst (unlike a token bucket that starts full, e.g. aiolimiter). Because every due
time is absolute, a late wake-up is caught up by the next messages instead of accumulating
as drift: the achieved rate over a run converges on ``rate``.

A rate change (``--adaptive``, ``--stages``) starts a new segment: ``Schedule`` keeps the
anchor (time and count where the current rate took over) so due times stay absolute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Pacer(Protocol):
    """What the sender's dispatcher asks of a schedule (``Schedule``; load's stages)."""

    @property
    def rate(self) -> float: ...

    def wait(self, elapsed: float, sent: int) -> float: ...

    def due_at(self, sent: int) -> float: ...

    def set_rate(self, rate: float, elapsed: float, sent: int) -> None: ...


def pace(elapsed: float, sent: int, rate: float) -> float:
    """Seconds to wait before message number ``sent`` may go; <= 0 means now.

    ``elapsed`` seconds since the start, ``rate`` messages/s (0 = unpaced: always now).
    """
    if rate <= 0:
        return 0.0
    return sent / rate - elapsed


@dataclass(slots=True)
class Schedule:
    """A piecewise-constant rate: each segment paced by ``pace`` from its own anchor."""

    rate: float
    anchor_elapsed: float = 0.0
    anchor_sent: int = 0

    def wait(self, elapsed: float, sent: int) -> float:
        """Seconds until message ``sent`` is due, given ``elapsed`` since the run's start."""
        return pace(elapsed - self.anchor_elapsed, sent - self.anchor_sent, self.rate)

    def due_at(self, sent: int) -> float:
        """Elapsed time at which message ``sent`` is (or was) due; 0 when unpaced."""
        if self.rate <= 0:
            return self.anchor_elapsed
        return self.anchor_elapsed + (sent - self.anchor_sent) / self.rate

    def set_rate(self, rate: float, elapsed: float, sent: int) -> None:
        """Change the rate from now on. The new segment starts at the later of now and the
        next message's old due time, so a change never releases a burst."""
        start = max(elapsed, self.due_at(sent)) if self.rate > 0 else elapsed
        self.rate = rate
        self.anchor_elapsed = start
        self.anchor_sent = sent
