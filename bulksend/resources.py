"""Whether this process may open as many files as a run's connections need.

Each request in flight holds one keep-alive connection: one file descriptor (two with
``--embedded``, whose server end lives in the same process). Under ``ulimit -n 256``,
``--concurrency 5000`` failed 4,462 records with "Too many open files". Before the first
send, the soft RLIMIT_NOFILE is raised to the hard limit when that is needed and allowed
(as Go's runtime and nginx's ``worker_rlimit_nofile`` do); when even the hard limit is too
low the run is refused, saying what limit it needs.
"""

from __future__ import annotations

from bulksend.errors import ConfigError

#: Descriptors a run holds besides its connections: stdio, the event loop's epoll and
#: self-pipe, inputs, the ledger and its lock, stats/failed/HTML/timeseries outputs, the
#: embedded server's listening socket, a resolver's socket; doubled for headroom.
RESERVED_FILES = 64


def files_needed(connections: int, *, embedded: bool = False) -> int:
    return connections * (2 if embedded else 1) + RESERVED_FILES


def ensure_open_files(
    connections: int, *, embedded: bool = False, flag: str = "--concurrency"
) -> int:
    """Make sure ``connections`` sockets fit under RLIMIT_NOFILE; return the soft limit now
    in force. Raises the soft limit (to the hard one) if needed; ConfigError if it cannot.
    A no-op where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows has no RLIMIT_NOFILE
        return connections
    needed = files_needed(connections, embedded=embedded)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or soft >= needed:
        return soft
    if hard != unlimited and hard < needed:
        raise ConfigError(
            f"{flag} {connections:,} needs about {needed:,} open files, but this process may "
            f"open at most {hard:,} (ulimit -n); raise the limit (ulimit -n {needed}) or "
            f"lower {flag}"
        )
    target = needed if hard == unlimited else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        raise ConfigError(
            f"{flag} {connections:,} needs about {needed:,} open files; raising the limit "
            f"from {soft:,} failed ({exc}): run with ulimit -n {needed}"
        ) from None
    return target
