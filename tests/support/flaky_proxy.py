"""An HTTP proxy on 127.0.0.1 in front of the S3 test server that fails
chosen requests the ways object stores and networks fail:

- ``reset``: the request is read, then the connection is reset (RST), as a
  load balancer dropping a connection does;
- ``slowdown``: the request is answered ``503 Slow Down`` with S3's XML
  error body (S3's throttling answer), then the connection is closed;
- ``internal``: ``500 InternalError``, then closed.

Faults are armed with :meth:`FlakyProxy.fail_next` (the next N requests
fail, whatever they are), :meth:`FlakyProxy.fail_every` (every N-th request
fails: a flaky store under a long run) or :meth:`FlakyProxy.fail_always`
(every request fails: an outage). Requests are framed (Content-Length or chunked bodies) so
faults hit requests on kept-alive connections too; everything else is
forwarded byte for byte, so request signatures stay valid (the client signs
the proxy's host:port, and the server sees the same Host header).
"""

from __future__ import annotations

import socket
import struct
import threading
from contextlib import suppress

ANSWERS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}
KINDS = ("reset", *ANSWERS)


class FlakyProxy:
    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.pending: list[str] = []  # kinds of the next requests to fail
        self.always: str | None = None
        self.every: tuple[int, tuple[str, ...]] | None = None
        self.injected: dict[str, int] = {kind: 0 for kind in KINDS}
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def fail_next(self, count: int, kind: str) -> None:
        assert kind in KINDS, kind
        with self.lock:
            self.pending.extend([kind] * count)

    def fail_every(self, every: int, *kinds: str) -> None:
        """Every ``every``-th request fails, taking ``kinds`` in turn."""
        assert kinds and set(kinds) <= set(KINDS) and every >= 2, (every, kinds)
        with self.lock:
            self.every = (every, kinds)

    def fail_always(self, kind: str | None) -> None:
        assert kind is None or kind in KINDS, kind
        with self.lock:
            self.always = kind

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    def _next_fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            periodic = None
            if self.every and self.requests % self.every[0] == 0:
                every, kinds = self.every
                periodic = kinds[(self.requests // every) % len(kinds)]
            kind = self.always or (self.pending.pop(0) if self.pending else None) or periodic
            if kind:
                self.injected[kind] += 1
            return kind

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._connection, args=(client,), daemon=True).start()

    def _connection(self, client: socket.socket) -> None:
        """Requests of one client connection, in order: each forwarded or failed."""
        server = None
        try:
            while head := _read_head(client):
                fault = self._next_fault()
                if fault:
                    self._fail(client, head, fault)
                    return
                if server is None:
                    server = socket.create_connection(self.upstream)
                    threading.Thread(target=_pipe, args=(server, client), daemon=True).start()
                server.sendall(head)
                _copy_body(client, server, head)
        except OSError:
            pass
        finally:
            for sock in (client, server):
                if sock is not None:
                    with suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()

    def _fail(self, client: socket.socket, head: bytes, kind: str) -> None:
        if kind == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # linger 0: the close sends RST
            return
        if b"100-continue" not in head.lower():
            _copy_body(client, None, head)  # answer after the body, as a server does
        status, reason, code, message = ANSWERS[kind]
        body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'.encode()
        client.sendall(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode() + (b"" if head.startswith(b"HEAD ") else body)
        )

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()


def _read_head(sock: socket.socket) -> bytes:
    """The request line and headers (byte by byte past the first packet:
    nothing of the body may be consumed here)."""
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            return b""
        data += chunk
    return data


def _headers(head: bytes) -> dict[bytes, bytes]:
    lines = head.split(b"\r\n")[1:]
    return {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines if line)}


def _copy_body(source: socket.socket, sink: socket.socket | None, head: bytes) -> None:
    """Move one request body (Content-Length or chunked) from ``source`` to ``sink`` (None: discard)."""
    headers = _headers(head)
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            size_line = _read_line(source)
            _send(sink, size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := _read_line(source)) not in (b"\r\n", b""):
                    _send(sink, trailer)
                _send(sink, b"\r\n")
                return
            _send(sink, _read_exact(source, size + 2))
    remaining = int(headers.get(b"content-length", b"0"))
    while remaining > 0:
        chunk = source.recv(min(remaining, 1 << 20))
        if not chunk:
            raise OSError("client closed mid-body")
        _send(sink, chunk)
        remaining -= len(chunk)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            return data
        data += chunk
    return data


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("client closed mid-chunk")
        data += chunk
    return data


def _send(sink: socket.socket | None, data: bytes) -> None:
    if sink is not None:
        sink.sendall(data)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Server to client, unchanged, until either side closes."""
    try:
        while chunk := source.recv(1 << 16):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        with suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)
