"""Counters and latency histograms, exposed in the Prometheus text format (``GET /metrics``).

Hand-written rather than ``prometheus_client`` to keep the ``serve`` extra small: a handful of
counters and histograms behind one lock is all the service needs.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

#: Latency buckets in seconds: CPU generation is slow, edits slower still.
BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    body = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels
    )
    return "{" + body + "}"


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Thread-safe counters/histograms; ``gauges`` are read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[Labels, _Histogram]] = defaultdict(dict)
        self._help: dict[str, tuple[str, str]] = {}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, help_: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._help.setdefault(name, ("counter", help_))
            self._counters[name][key] = self._counters[name].get(key, 0.0) + amount

    def observe(self, name: str, help_: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._help.setdefault(name, ("histogram", help_))
            hist = self._histograms[name].setdefault(key, _Histogram(BUCKETS))
            hist.observe(value)

    def gauge(self, name: str, help_: str, read: Callable[[], float]) -> None:
        self._gauges[name] = (help_, read)

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                kind, help_ = self._help[name]
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                lines += [f"{name}{_labels(k)} {v:g}" for k, v in sorted(series.items())]
            for name, series in sorted(self._histograms.items()):
                kind, help_ = self._help[name]
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                for key, hist in sorted(series.items()):
                    for bound, count in zip(hist.buckets, hist.counts, strict=True):
                        le = key + (("le", f"{bound:g}"),)
                        lines.append(f"{name}_bucket{_labels(le)} {count}")
                    lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {hist.total}")
                    lines.append(f"{name}_sum{_labels(key)} {hist.sum:.6f}")
                    lines.append(f"{name}_count{_labels(key)} {hist.total}")
        for name, (help_, read) in sorted(self._gauges.items()):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"
