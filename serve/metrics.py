"""The server's Prometheus metrics, declared in one place against an injected registry.

Requests by handler and status code, their latency, rows predicted; reloads, refused
versions and roll-backs; and, read at scrape time, the version served and its age (time
since the snapshot it came from was written: how stale the weights are).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

__all__ = ["HANDLERS", "ServeMetrics"]

HANDLERS = ("predict", "status", "healthz", "readyz", "metrics", "other")
# seconds: from 100 us (one row through a small MLP) to 10 s
_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    """Every metric ``streamtrain serve`` exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "streamtrain_serve_requests", "HTTP requests answered, by handler and status code.", ["handler", "code"], registry=r
        )
        self.latency = Histogram(
            "streamtrain_serve_request_duration_seconds",
            "Time from a request's arrival to its response, by handler.",
            ["handler"],
            buckets=_LATENCY,
            registry=r,
        )
        for h in HANDLERS:
            self.latency.labels(h)
        self.requests.labels("predict", "200")
        self.instances = Counter("streamtrain_serve_instances", "Instances (rows) predicted.", registry=r)
        self.reloads = Counter("streamtrain_serve_reloads", "Versions loaded, validated and swapped in.", registry=r)
        self.refused = Counter(
            "streamtrain_serve_versions_refused",
            "Versions refused (corrupt, unloadable, non-finite outputs on the probe batch); the current one kept serving.",
            registry=r,
        )
        self.rollbacks = Counter(
            "streamtrain_serve_rollbacks", "Swaps to an older version because the one served left the repository.", registry=r
        )
        self.state = _ModelCollector()
        r.register(self.state)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelCollector:
    """The version served and its age, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.current: Callable[[], Any] = lambda: None  # the watcher's current ServedModel, or None

    def describe(self) -> list:
        return []

    def collect(self):
        m = self.current()
        ready = GaugeMetricFamily("streamtrain_serve_ready", "1 once a version is loaded and answering.", value=int(m is not None))
        yield ready
        if m is None:
            return
        yield GaugeMetricFamily(
            "streamtrain_serve_model_version", "Version served (the training step it was published at).", value=m.version
        )
        yield GaugeMetricFamily(
            "streamtrain_serve_model_age_seconds",
            "Seconds since the snapshot of the version served was written (how stale its weights are).",
            value=max(0.0, time.time() - m.created),
        )
        yield GaugeMetricFamily(
            "streamtrain_serve_model_loaded_timestamp_seconds", "Unix time the version served was swapped in.", value=m.loaded
        )
