"""Who may call: SDK-HMAC-SHA256 signatures and/or an X-Auth-Token, as the gateway checks.

* AK/SK configured: the request's signature is verified with ``bulksend.signing.verify``,
  the very code the client signs with (held equal to the SDK's Signer by its tests):
  missing or wrong signature, unknown AK, or X-Sdk-Date more than 15 minutes off -> 401.
* Token configured: X-Auth-Token must equal it (compared in constant time) -> else 401.
* Both: a request carrying X-Auth-Token is judged by the token, any other by signature.
* Neither: everything is accepted (the CLI says so on stderr).

An Authorization header that is not ASCII cannot hold a valid signature: it is refused
(401) before it reaches the verifier, whose constant-time comparison takes ASCII only.

Reasons returned never contain a secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from urllib.parse import parse_qsl

from bulksend import signing


class Authenticator:
    def __init__(self, *, ak: str | None, sk: str | None, token: str | None) -> None:
        self._secrets = {ak: sk} if ak is not None and sk is not None else {}
        self._token = token.encode() if token is not None else None
        self.required = bool(self._secrets) or self._token is not None

    def refuse(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[bytes, bytes],
        body: bytes,
        now: float,
    ) -> str | None:
        """None when the request may pass, else why not (for error_msg).

        ``path`` is the raw request path (what was signed); ``query`` the raw query string;
        ``headers`` are raw, names lower-cased; ``now`` is the wall clock, epoch seconds.
        """
        if not self.required:
            return None
        raw_token = headers.get(b"x-auth-token")
        offered = raw_token.decode("latin-1") if raw_token is not None else None
        if self._token is not None and (offered is not None or not self._secrets):
            if offered is None:
                return "missing X-Auth-Token"
            if not hmac.compare_digest(offered.encode(), self._token):
                return "invalid X-Auth-Token"
            return None
        authorization = headers.get(b"authorization")
        if authorization is not None and not authorization.isascii():
            return "verify aksk signature fail: the Authorization header is not ASCII"
        try:
            signing.verify(
                method,
                path,
                parse_qsl(query, keep_blank_values=True),
                {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()},
                body,
                secret_for=self._secrets.get,
                now=now,
            )
        except signing.SignatureError as exc:
            return f"verify aksk signature fail: {exc}"
        return None
