"""Flags shared by ``send`` and ``load``, and their resolution into config objects.

Precedence, lowest first: defaults < ``--config FILE.toml`` < environment < flags. Every
option can come from the file (``max_retries = 3``) or the environment
(``BULKSEND_MAX_RETRIES=3``); the SDK's own variables are read for the project id and,
only from the environment or the file, for secrets (no flag ever takes a secret).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from bulksend.config import (
    ENGINES,
    ENV_PROJECT_ID,
    Credentials,
    RetryPolicy,
    SendOptions,
    Target,
    TLSOptions,
    load_toml,
    region_endpoint,
)
from bulksend.errors import ConfigError

T = TypeVar("T")

#: Environment variables read beside BULKSEND_<OPTION> for some options.
_EXTRA_ENV = {"project_id": (ENV_PROJECT_ID,), "region": ("HUAWEICLOUD_SDK_REGION",)}
#: Keys a config file may hold that are not flags.
_SECRET_KEYS = {"ak", "sk", "security_token", "auth_token"}


def add_target_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--endpoint", help="base URL, e.g. https://dms.cn-north-4.myhuaweicloud.com")
    g.add_argument(
        "--region", help="region id; the endpoint becomes https://dms.REGION.myhuaweicloud.com"
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
        "--backoff-max", type=float, metavar="S", help="backoff cap, seconds (default 20)"
    )
    g.add_argument(
        "--max-answer-bytes",
        type=int,
        metavar="N",
        help="an answer larger than this fails ANSWER_TOO_LARGE (default 1048576)",
    )


@dataclass(frozen=True)
class Resolver:
    """Looks an option up in flags, then environment, then config file."""

    args: argparse.Namespace
    env: Mapping[str, str]
    file: Mapping[str, Any]

    @classmethod
    def build(cls, args: argparse.Namespace, env: Mapping[str, str]) -> Resolver:
        path = getattr(args, "config", None) or env.get("BULKSEND_CONFIG")
        file = load_toml(path) if path else {}
        known = set(vars(args)) | _SECRET_KEYS
        unknown = sorted(set(file) - known)
        if unknown:
            raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        return cls(args, env, file)

    def get(self, name: str, conv: Callable[[Any], T], default: T) -> T:
        value = getattr(self.args, name, None)
        if value is not None:
            return value  # type: ignore[no-any-return]  # argparse already converted it
        for env_name in (f"BULKSEND_{name.upper()}", *_EXTRA_ENV.get(name, ())):
            if self.env.get(env_name):
                return self._convert(name, conv, self.env[env_name], env_name)
        if name in self.file:
            return self._convert(name, conv, self.file[name], "--config")
        return default

    @staticmethod
    def _convert(name: str, conv: Callable[[Any], T], raw: Any, origin: str) -> T:
        try:
            return conv(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{origin}: {name} = {raw!r} is not valid") from None


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
    endpoint = r.get("endpoint", str, "")
    region = r.get("region", str, "")
    if not endpoint:
        if not region:
            raise ConfigError("a target is needed: --endpoint URL, --region R, or --embedded")
        endpoint = region_endpoint(region)
    return Target(
        endpoint=endpoint,
        project_id=r.get("project_id", str, ""),
        instance_id=r.get("instance_id", str, ""),
        engine=resolve_engine(r),
    )


def resolve_credentials(r: Resolver) -> Credentials:
    return Credentials.from_env(r.env, r.file)


def resolve_send_options(r: Resolver, **extra: Any) -> SendOptions:
    retry = RetryPolicy(
        max_retries=r.get("max_retries", int, 5),
        backoff_base=r.get("backoff_base", float, 0.2),
        backoff_max=r.get("backoff_max", float, 20.0),
    )
    tls = TLSOptions(
        insecure=r.get("insecure", to_bool, False), ca_bundle=r.get("ca_bundle", str, None)
    )
    return SendOptions(
        concurrency=r.get("concurrency", int, 64),
        rate=r.get("rate", float, 0.0),
        timeout=r.get("timeout", float, 30.0),
        retry=retry,
        tls=tls,
        max_answer_bytes=r.get("max_answer_bytes", int, 1 << 20),
        **extra,
    )
