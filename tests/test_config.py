"""Config value objects: region endpoints, target paths, credentials and precedence."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bulksend.cli.options import Resolver, resolve_credentials, resolve_send_options, resolve_target
from bulksend.config import Credentials, Target
from bulksend.errors import ConfigError
from bulksend.regions import region_endpoint


@pytest.mark.parametrize(
    ("region", "endpoint"),
    [
        ("cn-north-4", "https://dms.cn-north-4.myhuaweicloud.com"),
        ("ap-southeast-1", "https://dms.ap-southeast-1.myhuaweicloud.com"),
        ("eu-west-101", "https://dms.eu-west-101.myhuaweicloud.eu"),
    ],
)
def test_region_endpoint(region: str, endpoint: str) -> None:
    assert region_endpoint(region) == endpoint


def test_target_path_quotes_parameters_and_keeps_the_engine_alias() -> None:
    t = Target("https://dms.example.com/", "p/1", "inst?ance", engine="reliability")
    assert t.path == "/v2/reliability/p%2F1/instances/inst%3Fance/messages"
    assert t.url == "https://dms.example.com/v2/reliability/p%2F1/instances/inst%3Fance/messages"
    with pytest.raises(ConfigError, match="engine"):
        Target("https://x", "p", "i", engine="kafka")


@pytest.mark.parametrize(
    "bad",
    ["p\r\nX-Injected: 1", "p q", "p\u00e9", "p\x00"],
    ids=["crlf", "space", "e-acute", "nul"],
)
def test_ids_a_request_head_cannot_carry_are_refused(bad: str) -> None:
    # The project id is also the X-Project-Id header: a CR/LF in it added headers of its
    # own to every request. The message names the id, never quotes it.
    with pytest.raises(ConfigError, match="project id") as caught:
        Target("https://x", bad, "i")
    assert bad not in str(caught.value)
    with pytest.raises(ConfigError, match="instance id"):
        Target("https://x", "p", bad)


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("http://[::1", "IPv6"),
        ("http://127.0.0.1:99999", "port"),
        ("http://127.0.0.1:-1", "port"),
        ("http://127.0.0.1:x", "port"),
    ],
)
def test_an_endpoint_that_cannot_be_parsed_is_a_config_error(endpoint: str, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?i)--endpoint .*{why}"):
        Target(endpoint, "p", "i")


def test_credentials_never_show_secrets_and_prefer_the_sdk_names() -> None:
    env = {
        "HUAWEICLOUD_SDK_AK": "ak1",
        "CLOUD_SDK_AK": "ak2",
        "CLOUD_SDK_SK": "sk-secret",
        "HUAWEICLOUD_SDK_SECURITY_TOKEN": "tok-secret",
    }
    c = Credentials.from_env(env, {"ak": "from-file", "auth_token": "iam-secret"})
    assert (c.ak, c.sk, c.security_token, c.mode) == ("ak1", "sk-secret", "tok-secret", "aksk")
    assert "secret" not in repr(c) and "secret" not in str(c)
    assert Credentials.from_env({}, {"auth_token": "iam"}).mode == "token"
    assert Credentials.from_env({}).mode == "none"
    with pytest.raises(ConfigError, match="together"):
        Credentials(ak="only-ak")


def _args(**kw: object) -> argparse.Namespace:
    names = (
        "endpoint",
        "region",
        "project_id",
        "instance_id",
        "engine",
        "config",
        "concurrency",
        "rate",
        "max_retries",
        "timeout",
        "backoff_base",
        "backoff_max",
        "insecure",
        "ca_bundle",
    )
    return argparse.Namespace(**{n: kw.get(n) for n in names})


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[bulksend]\nregion = "cn-north-4"\nproject-id = "file-p"\ninstance_id = "file-i"\n'
        'concurrency = 8\nmax_retries = 1\nsk = "file-sk"\nak = "file-ak"\n'
    )
    env = {
        "BULKSEND_CONCURRENCY": "16",
        "HUAWEICLOUD_SDK_PROJECT_ID": "env-p",
        "HUAWEICLOUD_SDK_SK": "env-sk",
        "HUAWEICLOUD_SDK_AK": "env-ak",
    }
    r = Resolver.build(_args(config=str(conf), instance_id="flag-i"), env)
    t = resolve_target(r)
    assert (t.endpoint, t.project_id, t.instance_id) == (
        "https://dms.cn-north-4.myhuaweicloud.com",
        "env-p",
        "flag-i",
    )
    opts = resolve_send_options(r)
    assert (opts.concurrency, opts.retry.max_retries, opts.timeout) == (16, 1, 30.0)
    assert resolve_credentials(r).sk == "env-sk"
    assert resolve_credentials(Resolver.build(_args(config=str(conf)), {})).sk == "file-sk"


def test_config_file_errors_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("concurrency = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Resolver.build(_args(config=str(bad)), {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("concurency = 3\n")
    with pytest.raises(ConfigError, match="unknown option"):
        Resolver.build(_args(config=str(unknown)), {})
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('concurrency = "many"\n')
    with pytest.raises(ConfigError, match="concurrency"):
        resolve_send_options(Resolver.build(_args(config=str(wrong)), {}))
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\nconcurrency = 3\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Resolver.build(_args(config=str(latin)), {})
    with pytest.raises(ConfigError, match="not a regular file"):
        Resolver.build(_args(config="/dev/zero"), {})  # was read without end
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (2 << 20) + b"\n")
    with pytest.raises(ConfigError, match="larger than"):
        Resolver.build(_args(config=str(huge)), {})
    number = tmp_path / "number.toml"
    number.write_text("ca_bundle = 5\n")  # a path given as a number: a file named 5
    with pytest.raises(ConfigError, match="--ca-bundle"):
        resolve_send_options(Resolver.build(_args(config=str(number)), {}))


@pytest.mark.parametrize("name", ["local.toml", "region.toml"])
def test_shipped_config_examples_load(name: str) -> None:
    from bulksend.cli import build_parser
    from bulksend.cli.send import build_job

    path = Path(__file__).resolve().parent.parent / "configs" / name
    job = build_job(build_parser().parse_args(["send", "in.jsonl", "--config", str(path)]))
    assert job.target is not None and job.target.instance_id and job.options.concurrency > 0
