"""The results ledger as a memory of what was sent: ``--resume`` support.

* ``read_ledger(path)`` streams an existing results file and collects the identities of
  records with an ``ok`` result (a record's identity is its ``id`` when given, else
  ``path:line``). Only the last line can be torn (a crash inside the one write that holds
  it); it is ignored and cut off so appended lines start clean. Memory: the identity
  strings of the ok records (~130 bytes each for a
  path:line identity, measured with tracemalloc).
* Beside the ledger, ``{out}.inputs.json`` keeps a fingerprint of each input
  (``sources.fingerprint``); a resume over an input whose content changed at the same path
  is refused (``LedgerError``, exit 2) unless ``force``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from bulksend.errors import LedgerError
from bulksend.record import Item
from bulksend.result import OK
from bulksend.sources import fingerprint

_OK_MARK = b'"status":"ok"'


@dataclass(slots=True)
class LedgerState:
    """What an existing ledger says was already sent."""

    done_identities: set[str] = field(default_factory=set)
    lines: int = 0
    torn_bytes: int = 0

    def done(self, item: Item) -> bool:
        return item.identity in self.done_identities


def fingerprints_path(out: str) -> str:
    return f"{out}.inputs.json"


def read_ledger(path: str, *, repair: bool = True) -> LedgerState:
    """Read a results file; ``repair`` truncates a torn last line so appends start clean."""
    state = LedgerState()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; we may truncate after reading
    except FileNotFoundError:
        return state
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger {path}: {exc.strerror or exc}") from None
    good_end = 0
    with fh:
        offset = 0
        for line in fh:
            offset += len(line)
            if not line.endswith(b"\n"):
                state.torn_bytes = len(line)  # a torn last line: a crash mid-write
                break
            good_end = offset
            state.lines += 1
            if _OK_MARK not in line:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict) and obj.get("status") == OK:
                ident = obj.get("id")
                state.done_identities.add(
                    str(ident) if ident is not None else str(obj.get("source"))
                )
    if repair and state.torn_bytes:
        try:
            os.truncate(path, good_end)
        except OSError as exc:
            raise LedgerError(
                f"cannot cut the torn last line of {path}: {exc.strerror or exc}"
            ) from None
    return state


def check_inputs(out: str, inputs: Sequence[str], *, force: bool) -> None:
    """Refuse (LedgerError) to resume over an input that changed since the ledger began."""
    try:
        with open(fingerprints_path(out), "rb") as fh:
            stored: dict[str, str] = orjson.loads(fh.read()).get("inputs", {})
    except FileNotFoundError:
        return
    except (OSError, orjson.JSONDecodeError, AttributeError) as exc:
        raise LedgerError(f"cannot read {fingerprints_path(out)}: {exc}") from None
    for path in inputs:
        if path == "-" or path not in stored:
            continue
        now = fingerprint(path)
        if now != stored[path] and not force:
            raise LedgerError(
                f"input {path} changed since {out} was written (fingerprint {stored[path][:16]}… is now "
                f"{now[:16]}…): resuming would skip or resend the wrong records; use --force to resume anyway"
            )


def write_fingerprints(out: str, inputs: Sequence[str]) -> None:
    """Record each input's fingerprint beside the ledger (kept for inputs not in this run)."""
    path = fingerprints_path(out)
    try:
        with open(path, "rb") as fh:
            stored: dict[str, str] = orjson.loads(fh.read()).get("inputs", {})
    except (OSError, orjson.JSONDecodeError, AttributeError):
        stored = {}
    stored.update({p: fingerprint(p) for p in inputs if p != "-"})
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps({"inputs": stored}, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)
