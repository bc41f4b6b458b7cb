"""HTTP/1.1 over a plain socket, for the tests that must send what no client library sends: partial
headers, a body shorter than its Content-Length, trailing spaces in a header, a multipart body cut off."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int | None               # None: the server closed without answering
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    closed: bool = False             # the server closed the connection after it
    seconds: float = 0.0             # from the call to the answer (or the close)

    def json(self):
        return json.loads(self.body)


def connect(port: int, source: str | None = None, timeout: float = 10.0) -> socket.socket:
    """A connection to 127.0.0.1:port, from the loopback address `source` (127.0.0.2 ... : another
    client as far as the server can tell)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def read_answer(sock: socket.socket, timeout: float) -> Answer:
    """Read one response (status, headers, Content-Length body), then whether the server closed."""
    started = time.monotonic()
    deadline = started + timeout
    data = b""
    answer = Answer(None)
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        except socket.timeout:
            raise AssertionError(f"no answer and no close within {timeout} s (got {data[:200]!r})") from None
        data += chunk
        if b"\r\n\r\n" in data and answer.status is None:
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            answer.status = int(lines[0].split()[1])
            answer.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            data = rest
        if answer.status is not None and len(data) >= int(answer.headers.get("content-length", "0")):
            answer.body = data[: int(answer.headers.get("content-length", "0"))]
            answer.seconds = time.monotonic() - started
            answer.closed = answer.headers.get("connection", "").lower() == "close" and _closes(sock, deadline)
            return answer
        if not chunk:
            answer.closed, answer.seconds = True, time.monotonic() - started
            return answer


def _closes(sock: socket.socket, deadline: float) -> bool:
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def request(port: int, raw: bytes, timeout: float = 30.0, source: str | None = None) -> Answer:
    """Send `raw` on a new connection and read the answer."""
    with connect(port, source) as sock:
        sock.sendall(raw)
        return read_answer(sock, timeout)
