"""Prometheus metrics of one service instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import re

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info,
                               disable_created_metrics, generate_latest)

# The *_created timestamp series double the exposition for no operator value.
disable_created_metrics()

# Server-side latency of a caption request: from a few ms (one small image) to the timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ROUTES = ("/v1/captions", "/v1/model", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json",
          "/v2", "/v2/health/live", "/v2/health/ready")
# The Open Inference Protocol's per-model paths, labelled by their template (the name is the client's).
_V2_MODEL = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?(/ready|/infer)?")


def route_label(path: str) -> str:
    """The route for labels; any other path is 'other', so random URLs cannot grow the label set."""
    if path in ROUTES:
        return path
    model = _V2_MODEL.fullmatch(path)
    if model is None:
        return "other"
    return "/v2/models/{name}" + ("/versions/{version}" if model.group(1) else "") + (model.group(2) or "")


class ServeMetrics:
    """Requests by route and status, latency, batch sizes, queue depth, busy streams, images captioned."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("captrt_requests", "HTTP requests by route, method and status "
                                "(499: the client went away first)", ["route", "method", "status"], registry=r)
        self.latency = Histogram("captrt_request_duration_seconds", "Server-side request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("captrt_requests_in_flight", "HTTP requests being handled", registry=r)
        self.batch_size = Histogram("captrt_batch_size", "Images per batched engine call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("captrt_inference_seconds", "Wall time of one batched engine call",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("captrt_queue_depth", "Images waiting for the engine", registry=r)
        self.streams_busy = Gauge("captrt_streams_busy", "Streams running a batch now (of --streams)", registry=r)
        self.images_captioned = Counter("captrt_images_captioned", "Images the engine captioned (also those whose client left mid-inference)", registry=r)
        self.images_dropped = Counter("captrt_images_dropped", "Queued images dropped before inference "
                                      "(client disconnected or request timed out)", registry=r)
        self.image_errors = Counter("captrt_image_errors", "Uploaded images refused, by reason",
                                    ["reason"], registry=r)
        self.connections_closed = Counter("captrt_connections_closed", "Connections the service closed to protect "
                                          "itself: header_timeout, per_client_limit", ["reason"], registry=r)
        self.ready = Gauge("captrt_ready", "1 once the model is loaded and warmed", registry=r)
        self.model = Info("captrt_model", "The model and engine being served", registry=r)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) in the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
