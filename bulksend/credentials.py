"""Where credentials come from, in the official SDK's order, and keeping them fresh.

The first source that holds credentials wins, and is taken whole::

    1. the environment    HUAWEICLOUD_SDK_AK + HUAWEICLOUD_SDK_SK (or CLOUD_SDK_AK/SK), with
                          HUAWEICLOUD_SDK_SECURITY_TOKEN; or HUAWEICLOUD_SDK_AUTH_TOKEN
    2. --config FILE.toml its ak / sk / security_token / auth_token keys (bulksend's own;
                          below the environment, as every option of the file is)
    3. the SDK's file     HUAWEICLOUD_SDK_CREDENTIALS_FILE, else ~/.huaweicloud/credentials:
                          INI, section [basic], keys ak, sk, security_token, project_id
    4. ECS metadata       the temporary AK/SK and security token an agency grants the ECS,
                          refreshed before they expire (``CredentialRefresher``)

Steps 1–3 read no network (``find_static``); step 4 (``with_metadata``) runs only when they
gave nothing, for a target that is not the built-in server, and where ``metadata_url``
says to ask. The project id the file gives counts as the project id when neither
``--project-id`` nor HUAWEICLOUD_SDK_PROJECT_ID (nor the config file) gives one.

Read from huaweicloudsdkcore 3.1.219 (``auth/provider.py``, ``auth/internal.py``) and
matched: the file's path, section and keys; the metadata paths, the session token
(``PUT /meta-data/latest/api/token`` with ``X-Metadata-Token-Ttl-Seconds``, answered 404/
405/503 where tokens are not in use, a new one on a 401 that is not "configure an agency"),
the answer's field names and its ``expires_at`` format. Where bulksend differs, on purpose:

- The SDK asks 169.254.169.254 on any machine, waiting out its 3 s timeouts off the cloud;
  bulksend asks it only on a Huawei Cloud ECS, known from the DMI chassis asset tag
  ``HUAWEICLOUD`` as cloud-init knows it, or where BULKSEND_METADATA_URL names a service.
- A credentials file named by HUAWEICLOUD_SDK_CREDENTIALS_FILE that cannot be read, a file
  that is not INI, a [basic] section with an AK and no SK: one-line errors, where the SDK
  moves on to the next source and the mistake goes unseen. ``%`` in a value is literal
  (the SDK's parser would interpolate it and fail).
- The SDK's OIDC, federation (idp_id / id_token_file) and CCE pod-identity sources are not
  supported; credentials from the metadata service that are not renewed yet are asked for
  again with backoff (the SDK asks on every request until they are).
- The metadata service is asked directly, never through HTTPS_PROXY/HTTP_PROXY: it is a
  link-local address that no proxy can reach.
"""

from __future__ import annotations

import configparser
import datetime
import http.client
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import orjson

from bulksend.config import Credentials
from bulksend.errors import ConfigError

ENV_CREDENTIALS_FILE = "HUAWEICLOUD_SDK_CREDENTIALS_FILE"
#: ``~/.huaweicloud/credentials``, below HOME as the SDK finds it.
DEFAULT_CREDENTIALS_FILE = (".huaweicloud", "credentials")
CREDENTIALS_SECTION = "basic"
#: A credentials file is a few lines; anything longer is something else.
MAX_CREDENTIALS_FILE_BYTES = 1 << 20

ENV_METADATA_URL = "BULKSEND_METADATA_URL"
METADATA_URL = "http://169.254.169.254"
TOKEN_PATH = "/meta-data/latest/api/token"
SECURITY_KEY_PATH = "/openstack/latest/securitykey"
#: The session token's lifetime the SDK asks for (6 h).
TOKEN_TTL_S = 6 * 60 * 60
#: The SDK's per-request timeout to the metadata service (connect and read, 3 s each).
METADATA_TIMEOUT_S = 3.0
#: bulksend's bound on the whole exchange (two or four requests); the SDK has none.
METADATA_DEADLINE_S = 10.0
#: The answer to a 401 when the ECS has no agency: asking again will not help.
NO_AGENCY = "Please configure Cloud Service Agency first"
#: A security-key answer is a few KB; more than this is not one.
MAX_ANSWER_BYTES = 64 * 1024

