"""Reporters only format: the end-of-run table, and ``printable`` for any text that came
from a server before it reaches a terminal (the live line is ``bulksend.progress``)."""

from __future__ import annotations

import re
from typing import Any

#: C0 and C1 controls, DEL, and the bidirectional overrides and isolates ("Trojan Source",
#: CVE-2021-42574): a server's error code holding ESC ] 0 ; ... BEL would set the window
#: title, ESC [ 2 J clear the screen, U+202E reverse what follows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": r"\n", "\r": r"\r", "\t": r"\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character escaped as Python writes it (``\\x1b``,
    ``\\u202e``), so text a server chose can be shown on a terminal."""
    return _UNPRINTABLE.sub(_escape, text)


def _latency(lat: dict[str, float]) -> str:
    # p99.9 and p99.99: the tail a load test is about (a stats document written before
    # they existed lacks them: shown only when there).
    tail = "".join(
        f"  {name} {lat[key]:.1f}"
        for key, name in (("p99_9", "p99.9"), ("p99_99", "p99.99"))
        if key in lat
    )
    return (
        f"p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}{tail}  "
        f"max {lat['max']:.1f}  mean {lat['mean']:.1f}"
    )


#: Where there is no ok record, a latency of 0.0 and a rate of answers per second would be
#: figures nothing measured.
_NA = "n/a (no ok record)"


def summary_table(stats: dict[str, Any], *, title: str = "bulksend") -> str:
    """The summary printed on stderr at the end of a run, from a stats snapshot."""
    measured = stats["ok"] > 0
    rows = [
        ("records", f"{stats['total']:,}"),
        ("ok", f"{stats['ok']:,}"),
        ("failed", f"{stats['failed']:,}"),
        ("invalid", f"{stats['invalid']:,}"),
        ("skipped", f"{stats['skipped']:,}"),
        ("retries", f"{stats['retries']:,}"),
        ("elapsed", f"{stats['elapsed_s']:.2f} s"),
        ("throughput", f"{stats['throughput_msg_s']:,.1f} msg/s" if measured else "n/a"),
        ("latency ms", _latency(stats["latency_ms"]) if measured else _NA),
    ]
    if stats.get("http_status"):
        rows.append(
            ("http status", "  ".join(f"{k}: {v:,}" for k, v in stats["http_status"].items()))
        )
    for code, count in list(stats.get("errors", {}).items())[:8]:
        rows.append(("error", f"{printable(str(code))}: {count:,}"))
    if stats.get("outages"):
        n = stats["outages"]
        rows.append(
            (
                "outages",
                f"{n:,} (target unreachable {stats['downtime_s']:,.1f} s in all; "
                f"{stats['probes']:,} probe{'s' if stats['probes'] != 1 else ''})",
            )
        )
    return _table(title, rows)


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"── {title} " + "─" * max(0, 40 - len(title))]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def summary_text(snapshot: dict[str, Any], *, title: str) -> str:
    """``summary_table`` plus, for a load, the uncorrected latency, late sends and rates."""
    table = summary_table(snapshot, title=title)
    if "service_latency_ms" not in snapshot:
        return table
    measured = snapshot["ok"] > 0
    svc = snapshot["service_latency_ms"]
    # summary_table aligns its values after the longest label it printed.
    width = 11 if snapshot.get("http_status") else 10
    rows = [
        ("service ms", f"{_latency(svc)}  (from the actual send)" if measured else _NA),
        (
            "late",
            f"{snapshot['late']:,}  (sent > {snapshot['late_after_ms']:g} ms after the intended time)",
        ),
        (
            "rate",
            f"intended {snapshot['intended_rate_msg_s']:,.1f}/s  sent {snapshot['send_rate_msg_s']:,.1f}/s",
        ),
    ]
    lines = table.splitlines()
    at = next(
        (i for i, line in enumerate(lines) if line.lstrip().startswith("latency ms")),
        len(lines) - 1,
    )
    if measured:
        lines[at] += "  (from the intended send time)"
    extra = [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join([*lines[: at + 1], *extra, *lines[at + 1 :]])
