"""Connection limits of `captrt serve` that uvicorn's configuration does not offer.

uvicorn bounds only the time a keep-alive connection may sit idle *after* a response
(timeout_keep_alive). A connection that never finishes its request headers, or never sends a byte,
stays open forever, and since `limit_concurrency` counts open connections, about --max-connections of
them make every request (/healthz included) a 503. Two limits close that, at the asyncio level where
connections live, around whichever HTTP protocol uvicorn picked:

- header timeout: from the moment a connection is accepted, and from the first byte of each later
  request on it, the request headers must be complete within --header-timeout seconds, or the
  connection is closed (with a 408 when part of a request had arrived).
- per-client cap: at most --max-connections-per-client open connections from one IP address; the
  next one is answered 503 and closed at once, before any of it is parsed.

"Headers complete" is when uvicorn calls the application for the request: the ASGI wrapper from
`track_requests` tells the connection, found through a context variable that uvicorn's request task
inherits from the data_received call that started it. The request body has its own timeout in the
application (ServiceMiddleware), as the application is what reads it.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from typing import Any, Callable

log = logging.getLogger("captrt.serve")
_CONNECTION: contextvars.ContextVar["_Guarded | None"] = contextvars.ContextVar("captrt_connection", default=None)
REASON_HEADER_TIMEOUT, REASON_PER_CLIENT = "header_timeout", "per_client_limit"


def _response(status: str, detail: str, extra: str = "") -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
            "connection: close\r\n\r\n").encode("latin-1") + body


class ConnectionLimits:
    """The header timeout and per-client cap of one server, and the open connections per address.

    on_close(reason): called for each connection these limits closed (REASON_HEADER_TIMEOUT or
    REASON_PER_CLIENT), e.g. to count it in the metrics.
    """

    def __init__(self, header_timeout_s: float, per_client: int, on_close: Callable[[str], None] | None = None):
        self.header_timeout_s = header_timeout_s
        self.per_client = per_client  # 0: no cap (behind a proxy every client has the proxy's address)
        self.on_close = on_close or (lambda reason: None)
        self.open_by_address: dict[str, int] = {}

    def protocol(self, inner: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
        """An asyncio protocol class to hand uvicorn (Config(http=...)): `inner` (uvicorn's own HTTP
        protocol, built with the same arguments) behind these limits."""
        limits = self

        class GuardedHTTP(_Guarded):
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(limits, lambda: inner(*args, **kwargs))

        return GuardedHTTP

    def track_requests(self, app: Callable) -> Callable:
        """The ASGI app wrapped so that each request tells its connection when its headers were
        complete (the call) and when it was answered (the return)."""
        async def tracked(scope: dict, receive: Callable, send: Callable) -> None:
            connection = _CONNECTION.get()
            if connection is None or scope["type"] != "http":
                await app(scope, receive, send)
                return
            connection.request_started()
            try:
                await app(scope, receive, send)
            finally:
                connection.request_finished()

        return tracked


class _Guarded(asyncio.Protocol):
    """One connection: forwards every event to the inner protocol, closes it when its headers are late,
    refuses it when its address already holds the cap."""

    def __init__(self, limits: ConnectionLimits, make_inner: Callable[[], asyncio.Protocol]):
        self.limits = limits
        self.make_inner = make_inner
        self.inner: Any = None  # made only for an accepted connection
        self.transport: Any = None
        self.address: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.requests = 0       # requests of this connection in the application now
        self.partial = False    # bytes of a request arrived since the last answer

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else None
        limits = self.limits
        if address is not None and limits.per_client:
            held = limits.open_by_address.get(address, 0)
            if held >= limits.per_client:
                transport.write(_response("503 Service Unavailable", f"too many connections from {address} "
                                          f"(the service's --max-connections-per-client is {limits.per_client})",
                                          "retry-after: 1\r\n"))
                transport.close()
                limits.on_close(REASON_PER_CLIENT)
                log.debug("refused a connection from %s: %d already open", address, held)
                return
            limits.open_by_address[address] = held + 1
            self.address = address
        self._arm()  # the client connected to send a request: its headers are due from now
        self.inner = self.make_inner()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return  # a refused connection: nothing it sends is read
        if self.requests == 0:
            self.partial = True
            if self.timer is None:
                self._arm()  # the first byte of a new request on a kept-alive connection
        token = _CONNECTION.set(self)  # uvicorn's request task, created inside, inherits it
        try:
            self.inner.data_received(data)
        finally:
            _CONNECTION.reset(token)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.address is not None:
            left = self.limits.open_by_address.get(self.address, 1) - 1
            if left > 0:
                self.limits.open_by_address[self.address] = left
            else:
                self.limits.open_by_address.pop(self.address, None)
            self.address = None
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def request_started(self) -> None:
        self.requests += 1
        self._disarm()

    def request_finished(self) -> None:
        self.requests -= 1
        self.partial = False  # uvicorn's keep-alive timeout covers the idle time until the next request

    def _arm(self) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(self.limits.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.requests or self.transport is None or self.transport.is_closing():
            return
        if self.partial:
            self.transport.write(_response("408 Request Timeout", "request headers not complete within the "
                                           f"service's --header-timeout of {self.limits.header_timeout_s:g} s"))
        self.transport.close()
        self.limits.on_close(REASON_HEADER_TIMEOUT)
        log.debug("closed a connection whose request headers were late")
