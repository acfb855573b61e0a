"""What ``bulksend serve`` is told: one frozen value object, validated when built.

The CLI and in-process callers build the same ``ServerOptions``; every default is named
here with its unit. Misbehaviour is off unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bulksend.config import parse_duration
from bulksend.errors import ConfigError

#: Engines the SendMessage path accepts; anything else is a 404, as on the real gateway.
ENGINES = frozenset({"rocketmq", "reliability"})


@dataclass(frozen=True, slots=True)
class Stall:
    """Every ``every_s`` seconds after start, hold all answers for ``duration_s`` seconds."""

    every_s: float
    duration_s: float

    def __post_init__(self) -> None:
        if not 0 < self.duration_s < self.every_s:
            raise ConfigError("--stall EVERY:FOR needs 0 < FOR < EVERY")

    @classmethod
    def parse(cls, text: str) -> Stall:
        """``"10s:1s"`` -> Stall(10.0, 1.0)."""
        every, sep, duration = text.partition(":")
        if not sep:
            raise ConfigError(f"--stall wants EVERY:FOR (e.g. 10s:1s), got {text!r}")
        return cls(parse_duration(every), parse_duration(duration))


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Everything ``bulksend serve`` does; defaults are a well-behaved, unsigned server.

    Probabilities are per SendMessage request, in [0, 1]. Misbehaviour (rate limit,
    latency, stall and the ``*_rate`` faults) applies to SendMessage (POST) only, so that
    ListMessages and /metrics always show promptly what was stored.
    """

    host: str = "127.0.0.1"
    #: 0 picks a free port.
    port: int = 9876
    #: Queues per topic on each broker; a topic has ``queues * brokers`` queues in all.
    queues: int = 8
    brokers: int = 1
    #: SQLite file that keeps accepted messages across restarts; None keeps them in memory.
    store_path: str | None = None
    #: In-memory store only: how many of the newest messages ListMessages can still see
    #: (offsets and counts go on past it). None keeps every message.
    keep: int | None = 1_000_000
    #: SQLite store only: the least time from one batch commit's start to the next one's
    #: (s). 0 commits whenever the writer is free; more makes bigger batches, later answers.
    commit_interval_s: float = 0.0
    #: SDK-HMAC-SHA256 credentials to verify; None with ``token`` None accepts unsigned.
    ak: str | None = None
    sk: str | None = field(default=None, repr=False)
    #: Required X-Auth-Token value, when set.
    token: str | None = field(default=None, repr=False)
    #: Seeds every random choice below; None draws a seed (printed on stderr when used).
    seed: int | None = None
    #: Token bucket: SendMessage requests per second, and its capacity (default: one
    #: second's worth, at least 1). Over it: 429 APIG.0308 with Retry-After.
    rate_limit: float | None = None
    rate_burst: float | None = None
    #: Each SendMessage answer waits latency_ms + uniform(0, latency_jitter_ms).
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    stall: Stall | None = None
    #: Answer 503 DMS.00503001 (message not stored).
    error_rate: float = 0.0
    #: Close the connection without answering (message not stored).
    drop_rate: float = 0.0
    #: Read the request, never answer, keep the connection open (message not stored).
    hang_rate: float = 0.0
    #: Answer 200 with a body that is not JSON (message stored).
    garbage_rate: float = 0.0
    #: Answer 200 JSON without msg_id (message stored).
    no_msgid_rate: float = 0.0
    #: Store the message (committed), then lose its answer: close the connection without
    #: it, or, with ``lose_answer_hang_s`` > 0, send it that many seconds late.
    lose_answer_rate: float = 0.0
    lose_answer_hang_s: float = 0.0
    #: Request bodies over this many bytes get 413; None: only the built-in 64 MiB ceiling.
    max_body: int | None = None
    #: Send Retry-After as an HTTP date rather than delta-seconds.
    retry_after_date: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    #: On shutdown, how long in-flight requests may take to finish before being cut (s).
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        if self.queues < 1 or self.brokers < 1:
            raise ConfigError("--queues and --brokers must be at least 1")
        if self.keep is not None and self.keep < 0:
            raise ConfigError("--keep must not be negative")
        if (self.ak is None) != (self.sk is None):
            raise ConfigError("set both HUAWEICLOUD_SDK_AK and HUAWEICLOUD_SDK_SK, or neither")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        for name in (
            "error_rate",
            "drop_rate",
            "hang_rate",
            "garbage_rate",
            "no_msgid_rate",
            "lose_answer_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ConfigError("--rate-limit must be positive")
        if self.rate_burst is not None and self.rate_burst < 1:
            raise ConfigError("--rate-burst must be at least 1")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ConfigError("--latency and --latency-jitter must not be negative")
        if self.max_body is not None and self.max_body < 0:
            raise ConfigError("--max-body must not be negative")
        if self.commit_interval_s < 0 or self.shutdown_grace_s < 0 or self.lose_answer_hang_s < 0:
            raise ConfigError(
                "--commit-interval, --shutdown-grace and --lose-answer-hang must not be negative"
            )

    @property
    def signed(self) -> bool:
        """Whether requests must carry an SDK-HMAC-SHA256 signature (or the token)."""
        return self.ak is not None

    @property
    def misbehaves(self) -> bool:
        """Whether any deliberate misbehaviour is on."""
        return bool(
            self.rate_limit
            or self.latency_ms
            or self.latency_jitter_ms
            or self.stall
            or self.error_rate
            or self.drop_rate
            or self.hang_rate
            or self.garbage_rate
            or self.no_msgid_rate
            or self.lose_answer_rate
        )
