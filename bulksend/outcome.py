"""What one HTTP answer means for a record: a Result, ok or failed. Pure.

* 2xx with a JSON object holding a non-empty ``msg_id``: ok, with the queue fields.
* 2xx that is not JSON, or lacks msg_id: failed, ``BAD_RESPONSE`` (not retried: the server
  may have stored the message, so sending again would risk a duplicate for no gain).
* anything else: failed, with the Huawei ``error_code``/``error_msg`` when the body has
  them, else ``HTTP_<status>`` and the start of the body.
* an answer whose framing broke after its status line (``Response.broken``): failed with
  that status and the break's code (``PROTOCOL_ERROR``). Whether it is tried again is the
  status's to say, as for any answer: a broken 2xx is not (it may have been stored), a
  broken 503 or 429 is.

What the server sends back is scrubbed before it reaches a result (``scrub``): a server
that echoes the request's headers must not get a credential written to the ledger. What
travels, and so can come back: the security token (X-Security-Token), the IAM token
(X-Auth-Token), and in ``Authorization`` the AK and a signature. The SK never travels, but
a server that verifies signatures knows it: it is scrubbed too. The signature is good for
its one request for 15 minutes (the gateway's clock skew), so it goes as well. The AK is
kept: it names the key, like a user name, and is what one needs to tell which key a 401
was for.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import orjson

from bulksend.client import Response
from bulksend.record import Record
from bulksend.result import FAILED, OK, Result

#: How much of a non-JSON error body goes into error_msg.
ERROR_BODY_CHARS = 200


def interpret(record: Record, resp: Response, secrets: tuple[str, ...] = ()) -> Result:
    """Map one answer to a Result. ``secrets`` are scrubbed from any text the server sent."""
    result = Result(
        seq=record.seq,
        source=record.source,
        id=record.id,
        identity=record.identity,
        status=FAILED,
        http_status=resp.status,
        request_id=scrub(resp.request_id, secrets) if resp.request_id else resp.request_id,
    )
    try:
        data = orjson.loads(resp.body) if resp.body else None
    except orjson.JSONDecodeError:
        data = None
    if 200 <= resp.status < 300:
        if isinstance(data, dict) and isinstance(data.get("msg_id"), str) and data["msg_id"]:
            result.status = OK
            result.msg_id = data["msg_id"]
            result.queue_id = _int_or_none(data.get("queue_id"))
            result.queue_offset = _int_or_none(data.get("queue_offset"))
            broker = data.get("broker_name")
            result.broker_name = broker if isinstance(broker, str) else None
        elif resp.broken is not None:  # its body is empty: never ok
            _broken(result, resp)
        else:
            result.error_code = "BAD_RESPONSE"
            result.error_msg = (
                "answer is not JSON" if data is None and resp.body else "answer lacks msg_id"
            )
        return result
    if resp.broken is not None:
        _broken(result, resp)
    elif isinstance(data, dict) and ("error_code" in data or "error_msg" in data):
        result.error_code = scrub(str(data.get("error_code") or f"HTTP_{resp.status}"), secrets)
        result.error_msg = scrub(str(data.get("error_msg") or ""), secrets)
    else:
        result.error_code = f"HTTP_{resp.status}"
        result.error_msg = scrub(resp.body[:ERROR_BODY_CHARS].decode("utf-8", "replace"), secrets)
    return result


def _broken(result: Result, resp: Response) -> None:
    broken = resp.broken
    assert broken is not None
    result.error_code = broken.code
    result.error_msg = f"{broken} (after HTTP {resp.status})"


#: An SDK-HMAC-SHA256 signature as it appears in an Authorization header, also
#: URL-encoded (``Signature%3D<hex>``, as a gateway's error page may dump the request).
_SIGNATURE = re.compile(r"(signature\s*(?:=|%3d)\s*)(?:%20)?[^\s,;\"'%&]+", re.IGNORECASE)


def _forms(secrets: tuple[str, ...]) -> tuple[tuple[tuple[str, ...], re.Pattern[str]], ...]:
    """Each secret's spellings to look for (as is, and URL-encoded; lower-cased, for a
    test on lower-cased text) and one case-blind pattern that replaces any of them.
    Kept for the last set of secrets seen (a run has one, or one per credential renewal):
    one reference, swapped whole, so threads running shards never pair one set's secrets
    with another's spellings. An lru_cache lookup cost more than the rest of the scrub."""
    global _last_forms
    last = _last_forms
    if last[0] is secrets:
        return last[1]
    forms = []
    for secret in secrets:
        spellings = sorted({secret, quote(secret, safe="")}, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, spellings)), re.IGNORECASE)
        forms.append((tuple(x.lower() for x in spellings), pattern))
    _last_forms = (secrets, tuple(forms))
    return _last_forms[1]


_last_forms: tuple[tuple[str, ...] | None, tuple[tuple[tuple[str, ...], re.Pattern[str]], ...]] = (
    None,
    (),
)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Never let a secret (or a request's signature) the server echoes back reach a result:
    as is, lower- or upper-cased (a proxy may fold a header dump), or URL-encoded.

    Cheap when there is nothing to scrub, as for nearly every answer (~0.4 µs for a
    request id and two secrets): one ``lower()`` of the text and a substring test per
    spelling, and the regular expression only where an ``=`` (or its ``%3D``) could
    introduce a signature.
    """
    low = text.lower()
    for spellings, pattern in _forms(secrets):
        for spelling in spellings:
            if spelling in low:
                text = pattern.sub("***", text)
                low = text.lower()
                break
    if "=" in text or "%3d" in low:
        text = _SIGNATURE.sub(r"\1***", text)
    return text


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None
