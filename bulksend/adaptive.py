"""``--adaptive``: AIMD rate control (additive increase, multiplicative decrease), the
scheme TCP congestion control made standard (Chiu & Jain, 1989), driven by 429 answers.

Pure: the caller passes the time and what it observed; the controller answers with a new
rate or None. At most one decrease per ``window``; each whole window without a 429 adds
``increase_fraction`` of the rate at the last decrease (so recovery to the old level takes
about ``(1 - decrease) / increase_fraction`` windows). The rate never exceeds ``ceiling``
(the user's ``--rate``), nor falls under ``floor``.

A run with no ``--rate`` starts unpaced; its first 429 sets the rate from what the server
actually *accepted* over the last window, not from what was offered, so one decrease lands
near the limit instead of ten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class AIMD:
    #: Messages/s now; 0 = unpaced (no throttle seen yet, no --rate).
    rate: float
    ceiling: float = math.inf
    floor: float = 1.0
    decrease: float = 0.8
    increase_fraction: float = 0.02
    window: float = 1.0
    changes: int = 0
    _last_decrease: float = field(default=-math.inf)
    _last_increase: float = field(default=-math.inf)
    _base: float = 0.0

    def on_throttle(self, now: float, accepted_rate: float) -> float | None:
        """A 429 arrived at ``now``; ``accepted_rate`` is ok answers/s over the last window."""
        if now - self._last_decrease < self.window:
            return None
        current = self.rate if self.rate > 0 else math.inf
        if accepted_rate > 0:
            current = min(current, accepted_rate)
        if math.isinf(current):
            return None  # nothing measured yet: wait for a window of evidence
        self.rate = max(self.floor, min(self.ceiling, current * self.decrease))
        self._base = self.rate
        self._last_decrease = self._last_increase = now
        self.changes += 1
        return self.rate

    def on_tick(self, now: float) -> float | None:
        """Called as time passes; a new rate after each whole quiet window, else None."""
        if self.rate <= 0 or self.rate >= self.ceiling or now - self._last_increase < self.window:
            return None
        if now - self._last_decrease < self.window:
            return None
        self._last_increase = now
        self.rate = min(self.ceiling, self.rate + max(1.0, self._base * self.increase_fraction))
        self.changes += 1
        return self.rate
