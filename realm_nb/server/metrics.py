"""Prometheus metrics of one server app, in a registry of its own (several apps never collide).

Counters and histograms are fed by the gate middleware (requests, latency, refused keys), by the
model routes (the audit of loads and unloads: who, what, with which outcome) and by the server
when a generation ends (tokens, time to first token, cancellations); gauges are read from the
kernel at scrape time (queue depth, tenants, resident bytes, running requests).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..types import Generation

if TYPE_CHECKING:
    from ..kernel import RealmKernel

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _KernelGauges(Collector):
    """Gauges computed from the kernel when Prometheus scrapes."""

    def __init__(self, kernel: RealmKernel) -> None:
        self.kernel = kernel

    def collect(self) -> Iterator[Metric]:
        stats = self.kernel.stats()
        queue = sum(int(s["queue_depth"]) for s in stats["schedulers"].values())
        values = (
            ("realm_queue_depth", "requests waiting for a KV-cache slot or a forward", queue),
            ("realm_tenants", "tenants known to the kernel", len(stats["tenants"])),
            ("realm_resident_bytes", "bytes of model weights and KV caches resident",
             int(stats["store"]["resident_bytes"])),
            ("realm_running_requests", "generations running now", int(stats["running"])),
        )
        for name, doc, value in values:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g


class ServerMetrics:
    """realm_requests_total, realm_tokens_total, latency/TTFT histograms, gauges, cancellations,
    and the audit: admin actions (load, unload) and refused API keys."""

    def __init__(self, kernel: RealmKernel) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("realm_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("realm_tokens", "tokens processed, by kind (prompt|completion)",
                              ["kind"], registry=r)
        self.latency = Histogram("realm_request_latency_seconds",
                                 "HTTP request latency (streams: until the last byte)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("realm_time_to_first_token_seconds",
                              "time from request start to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.cancelled = Counter("realm_cancelled", "generations that ended cancelled "
                                 "(client gone or cancel call)", registry=r)
        self.admin_actions = Counter(
            "realm_admin_actions", "model loads and unloads asked for over HTTP, by action, "
            "outcome (done | denied | failed) and actor (the key's tenant; keyless: one user)",
            ["action", "outcome", "actor"], registry=r)
        self.auth_failures = Counter(
            "realm_auth_failures", "requests refused for their API key, by reason "
            "(missing | invalid | throttled)", ["reason"], registry=r)
        self.tokens.labels(kind="prompt")
        self.tokens.labels(kind="completion")
        for reason in ("missing", "invalid", "throttled"):
            self.auth_failures.labels(reason=reason)
        r.register(_KernelGauges(kernel))

    def observe_generation(self, g: Generation) -> None:
        """Count one finished generation (called from the thread that waited for it)."""
        self.tokens.labels(kind="prompt").inc(len(g.prompt_ids))
        self.tokens.labels(kind="completion").inc(len(g.token_ids))
        if g.token_ids and "ttft_ms" in g.timings:
            self.ttft.observe(g.timings["ttft_ms"] / 1000)
        if g.finish_reason == "cancelled":
            self.cancelled.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
