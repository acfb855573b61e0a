"""Counters the server keeps, and ``GET /metrics`` in Prometheus text format (0.0.4).

Counting is a dict increment on the hot path; formatting happens only when scraped.
"""

from __future__ import annotations

from collections import Counter

from bulksend.server.store import Store

#: Which handler answered a request, the ``route`` label.
SEND, LIST, METRICS, OTHER = "send", "list", "metrics", "other"


class Metrics:
    def __init__(self) -> None:
        #: Answers sent but SendMessage's 200s, by (route, HTTP status).
        self.answered: Counter[tuple[str, int]] = Counter()
        #: SendMessage's 200s: an int, the one count on the hot path (~3x cheaper).
        self.send_ok = 0
        #: SendMessage requests given a deliberate fault, by kind (drop, hang, ...).
        self.faults: Counter[str] = Counter()

    @property
    def requests(self) -> Counter[tuple[str, int]]:
        """Answers sent, by (route, HTTP status) (a copy)."""
        out = Counter(self.answered)
        if self.send_ok:
            out[(SEND, 200)] += self.send_ok
        return out

    def render(self, store: Store) -> bytes:
        out: list[str] = []
        family = _Family(out)
        family(
            "bulksend_serve_requests_total",
            "counter",
            "HTTP answers sent, by route and status code.",
        )
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'bulksend_serve_requests_total{{route="{route}",status="{status}"}} {n}')
        family(
            "bulksend_serve_faults_total",
            "counter",
            "SendMessage requests given a deliberate fault, by kind.",
        )
        for kind, n in sorted(self.faults.items()):
            out.append(f'bulksend_serve_faults_total{{kind="{kind}"}} {n}')
        family(
            "bulksend_serve_messages_accepted_total",
            "counter",
            "Messages accepted since this server started.",
        )
        out.append(f"bulksend_serve_messages_accepted_total {store.accepted}")
        family(
            "bulksend_serve_messages_stored",
            "gauge",
            "Messages in the store, those kept from earlier runs included.",
        )
        out.append(f"bulksend_serve_messages_stored {store.total}")
        family("bulksend_serve_topic_messages", "gauge", "Messages stored, by topic.")
        for instance, topic, n in store.topic_counts():
            labels = f'instance="{_esc(instance)}",topic="{_esc(topic)}"'
            out.append(f"bulksend_serve_topic_messages{{{labels}}} {n}")
        family(
            "bulksend_serve_queue_next_offset",
            "gauge",
            "The queue_offset the next message of a queue gets, by topic and queue.",
        )
        for instance, topic, broker, queue, n in store.offsets():
            labels = (
                f'instance="{_esc(instance)}",topic="{_esc(topic)}",'
                f'broker="broker-{broker}",queue="{queue}"'
            )
            out.append(f"bulksend_serve_queue_next_offset{{{labels}}} {n}")
        return ("\n".join(out) + "\n").encode()


class _Family:
    """Writes a metric family's HELP and TYPE lines."""

    def __init__(self, out: list[str]) -> None:
        self._out = out

    def __call__(self, name: str, kind: str, help_text: str) -> None:
        self._out.append(f"# HELP {name} {help_text}")
        self._out.append(f"# TYPE {name} {kind}")


def _esc(value: str) -> str:
    """A label value escaped as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
