"""A small HTTP proxy in front of the moto S3 server that injects real network faults.

Faults are what a flaky S3 does on the wire: a 503 SlowDown answer, a connection reset
before any answer, or an answer that comes later than the client's read timeout. boto3
talks to the proxy through AWS_ENDPOINT_URL exactly as it would talk to S3.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultPlan:
    """Which requests fail, and how: ``add(fault, method, times)`` queues faults per method."""

    def __init__(self) -> None:
        self._queue: list[tuple[str, str]] = []  # (method or "*", fault)
        self.injected: list[tuple[str, str, str]] = []  # (fault, method, path)
        self.every: tuple[int, str] | None = None  # fail every n-th request with this fault
        self._seen = 0
        self._lock = threading.Lock()

    def add(self, fault: str, method: str = "*", times: int = 1) -> None:
        with self._lock:
            self._queue.extend([(method, fault)] * times)

    def take(self, method: str, path: str) -> str | None:
        with self._lock:
            self._seen += 1
            for i, (wanted, fault) in enumerate(self._queue):
                if wanted in ("*", method):
                    del self._queue[i]
                    self.injected.append((fault, method, path))
                    return fault
            if self.every and self._seen % self.every[0] == 0:
                self.injected.append((self.every[1], method, path))
                return self.every[1]
        return None


class FaultProxy:
    def __init__(self, upstream: str, delay_seconds: float = 3.0) -> None:
        self.plan = FaultPlan()
        target = urlsplit(upstream)
        plan, delay = self.plan, delay_seconds

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = plan.take(self.command, self.path)
                if fault == "reset":
                    # SO_LINGER 0: the close sends RST, as a dropped connection does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault == "slowdown":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if fault and fault.startswith("error:"):  # "error:403:AccessDenied": an S3 error answer
                    _, status, code = fault.split(":")
                    body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
                    self.send_response(int(status))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":  # HEAD answers carry no body, as on S3
                        self.wfile.write(body)
                    return
                if fault == "timeout":
                    time.sleep(delay)
                    self.close_connection = True
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = target.netloc
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                response = upstream_conn.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream_conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
