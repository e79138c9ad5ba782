"""`pneumo serve` as an operator sees it: where the docs are, one log line per request, a quick stop."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import free_port, wait_for_port
from tests.predict_helpers import register_two, xray_pair

# real servers in subprocesses: left out of `make test-fast`.
pytestmark = pytest.mark.slow

REQUEST_LINE = re.compile(r"^\S+ \S+ (GET|POST) (\S+) (\d{3}) (\d+\.\d) ms tinynet (v\d{4})$")


def _serve(root: str, port: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--registry", root, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=log,
    )


def test_serve_says_where_the_docs_are_and_logs_one_line_per_request(tmp_path, shared_data):
    root = str(tmp_path / "registry")
    register_two(root)
    port, log_path = free_port(), tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = _serve(root, port, log)
        try:
            wait_for_port(port, timeout=60)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                assert client.get("/health").status_code == 200
                image = xray_pair(shared_data)[0].read_bytes()
                assert client.post("/predict", files={"file": ("a.jpeg", image)}).status_code == 200
                assert client.post("/predict", content=b"not an image", headers={"content-type": "image/png"}).status_code == 422
                assert client.get("/docs").status_code == 200
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
    lines = log_path.read_text().splitlines()
    assert f"API docs at http://127.0.0.1:{port}/docs" in lines[0] and "tinynet v0001" in lines[0]
    requests = [REQUEST_LINE.match(line) for line in lines[1:]]
    assert all(requests), lines
    assert [(m[1], m[2], m[3], m[5]) for m in requests] == [
        ("GET", "/health", "200", "v0001"), ("POST", "/predict", "200", "v0001"),
        ("POST", "/predict", "422", "v0001"), ("GET", "/docs", "200", "v0001"),
    ]
    assert all(float(m[4]) >= 0 for m in requests)


def test_serve_stops_soon_after_sigterm_even_with_a_stalled_upload(tmp_path):
    """And the request it cancels is answered and logged 503 with Retry-After (issue 23, "also
    seen": it was logged 500, and the client got uvicorn's 500)."""
    root = str(tmp_path / "registry")
    register_two(root)
    port, log_path = free_port(), tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = _serve(root, port, log)
    try:
        wait_for_port(port, timeout=60)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:  # announces 100 KB, sends 1 KB, waits
            stalled.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
                + b"x" * 1000
            )
            time.sleep(0.5)
            started = time.perf_counter()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)  # before the shutdown timeout, this upload held the server forever
            seconds = time.perf_counter() - started
            answer = stalled.recv(65536)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    print(f"pneumo serve exited {seconds:.2f} s after SIGTERM with a stalled upload")
    assert seconds < 3.0  # 0.5 s of grace plus the exit; generous for a loaded machine
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 503") and b"\r\nretry-after: 5" in head, answer
    requests = [m for m in map(REQUEST_LINE.match, log_path.read_text().splitlines()) if m]
    assert [(m[1], m[2], m[3]) for m in requests] == [("POST", "/predict", "503")], log_path.read_text()
