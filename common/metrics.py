"""Prometheus metrics for every JackPay process (`prometheus-client`), off unless
configured (`metrics_addr`).

Rules:
- the hot path never touches prometheus-client: it bumps plain counters it keeps anyway
  (`Pipeline.counts`, the ledger's statistics) and observes latencies into `Histogram`,
  a list of bucket counts (a bisect and an increment); the HTTP thread reads them at
  scrape time through a `Collector` that builds the metric families from a snapshot;
- what the scrape reads is copied first (a dict or list copy is atomic under the GIL), so
  the event loop never waits for a scrape and a scrape never sees a dict change size;
- the server listens where it is told (`127.0.0.1:9401`; port 0 picks one, printed in the
  readiness line as `metrics=HOST:PORT`). It carries no secrets, but it is not a public
  port: bind it to loopback or a monitoring network.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from common.config import parse_host_port
from common.errors import ConfigError

# Seconds: from a fast in-memory step to a stalled ledger.
BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Rows per ledger batch.
BUCKETS_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Histogram:
    """Bucket counts and a sum, observed from the event loop, read at scrape time."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, doc: str, labels: dict[str, str] | None = None,
               into: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
        counts, total = list(self.counts), self.total
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, counts, strict=False):
            running += n
            buckets.append((_le(bound), running))
        buckets.append(("+Inf", running + counts[-1]))
        fam = into or HistogramMetricFamily(name, doc, labels=list(labels or {}))
        fam.add_metric(list((labels or {}).values()), buckets, total)
        return fam


def _le(bound: float) -> str:
    return repr(float(bound))


def counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None
            ) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=list(labels or {}))
    fam.add_metric(list((labels or {}).values()), value)
    return fam


def counters(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    """One counter family with a sample per label value."""
    fam = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        fam.add_metric([key], value)
    return fam


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class _Collector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        # Runs in the HTTP thread while the event loop changes what it reads: a dict
        # that changed size under a comprehension raises RuntimeError; read again.
        for attempt in range(5):
            try:
                families = list(self._collect())
            except RuntimeError:
                if attempt == 4:
                    raise
                continue
            yield from families
            return


def parse_addr(text: str) -> tuple[str, int]:
    """`HOST:PORT` (port 0: any). Raises ConfigError."""
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise ConfigError(f"metrics_addr {exc}") from None


def serve_metrics(addr: str, collect: Callable[[], Iterable[Metric]]) -> tuple[str, int, Any]:
    """Serve `collect()`'s families on http://addr/metrics from a daemon thread. Returns
    (host, port, server) — the real port when 0 was asked. Raises ConfigError, OSError."""
    host, port = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(collect))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return host, server.server_port, server
