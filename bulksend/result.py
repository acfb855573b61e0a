"""One ``Result`` per input record: the ledger line. Per-message failure is data, never an
exception: a record that could not be sent is a ``failed`` Result with the reason in it, so
one bad record (or one bad answer) never stops the others, and the ledger accounts for every
record whatever happened to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson

if TYPE_CHECKING:
    from bulksend.record import Item

OK: Final = "ok"
FAILED: Final = "failed"
INVALID: Final = "invalid"
SKIPPED: Final = "skipped"


@dataclass(slots=True)
class Result:
    """The outcome of one record. Field names are the results-file contract."""

    seq: int
    source: str
    id: str | None
    #: Record.identity. Keyword-only with a default: written right after id, yet optional.
    identity: str | None = field(default=None, kw_only=True)
    status: str
    http_status: int | None = None
    msg_id: str | None = None
    queue_id: int | None = None
    queue_offset: int | None = None
    broker_name: str | None = None
    #: Every HTTP attempt made for this record (0 for invalid and skipped ones).
    attempts: int = 0
    #: First attempt's start to the final answer, retries and backoff included.
    latency_ms: float | None = None
    error_code: str | None = None
    error_msg: str | None = None
    request_id: str | None = None
    #: Wall clock, ms since the epoch, of the first attempt's start and of the final answer.
    started_at: int | None = None
    done_at: int | None = None
    #: Paced runs only: when the pacer meant the record to go (ms since the epoch), and how
    #: long it waited for a free worker past that (ms; the "late" share of latency).
    intended_at: int | None = None
    queue_ms: float | None = None
    #: --exactly-once: True on the ok line of a record whose answer was lost but which
    #: ListMessages found stored (msg_id and queue fields are the stored message's).
    #: Written only when set.
    reconciled: bool | None = field(default=None, kw_only=True)

    def to_json_line(self) -> bytes:
        """One whole JSON line, newline included: every field, in declaration order, but
        ``reconciled`` only when set. Replaced below by a function generated from the
        fields (same output)."""
        line = {
            name: getattr(self, name)
            for name in _FIELDS
            if name not in _WHEN_SET or getattr(self, name) is not None
        }
        return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        return cls(**{k: d.get(k) for k in _FIELDS if k in d})  # type: ignore[arg-type]


_FIELDS = tuple(Result.__dataclass_fields__)
#: Fields written only when not None (rare; an extra key on every line would cost bytes).
_WHEN_SET = ("reconciled",)


def _line_function(fields: tuple[str, ...]) -> Callable[[Result], bytes]:
    """``to_json_line`` generated from the fields, as dataclasses generates ``__init__``: a
    dict literal handed to orjson. The output is byte for byte orjson's serialisation of the
    dataclass (same keys in the same order, same escaping) less the ``_WHEN_SET`` fields
    that are None, at ~15 % fewer instructions per line: orjson's generic dataclass path
    looks each field up by name.

    Measured and kept over templates built in Python (``%``/f-string with a null check per
    field, orjson per value): each costs more than orjson's one pass over a dict, since a
    Python-level formatting step per field outweighs what the template saves."""
    always = [name for name in fields if name not in _WHEN_SET]
    pairs = ", ".join(f"{name!r}: self.{name}" for name in always)
    source = f"def to_json_line(self):\n    line = {{{pairs}}}\n"
    for name in fields:
        if name in _WHEN_SET:
            source += f"    if self.{name} is not None:\n        line[{name!r}] = self.{name}\n"
    source += "    return _dumps(line, option=_OPTION)\n"
    namespace: dict[str, Any] = {"_dumps": orjson.dumps, "_OPTION": orjson.OPT_APPEND_NEWLINE}
    exec(source, namespace)  # the names interpolated are the dataclass's own field names
    function: Callable[[Result], bytes] = namespace["to_json_line"]
    function.__doc__ = Result.to_json_line.__doc__
    return function


Result.to_json_line = _line_function(_FIELDS)  # type: ignore[method-assign,assignment]


def result_for(item: Item, status: str) -> Result:
    """A Result for ``item`` with the fields that identify it in the ledger copied over.
    The one place (with ``outcome.interpret`` for answers) that decides which fields those
    are: a new identifying field is copied here."""
    return Result(
        seq=item.seq, source=item.source, id=item.id, identity=item.identity, status=status
    )
