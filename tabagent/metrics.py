"""Prometheus metrics, one registry per server so two apps in one process never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Buckets from 0.5 ms: most local API calls finish in a few milliseconds, chat streams in seconds.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "tabagent_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "tabagent_http_request_duration_seconds",
            "Time from request received to response headers sent (streams: to stream end).",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.download_bytes = Counter(
            "tabagent_download_bytes", "Bytes downloaded from the Hub.", registry=self.registry
        )
        self.download_retries = Counter(
            "tabagent_download_retries",
            "Download requests retried (errors, stalls, dropped connections).",
            registry=self.registry,
        )
        self.download_speed = Histogram(
            "tabagent_download_speed_bytes_per_second",
            "Speed of each file download (verification included).",
            buckets=(1e5, 1e6, 5e6, 1e7, 2.5e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2e9),
            registry=self.registry,
        )

    def observe_download(self, fetched: int, retries: int, seconds: float) -> None:
        self.download_bytes.inc(fetched)
        self.download_retries.inc(retries)
        if seconds > 0 and fetched:
            self.download_speed.observe(fetched / seconds)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
