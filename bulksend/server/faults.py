"""Misbehaviour on purpose, for testing senders: rate limiting, slowness, stalls, faults.

Pure parts take the clock as an argument (``TokenBucket.take``, ``stall_release``) so tests
state exact answers; ``Faults`` holds the one seeded ``random.Random``, drawn in a fixed
order per request, so a run with the same ``--seed``, flags and request order makes the
same choices.

Per SendMessage request, in this order (each draw only when its flag is on):
rate limit (429, nothing stored) -> drop -> hang -> error (503) -> [validate, store] ->
garbage -> no msg_id -> lose answer -> latency jitter. Drop, hang and error happen before
the message is stored ("the request never reached the broker"); garbage, no-msg_id and a
lost answer after ("stored, but the answer is unusable, never comes, or comes too late"),
which is how a sender meets at-least-once duplicates.
"""

from __future__ import annotations

import math
import os
import random
from enum import IntEnum

from bulksend.server.options import ServerOptions, Stall


class TokenBucket:
    """Token bucket: ``rate`` tokens a second, at most ``burst`` saved, starting full.

    A request takes one token; when none is left it is refused with how long until one is.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken; else seconds until the next one (nothing taken)."""
        tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        # The tolerance: a request arriving just when its token is due is admitted, not
        # refused for a rounding error of 1e-15 tokens.
        if tokens >= 1.0 - 1e-9:
            self._tokens = max(0.0, tokens - 1.0)
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self.rate


def retry_after_seconds(wait_s: float) -> int:
    """Retry-After as delta-seconds: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


def stall_release(due: float, start: float, stall: Stall) -> float:
    """When an answer due at ``due`` may go out, for stalls starting at ``start + k*every``
    (k >= 1) and lasting ``duration``: answers due inside a stall wait for its end."""
    elapsed = due - start
    k = math.floor(elapsed / stall.every_s)
    if k >= 1 and elapsed - k * stall.every_s < stall.duration_s:
        return start + k * stall.every_s + stall.duration_s
    return due


class Fault(IntEnum):
    """What happens to one SendMessage request before it reaches the store."""

    NONE = 0
    DROP = 1
    HANG = 2
    ERROR = 3


class Mangle(IntEnum):
    """What happens to a 200 answer after the message was stored."""

    NONE = 0
    GARBAGE = 1
    NO_MSG_ID = 2


class Faults:
    """The seeded choices of one server run."""

    def __init__(self, options: ServerOptions, now: float) -> None:
        self.seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4))
        self._rng = random.Random(self.seed)
        self._o = options
        self._start = now
        self.bucket = (
            TokenBucket(options.rate_limit, options.rate_burst or max(1.0, options.rate_limit), now)
            if options.rate_limit
            else None
        )
        self._latency_s = options.latency_ms / 1000
        self._jitter_s = options.latency_jitter_ms / 1000
        self.delays = bool(self._latency_s or self._jitter_s or options.stall)

    def throttle(self, now: float) -> float:
        """0.0 to admit a request, else seconds until the bucket has a token."""
        return 0.0 if self.bucket is None else self.bucket.take(now)

    def fault(self) -> Fault:
        o, rng = self._o, self._rng
        if o.drop_rate and rng.random() < o.drop_rate:
            return Fault.DROP
        if o.hang_rate and rng.random() < o.hang_rate:
            return Fault.HANG
        if o.error_rate and rng.random() < o.error_rate:
            return Fault.ERROR
        return Fault.NONE

    def mangle(self) -> Mangle:
        o, rng = self._o, self._rng
        if o.garbage_rate and rng.random() < o.garbage_rate:
            return Mangle.GARBAGE
        if o.no_msgid_rate and rng.random() < o.no_msgid_rate:
            return Mangle.NO_MSG_ID
        return Mangle.NONE

    def lose(self) -> bool:
        """Whether this stored message's answer is lost (--lose-answer-rate)."""
        rate = self._o.lose_answer_rate
        return bool(rate) and self._rng.random() < rate

    def due(self, now: float) -> tuple[float, bool]:
        """When an answer ready at ``now`` may go out (after latency, jitter and stalls),
        and whether a stall holds it."""
        due = now + self._latency_s
        if self._jitter_s:
            due += self._rng.uniform(0.0, self._jitter_s)
        if self._o.stall is None:
            return due, False
        released = stall_release(due, self._start, self._o.stall)
        return released, released != due
