"""A TCP proxy on 127.0.0.1 that counts what crosses it: HTTP requests and the bytes
the server sends back, optionally adding latency to every request.

Put it in front of the S3 test server (``tests/support/s3server.py``) to measure what a
reader fetches from an object store::

    with CountingProxy(port_of_s3_server, latency_s=0.02) as proxy:
        ... endpoint_url = proxy.endpoint ...
        proxy.requests, proxy.bytes_down
        proxy.reset()

A request is counted when a client chunk begins with an HTTP method (S3
clients send a request's head in one write, and read requests carry no body).
"""

from __future__ import annotations

import socket
import threading
import time

from vlcluster.ports import free_ports

METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")
CHUNK = 1 << 16


class CountingProxy:
    def __init__(self, target_port: int, latency_s: float = 0.0) -> None:
        self.target_port, self.latency_s = target_port, latency_s
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.requests = self.bytes_down = self.bytes_up = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopping = False

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes_down = self.bytes_up = 0

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.requests, self.bytes_down

    def __enter__(self) -> CountingProxy:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        if self._listener is not None:
            self._listener.close()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while chunk := source.recv(CHUNK):
                if upstream and chunk.startswith(METHODS):
                    with self._lock:
                        self.requests += 1
                    if self.latency_s:
                        time.sleep(self.latency_s)  # one round trip's worth per request
                with self._lock:
                    if upstream:
                        self.bytes_up += len(chunk)
                    else:
                        self.bytes_down += len(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
