"""Flags shared by ``send`` and ``load``, and their resolution into config objects.

Precedence, lowest first: defaults < ``--config FILE.toml`` < environment < flags. Every
option of a subcommand can come from the file (``max_retries = 3``, top level or in that
subcommand's ``[send]`` / ``[load]`` table) or the environment (``BULKSEND_MAX_RETRIES=3``).
A subcommand reads only its own options: ``BULKSEND_CONCURRENCY`` means nothing to
``load``, and a shared config file's ``concurrency`` is ignored there. Every numeric option
is checked against ``config.LIMITS`` whichever of the three it came from. Credentials come
from the environment, the file or the SDK's own sources (``bulksend.credentials``), never
from a flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

from bulksend import credentials
from bulksend.config import (
    COMMAND_TABLES,
    ENGINES,
    ENV_PROJECT_ID,
    LIMITS,
    Credentials,
    RetryPolicy,
    SendOptions,
    Target,
    TLSOptions,
    check_number,
    load_toml,
)
from bulksend.errors import ConfigError
from bulksend.regions import region_endpoint
from bulksend.resources import ensure_open_files

T = TypeVar("T")

#: Environment variables read beside BULKSEND_<OPTION> for some options.
_EXTRA_ENV = {"project_id": (ENV_PROJECT_ID,), "region": ("HUAWEICLOUD_SDK_REGION",)}
#: Keys a config file may hold that are not flags.
_SECRET_KEYS = frozenset({"ak", "sk", "security_token", "auth_token"})
#: Namespace entries that are not options.
_NOT_OPTIONS = frozenset({"command", "func", "config_options", "config", "inputs"})
#: The connection pool's size: send's --concurrency, load's --max-in-flight.
POOL_OPTIONS = {"concurrency": 64, "max_in_flight": 256}


def add_target_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--endpoint", help="base URL, e.g. https://dms.cn-north-4.myhuaweicloud.com")
    g.add_argument(
        "--region",
        help="a Huawei Cloud region id, e.g. cn-north-4 (its DMS endpoint is known; "
        "--endpoint for any other)",
    )
    g.add_argument("--project-id", help="project id (env HUAWEICLOUD_SDK_PROJECT_ID)")
    g.add_argument("--instance-id", help="RocketMQ instance id")
    g.add_argument("--engine", help="rocketmq (default) or its alias reliability")
    g.add_argument(
        "--embedded",
        action="store_true",
        default=None,
        help="start the built-in server in this process on a free loopback port and send to it",
    )
    g.add_argument("--config", metavar="FILE.toml", help="read any option from a TOML file")
    g.add_argument(
        "--insecure", action="store_true", default=None, help="do not verify TLS certificates"
    )
    g.add_argument(
        "--ca-bundle", metavar="FILE", help="trust this CA (PEM) in addition to the system's"
    )


def add_pipeline_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline")
    g.add_argument("--concurrency", type=int, metavar="N", help="requests in flight (default 64)")
    g.add_argument(
        "--rate", type=float, metavar="R", help="messages/s for the whole run (default 0 = no cap)"
    )
    g.add_argument(
        "--max-retries",
        type=int,
        metavar="N",
        help="retries per record (default 5: at most 6 attempts)",
    )
    g.add_argument("--timeout", type=float, metavar="S", help="seconds per attempt (default 30)")
    g.add_argument(
        "--backoff-base", type=float, metavar="S", help="backoff base, seconds (default 0.2)"
    )
    g.add_argument(
        "--backoff-max",
        type=float,
        metavar="S",
        help="longest wait before a retry, a server's Retry-After included, seconds (default 20)",
    )
    g.add_argument(
        "--max-answer-bytes",
        type=int,
        metavar="N",
        help="an answer larger than this fails ANSWER_TOO_LARGE (default 1048576)",
    )
    g.add_argument(
        "--outage-timeout",
        type=float,
        metavar="S",
        help="seconds to pause and probe an unreachable target before stopping, exit 2"
        " (default 300)",
    )


@dataclass(frozen=True)
class Resolver:
    """Looks an option of one subcommand up in flags, then environment, then config file."""

    args: argparse.Namespace
    env: Mapping[str, str]
    #: The config file's keys that apply to this subcommand (its table's over top level).
    file: Mapping[str, Any]
    #: This subcommand's options: nothing else is read from the environment or the file.
    options: frozenset[str] = field(default_factory=frozenset)
    path: str | None = None

    @classmethod
    def build(cls, args: argparse.Namespace, env: Mapping[str, str]) -> Resolver:
        own, every = _options(args)
        path = getattr(args, "config", None) or env.get("BULKSEND_CONFIG")
        file = (
            _applicable(load_toml(path), path, getattr(args, "command", None), own, every)
            if path
            else {}
        )
        return cls(args, env, file, own, path)

    def get(self, name: str, conv: Callable[[Any], T], default: T) -> T:
        if name not in self.options:
            return default  # not an option of this subcommand: its env and file keys neither
        value = getattr(self.args, name, None)
        origin: str | None = None
        if value is None:
            for env_name in (f"BULKSEND_{name.upper()}", *_EXTRA_ENV.get(name, ())):
                if self.env.get(env_name):
                    origin = env_name
                    value = self._convert(name, conv, self.env[env_name], origin)
                    break
            else:
                if name not in self.file:
                    return default
                origin = f"--config {self.path}"
                value = self._convert(name, conv, self.file[name], origin)
        if name in LIMITS:
            check_number(name, value, origin)
        return value  # type: ignore[no-any-return]  # argparse (or _convert) converted it

    def has(self, name: str) -> bool:
        """Whether this subcommand has the option ``name``."""
        return name in self.options

    @cached_property
    def static_auth(self) -> credentials.Auth:
        """Credentials from the environment, the config file or the SDK's file (no network)."""
        return credentials.find_static(self.env, self.file)

    @cached_property
    def auth(self) -> credentials.Auth:
        """The run's credentials: ``static_auth``, else (not --embedded) the ECS metadata
        service's, with a refresher."""
        if self.get("embedded", to_bool, False):
            return self.static_auth
        return credentials.with_metadata(self.static_auth, self.env)

    @staticmethod
    def _convert(name: str, conv: Callable[[Any], T], raw: Any, origin: str) -> Any:
        strict: Callable[[Any], Any] = conv
        if conv is int:
            strict = _to_int
        elif conv is float:
            strict = _to_float
        elif conv is str:
            strict = _to_str
        try:
            return strict(raw)
        except (TypeError, ValueError):
            flag = "--" + name.replace("_", "-")
            if name in LIMITS:
                raise ConfigError(
                    f"{origin}: {flag} must be {LIMITS[name].describe()}, got {raw!r}"
                ) from None
            raise ConfigError(f"{origin}: {flag} = {raw!r} is not valid") from None


