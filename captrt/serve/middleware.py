"""ServiceMiddleware: what every request of the service goes through, whichever route serves it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Callable

from captrt.serve.metrics import ServeMetrics, route_label
from captrt.serve.upload import BodyTooLargeError, ServeError


class ServiceMiddleware:
    """Pure ASGI: per-request metrics (status, latency, in flight), the body cap and the body timeout
    on the receive channel (a body is refused while it streams in, whoever reads it), HEAD served as
    GET without the body on every GET route (routes added later included), and an X-Request-ID on
    every response (the client's own, when it sent a sane one, else a new one) to match logs to requests."""

    def __init__(self, app: Any, metrics: ServeMetrics, max_body_bytes: int, body_timeout: float | None = None):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id.decode()  # request.state.request_id (/v2 echoes it)
        method = scope.get("method", "")
        head = method == "HEAD"
        if head:  # HTTP serves HEAD wherever it serves GET: the same headers, no body
            scope = {**scope, "method": "GET"}
        status = 500
        received = 0
        body_done = False
        started = time.perf_counter()
        limit, body_timeout = self.max_body_bytes, self.body_timeout

        async def capped_receive() -> dict:
            nonlocal received, body_done
            if body_done or body_timeout is None:  # after the body: waiting for a disconnect is unbounded
                message = await receive()
            else:  # asyncio.wait, not wait_for: wait_for can swallow the caller's own cancellation (the
                # request timeout's) when the message arrives at the same moment, and the request runs on
                pending = asyncio.ensure_future(receive())
                try:
                    done, _ = await asyncio.wait({pending}, timeout=body_timeout)
                finally:
                    if not pending.done():
                        pending.cancel()
                if pending not in done:
                    raise ServeError(408, f"the request body stalled: nothing arrived for {body_timeout:g} s "
                                          "(the service's --body-timeout; is it shorter than its Content-Length?)",
                                     {"Connection": "close"})
                message = pending.result()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, capped_receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def _request_id(scope: dict) -> bytes:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id" and 0 < len(value) <= 128 and all(33 <= c < 127 for c in value):
            return value
    return uuid.uuid4().hex.encode()
