"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide).

    minivlm_requests_total{endpoint, status}         requests answered
    minivlm_request_duration_seconds{endpoint}       latency, from the request to the last byte
    minivlm_batch_size                               jobs per model batch
    minivlm_queue_depth                              jobs waiting for the model, read at scrape time
    minivlm_model_errors_total                       requests failed by the model (500)

`endpoint` is the route's path, or "other" for paths the server does not have, so that a scan of random
URLs cannot grow the label set without bound.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, endpoints: set[str], queue_depth: Callable[[], int]):
        self.endpoints = endpoints
        self.registry = CollectorRegistry()
        self.requests = Counter("minivlm_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("minivlm_request_duration_seconds", "request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("minivlm_batch_size", "requests per model batch", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.model_errors = Counter("minivlm_model_errors", "requests failed inside the model",
                                    registry=self.registry)
        depth = Gauge("minivlm_queue_depth", "requests waiting for the model", registry=self.registry)
        depth.set_function(queue_depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)



class MetricsMiddleware:
    """ASGI middleware counting every request by endpoint and status, the refusals of `Guard` included."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m = self.metrics
        endpoint = scope["path"] if scope["path"] in m.endpoints else "other"
        start, status = time.perf_counter(), [500]

        async def tap(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, tap)
        finally:
            m.requests.labels(endpoint, str(status[0])).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - start)
