"""Prometheus metrics of the API: requests by route and status, their latency, and the jobs by state.

They live in this module, not in the ingress class: Serve ships the ingress class to its replicas by value, with
copies of the objects its methods use, so state shared with the module's middleware must be reached through an
imported module.
"""

import time

from fastapi import Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .store import JobState, JobStore

registry = CollectorRegistry()
_requests = Counter(
    "multitalk_http_requests",
    "HTTP requests by route, method and status.",
    ["route", "method", "status"],
    registry=registry,
)
_latency = Histogram("multitalk_http_request_seconds", "HTTP request time by route.", ["route"], registry=registry)


async def measure(request: Request, call_next):
    """HTTP middleware: counts and times every request under its route template (/v1/videos/{job_id})."""
    start = time.perf_counter()
    response = await call_next(request)
    label = getattr(request.scope.get("route"), "path", "unmatched")  # never the raw path: ids are unbounded
    _requests.labels(label, request.method, str(response.status_code)).inc()
    _latency.labels(label).observe(time.perf_counter() - start)
    return response


class _JobStates(Collector):
    """multitalk_jobs{state}, read from the store at scrape time: every API replica reports the same truth."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self):
        gauge = GaugeMetricFamily("multitalk_jobs", "Jobs in the store by state.", labels=["state"])
        counts = self.store.state_counts()
        for state in JobState:
            gauge.add_metric([state.value], counts.get(state.value, 0))
        yield gauge


def watch_jobs(store: JobStore) -> None:
    """Adds the job-state gauge of this store to the metrics."""
    registry.register(_JobStates(store))


def exposition() -> tuple[bytes, str]:
    """The metrics in the Prometheus text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
