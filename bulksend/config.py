"""Configuration as small frozen value objects, validated when built.

The CLI, the TOML loader and library users all build the same objects. Precedence,
lowest first: defaults < ``--config FILE.toml`` < environment < flags. Secrets (AK/SK,
security token, IAM token) never come from a flag (see ``bulksend.credentials`` for where
they do come from) and never appear in a repr, a log line, a result or an error.

Every numeric option has its range in ``LIMITS``; the value objects and the CLI (flags,
environment and config file alike) check against that one table with ``check_number``.
"""

from __future__ import annotations

import math
import os
import re
import ssl
import stat
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


@dataclass(frozen=True, slots=True)
class Range:
    """The values a numeric option may take: finite, ``lo`` <= value <= ``hi``."""

    lo: float
    hi: float
    #: ``lo`` itself is excluded (a timeout of 0 s means nothing can answer).
    lo_open: bool = False
    integer: bool = False
    unit: str = ""

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        lo, hi = _number(self.lo), _number(self.hi)
        if self.integer:
            return f"a whole number from {lo} to {hi}{unit}"
        return f"a number {'>' if self.lo_open else '>='} {lo} and <= {hi}{unit}"

    def admits(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        return above and value <= self.hi


def _number(x: float) -> str:
    return f"{int(x):,}" if x == int(x) else f"{x:g}"


#: The range of every numeric option of ``send`` and ``load``, by option name. Upper bounds
#: are there to catch typos and overflow (``1e309`` is inf), not to second-guess a user.
LIMITS: dict[str, Range] = {
    # One connection (one file descriptor, one local port) each: a host has ~64k ports.
    "concurrency": Range(1, 65_535, integer=True),
    "max_in_flight": Range(1, 65_535, integer=True),
    "rate": Range(0, 10_000_000, unit="messages/s"),
    # Past ~60 retries the backoff ceiling stops growing; 100 is already days of waiting.
    "max_retries": Range(0, 100, integer=True),
    "timeout": Range(0, 86_400, lo_open=True, unit="s"),
    "backoff_base": Range(0, 3_600, unit="s"),
    "backoff_max": Range(0, 86_400, unit="s"),
    # 0 wrote 12 MB of status lines in 2.5 s: ten lines a second is the most anyone reads.
    "progress_interval": Range(0.1, 86_400, unit="s"),
    "drain_timeout": Range(0, 86_400, unit="s"),
    # 0: stop as soon as the target is judged unreachable; a week rides out anything.
    "outage_timeout": Range(0, 604_800, unit="s"),
    # The broker's body limit (synthetic.MAX_BODY_BYTES).
    "body_size": Range(0, 4 * 1024 * 1024, integer=True, unit="bytes"),
    "keys": Range(0, 1_000_000_000, integer=True),
    # A SendMessage answer is a few hundred bytes; the cap only stops a runaway one.
    "max_answer_bytes": Range(1, 1 << 40, integer=True, unit="bytes"),
    # --exactly-once's wait for a broker's key index; an hour is already no backfill.
    "reconcile_after": Range(0, 3_600, unit="s"),
}


def check_number(name: str, value: object, origin: str | None = None) -> None:
    """ConfigError, one line naming the option (and where it came from: an environment
    variable or the config file), unless ``value`` is in ``LIMITS[name]``."""
    allowed = LIMITS[name]
    if allowed.admits(value):
        return
    where = f"{origin}: " if origin else ""
    flag = "--" + name.replace("_", "-")
    raise ConfigError(f"{where}{flag} must be {allowed.describe()}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Target:
    """Where messages go: ``{endpoint}/v2/{engine}/{project_id}/instances/{instance_id}/messages``."""

    endpoint: str
    project_id: str
    instance_id: str
    engine: str = "rocketmq"

    def __post_init__(self) -> None:
        try:
            parts = urlsplit(self.endpoint)
            parts.port  # noqa: B018  (parsed on first use: a bad port raises here, not mid-run)
        except ValueError as exc:
            raise ConfigError(f"--endpoint {self.endpoint!r} cannot be parsed: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"endpoint must be an http:// or https:// URL, got {self.endpoint!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not self.project_id:
            raise ConfigError("a project id is needed: --project-id or HUAWEICLOUD_SDK_PROJECT_ID")
        if not self.instance_id:
            raise ConfigError("an instance id is needed: --instance-id")
        # The project id is also the X-Project-Id header: a CR/LF would add headers of its
        # own to every request. Ids the cloud issues are hex and dashes; the path quotes
        # the rest. The value is not quoted back: it may be a paste of something else.
        for name, value in (("project id", self.project_id), ("instance id", self.instance_id)):
            if not _VISIBLE_ASCII.fullmatch(value):
                raise ConfigError(
                    f"the {name} holds a character no id has (a space, a control character"
                    " or non-ASCII): check how it was set"
                )

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


#: What every character of a credential is: printable ASCII, no space.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


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
        for name, value in (
            ("AK", self.ak),
            ("SK", self.sk),
            ("security token", self.security_token),
            ("auth token", self.auth_token),
        ):
            # Each goes into a request head or a signature. Keys and tokens the cloud
            # issues are visible ASCII; anything else is a paste error, and a CR/LF would
            # add headers of its own to every request. Never quote the value.
            if value and not _VISIBLE_ASCII.fullmatch(value):
                raise ConfigError(
                    f"the {name} holds a character no credential has (a space, a control"
                    " character or non-ASCII): check how it was set"
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
        """From the environment, else from the config file's ``ak``/``sk``/... keys.

        Each source is taken whole, as the SDK's providers take theirs: an AK from one
        place is never paired with an SK (or a security token) from another.
        """
        names = (ENV_AK, ENV_SK, (ENV_SECURITY_TOKEN,), (ENV_AUTH_TOKEN,))
        found = _credentials_in(env, names, "HUAWEICLOUD_SDK_AK and HUAWEICLOUD_SDK_SK")
        if found.mode != "none":
            return found
        keys = (("ak",), ("sk",), ("security_token",), ("auth_token",))
        return _credentials_in(file or {}, keys, "ak and sk in the config file")


def _credentials_in(
    source: Mapping[str, Any], names: tuple[tuple[str, ...], ...], pair: str
) -> Credentials:
    """AK/SK (+ security token), or an IAM token, or none, from one source."""

    def pick(candidates: tuple[str, ...]) -> str | None:
        for name in candidates:
            value = source.get(name)
            if value:
                return str(value)
        return None

    ak, sk, security_token, auth_token = (pick(n) for n in names)
    if bool(ak) != bool(sk):
        raise ConfigError(f"AK and SK go together: set both {pair}")
    if security_token and not ak:
        # A security token belongs to the temporary AK/SK it was issued with.
        raise ConfigError(f"a security token needs its temporary AK/SK: set {pair} too")
    return Credentials(ak=ak, sk=sk, security_token=security_token, auth_token=auth_token)


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
        check_number("max_retries", self.max_retries)
        check_number("backoff_base", self.backoff_base)
        check_number("backoff_max", self.backoff_max)


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
    #: Seconds the target may stay unreachable mid-run (dispatch paused, probed with
    #: backoff) before the run stops, TargetUnreachable (see health.py).
    outage_timeout: float = 300.0
    #: Wait out a target that stops answering (hold dispatch, probe, resume: health.py)
    #: rather than charge each failure to its record. Off for a load: a dead target is
    #: what it measures, each message failed when due.
    ride_outages: bool = True
    #: Each record carries bulksend's key in KEYS, the ledger holds an intent before its
    #: first request, and an attempt whose answer was lost is checked with ListMessages
    #: before any re-send (see writeahead.py). Needs a ledger file (``Outputs.out``).
    exactly_once: bool = False
    #: Seconds an attempt must have ended before ListMessages is asked about it (a broker
    #: indexes keys asynchronously).
    reconcile_after: float = 3.0

    def __post_init__(self) -> None:
        if self.on_key_failure not in ("continue", "skip"):
            raise ConfigError("--on-key-failure must be continue or skip")
        check_number("concurrency", self.concurrency)
        check_number("rate", self.rate)
        check_number("timeout", self.timeout)
        check_number("max_answer_bytes", self.max_answer_bytes)
        check_number("outage_timeout", self.outage_timeout)
        check_number("reconcile_after", self.reconcile_after)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"`` or a bare number of seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"not a duration: {text!r} (e.g. 500ms, 30s, 5m, 1h)")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not math.isfinite(seconds):  # 400 digits are still digits, and float() says inf
        raise ConfigError(f"not a duration: {text!r} (too long)")
    return seconds


#: Tables of a config file that apply to one subcommand only.
COMMAND_TABLES = ("send", "load")


#: A config file is a page of settings; anything this large is the wrong file.
MAX_CONFIG_BYTES = 1 << 20


def read_small_text(path: str, flag: str, limit: int) -> str:
    """A small UTF-8 text file given by ``flag``, whole; ConfigError (one line) when it is
    not a regular file (``/dev/zero`` or a FIFO would be read without end), is larger than
    ``limit`` bytes, cannot be read, or is not UTF-8."""
    try:
        # Looked at before opening: opening a FIFO waits for a writer.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"{flag} {path} is not a regular file")
        with Path(path).open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError(f"{flag} {path} is larger than {limit:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{flag} {path} is not UTF-8 text (byte {exc.start:,})") from None


def load_toml(path: str) -> dict[str, Any]:
    """A config file's keys, normalised to snake_case (``max-retries`` = ``max_retries``).

    Top-level keys (or a ``[bulksend]`` table, the same thing) apply to every subcommand
    that has the option; a ``[send]`` or ``[load]`` table's keys only to that subcommand,
    kept as a nested dict under its name. Any other table is an error.
    """
    text = read_small_text(path, "--config", MAX_CONFIG_BYTES)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None
    if isinstance(data.get("bulksend"), dict):
        shared = data.pop("bulksend")
        data = {**data, **shared}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in COMMAND_TABLES:
                tables = ", ".join(f"[{t}]" for t in ("bulksend", *COMMAND_TABLES))
                raise ConfigError(f"--config {path}: unknown table [{key}] (known: {tables})")
            value = {k.replace("-", "_"): v for k, v in value.items()}
        flat[key.replace("-", "_")] = value
    return flat


def environ() -> Mapping[str, str]:
    return os.environ