#: cloud-init's test for Huawei Cloud (DataSourceOpenStack, DMI_ASSET_TAG_HUAWEICLOUD).
DMI_ASSET_TAG_PATH = "/sys/class/dmi/id/chassis_asset_tag"
HUAWEICLOUD_ASSET_TAG = "HUAWEICLOUD"

#: Refresh this long before the credentials expire: the SDK's threshold (40 min), or half
#: their lifetime when that is shorter.
REFRESH_MARGIN_S = 40 * 60
#: Backoff between failed (or not yet renewed) refreshes: 1, 2, 4 ... capped at 60 s. No
#: jitter: one process asking its own host's metadata service makes no herd.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
#: The refresher looks at the wall clock at least this often: after a host suspend a long
#: sleep wakes late, and the expiry is a wall-clock time.
MAX_SLEEP_S = 600.0


@dataclass(frozen=True, slots=True)
class TemporaryCredentials:
    """Credentials that stop working at ``expires_at`` (seconds since the epoch)."""

    credentials: Credentials
    expires_at: float


@dataclass(frozen=True, slots=True)
class Auth:
    """The credentials a run starts with, where they came from, and what keeps them fresh."""

    credentials: Credentials
    #: "environment", "config file", "credentials file", "ECS metadata" or "none".
    source: str
    #: The credentials file's project_id, if it has one.
    project_id: str | None = None
    #: Set when the credentials came from the metadata service: run it beside the Sender.
    refresher: CredentialRefresher | None = None


def find_static(env: Mapping[str, str], config: Mapping[str, Any] | None = None) -> Auth:
    """Steps 1–3: the environment, the config file's keys, the SDK's credentials file.
    Reads no network; ``source`` "none" when none of them holds credentials. ``project_id``
    is the credentials file's, when that file was read and has one."""
    from_env = Credentials.from_env(env)
    if from_env.mode != "none":
        return Auth(from_env, "environment")
    from_config = Credentials.from_env({}, config or {})
    if from_config.mode != "none":
        return Auth(from_config, "config file")
    # The file is read only now, as the SDK reads it only when the environment gave
    # nothing: its project_id belongs to its own keys (or to the ECS's, below).
    path, named = credentials_file(env)
    if path is None:
        return Auth(Credentials(), "none")
    credentials, project_id = read_credentials_file(path, named)
    source = "credentials file" if credentials.mode != "none" else "none"
    return Auth(credentials, source, project_id)


def with_metadata(found: Auth, env: Mapping[str, str]) -> Auth:
    """Step 4: when ``found`` holds nothing and the metadata service is to be asked, ask it
    (blocking, at most a few seconds) and return its credentials with a refresher.

    ConfigError (exit 2) when it was asked and gave none: a run that would sign nothing
    against a cloud endpoint only collects 401s.
    """
    if found.credentials.mode != "none":
        return found
    url = metadata_url(env)
    if url is None:
        return found
    service = MetadataService(url)
    try:
        current = service.fetch()
    except ConfigError as exc:
        raise ConfigError(
            f"no credentials: none in the environment (HUAWEICLOUD_SDK_AK/SK) or a "
            f"credentials file, and {exc}; set {ENV_METADATA_URL}=off to send unsigned"
        ) from None
    return Auth(
        current.credentials, "ECS metadata", found.project_id, CredentialRefresher(service, current)
    )


