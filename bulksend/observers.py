"""Observers of attempts: each sees every attempt's Result as delivery makes it, and acts on
the *run* (stop it, change its rate), never on the record. Delivery calls
``on_attempt(result)`` after each attempt, an answer's or a transport error's (then
``result.http_status`` is None); an observer must be quick and must not block.

* ``AuthStreak``: too many 401/403 answers in a row mean the credentials are wrong, and
  every further request would be refused too: stop the run, leave the rest for --resume.
* ``AdaptiveRate``: ``--adaptive``'s glue between 429 answers, the pool's counters and the
  pure AIMD controller (``bulksend.adaptive``).

Target health (``bulksend.health``: pause and probe during an outage, fail fast) is not an
observer: it needs more than a Result (the transport error's cause, the connection it
failed on) and it answers back (whether a failure is charged to the record, when the next
attempt may go), so delivery calls it directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from bulksend.adaptive import AIMD
from bulksend.pool import Counters
from bulksend.result import Result


class AttemptObserver(Protocol):
    def on_attempt(self, result: Result) -> None: ...


class AuthStreak:
    """Counts 401/403 answers in a row; at ``limit`` calls ``on_limit(reason)`` once."""

    __slots__ = ("_on_limit", "error", "limit", "streak")

    def __init__(self, limit: int, on_limit: Callable[[str], None]) -> None:
        self.limit = limit
        self.streak = 0
        #: Why the run stopped, once it did; None before.
        self.error: str | None = None
        self._on_limit = on_limit

    def on_attempt(self, result: Result) -> None:
        status = result.http_status
        if status is None:
            return  # no answer: says nothing about the credentials either way
        if status not in (401, 403):
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.limit and self.error is None:
            self.error = (
                f"{self.streak} answers of HTTP {status} in a row"
                f" ({result.error_code}: {result.error_msg})"
            )
            self._on_limit(self.error)


class AdaptiveRate:
    """Feeds AIMD what it needs (time, 429s, the rate the server accepted) and applies the
    rate it answers with through ``set_rate``.

    The accepted rate is ok answers per ``aimd.window`` seconds, measured over the last
    whole window (or the part there is, when the first 429 comes within the first one)."""

    __slots__ = ("_accepted_rate", "_counters", "_set_rate", "_window_ok", "_window_start", "aimd")

    def __init__(self, aimd: AIMD, counters: Counters, set_rate: Callable[[float], None]) -> None:
        self.aimd = aimd
        self._counters = counters
        self._set_rate = set_rate
        self._window_start: float | None = None
        self._window_ok = 0
        self._accepted_rate = 0.0

    def on_dispatch(self, now: float) -> None:
        """Called before each record is dispatched: close a whole window, let AIMD recover."""
        if self._window_start is None:
            self._window_start = now  # the run's first record: the first window opens
        elif now - self._window_start >= self.aimd.window:
            ok = self._counters.ok
            self._accepted_rate = (ok - self._window_ok) / (now - self._window_start)
            self._window_start, self._window_ok = now, ok
        if (rate := self.aimd.on_tick(now)) is not None:
            self._set_rate(rate)

    def on_attempt(self, result: Result) -> None:
        if result.http_status != 429:
            return
        now = time.monotonic()
        accepted = self._accepted_rate
        start = self._window_start if self._window_start is not None else now
        span = now - start
        if not accepted and span > 0.2:  # no whole window yet: use the part we have
            accepted = (self._counters.ok - self._window_ok) / span
        if (rate := self.aimd.on_throttle(now, accepted)) is not None:
            self._set_rate(rate)
