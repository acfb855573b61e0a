"""Options of ``send`` and ``load``: each subcommand reads only its own (flags, environment
and config file), every numeric one is checked in one place, regions come from a table,
--help names the credentials and the exit codes, and the open-files limit is checked
before the first send."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from bulksend.cli import build_parser, main
from bulksend.regions import DMS_ENDPOINTS
from tests.cli_helpers import bulksend, no_traceback, read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def one_error_line(err: str) -> str:
    """The single stderr line of a refused command."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bulksend: error: "), err
    return lines[0]


# ---- each subcommand reads its own options -------------------------------------------


def test_load_ignores_the_environment_of_options_it_does_not_have(tmp_path: Path) -> None:
    env = {"BULKSEND_CONCURRENCY": "0", "BULKSEND_FAILED": str(tmp_path / "f.jsonl")}
    proc = bulksend("load", "--embedded", "--rate", "40", "--duration", "0.5s", "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    # send has --concurrency: there the same variable is read, and refused by name.
    refused = bulksend("send", "-", "--embedded", env={"BULKSEND_CONCURRENCY": "0"}, stdin=b"")
    assert refused.returncode == 2
    assert "BULKSEND_CONCURRENCY: --concurrency must be" in one_error_line(refused.stderr)


@pytest.mark.parametrize("config", ["local.toml", "region.toml"])
@pytest.mark.parametrize("command", ["send", "load"])
def test_shipped_configs_build_both_jobs(config: str, command: str) -> None:
    from bulksend.cli import load as load_cli
    from bulksend.cli import send as send_cli

    path = str(CONFIGS / config)
    if command == "send":
        send = send_cli.build_job(build_parser().parse_args(["send", "in.jsonl", "--config", path]))
        assert send.target is not None and send.target.instance_id
        assert send.options.concurrency == {"local.toml": 64, "region.toml": 32}[config]
        assert send.options.retry.max_retries == {"local.toml": 5, "region.toml": 8}[config]
    else:
        args = ["load", "--config", path, "--rate", "10", "--duration", "1s"]
        load = load_cli.build_job(build_parser().parse_args(args))
        assert load.target is not None and load.target.instance_id
        assert load.options.concurrency == {"local.toml": 256, "region.toml": 128}[config]
        assert load.options.retry.max_retries == 0  # [send]'s max_retries is not load's


def test_shipped_local_config_runs_a_load(tmp_path: Path) -> None:
    """README: a load takes the target and settings from the same file as send."""
    args = ("load", "--config", str(CONFIGS / "local.toml"), "--embedded")
    proc = bulksend(*args, "--rate", "40", "--duration", "0.5s", "--quiet", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert len(read_jsonl(tmp_path / "load.jsonl")) == 20  # [load] out = "load.jsonl"
    assert not (tmp_path / "results.jsonl").exists()  # [send]'s out is not load's


def test_config_tables_apply_to_their_subcommand(tmp_path: Path) -> None:
    from bulksend.cli import load as load_cli
    from bulksend.cli import send as send_cli

    conf = tmp_path / "c.toml"
    conf.write_text(
        'endpoint = "http://127.0.0.1:9"\nproject_id = "p"\ninstance_id = "i"\ntimeout = 7\n'
        "failed = 'f.jsonl'\n[send]\nconcurrency = 9\ntimeout = 8\n[load]\nmax-in-flight = 11\n"
    )
    send = send_cli.build_job(build_parser().parse_args(["send", "x", "--config", str(conf)]))
    assert (send.options.concurrency, send.options.timeout, send.failed) == (9, 8.0, "f.jsonl")
    args = ["load", "--config", str(conf), "--rate", "1", "--duration", "1s"]
    load = load_cli.build_job(build_parser().parse_args(args))
    assert (load.options.concurrency, load.options.timeout) == (11, 7.0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("concurency = 3\n", "unknown option(s) concurency"),
        ("[load]\nmax_in_flght = 3\n", "unknown option(s) [load] max_in_flght"),
        ("[send]\nmax_in_flight = 3\n", "unknown option(s) [send] max_in_flight"),
        ("[serve]\nport = 1\n", "unknown table [serve]"),
    ],
)
def test_config_typos_are_one_line(tmp_path: Path, body: str, message: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(body)
    proc = bulksend("load", "--embedded", "--rate", "1", "--duration", "1s", "--config", str(conf))
    assert proc.returncode == 2 and message in one_error_line(proc.stderr)


# ---- numbers: one place, one line, exit 2 --------------------------------------------

SEND_FLAGS = [
    ("--timeout", "nan"),
    ("--timeout", "0"),
    ("--timeout", "inf"),
    ("--progress-interval", "nan"),
    ("--progress-interval", "0"),
    ("--progress-interval", "0.05"),
    ("--backoff-base", "nan"),
    ("--backoff-base", "-1"),
    ("--backoff-max", "inf"),
    ("--rate", "nan"),
    ("--rate", "-1"),
    ("--rate", "1e999"),
    ("--concurrency", "0"),
    ("--concurrency", "70000"),
    ("--max-retries", "-1"),
    ("--max-retries", "101"),
    ("--drain-timeout", "nan"),
]
LOAD_FLAGS = [
    ("--rate", "nan"),
    ("--max-in-flight", "0"),
    ("--body-size", "-1"),
    ("--body-size", "5000000"),
    ("--keys", "-1"),
    ("--timeout", "nan"),
    ("--progress-interval", "0"),
    ("--drain-timeout", "-1"),
    ("--backoff-base", "nan"),
    ("--max-retries", "-1"),
]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return one_error_line(err)


@pytest.mark.parametrize(("flag", "value"), SEND_FLAGS)
def test_send_numbers_from_flags(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(["send", "in.jsonl", "--embedded", flag, value], capsys)
    assert line.startswith(f"bulksend: error: {flag} must be") and ", got " in line


@pytest.mark.parametrize(("flag", "value"), LOAD_FLAGS)
def test_load_numbers_from_flags(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["load", "--embedded", "--duration", "1s", flag, value]
    if flag != "--rate":
        argv += ["--rate", "10"]
    assert f"{flag} must be" in _refused(argv, capsys)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BULKSEND_TIMEOUT", "nan", "BULKSEND_TIMEOUT: --timeout must be a number > 0"),
        ("BULKSEND_PROGRESS_INTERVAL", "0", "BULKSEND_PROGRESS_INTERVAL: --progress-interval"),
        ("BULKSEND_CONCURRENCY", "2.5", "BULKSEND_CONCURRENCY: --concurrency must be a whole"),
        ("BULKSEND_CONCURRENCY", "many", "got 'many'"),
        ("BULKSEND_RATE", "inf", "BULKSEND_RATE: --rate must be"),
    ],
)
def test_send_numbers_from_the_environment(
    variable: str,
    value: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    assert expected in _refused(["send", "in.jsonl", "--embedded"], capsys)


@pytest.mark.parametrize(
    ("command", "toml", "expected"),
    [
        ("send", "timeout = nan", "--timeout must be a number > 0"),
        ("load", "timeout = nan", "--timeout must be a number > 0"),
        ("send", "[send]\nconcurrency = 2.5", "--concurrency must be a whole number"),
        ("send", "rate = inf", "--rate must be"),
        ("load", "rate = inf", "--rate must be"),
        ("send", "progress_interval = 0", "--progress-interval must be a number >= 0.1"),
        ("load", "[load]\nprogress_interval = 0", "--progress-interval must be a number >= 0.1"),
        ("send", "max_retries = true", "--max-retries must be a whole number"),
        ("load", "[load]\nmax_in_flight = 0", "--max-in-flight must be"),
        ("load", "[load]\nbody_size = 1.5", "--body-size must be a whole number"),
    ],
)
def test_numbers_from_the_config_file(
    command: str, toml: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(toml + "\n")
    argv = {"send": ["send", "in.jsonl"], "load": ["load", "--duration", "1s"]}[command]
    if "rate" not in toml:
        argv += ["--rate", "10"] if command == "load" else []
    line = _refused([*argv, "--embedded", "--config", str(conf)], capsys)
    assert line.startswith(f"bulksend: error: --config {conf}: ") and expected in line


def test_a_nan_flag_is_one_line_not_a_traceback() -> None:
    """The reported cases, as a user runs them."""
    for flag in ("--timeout", "--progress-interval"):
        proc = bulksend("send", "-", "--embedded", flag, "nan", stdin=b'{"topic":"t","body":"b"}\n')
        assert proc.returncode == 2 and no_traceback(proc)
        assert f"{flag} must be" in one_error_line(proc.stderr)


# ---- regions -------------------------------------------------------------------------


def test_region_table_is_the_sdks() -> None:
    from huaweicloudsdkrocketmq.v2.region.rocketmq_region import RocketMQRegion

    sdk = {rid: region.endpoints[0] for rid, region in RocketMQRegion.static_fields.items()}
    assert sdk == DMS_ENDPOINTS


def test_an_unknown_region_is_one_line_with_a_suggestion(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    records = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": "b"}] * 50)
    args = ("--project-id", "p", "--instance-id", "i", "--out", str(out))
    proc = bulksend("send", str(records), "--region", "cn-nort-4", *args)
    assert proc.returncode == 2 and no_traceback(proc)
    line = one_error_line(proc.stderr)
    assert "unknown region 'cn-nort-4' (did you mean cn-north-4?)" in line and "--endpoint" in line
    assert not out.exists() or out.read_text() == ""
    env_typo = bulksend("send", str(records), *args, env={"HUAWEICLOUD_SDK_REGION": "eu-west-11"})
    assert env_typo.returncode == 2 and "did you mean eu-west-1" in one_error_line(env_typo.stderr)


# ---- help ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["send", "load"])
def test_help_names_credentials_and_exit_codes(command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bulksend", command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
        timeout=60,
    )
    assert proc.returncode == 0
    text = proc.stdout
    for name in (
        "HUAWEICLOUD_SDK_AK",
        "HUAWEICLOUD_SDK_SK",
        "HUAWEICLOUD_SDK_SECURITY_TOKEN",
        "HUAWEICLOUD_SDK_AUTH_TOKEN",
        "HUAWEICLOUD_SDK_CREDENTIALS_FILE",
        "HUAWEICLOUD_SDK_PROJECT_ID",
        "BULKSEND_METADATA_URL",
        "BULKSEND_<OPTION>",
        "exit codes:",
        "  130  interrupted",
    ):
        assert name in text, name
    assert ("  99   a threshold failed" in text) == (command == "load")
    assert max(len(line) for line in text.splitlines()) <= 80


# ---- open files ----------------------------------------------------------------------


#: Runs bulksend under a lowered RLIMIT_NOFILE, as ``ulimit -n`` in a shell would.
_LIMITED = (
    "import resource, sys; from bulksend.cli import main; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "sys.exit(main(sys.argv[3:]))"
)


def _send_limited(
    tmp_path: Path, soft: int, hard: int, *flags: str, records: int = 1
) -> subprocess.CompletedProcess[str]:
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"topic": "t", "body": f"m{i}"} for i in range(records)]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKSEND_")}
    argv = ["send", str(src), "--embedded", "--quiet", *flags]
    return subprocess.run(
        [sys.executable, "-c", _LIMITED, str(soft), str(hard), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=REPO,
    )


def test_concurrency_over_the_hard_open_files_limit_is_refused_up_front(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = _send_limited(tmp_path, 256, 256, "--concurrency", "5000", "--out", str(out))
    assert proc.returncode == 2 and no_traceback(proc)
    line = one_error_line(proc.stderr)
    assert "--concurrency 5,000 needs about 10,064 open files" in line
    assert "at most 256" in line and "ulimit -n 10064" in line
    assert not out.exists() or out.read_text() == ""


def test_the_soft_open_files_limit_is_raised_toward_the_hard_one(tmp_path: Path) -> None:
    """600 connections, each end in this process (--embedded): 1,200 sockets under a soft
    limit of 256. Without raising it, records fail "Too many open files"."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"this machine's hard RLIMIT_NOFILE is {hard}: the test needs 2,048")
    out = tmp_path / "out.jsonl"
    proc = _send_limited(
        tmp_path, 256, 4096, "--concurrency", "600", "--out", str(out), records=3000
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = read_jsonl(out)
    assert len(results) == 3000 and {r["status"] for r in results} == {"ok"}