def _options(args: argparse.Namespace) -> tuple[frozenset[str], Mapping[str, frozenset[str]]]:
    """This subcommand's options, and every subcommand's (``build_parser`` records them as
    ``config_options``; a bare Namespace, as tests build, has only its own)."""
    every: Mapping[str, frozenset[str]] = getattr(args, "config_options", None) or {}
    command = getattr(args, "command", None)
    own = every.get(command) if command else None
    if own is None:
        own = frozenset(vars(args)) - _NOT_OPTIONS
    return own, every


def _applicable(
    data: Mapping[str, Any],
    path: str,
    command: str | None,
    own: frozenset[str],
    every: Mapping[str, frozenset[str]],
) -> dict[str, Any]:
    """The file's keys for ``command``: top-level keys it has, then its own table's.

    A top-level key that belongs to another subcommand only (``failed`` for ``load``) is
    skipped, so one file serves both; a key no subcommand has, at top level or in a table,
    is a typo and an error.
    """
    known_anywhere = own.union(*(every.get(c, ()) for c in COMMAND_TABLES)) | _SECRET_KEYS
    unknown = sorted(
        k for k, v in data.items() if not isinstance(v, dict) and k not in known_anywhere
    )
    for table in COMMAND_TABLES:
        section = data.get(table)
        if isinstance(section, dict):
            allowed = (
                every.get(table) or (own if table == command else known_anywhere)
            ) | _SECRET_KEYS
            unknown += sorted(f"[{table}] {k}" for k in section if k not in allowed)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    mine = own | _SECRET_KEYS
    flat = {k: v for k, v in data.items() if not isinstance(v, dict) and k in mine}
    section = data.get(command) if command in COMMAND_TABLES else None
    if isinstance(section, dict):
        flat.update(section)
    return flat


def _to_int(raw: Any) -> int:
    """An int from the environment's text or the file's TOML integer; never a bool, never a
    float (``2.5`` connections is a typo, not 2)."""
    if isinstance(raw, bool | float):
        raise ValueError(raw)
    if isinstance(raw, int):
        return raw
    return int(str(raw).strip())


def _to_str(raw: Any) -> str:
    """Text as given: a path or a name from TOML that is a number (``out = 5``) is a
    mistake, not a file named ``5``."""
    if not isinstance(raw, str):
        raise TypeError(raw)
    return raw


def _to_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(raw)
    if isinstance(raw, int | float):
        return float(raw)
    return float(str(raw).strip())


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


def resolve_engine(r: Resolver) -> str:
    engine = r.get("engine", str, "rocketmq")
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


