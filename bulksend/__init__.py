"""bulksend: send large numbers of messages, fast and without losing any, to the
Huawei Cloud DMS RocketMQ SendMessage API."""

from __future__ import annotations

__version__ = "0.1.0"

from bulksend.errors import (
    AuthenticationFailed,
    BulksendError,
    ConfigError,
    InputOpenError,
    LedgerError,
    SinkError,
)
from bulksend.record import Invalid, Item, Record
from bulksend.result import Result

__all__ = [
    "AuthenticationFailed",
    "BulksendError",
    "ConfigError",
    "InputOpenError",
    "Invalid",
    "Item",
    "LedgerError",
    "Record",
    "Result",
    "SinkError",
    "__version__",
]
