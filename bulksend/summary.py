"""Reporters only format (STYLE habit 9): the end-of-run table and the live progress line."""

from __future__ import annotations

from typing import Any


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def summary_table(stats: dict[str, Any], *, title: str = "bulksend") -> str:
    """The summary printed on stderr at the end of a run, from a stats snapshot."""
    lat = stats["latency_ms"]
    rows = [
        ("records", f"{stats['total']:,}"),
        ("ok", f"{stats['ok']:,}"),
        ("failed", f"{stats['failed']:,}"),
        ("invalid", f"{stats['invalid']:,}"),
        ("skipped", f"{stats['skipped']:,}"),
        ("retries", f"{stats['retries']:,}"),
        ("elapsed", f"{stats['elapsed_s']:.2f} s"),
        ("throughput", f"{stats['throughput_msg_s']:,.1f} msg/s"),
        (
            "latency ms",
            f"p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  "
            f"max {lat['max']:.1f}  mean {lat['mean']:.1f}",
        ),
    ]
    if stats.get("http_status"):
        rows.append(
            ("http status", "  ".join(f"{k}: {v:,}" for k, v in stats["http_status"].items()))
        )
    for code, count in list(stats.get("errors", {}).items())[:8]:
        rows.append(("error", f"{code}: {count:,}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"── {title} " + "─" * max(0, 40 - len(title))]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def progress_line(
    *,
    done: int,
    ok: int,
    failed: int,
    invalid: int,
    retrying: int,
    in_flight: int,
    elapsed: float,
    fraction: float | None,
    rate_target: float = 0.0,
    width: int = 24,
    bar: bool = True,
    note: str | None = None,
) -> str:
    """One progress line: bar (when the inputs' size is known), counts, rate, ETA; then
    ``note`` (``target unreachable since ..., probing``) when there is one."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = []
    if fraction is not None:
        fraction = min(1.0, max(0.0, fraction))
        if bar:
            filled = int(fraction * width)
            parts.append(
                "[" + "#" * filled + "-" * (width - filled) + f"] read {fraction * 100:5.1f}%"
            )
        else:
            parts.append(f"read {fraction * 100:5.1f}%")
    parts.append(f"{done:,} done")
    parts.append(f"{rate:,.0f} msg/s" + (f" (target {rate_target:,.0f})" if rate_target else ""))
    parts.append(
        f"ok {ok:,} failed {failed:,} invalid {invalid:,} retrying {retrying:,} in-flight {in_flight:,}"
    )
    if fraction and 0 < fraction < 1 and elapsed > 0:
        parts.append(f"ETA {_fmt_duration(elapsed * (1 - fraction) / fraction)}")
    parts.append(f"elapsed {_fmt_duration(elapsed)}")
    if note:
        parts.append(note)
    return "  ".join(parts)
