"""bulksend: send large numbers of messages, fast and without losing any, to the
Huawei Cloud DMS RocketMQ SendMessage API."""

from __future__ import annotations

from bulksend._version import __version__
from bulksend.config import Credentials, RetryPolicy, SendOptions, Target, TLSOptions
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
from bulksend.sender import Sender
from bulksend.sources import Inputs
from bulksend.stats import Stats

__all__ = [
    "AuthenticationFailed",
    "BulksendError",
    "ConfigError",
    "Credentials",
    "InputOpenError",
    "Inputs",
    "Invalid",
    "Item",
    "LedgerError",
    "Record",
    "Result",
    "RetryPolicy",
    "SendOptions",
    "Sender",
    "SinkError",
    "Stats",
    "TLSOptions",
    "Target",
    "__version__",
]
