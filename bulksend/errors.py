"""bulksend's one exception tree. Per-record failures are *not* exceptions: they are
``Result`` values (status ``failed`` / ``invalid``). Exceptions are for what stops a run::

    BulksendError                 anything bulksend raises on purpose
    ├── ConfigError               bad options, config file or environment      -> exit 2
    ├── InputOpenError            an input path cannot be opened                -> exit 2
    ├── LedgerError               --resume cannot trust the results file        -> exit 2
    ├── AuthenticationFailed      20 answers of 401/403 in a row: stop (drain)  -> exit 2
    ├── TargetUnreachable         refused/unresolved/untrusted from the start, or
    │                             down past --outage-timeout: stop (drain)      -> exit 2
    ├── SinkError                 a results/stats/failed file cannot be written  -> exit 2
    ├── ReconcileError            --exactly-once: ListMessages cannot say whether a
    │   │                         message is stored (intents stay for --resume) -> exit 2
    │   └── ListMessagesUnavailable   no usable ListMessages (404/405, 401/403, ...)
    ├── ClusterError              the Dask cluster cannot run the job (--workers,
    │                             --cluster): no scheduler or worker, another
    │                             bulksend there, a shard that kept losing its worker -> exit 2
    └── TransportError            one HTTP attempt failed below HTTP (internal: the client
        ├── ConnectError          turns it into a retry or a failed Result, never escapes
        ├── RequestTimeout        a Sender)
        │   └── ConnectTimeout    no connection within --timeout (nothing was sent)
        ├── ProtocolError
        │   └── ConnectionClosed  closed or reset before a complete answer
        └── AnswerTooLarge        an answer over --max-answer-bytes (not retried)

``TransportError.request_written`` says whether the request may have reached the server:
False only where nothing was sent (no connection); --exactly-once checks the others.

aiohttp, httptools, ssl and OS errors are translated into TransportError in exactly one
place per transport (``client.py``); the CLI translates BulksendError into a one-line
message and an exit code in exactly one place (``cli/__init__.py``).
"""

from __future__ import annotations


class BulksendError(Exception):
    """Base of every exception bulksend raises on purpose."""

    exit_code = 2


class ConfigError(BulksendError):
    """Invalid options, config file, or environment."""


class InputOpenError(BulksendError):
    """An input cannot be opened (missing, unreadable, a directory)."""


class LedgerError(BulksendError):
    """An existing results ledger cannot be used for --resume (changed input, unreadable)."""


class AuthenticationFailed(BulksendError):
    """The server refused the credentials too many times in a row; the run stopped."""


class TargetUnreachable(BulksendError):
    """The target cannot be reached: from the start (connection refused, unknown host, TLS
    certificate not trusted), or for longer than --outage-timeout. The run stopped; the
    records it did not finish have no result, and are left for --resume. ``cause``:
    ``refused``, ``unknown-host``, ``tls-verify`` or ``outage``."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class SinkError(BulksendError):
    """An output file could not be written."""


class ReconcileError(BulksendError):
    """ListMessages could not say whether a message is stored, so the run stops rather
    than guess (a guess is either a loss or a duplicate). Exit 2; the records' intents stay
    in the ledger for ``--resume``."""


class ListMessagesUnavailable(ReconcileError):
    """The endpoint has no usable ListMessages (404/405, no such API), refuses our
    credentials for it (401/403) or the query (another 4xx), answers something that is not
    a ListMessages answer, or its certificate does not verify."""


class ClusterError(BulksendError):
    """The Dask cluster could not run the job: no scheduler, no worker, a worker without
    bulksend (or another version of it), a shard that kept losing its worker."""


class TransportError(BulksendError):
    """One HTTP attempt failed below the HTTP layer. ``code`` is the stable error_code.
    ``request_written``: whether any of the request may have reached the server (then the
    message may be stored although no answer says so)."""

    code = "TRANSPORT_ERROR"
    request_written = True


class ConnectError(TransportError):
    """No connection, so nothing was sent. ``cause``: ``refused``, ``unknown-host``,
    ``tls-verify`` (the certificate is not trusted), ``tls`` (another handshake failure) or
    ``connect`` (anything else: unreachable network, ...)."""

    code = "CONNECT_ERROR"
    request_written = False

    def __init__(self, message: str, cause: str = "connect") -> None:
        super().__init__(message)
        self.cause = cause


class RequestTimeout(TransportError):
    code = "TIMEOUT"


class ConnectTimeout(RequestTimeout):
    """No connection within the timeout: nothing was sent (the same error_code)."""

    request_written = False


class ProtocolError(TransportError):
    """The peer broke HTTP/1.1 (closed mid-answer, unparsable bytes)."""

    code = "PROTOCOL_ERROR"


class ConnectionClosed(ProtocolError):
    """The connection was closed or reset before a complete answer (the same error_code)."""


class AnswerTooLarge(TransportError):
    """The answer outgrew --max-answer-bytes; the connection was closed."""

    code = "ANSWER_TOO_LARGE"