def credentials_file(env: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The SDK's credentials file path, and whether the environment named it."""
    named = env.get(ENV_CREDENTIALS_FILE)
    if named:
        return Path(named), True
    home = env.get("HOME")  # the SDK's get_home_path on Linux and macOS
    return (Path(home).joinpath(*DEFAULT_CREDENTIALS_FILE) if home else None), False


def read_credentials_file(path: Path, named: bool = True) -> tuple[Credentials, str | None]:
    """The [basic] section's credentials and project_id. A missing default file, or one
    without [basic] (it may hold only [global] ones), is no credentials; anything else
    wrong is a ConfigError that quotes no line of the file (a line may hold a secret)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        # Looked at before it is opened: a FIFO nobody writes would block the start for
        # ever, and /dev/zero would be read until memory runs out.
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"the credentials file {path} is not a regular file")
        if info.st_mode & stat.S_IWOTH:
            # Anyone on the host could put their keys in it and have this run sign with
            # them: refused, as ssh refuses a world-writable config.
            raise ConfigError(
                f"the credentials file {path} is writable by every user: chmod o-w {path}"
            )
        with path.open("rb") as fh:
            data = fh.read(MAX_CREDENTIALS_FILE_BYTES + 1)
        if len(data) > MAX_CREDENTIALS_FILE_BYTES:
            raise ConfigError(
                f"the credentials file {path} is over {MAX_CREDENTIALS_FILE_BYTES:,} bytes:"
                " not a credentials file"
            )
        # utf-8-sig: a byte-order mark (editors on Windows write one) is not a section.
        parser.read_string(data.decode("utf-8-sig"), source=str(path))
    except FileNotFoundError:
        if named:
            raise ConfigError(
                f"{ENV_CREDENTIALS_FILE} names {path}, which does not exist"
            ) from None
        return Credentials(), None
    except OSError as exc:
        raise ConfigError(
            f"cannot read the credentials file {path}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"the credentials file {path} is not UTF-8 text") from None
    except configparser.Error as exc:
        errors = getattr(exc, "errors", None)  # ParsingError: [(line number, line), ...]
        line = getattr(exc, "lineno", None) or (errors[0][0] if errors else None)
        at = f" (line {line})" if line else ""
        raise ConfigError(f"the credentials file {path} is not an INI file{at}") from None
    if not parser.has_section(CREDENTIALS_SECTION):
        return Credentials(), None
    section = parser[CREDENTIALS_SECTION]
    if section.get("idp_id") and not section.get("ak"):
        raise ConfigError(
            f"the credentials file {path}: federated credentials (idp_id, id_token_file) "
            "are not supported; give ak and sk"
        )
    ak, sk, token = (section.get(k, "").strip() or None for k in ("ak", "sk", "security_token"))
    if bool(ak) != bool(sk) or (token and not ak):
        has = ", ".join(k for k, v in (("ak", ak), ("sk", sk), ("security_token", token)) if v)
        raise ConfigError(
            f"the credentials file {path} [{CREDENTIALS_SECTION}] has {has} but needs ak and sk"
        )
    project_id = section.get("project_id", "").strip() or None
    return Credentials(ak=ak, sk=sk, security_token=token), project_id


def metadata_url(env: Mapping[str, str], asset_tag_path: str = DMI_ASSET_TAG_PATH) -> str | None:
    """The metadata service to ask, or None: BULKSEND_METADATA_URL when set (``off``: never
    ask), else 169.254.169.254 on a Huawei Cloud ECS, else None."""
    configured = env.get(ENV_METADATA_URL, "").strip()
    if configured:
        if configured.lower() == "off":
            return None
        parts = urlsplit(configured)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{ENV_METADATA_URL} must be an http:// URL or off, got {configured!r}"
            )
        return configured.rstrip("/")
    return METADATA_URL if on_huawei_cloud(asset_tag_path) else None


def on_huawei_cloud(asset_tag_path: str = DMI_ASSET_TAG_PATH) -> bool:
    try:
        return Path(asset_tag_path).read_text(errors="replace").strip() == HUAWEICLOUD_ASSET_TAG
    except OSError:
        return False


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the session token elsewhere: it is an error instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class MetadataService:
    """The ECS metadata service's temporary credentials, as the SDK's MetadataAccessor
    reads them.

    Plain blocking urllib: the first fetch runs while the CLI builds the job, before any
    event loop exists, and later ones (a few a day) on a worker thread; two small requests
    do not call for an HTTP client session.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = METADATA_TIMEOUT_S,
        deadline_s: float = METADATA_DEADLINE_S,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        # No proxy handler: the service is link-local, no proxy reaches it.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())

    def __repr__(self) -> str:
        return f"MetadataService({self.url!r})"

    def fetch(self) -> TemporaryCredentials:
        """Blocking, at most ``deadline_s``; ConfigError (one line, no secret in it) when
        no credentials come.

        urllib's timeout bounds each read of the socket, not the exchange: a service that
        trickles a byte a second holds it for minutes. The exchange runs on a daemon thread
        that is abandoned at the deadline (it ends when its socket times out or closes;
        a daemon thread never holds the process at exit)."""
        outcome: list[TemporaryCredentials | BaseException] = []

        def exchange() -> None:
            try:
                outcome.append(self._exchange())
            except BaseException as exc:  # handed to the caller, raised there
                outcome.append(exc)

        worker = threading.Thread(target=exchange, name="bulksend-metadata", daemon=True)
        worker.start()
        worker.join(self.deadline_s)
        if not outcome:
            raise ConfigError(
                f"the ECS metadata service at {self.url} did not answer within"
                f" {self.deadline_s:g} s"
            )
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _exchange(self) -> TemporaryCredentials:
        token = self._session_token(required=False)
        status, body = self._get_security_key(token)
        if status == 401 and NO_AGENCY.encode() not in body:
            # The session token expired or was refused: a new one, then once more.
            token = self._session_token(required=True)
            status, body = self._get_security_key(token)
        if status == 401 and NO_AGENCY.encode() in body:
            raise ConfigError(
                f"the ECS metadata service at {self.url} has no credentials for this ECS: "
                "it has no agency (IAM: bind one to the ECS)"
            )
        if status != 200:
            raise ConfigError(
                f"the ECS metadata service at {self.url} answered HTTP {status} to "
                f"{SECURITY_KEY_PATH}: {_snippet(body)}"
            )
        try:
            issued = parse_security_key(body)
        except ConfigError as exc:
            raise ConfigError(f"the ECS metadata service at {self.url}: {exc}") from None
        now = time.time()
        if issued.expires_at <= now:
            # Signing with them would only collect 401s; a refresher tries again later.
            raise ConfigError(
                f"the ECS metadata service at {self.url} gave credentials that expired"
                f" {now - issued.expires_at:,.0f} s ago (is this host's clock right?)"
            )
        return issued

    async def fetch_async(self) -> TemporaryCredentials:
        """``fetch`` on a worker thread; a cancelled caller does not wait for it."""
        return await anyio.to_thread.run_sync(self.fetch, abandon_on_cancel=True)

    def _session_token(self, *, required: bool) -> str | None:
        status, body = self._request(
            "PUT", TOKEN_PATH, {"X-Metadata-Token-Ttl-Seconds": str(TOKEN_TTL_S)}
        )
        if status == 200:
            return body.decode("latin-1").strip()
        if status in (404, 405, 503) and not required:
            return None  # a service without session tokens: ask without one, as the SDK does
        raise ConfigError(
            f"the ECS metadata service at {self.url} answered HTTP {status} to "
            f"{TOKEN_PATH}: {_snippet(body)}"
        )

    def _get_security_key(self, token: str | None) -> tuple[int, bytes]:
        return self._request("GET", SECURITY_KEY_PATH, {"X-Metadata-Token": token} if token else {})

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as resp:
                return resp.status, resp.read(MAX_ANSWER_BYTES)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(MAX_ANSWER_BYTES)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise ConfigError(
                f"the ECS metadata service at {self.url} did not answer: {reason}"
            ) from None


def parse_security_key(body: bytes) -> TemporaryCredentials:
    """The securitykey answer: ``{"credential": {"access", "secret", "securitytoken",
    "expires_at"}}``, with every spelling of the fields the SDK accepts. Errors never quote
    the answer: it holds the secret."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ConfigError("the security key answer is not JSON") from None
    if isinstance(data, dict):
        data = data.get("credential") or data.get("credentials") or data
    if not isinstance(data, dict):
        raise ConfigError("the security key answer is not a JSON object")

    def field(*names: str) -> str | None:
        for name in names:
            value = data.get(name)
            if isinstance(value, str) and value:
                return value
        return None

    ak = field("access", "accessKeyId", "access_key_id")
    sk = field("secret", "secretAccessKey", "secret_access_key")
    token = field("securitytoken", "securityToken", "security_token")
    expires = field("expires_at", "expiration")
    if not (ak and sk and token and expires):
        raise ConfigError(
            "the security key answer lacks access, secret, securitytoken or expires_at"
        )
    return TemporaryCredentials(Credentials(ak=ak, sk=sk, security_token=token), _epoch(expires))


def _epoch(text: str) -> float:
    """``2026-11-27T10:00:00.000000Z`` (the SDK's format; any ISO 8601 form) -> epoch s."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"the security key's expires_at is not a time: {text[:40]!r}") from None
    if when.tzinfo is None:  # the service gives UTC
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _snippet(body: bytes) -> str:
    """The start of an error answer, control characters escaped, for a one-line message."""
    text = body[:200].decode("utf-8", "replace").strip()
    return text.encode("unicode_escape").decode("ascii") or "(empty)"


class CredentialRefresher:
    """Keeps metadata credentials fresh for a long run.

    ``run(on_change)`` sleeps until ``REFRESH_MARGIN_S`` (at most half their lifetime)
    before the current credentials expire, fetches new ones and hands them to
    ``on_change`` (``Sender.set_credentials``). A failed fetch, or an answer with the same
    expiry (the service renews on its own schedule), is retried after 1, 2, 4 ... 60 s;
    ``on_error`` hears of each failure in one line. Runs until cancelled.

    ``now`` (wall clock, epoch s: expiry is a wall-clock time), ``sleep`` and ``fetch`` are
    parameters so that a test can run hours of schedule in no time.
    """

    def __init__(
        self,
        service: MetadataService,
        current: TemporaryCredentials,
        *,
        now: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        fetch: Callable[[], Awaitable[TemporaryCredentials]] | None = None,
    ) -> None:
        self.service = service
        self._current = current
        self._now = now
        self._sleep = sleep
        self._fetch = fetch or service.fetch_async
        self._fetched_at = now()

    @property
    def current(self) -> TemporaryCredentials:
        return self._current

    @property
    def due(self) -> float:
        """When (epoch s) the next refresh is planned, failures aside."""
        lifetime = max(self._current.expires_at - self._fetched_at, 0.0)
        return self._current.expires_at - min(REFRESH_MARGIN_S, lifetime / 2)

    async def run(
        self,
        on_change: Callable[[Credentials], None],
        *,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        failures = 0
        retry_at: float | None = None
        while True:
            wait = (self.due if retry_at is None else retry_at) - self._now()
            if wait > 0:
                await self._sleep(min(wait, MAX_SLEEP_S))
                continue
            try:
                fresh = await self._fetch()
            except ConfigError as exc:
                failures += 1
                retry_at = self._now() + _backoff(failures)
                if on_error is not None:
                    left = self._current.expires_at - self._now()
                    when = f"expire in {left:,.0f} s" if left > 0 else "have expired"
                    on_error(
                        f"refreshing the ECS credentials failed ({exc}); the current ones "
                        f"{when}; trying again in {retry_at - self._now():.0f} s"
                    )
                continue
            if fresh.expires_at > self._current.expires_at:
                self._current, self._fetched_at = fresh, self._now()
                failures, retry_at = 0, None
                on_change(fresh.credentials)
            else:
                failures += 1
                retry_at = self._now() + _backoff(failures)


def _backoff(failures: int) -> float:
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2.0 ** min(failures - 1, 30))
