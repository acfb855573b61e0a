"""Credentials as the official SDK finds them: environment, config file, the SDK's
credentials file, then the ECS metadata service (a stand-in on 127.0.0.1), refreshed
before they expire. The SDK itself reads the same file and the same stand-in as a check."""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from pathlib import Path

import anyio
import pytest

from bulksend import credentials
from bulksend.cli.options import Resolver, resolve_auth, resolve_target
from bulksend.config import Credentials
from bulksend.credentials import (
    METADATA_URL,
    CredentialRefresher,
    MetadataService,
    TemporaryCredentials,
    find_static,
    metadata_url,
    parse_security_key,
    read_credentials_file,
)
from bulksend.errors import ConfigError
from tests.cli_helpers import bulksend, no_traceback, read_jsonl, target, write_jsonl
from tests.metadata_standin import Issued, run_standin
from tests.serve_helpers import start_server_subprocess

FILE_AK, FILE_SK, FILE_TOKEN = "AKFROMFILE0001", "file-secret-sk-0001", "file-security-token"


def write_credentials(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


BASIC = (
    f"[basic]\nak = {FILE_AK}\nsk = {FILE_SK}\nsecurity_token = {FILE_TOKEN}\n"
    "project_id = file-project\n\n[global]\nak = AKGLOBAL\nsk = global-sk\ndomain_id = d\n"
)


def test_the_environment_wins_over_the_credentials_file(tmp_path: Path) -> None:
    path = write_credentials(tmp_path / "creds", BASIC)
    env = {
        "HUAWEICLOUD_SDK_AK": "AKENV",
        "HUAWEICLOUD_SDK_SK": "env-sk",
        "HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(path),
    }
    auth = find_static(env)
    assert (auth.source, auth.credentials.ak, auth.credentials.security_token) == (
        "environment",
        "AKENV",
        None,
    )
    # Taken whole: the file's token never rides with the environment's keys, nor its
    # project id (it belongs to the file's account).
    assert auth.project_id is None


def test_the_config_file_keys_come_before_the_sdk_file(tmp_path: Path) -> None:
    path = write_credentials(tmp_path / "creds", BASIC)
    auth = find_static(
        {"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(path)}, {"ak": "AKCONF", "sk": "conf-sk"}
    )
    assert (auth.source, auth.credentials.ak) == ("config file", "AKCONF")


def test_credentials_file_named_by_env_as_the_sdk_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_credentials(tmp_path / "creds", BASIC)
    auth = find_static({"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(path)})
    c = auth.credentials
    assert (auth.source, c.ak, c.sk, c.security_token, auth.project_id) == (
        "credentials file",
        FILE_AK,
        FILE_SK,
        FILE_TOKEN,
        "file-project",
    )
    # The official SDK's ProfileCredentialProvider, reading the same file, agrees.
    from huaweicloudsdkcore.auth.provider import ProfileCredentialProvider

    monkeypatch.setenv("HUAWEICLOUD_SDK_CREDENTIALS_FILE", str(path))
    sdk = ProfileCredentialProvider.get_basic().get_credentials()
    assert (sdk.ak, sdk.sk, sdk.security_token, sdk.project_id) == (
        c.ak,
        c.sk,
        c.security_token,
        auth.project_id,
    )


def test_default_credentials_file_is_under_home(tmp_path: Path) -> None:
    write_credentials(tmp_path / ".huaweicloud" / "credentials", BASIC)
    assert find_static({"HOME": str(tmp_path)}).credentials.ak == FILE_AK
    # No file there: no credentials, no error (as the SDK moves on).
    assert find_static({"HOME": str(tmp_path / "elsewhere")}).source == "none"
    # A file with only [global] keys has none for a project-scoped service.
    write_credentials(tmp_path / "g" / ".huaweicloud" / "credentials", "[global]\nak=a\nsk=b\n")
    assert find_static({"HOME": str(tmp_path / "g")}).source == "none"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[basic]\nak = AKONLY\n", "has ak but needs ak and sk"),
        ("[basic]\nsecurity_token = t\nsk = s\n", "needs ak and sk"),
        ("not an ini file, sk = secret-value\n", r"not an INI file \(line 1\)"),
        ("[basic]\nidp_id = i\nid_token_file = /f\n", "federated credentials"),
    ],
)
def test_a_broken_credentials_file_is_one_line_without_its_secrets(
    tmp_path: Path, body: str, message: str
) -> None:
    path = write_credentials(tmp_path / "creds", body)
    with pytest.raises(ConfigError, match=message) as caught:
        read_credentials_file(path)
    assert "secret-value" not in str(caught.value) and "\n" not in str(caught.value)


def test_a_named_credentials_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        find_static({"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(tmp_path / "nope")})


def test_a_byte_order_mark_is_not_a_section(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    path.write_bytes(b"\xef\xbb\xbf" + BASIC.encode())
    assert read_credentials_file(path)[0].ak == FILE_AK


def test_a_credentials_file_that_is_not_a_file_or_too_big_is_one_line(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes it: opening it would block the run for ever
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_credentials_file(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_credentials_file(Path("/dev/zero"))
    big = tmp_path / "big"
    big.write_bytes(b"[basic]\n" + b"# " + b"x" * credentials.MAX_CREDENTIALS_FILE_BYTES)
    with pytest.raises(ConfigError, match="is over 1,048,576 bytes"):
        read_credentials_file(big)


def test_a_world_writable_credentials_file_is_refused(tmp_path: Path) -> None:
    path = write_credentials(tmp_path / "creds", BASIC)
    path.chmod(0o666)
    with pytest.raises(ConfigError, match=r"writable by every user: chmod o-w") as caught:
        read_credentials_file(path)
    assert FILE_SK not in str(caught.value)
    path.chmod(0o640)  # readable by its group is the user's call
    assert read_credentials_file(path)[0].ak == FILE_AK


def test_percent_in_a_value_is_literal(tmp_path: Path) -> None:
    path = write_credentials(tmp_path / "creds", "[basic]\nak = AK%1\nsk = s%(x)s\n")
    assert read_credentials_file(path)[0].sk == "s%(x)s"


def _args(**kw: object) -> argparse.Namespace:
    names = ("endpoint", "region", "project_id", "instance_id", "engine", "embedded", "config")
    return argparse.Namespace(**{n: kw.get(n) for n in names})


def test_project_id_flag_then_env_then_credentials_file(tmp_path: Path) -> None:
    path = write_credentials(tmp_path / "creds", BASIC)
    env = {"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(path)}
    base = {"endpoint": "http://127.0.0.1:1", "instance_id": "i"}
    assert resolve_target(Resolver.build(_args(**base), env)).project_id == "file-project"
    env_p = {**env, "HUAWEICLOUD_SDK_PROJECT_ID": "env-project"}
    assert resolve_target(Resolver.build(_args(**base), env_p)).project_id == "env-project"
    flag = _args(**base, project_id="flag-project")
    assert resolve_target(Resolver.build(flag, env_p)).project_id == "flag-project"


# ---- the metadata service ------------------------------------------------------------


def rotating(lifetime_s: float = 24 * 3600, now: float | None = None) -> Issued:
    return Issued(
        "AKTEMP", "temp-secret-sk", "temp-security-token", (now or time.time()) + lifetime_s
    )


def test_metadata_credentials_match_what_the_sdk_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    expires = time.time() + 3600
    with run_standin(lambda n: Issued(f"AKTEMP{n}", f"sk-{n}", f"token-{n}", expires)) as standin:
        got = MetadataService(standin.url).fetch()
        assert (got.credentials.ak, got.credentials.sk, got.credentials.security_token) == (
            "AKTEMP0",
            "sk-0",
            "token-0",
        )
        assert got.expires_at == pytest.approx(expires, abs=1e-3)
        # The session-token handshake, as the SDK does it.
        (put, _, put_headers), (get, _, get_headers) = standin.seen
        assert (put, put_headers["X-Metadata-Token-Ttl-Seconds"]) == ("PUT", "21600")
        assert get == "GET" and get_headers["X-Metadata-Token"] in standin.valid_tokens

        from huaweicloudsdkcore.auth.internal import MetadataAccessor

        for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(proxy, raising=False)
        monkeypatch.setattr(MetadataAccessor, "_METADATA_ENDPOINT", standin.url)
        sdk = MetadataAccessor().get_credential()
        assert (sdk.access, sdk.secret, sdk.security_token) == ("AKTEMP1", "sk-1", "token-1")


def test_metadata_without_session_tokens_and_with_an_expired_one() -> None:
    with run_standin(lambda n: rotating(), tokens="v1") as standin:
        assert MetadataService(standin.url).fetch().credentials.ak == "AKTEMP"
        assert "X-Metadata-Token" not in standin.seen[-1][2]
    with run_standin(lambda n: rotating(), script=["expire-tokens"]) as standin:
        assert MetadataService(standin.url).fetch().credentials.ak == "AKTEMP"
        # PUT, GET (401), PUT again, GET.
        assert [m for m, _, _ in standin.seen] == ["PUT", "GET", "PUT", "GET"]


@pytest.mark.parametrize(
    ("script", "message"),
    [(["no-agency"], "no agency"), ([500], "HTTP 500"), ([404], "HTTP 404")],
)
def test_metadata_failures_are_one_line(script: list[object], message: str) -> None:
    with (
        run_standin(lambda n: rotating(), script=script) as standin,
        pytest.raises(ConfigError, match=message) as caught,
    ):
        MetadataService(standin.url).fetch()
    assert "\n" not in str(caught.value)


def test_metadata_credentials_already_expired_are_refused() -> None:
    with (
        run_standin(lambda n: rotating(lifetime_s=-100)) as standin,
        pytest.raises(ConfigError, match=r"gave credentials that expired 10\d s ago") as caught,
    ):
        MetadataService(standin.url).fetch()
    assert "temp-secret-sk" not in str(caught.value)


def test_metadata_that_trickles_its_answer_stops_at_the_deadline() -> None:
    """A byte every 0.3 s: each read is within urllib's timeout, the exchange never ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 9999\r\n\r\n" + b"x" * 9999:
                if stop.wait(0.3):
                    return
                conn.sendall(bytes([byte]))

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(ConfigError, match=r"did not answer within 1 s"):
            MetadataService(url, deadline_s=1).fetch()
    finally:
        stop.set()
        listener.close()
        feeder.join(timeout=5)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ak", "ключ"),
        ("sk", "secret with space"),
        ("security_token", "TOK\r\nX-Evil: 1"),
        ("auth_token", "T\nX: y"),
    ],
)
def test_a_credential_no_cloud_issues_is_refused_without_quoting_it(field: str, value: str) -> None:
    pair = {} if field in ("ak", "sk") else {"ak": "AK", "sk": "SK"}
    other = {"ak": {"sk": "SK"}, "sk": {"ak": "AK"}}.get(field, {})
    with pytest.raises(ConfigError, match="holds a character no credential has") as caught:
        Credentials(**{**pair, **other, field: value})
    assert value not in str(caught.value) and "\n" not in str(caught.value)


def test_a_header_breaking_token_from_the_environment_stops_the_run(tmp_path: Path) -> None:
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": "b"}] * 3)
    env = {
        "HUAWEICLOUD_SDK_AK": "AKTEST",
        "HUAWEICLOUD_SDK_SK": "sk-test",
        "HUAWEICLOUD_SDK_SECURITY_TOKEN": "TOK\r\nX-Evil: 1",
    }
    with start_server_subprocess() as (_, url):
        proc = bulksend(
            "send", str(inputs), *target(url), "--out", str(tmp_path / "o.jsonl"), env=env
        )
    assert proc.returncode == 2 and no_traceback(proc), proc.stderr
    assert proc.stderr == (
        "bulksend: error: the security token holds a character no credential has (a space,"
        " a control character or non-ASCII): check how it was set\n"
    )
    assert not (tmp_path / "o.jsonl").exists()


def test_metadata_that_does_not_answer_is_one_line() -> None:
    with run_standin(lambda n: rotating()) as standin:
        url = standin.url  # closed on leaving: nothing listens there now
    with pytest.raises(ConfigError, match="did not answer"):
        MetadataService(url, timeout_s=2).fetch()


@pytest.mark.parametrize(
    "body",
    [
        b"not json temp-secret-sk",
        b'{"credential": {"access": "A", "secret": "temp-secret-sk"}}',
        b'{"credential": {"access": "A", "secret": "temp-secret-sk", "securitytoken": "t",'
        b' "expires_at": "tomorrow"}}',
    ],
)
def test_a_bad_security_key_answer_never_quotes_it(body: bytes) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_security_key(body)
    assert "temp-secret-sk" not in str(caught.value)


def test_the_sdk_spellings_of_the_answer_are_read() -> None:
    body = (
        b'{"credentials": {"accessKeyId": "A", "secretAccessKey": "S", "securityToken": "T",'
        b' "expiration": "2030-01-02T03:04:05.000000Z"}}'
    )
    got = parse_security_key(body)
    assert (got.credentials.ak, got.credentials.sk, got.credentials.security_token) == (
        "A",
        "S",
        "T",
    )
    assert got.expires_at == 1893553445.0


# ---- when the metadata service is asked at all ---------------------------------------


def test_the_metadata_address_is_asked_only_when_it_should_be(tmp_path: Path) -> None:
    tag = tmp_path / "chassis_asset_tag"
    tag.write_text("HUAWEICLOUD\n")
    other = tmp_path / "other_tag"
    other.write_text("OpenStack Nova\n")
    outside_tests: dict[str, str] = {}
    assert metadata_url(outside_tests, str(tag)) == METADATA_URL
    assert metadata_url(outside_tests, str(other)) is None
    assert metadata_url(outside_tests, str(tmp_path / "missing")) is None
    # The test run itself never asks the real address, even on an ECS (conftest.py).
    assert metadata_url(dict(os.environ), str(tag)) is None
    assert metadata_url({"BULKSEND_METADATA_URL": "http://127.0.0.1:9/"}, str(tag)) == (
        "http://127.0.0.1:9"
    )
    assert metadata_url({"BULKSEND_METADATA_URL": "off"}, str(tag)) is None
    with pytest.raises(ConfigError, match="BULKSEND_METADATA_URL"):
        metadata_url({"BULKSEND_METADATA_URL": "169.254.169.254"})


def test_metadata_is_asked_only_when_nothing_else_gave_credentials(tmp_path: Path) -> None:
    creds_file = write_credentials(tmp_path / "creds", BASIC)
    remote = {"endpoint": "http://127.0.0.1:1", "project_id": "p", "instance_id": "i"}
    with run_standin(lambda n: rotating()) as standin:
        env = {"BULKSEND_METADATA_URL": standin.url, "HOME": str(tmp_path / "home")}
        cases = [
            ({"HUAWEICLOUD_SDK_AK": "AK", "HUAWEICLOUD_SDK_SK": "SK"}, remote, "environment"),
            ({"HUAWEICLOUD_SDK_AUTH_TOKEN": "iam"}, remote, "environment"),
            ({"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(creds_file)}, remote, "credentials file"),
            ({}, {**remote, "embedded": True}, "none"),
        ]
        for extra, flags, source in cases:
            auth = resolve_auth(Resolver.build(_args(**flags), {**env, **extra}))
            assert (auth.source, auth.refresher) == (source, None)
        assert standin.seen == []

        auth = resolve_auth(Resolver.build(_args(**remote), env))
        assert (auth.source, auth.credentials.ak) == ("ECS metadata", "AKTEMP")
        assert auth.refresher is not None and standin.security_key_requests() == 1


def test_no_credentials_from_an_asked_metadata_service_stops_with_a_hint() -> None:
    with (
        run_standin(lambda n: rotating(), script=["no-agency"]) as standin,
        pytest.raises(ConfigError, match="BULKSEND_METADATA_URL=off") as caught,
    ):
        credentials.with_metadata(find_static({}), {"BULKSEND_METADATA_URL": standin.url})
    assert "agency" in str(caught.value)


# ---- the refresher -------------------------------------------------------------------


class FakeClock:
    """Wall-clock time that moves only when the refresher sleeps."""

    def __init__(self) -> None:
        self.t = 1_800_000_000.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        assert len(self.sleeps) < 500, "the refresher does not settle"
        self.sleeps.append(seconds)
        self.t += seconds
        await anyio.lowlevel.checkpoint()


async def refresh(
    refresher: CredentialRefresher, changes: int
) -> tuple[list[tuple[float, Credentials]], list[str]]:
    """Run the refresher until it has handed over ``changes`` new credentials."""
    seen: list[tuple[float, Credentials]] = []
    errors: list[str] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            def on_change(c: Credentials) -> None:
                seen.append((refresher._now(), c))
                if len(seen) == changes:
                    tg.cancel_scope.cancel()

            tg.start_soon(lambda: refresher.run(on_change, on_error=errors.append))
    return seen, errors


async def test_refreshes_before_expiry_with_what_the_service_hands_out() -> None:
    clock = FakeClock()
    hour = 3600.0

    def issue(n: int) -> Issued:
        return Issued(f"AK{n}", f"sk-{n}", f"token-{n}", clock.t + hour)

    with run_standin(issue) as standin:
        service = MetadataService(standin.url)
        first = service.fetch()
        refresher = CredentialRefresher(service, first, now=clock.now, sleep=clock.sleep)
        seen, errors = await refresh(refresher, 2)
    # Lifetime 1 h: renewed half-way (the 40 min margin is more than half of it), each
    # time before the credentials in use expire, and with what the service handed out.
    start = 1_800_000_000.0
    assert [(at - start, c.ak, c.sk, c.security_token) for at, c in seen] == [
        (1800.0, "AK1", "sk-1", "token-1"),
        (3600.0, "AK2", "sk-2", "token-2"),
    ]
    assert errors == []
    assert refresher.current.credentials.ak == "AK2"


async def test_a_long_lifetime_refreshes_40_minutes_before_expiry() -> None:
    clock = FakeClock()
    day = 24 * 3600.0

    def issue(n: int) -> Issued:
        return Issued(f"AK{n}", "sk", "token", clock.t + day)

    with run_standin(issue) as standin:
        service = MetadataService(standin.url)
        refresher = CredentialRefresher(service, service.fetch(), now=clock.now, sleep=clock.sleep)
        seen, _ = await refresh(refresher, 1)
    assert seen[0][0] - 1_800_000_000.0 == day - 40 * 60
    # It slept in steps of at most 10 min, looking at the wall clock in between.
    assert max(clock.sleeps) == credentials.MAX_SLEEP_S


async def test_failures_back_off_and_the_old_credentials_stay_until_new_ones_come() -> None:
    clock = FakeClock()
    with run_standin(lambda n: Issued(f"AK{n}", "sk", "token", clock.t + 3600)) as standin:
        service = MetadataService(standin.url)
        refresher = CredentialRefresher(service, service.fetch(), now=clock.now, sleep=clock.sleep)
        standin.script.extend([500, 503, 500])
        seen, errors = await refresh(refresher, 1)
    # Ten-minute steps to the due time (half of 1 h), then 1, 2, 4 s after the failures.
    assert clock.sleeps[:6] == [600.0, 600.0, 600.0, 1.0, 2.0, 4.0]
    assert [c.ak for _, c in seen] == ["AK1"]
    assert len(errors) == 3 and all("HTTP 50" in e and "expire in" in e for e in errors)


async def test_credentials_not_renewed_yet_are_asked_again_quietly() -> None:
    clock = FakeClock()
    first_expiry = clock.t + 3600

    def issue(n: int) -> Issued:
        # The service renews on its own schedule: the first three answers repeat the key.
        return (
            Issued("AK0", "sk", "token", first_expiry)
            if n < 3
            else Issued("AK1", "sk1", "t1", clock.t + 3600)
        )

    with run_standin(issue) as standin:
        service = MetadataService(standin.url)
        refresher = CredentialRefresher(service, service.fetch(), now=clock.now, sleep=clock.sleep)
        seen, errors = await refresh(refresher, 1)
    assert [c.ak for _, c in seen] == ["AK1"] and errors == []
    assert clock.sleeps[:5] == [600.0, 600.0, 600.0, 1.0, 2.0]


def test_temporary_credentials_never_show_their_secrets() -> None:
    temp = TemporaryCredentials(Credentials("AK", "temp-secret-sk", "temp-token"), 0.0)
    assert "temp-secret" not in repr(temp) and "temp-token" not in repr(temp)


# ---- end to end ----------------------------------------------------------------------


def test_send_signs_with_metadata_credentials(tmp_path: Path) -> None:
    """The CLI, with nothing in the environment or a file, takes the stand-in's temporary
    keys and signs with them; a server that verifies those keys accepts every record."""
    issued = rotating()
    server_env = {"HUAWEICLOUD_SDK_AK": issued.ak, "HUAWEICLOUD_SDK_SK": issued.sk}
    records = write_jsonl(
        tmp_path / "in.jsonl", [{"topic": "t", "body": f"m{i}"} for i in range(20)]
    )
    out = tmp_path / "out.jsonl"
    with (
        run_standin(lambda n: issued) as standin,
        start_server_subprocess(env=server_env) as (_, url),
    ):
        env = {"BULKSEND_METADATA_URL": standin.url, "HOME": str(tmp_path)}
        proc = bulksend("send", str(records), *target(url), "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in read_jsonl(out)] == ["ok"] * 20
    assert standin.security_key_requests() == 1
    for secret in (issued.sk, issued.token):
        assert secret not in proc.stderr + proc.stdout + out.read_text()


def test_send_signs_with_the_credentials_file(tmp_path: Path) -> None:
    path = write_credentials(tmp_path / "home" / ".huaweicloud" / "credentials", BASIC)
    server_env = {"HUAWEICLOUD_SDK_AK": FILE_AK, "HUAWEICLOUD_SDK_SK": FILE_SK}
    records = write_jsonl(
        tmp_path / "in.jsonl", [{"topic": "t", "body": f"m{i}"} for i in range(5)]
    )
    out = tmp_path / "out.jsonl"
    with start_server_subprocess(env=server_env) as (_, url):
        # No --project-id: the file's project_id is the project.
        args = ["--endpoint", url, "--instance-id", "i", "--out", str(out)]
        proc = bulksend("send", str(records), *args, env={"HOME": str(path.parent.parent)})
        wrong = write_credentials(tmp_path / "wrong", "[basic]\nak = AKWRONG\nsk = nope\n")
        refused = bulksend(
            "send",
            str(records),
            *args[:-1],
            str(tmp_path / "out2.jsonl"),
            "--project-id",
            "p",
            env={"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(wrong)},
        )
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in read_jsonl(out)] == ["ok"] * 5
    assert refused.returncode == 1 and {
        r["http_status"] for r in read_jsonl(tmp_path / "out2.jsonl")
    } == {401}


def test_send_without_any_credentials_from_an_asked_service_exits_2(tmp_path: Path) -> None:
    records = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": "m"}])
    with run_standin(lambda n: rotating(), script=["no-agency"]) as standin:
        proc = bulksend(
            "send",
            str(records),
            *target("http://127.0.0.1:1"),
            env={"BULKSEND_METADATA_URL": standin.url, "HOME": str(tmp_path)},
        )
    assert proc.returncode == 2 and no_traceback(proc)
    assert proc.stderr.count("\n") == 1 and "agency" in proc.stderr