def resolve_target(r: Resolver) -> Target:
    """``--endpoint``, or a known ``--region``'s endpoint; the project id from the flag, the
    environment, the config file, else the SDK's credentials file."""
    endpoint = r.get("endpoint", str, "")
    region = r.get("region", str, "")
    if not endpoint:
        if not region:
            raise ConfigError("a target is needed: --endpoint URL, --region R, or --embedded")
        endpoint = region_endpoint(region)
    return Target(
        endpoint=endpoint,
        project_id=r.get("project_id", str, "") or r.static_auth.project_id or "",
        instance_id=r.get("instance_id", str, ""),
        engine=resolve_engine(r),
    )


def resolve_credentials(r: Resolver) -> Credentials:
    """The run's starting credentials (see ``resolve_auth`` for their refresher)."""
    return r.auth.credentials


def resolve_auth(r: Resolver) -> credentials.Auth:
    """Credentials, where they came from, and (ECS metadata) the refresher to run beside the
    Sender: ``refresher.run(sender.set_credentials)``."""
    return r.auth


def resolve_metrics_addr(r: Resolver) -> str | None:
    """``--metrics-addr HOST:PORT``, its form checked now: a typo is one line before
    anything else happens (the port is bound by the run, before its first send)."""
    addr = r.get("metrics_addr", str, None)
    if addr is not None:
        from bulksend.metrics import parse_addr  # prometheus_client: only when asked for

        parse_addr(addr)
    return addr


def resolve_send_options(r: Resolver, **extra: Any) -> SendOptions:
    """SendOptions from this subcommand's options. The pool is send's --concurrency or
    load's --max-in-flight, and this process is made to allow that many connections
    (``ensure_open_files``) before anything is sent."""
    retry = RetryPolicy(
        max_retries=r.get("max_retries", int, 5),
        backoff_base=r.get("backoff_base", float, 0.2),
        backoff_max=r.get("backoff_max", float, 20.0),
    )
    tls = TLSOptions(
        insecure=r.get("insecure", to_bool, False), ca_bundle=r.get("ca_bundle", str, None)
    )
    pool = next((name for name in POOL_OPTIONS if r.has(name)), "concurrency")
    concurrency = r.get(pool, int, POOL_OPTIONS[pool])
    ensure_open_files(
        concurrency,
        embedded=r.get("embedded", to_bool, False),
        flag="--" + pool.replace("_", "-"),
    )
    return SendOptions(
        concurrency=concurrency,
        rate=r.get("rate", float, 0.0),
        timeout=r.get("timeout", float, 30.0),
        retry=retry,
        tls=tls,
        max_answer_bytes=r.get("max_answer_bytes", int, 1 << 20),
        outage_timeout=r.get("outage_timeout", float, 300.0),
        **extra,
    )


#: What --help says about credentials and options, for send and load. Table lines fit
#: 78 columns (argparse's width in an 80-column terminal).
_CREDENTIALS_HELP = """\
credentials, from the first source that has them (no flag takes a secret):
  HUAWEICLOUD_SDK_AK                AK/SK: every request is signed
  HUAWEICLOUD_SDK_SK                (also read: CLOUD_SDK_AK, CLOUD_SDK_SK)
  HUAWEICLOUD_SDK_SECURITY_TOKEN    the token of temporary AK/SK
  HUAWEICLOUD_SDK_AUTH_TOKEN        an IAM token, used when there is no AK/SK
  --config FILE.toml                its ak, sk, security_token, auth_token
  HUAWEICLOUD_SDK_CREDENTIALS_FILE  the SDK's credentials file, by default
                                    ~/.huaweicloud/credentials; section
                                    [basic]: ak, sk, security_token,
                                    project_id
  (on a Huawei Cloud ECS)           the metadata service's temporary AK/SK,
                                    renewed before they expire
                                    (BULKSEND_METADATA_URL=off: never asked)
  HUAWEICLOUD_SDK_PROJECT_ID        the project id when --project-id is absent

options: any flag may also be set as BULKSEND_<OPTION> (e.g. BULKSEND_MAX_RETRIES=3) \
or in --config FILE.toml (max_retries = 3; a [send] or [load] table applies to that \
subcommand only). Flags beat the environment, which beats the file.
"""

_EXIT_HELP = {
    "send": """\
exit codes:
  0    every record ok
  1    some record failed or was invalid
  2    usage, config, input, ledger or output error; authentication failed;
       target unreachable; --exactly-once without a usable ListMessages (one
       line on stderr, no traceback)
  130  interrupted (the first Ctrl-C drains, the second stops at once)
""",
    "load": """\
exit codes:
  0    every message ok and every threshold passed
  1    some message failed
  2    usage, config or output error; authentication failed; target
       unreachable (one line on stderr, no traceback)
  99   a threshold failed
  130  interrupted (the first Ctrl-C drains, the second stops at once)
""",
}


def help_epilog(command: str) -> str:
    """The end of ``bulksend send --help`` / ``load --help``: credentials, exit codes."""
    return f"{_CREDENTIALS_HELP}\n{_EXIT_HELP[command]}"
