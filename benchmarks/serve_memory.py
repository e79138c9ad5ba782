"""Peak and remaining RSS of `pneumo serve` under concurrent uploads of a small PNG that decodes big.

    PYTHONPATH=. python benchmarks/serve_memory.py [--concurrent 4] [--side 7000] [--address-space GB]
                                                   [--batch 5 --part-mb 19] [-- SERVE OPTIONS...]

A 7000 x 7000 RGB PNG of ~160 KB (under the 20 MB and 50 MP bounds) is posted N times at
once to a server on 127.0.0.1 (a registry of hand-made schema-2 cards, as the tests use).
With --batch P, each request is instead a /predict/batch form of P parts of --part-mb MB
(a real film padded with zeros: large on the wire, cheap to decode). --address-space runs
the server under that RLIMIT_AS, as `prlimit --as` does. Prints the status codes, the
server's RSS before, its peak (VmHWM) and its RSS after the requests, and the wall time.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import free_port, pneumo_command, wait_for_port  # noqa: E402
from tests.predict_helpers import register_two  # noqa: E402


def big_png(side: int) -> bytes:
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[::50, :, 0] = 200
    pixels[:, ::70, 1] = 120
    pixels[side * 3 // 7 : side * 4 // 7, side * 3 // 7 : side * 4 // 7, 2] = 90
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def batch_form(parts: int, part_bytes: int) -> bytes:
    """A multipart form of ``parts`` copies of a real film padded with zeros to ``part_bytes``."""
    shared = Path(os.environ.get("PNEUMO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data/chest_xray_224"))
    film = sorted((shared / "train" / "NORMAL").iterdir())[0].read_bytes()
    part = film + bytes(part_bytes - len(film))
    head = 'Content-Disposition: form-data; name="files"; filename="p{}.jpeg"\r\nContent-Type: image/jpeg\r\n\r\n'
    return b"".join(f"--pneumoBoundary\r\n{head.format(at)}".encode() + part + b"\r\n"
                    for at in range(parts)) + b"--pneumoBoundary--\r\n"


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--side", type=int, default=7000)
    parser.add_argument("--address-space", type=float, help="the server's RLIMIT_AS, in GB")
    parser.add_argument("--batch", type=int, help="parts per /predict/batch form, instead of one PNG to /predict")
    parser.add_argument("--part-mb", type=float, default=19.0)
    parser.add_argument("serve_options", nargs="*", help="extra `pneumo serve` options, after --")
    args = parser.parse_args()
    if args.batch:
        path, content_type = "/predict/batch", "multipart/form-data; boundary=pneumoBoundary"
        data = batch_form(args.batch, int(args.part_mb * 1e6))
    else:
        path, content_type, data = "/predict", "image/png", big_png(args.side)
    limit = int(args.address_space * 2**30) if args.address_space else None
    with tempfile.TemporaryDirectory() as tmp:
        register_two(f"{tmp}/registry")
        port = free_port()
        server = subprocess.Popen(
            pneumo_command("serve", "--registry", f"{tmp}/registry", "--port", str(port), "--max-pixels", "50000000",
                           *args.serve_options),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if limit else None,
        )
        try:
            wait_for_port(port, timeout=120)
            url = f"http://127.0.0.1:{port}{path}"
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
            before = status_mb(server.pid, "VmRSS")
            codes: list[int] = []

            def post() -> None:
                response = httpx.post(url, content=data, headers={"content-type": content_type}, timeout=600)
                codes.append(response.status_code)

            started = time.perf_counter()
            threads = [threading.Thread(target=post) for _ in range(args.concurrent)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=900)
            seconds = time.perf_counter() - started
            time.sleep(1)
            peak, after = status_mb(server.pid, "VmHWM"), status_mb(server.pid, "VmRSS")
        finally:
            server.terminate()
            server.wait(timeout=30)
    what = (f"/predict/batch forms of {args.batch} x {args.part_mb:g} MB" if args.batch
            else f"{args.side}x{args.side} RGB PNG ({len(data) / 1024:.0f} KB)")
    limited = f", RLIMIT_AS {args.address_space:g} GB" if limit else ""
    print(f"{args.concurrent} x {what} at once{limited}, options {args.serve_options or '(none)'}: status {sorted(codes)}")
    print(f"server RSS before {before:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB; {seconds:.1f} s")


if __name__ == "__main__":
    main()
