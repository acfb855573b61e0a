"""When to retry an attempt, and how long to wait first. Pure: no clock, no sleeping.

Backoff is capped exponential with *full jitter* (AWS Architecture Blog, "Exponential
Backoff and Jitter", 2015)::

    wait(n) = uniform(0, min(backoff_max, backoff_base * 2**n))     n = 0 for the first retry

A ``Retry-After`` answer header (delay-seconds or an HTTP-date, RFC 9110 §10.2.3) replaces
the computed wait, up to ``backoff_max``: a gateway that asks for a billion seconds (or a
date in 2100) would otherwise park each record, and with it a place in the pool, for that
long; the user bounded waits with --backoff-max, and a retry that comes early only meets
another 429. Retried: 429, 500, 502, 503, 504, connection errors, timeouts and broken
answers. Never retried: other 4xx (401/403 included: a wrong key does not get better by
asking again), and an answer over --max-answer-bytes (``ANSWER_TOO_LARGE``): its status may
have been 2xx, the message stored, so a retry risks a duplicate; and a server that sent too
much once will again, each time costing the cap in memory and bandwidth.
"""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime

from bulksend.config import RetryPolicy
from bulksend.errors import AnswerTooLarge, TransportError

#: A Retry-After longer than this is taken as this (an hour): a typo on the server's side
#: must not park a record for days.
MAX_RETRY_AFTER_S = 3600.0


def compute_backoff(
    retry_number: int, policy: RetryPolicy, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry ``retry_number`` (0-based), full jitter."""
    ceiling = min(policy.backoff_max, policy.backoff_base * (2.0 ** min(retry_number, 62)))
    return (rng or random).uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now_epoch_s: float) -> float | None:
    """Seconds to wait from a Retry-After value, or None when absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT
            return None
        seconds = when.timestamp() - now_epoch_s
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def retry_wait(
    retry_after: str | None,
    retry_number: int,
    policy: RetryPolicy,
    now_epoch_s: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry ``retry_number`` (0-based): the answer's Retry-After
    capped at ``backoff_max``, else the jittered backoff."""
    asked = parse_retry_after(retry_after, now_epoch_s)
    if asked is None:
        return compute_backoff(retry_number, policy, rng)
    return min(asked, policy.backoff_max)


def is_retryable_status(status: int, policy: RetryPolicy) -> bool:
    return status in policy.retry_statuses


def is_retryable_error(exc: TransportError) -> bool:
    """Whether an attempt that failed below HTTP is tried again (see the module docstring).
    A broken answer comes here only when no status line was read; one whose framing broke
    after its status line is an answer (``Response.broken``), retried by its status."""
    return not isinstance(exc, AnswerTooLarge)
