"""Configuration as small frozen value objects, validated when built.

The CLI, the TOML loader and library users all build the same objects (STYLE habit 7).
Precedence, lowest first: defaults < ``--config FILE.toml`` < environment < flags.
Secrets (AK/SK, security token, IAM token) come only from the environment or the config
file, never from a flag, and never appear in a repr, a log line, a result or an error.
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from bulksend.errors import ConfigError

ENGINES = ("rocketmq", "reliability")

#: Environment variables read for credentials, in order of preference (the SDK's names
#: first, then the ones in the API page's examples).
ENV_AK = ("HUAWEICLOUD_SDK_AK", "CLOUD_SDK_AK")
ENV_SK = ("HUAWEICLOUD_SDK_SK", "CLOUD_SDK_SK")
ENV_PROJECT_ID = "HUAWEICLOUD_SDK_PROJECT_ID"
ENV_SECURITY_TOKEN = "HUAWEICLOUD_SDK_SECURITY_TOKEN"
ENV_AUTH_TOKEN = "HUAWEICLOUD_SDK_AUTH_TOKEN"

#: Regions whose DMS endpoint is not under myhuaweicloud.com.
_REGION_DOMAINS = {"eu-west-101": "myhuaweicloud.eu"}


def region_endpoint(region: str) -> str:
    """``https://dms.{region}.myhuaweicloud.com`` (``.eu`` for eu-west-101)."""
    return f"https://dms.{region}.{_REGION_DOMAINS.get(region, 'myhuaweicloud.com')}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where messages go: ``{endpoint}/v2/{engine}/{project_id}/instances/{instance_id}/messages``."""

    endpoint: str
    project_id: str
    instance_id: str
    engine: str = "rocketmq"

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"endpoint must be an http:// or https:// URL, got {self.endpoint!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not self.project_id:
            raise ConfigError("a project id is needed: --project-id or HUAWEICLOUD_SDK_PROJECT_ID")
        if not self.instance_id:
            raise ConfigError("an instance id is needed: --instance-id")

    @property
    def path(self) -> str:
        """The request path (each parameter percent-encoded, as the SDK does)."""
        base = urlsplit(self.endpoint).path.rstrip("/")
        engine, project, instance = (
            quote(s, safe="") for s in (self.engine, self.project_id, self.instance_id)
        )
        return f"{base}/v2/{engine}/{project}/instances/{instance}/messages"

    @property
    def url(self) -> str:
        parts = urlsplit(self.endpoint)
        return f"{parts.scheme}://{parts.netloc}{self.path}"


@dataclass(frozen=True, slots=True)
class Credentials:
    """AK/SK (with an optional security token), or an IAM token, or nothing (no auth)."""

    ak: str | None = field(default=None, repr=False)
    sk: str | None = field(default=None, repr=False)
    security_token: str | None = field(default=None, repr=False)
    auth_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if bool(self.ak) != bool(self.sk):
            raise ConfigError(
                "AK and SK go together: set both HUAWEICLOUD_SDK_AK and HUAWEICLOUD_SDK_SK"
            )

    @property
    def mode(self) -> str:
        """``aksk``, ``token`` or ``none``: AK/SK wins over a token, as the issue orders."""
        if self.ak and self.sk:
            return "aksk"
        return "token" if self.auth_token else "none"

    def secrets(self) -> tuple[str, ...]:
        """Every secret value held, so outputs can be checked (and scrubbed) against them."""
        return tuple(s for s in (self.sk, self.security_token, self.auth_token) if s)

    def __repr__(self) -> str:
        return f"Credentials(mode={self.mode!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str], file: Mapping[str, Any] | None = None) -> Credentials:
        """From the environment, falling back to the config file's ``ak``/``sk``/... keys."""
        file = file or {}

        def pick(names: tuple[str, ...], key: str) -> str | None:
            for name in names:
                if env.get(name):
                    return env[name]
            value = file.get(key)
            return str(value) if value else None

        return cls(
            ak=pick(ENV_AK, "ak"),
            sk=pick(ENV_SK, "sk"),
            security_token=pick((ENV_SECURITY_TOKEN,), "security_token"),
            auth_token=pick((ENV_AUTH_TOKEN,), "auth_token"),
        )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter (see ``bulksend.retry``)."""

    #: Retries after the first attempt: at most max_retries + 1 HTTP attempts.
    max_retries: int = 5
    #: Seconds; the backoff ceiling before jitter is base * 2**retry_number.
    backoff_base: float = 0.2
    #: Seconds; no backoff (Retry-After aside) is longer.
    backoff_max: float = 20.0
    retry_statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504})

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError("--max-retries must be >= 0")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ConfigError("--backoff-base and --backoff-max must be >= 0")


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """TLS is verified by default; ``insecure`` skips it; ``ca_bundle`` adds a CA file."""

    insecure: bool = False
    ca_bundle: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.ca_bundle:
            try:
                ctx.load_verify_locations(self.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load --ca-bundle {self.ca_bundle}: {exc}") from None
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True, slots=True)
class SendOptions:
    """How a Sender sends. Units in the names' comments."""

    #: Requests in flight at once (one keep-alive connection each).
    concurrency: int = 64
    #: Messages per second for the whole run; 0 = no cap.
    rate: float = 0.0
    #: Seconds per HTTP attempt (connect + answer).
    timeout: float = 30.0
    retry: RetryPolicy = RetryPolicy()
    tls: TLSOptions = TLSOptions()
    #: This many 401/403 answers in a row stop the run (AuthenticationFailed).
    auth_failure_limit: int = 20
    #: KEYS property set to the record id where a record has no KEYS (dedup downstream).
    key_from_id: bool = False
    #: Records with the same key go one at a time, in input order (see ordering.py).
    ordered: bool = False
    #: The ordering key: KEYS by default; or topic, id, tags, or a property name.
    order_by: str | None = None
    #: After a record of a key finally fails: "continue" with the key's next records, or
    #: "skip" them (each gets status failed, saying why).
    on_key_failure: str = "continue"
    #: AIMD rate control on 429 answers (see adaptive.py).
    adaptive: bool = False
    #: Bytes; an answer (head and body) larger than this fails its attempt ANSWER_TOO_LARGE
    #: and its connection is closed. A SendMessage answer is well under 1 KiB.
    max_answer_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.on_key_failure not in ("continue", "skip"):
            raise ConfigError("--on-key-failure must be continue or skip")
        if self.concurrency < 1:
            raise ConfigError("--concurrency must be >= 1")
        if self.rate < 0:
            raise ConfigError("--rate must be >= 0")
        if self.timeout <= 0:
            raise ConfigError("--timeout must be > 0")
        if self.max_answer_bytes < 1:
            raise ConfigError("--max-answer-bytes must be >= 1")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"`` or a bare number of seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"not a duration: {text!r} (e.g. 500ms, 30s, 5m, 1h)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def load_toml(path: str) -> dict[str, Any]:
    """A config file's table, keys normalised to snake_case (``max-retries`` = ``max_retries``)."""
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None
    # A [bulksend] or [send] table is accepted as well as top-level keys.
    for section in ("bulksend", "send"):
        if isinstance(data.get(section), dict):
            data = {**data, **data.pop(section)}
    return {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}


def environ() -> Mapping[str, str]:
    return os.environ
