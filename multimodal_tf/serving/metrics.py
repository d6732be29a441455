"""Request metrics in Prometheus' text format, named like TF Serving's.

TF Serving exports ``:tensorflow:serving:request_count`` and
``:tensorflow:serving:request_latency`` (microseconds); the same names are
used here so one dashboard reads both servers. ``model_runs`` counts signature
executions: with batching on it grows slower than ``request_count``.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

PREFIX = ":tensorflow:serving:"
# Microseconds, roughly 1-2.5-5 per decade from 100 us to 10 s.
LATENCY_BUCKETS_US = (
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_HELP = {
    "request_count": ("counter", "Requests by model, version, signature, API and status code."),
    "request_latency": ("histogram", "Request latency in microseconds, from receipt to response."),
    "model_runs": ("counter", "Signature executions (a batch of merged requests counts once)."),
    "batch_size": ("histogram", "Examples per signature execution."),
}


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...], extra: str = "") -> str:
    text = ",".join(f'{key}="{_escape(value)}"' for key, value in pairs)
    if extra:
        text = f"{text},{extra}" if text else extra
    return "{" + text + "}" if text else ""


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value


class Metrics:
    """Thread-safe counters and histograms keyed by label tuples."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[tuple, _Histogram]] = defaultdict(dict)

    def _add(self, name: str, labels: tuple, value: float = 1.0) -> None:
        with self._lock:
            series = self._counters[name]
            series[labels] = series.get(labels, 0.0) + value

    def _observe(self, name: str, labels: tuple, value: float, buckets: tuple) -> None:
        with self._lock:
            series = self._histograms[name]
            if labels not in series:
                series[labels] = _Histogram(buckets)
            series[labels].observe(value)

    def record_request(
        self,
        model: str,
        version: int | None,
        signature: str,
        api: str,
        entrypoint: str,
        status: str,
        seconds: float,
    ) -> None:
        """One finished request (any status)."""
        base = (
            ("model_name", model),
            ("model_version", "" if version is None else str(version)),
            ("signature_name", signature),
            ("API", api),
        )
        self._add("request_count", base + (("status", status),))
        self._observe(
            "request_latency", base + (("entrypoint", entrypoint),), seconds * 1e6, LATENCY_BUCKETS_US
        )

    def record_run(self, model: str, version: int, signature: str, batch_size: int) -> None:
        """One signature execution over ``batch_size`` examples."""
        labels = (("model_name", model), ("model_version", str(version)), ("signature_name", signature))
        self._add("model_runs", labels)
        self._observe("batch_size", labels, batch_size, BATCH_SIZE_BUCKETS)

    def counter(self, name: str, **labels: str) -> float:
        """Sum of a counter over series whose labels include ``labels`` (for tests and benchmarks)."""
        with self._lock:
            return sum(
                value
                for key, value in self._counters[name].items()
                if all((k, str(v)) in key for k, v in labels.items())
            )

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        lines = []
        with self._lock:
            for name, (kind, help_text) in _HELP.items():
                full = PREFIX + name
                lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    for labels, value in sorted(self._counters[name].items()):
                        lines.append(f"{full}{_labels(labels)} {value:g}")
                    continue
                for labels, histogram in sorted(self._histograms[name].items()):
                    cumulative = 0
                    for bound, count in zip(
                        histogram.buckets + (float("inf"),), histogram.counts, strict=False
                    ):
                        cumulative += count
                        le = "+Inf" if bound == float("inf") else f"{bound:g}"
                        bucket_labels = _labels(labels, 'le="' + le + '"')
                        lines.append(f"{full}_bucket{bucket_labels} {cumulative}")
                    lines.append(f"{full}_sum{_labels(labels)} {histogram.total:g}")
                    lines.append(f"{full}_count{_labels(labels)} {cumulative}")
        return "\n".join(lines) + "\n"
