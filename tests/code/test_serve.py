"""`pneumo serve`: the real server in its own process, spoken to over HTTP."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest
from PIL import Image

from pneumo import registry
from pneumo.model import predict_proba as model_proba
from pneumo.transform import featurize
from tests.helpers import free_port, late_exif_png, pneumo_command, wait_for_port
from tests.predict_helpers import TRANSFORM, expected_probability, image_bytes, register_two, xray_pair

import numpy as np

# real servers in subprocesses: left out of `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    """`pneumo serve` on a free port, polling its alias every second, with small upload bounds."""
    root = str(tmp_path / "registry")
    weights = register_two(root)
    port = free_port()
    process = subprocess.Popen(
        pneumo_command("serve", "--registry", root, "--port", str(port), "--poll", "1",
                       "--max-bytes", "300000", "--max-pixels", "1000000"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, timeout=60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client, root, weights
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_predict_health_model_and_batch(server, shared_data):
    client, root, weights = server
    normal, pneumonia = xray_pair(shared_data)
    assert client.get("/health").json()["version"] == "v0001"
    model = client.get("/model").json()
    assert (model["name"], model["version"], model["threshold"]) == ("tinynet", "v0001", 0.5)
    assert model["metrics"]["val"]["roc_auc"] == 0.9

    multipart = client.post("/predict", files={"file": (normal.name, normal.read_bytes(), "image/jpeg")})
    raw = client.post("/predict", content=normal.read_bytes(), headers={"content-type": "image/jpeg"})
    assert multipart.status_code == raw.status_code == 200
    expected = expected_probability(weights["v0001"], normal)
    assert multipart.json()["probability"] == pytest.approx(expected, abs=1e-6) == raw.json()["probability"]
    assert multipart.json()["input"] == normal.name and multipart.json()["model"]["version"] == "v0001"

    batch = client.post(
        "/predict/batch",
        files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in (normal, pneumonia)]
        + [("files", ("notes.txt", b"hello", "text/plain"))],
    )
    assert batch.status_code == 200
    body = batch.json()
    assert [r["input"] for r in body] == [normal.name, pneumonia.name, "notes.txt"]
    assert body[1]["probability"] == pytest.approx(expected_probability(weights["v0001"], pneumonia), abs=1e-6)
    assert body[2]["probability"] is None and "not an image" in body[2]["error"]

    # Issue 23, item 10: a PNG whose eXIf chunk follows the pixels (turned 90 degrees) is scored as
    # its upright copy, alone and beside a good film: no 500.
    upright = Image.open(pneumonia).convert("L").resize((180, 260))
    turned = late_exif_png(upright, 6)
    alone = client.post("/predict", files={"file": ("turned.png", turned, "image/png")})
    batch = client.post("/predict/batch", files=[("files", ("turned.png", turned, "image/png")),
                                                 ("files", (normal.name, normal.read_bytes(), "image/jpeg"))])
    assert alone.status_code == batch.status_code == 200
    want = float(model_proba(weights["v0001"], featurize(image_bytes(np.asarray(upright)), TRANSFORM)[None])[0])
    assert alone.json()["probability"] == pytest.approx(want, abs=1e-6) == batch.json()[0]["probability"]
    assert batch.json()[1]["probability"] == pytest.approx(expected, abs=1e-6)


def test_bad_uploads_are_4xx_with_a_clear_message(server):
    client, _, _ = server
    cases = [
        # not an image, as an upload and as a raw body
        (client.post("/predict", files={"file": ("notes.txt", b"plain text", "text/plain")}), 422, "not an image"),
        (client.post("/predict", content=b"\x00" * 100, headers={"content-type": "image/png"}), 422, "not an image"),
        (client.post("/predict", content=b"", headers={"content-type": "image/png"}), 422, "empty"),
        # a content type that is no image
        (client.post("/predict", content=b"{}", headers={"content-type": "application/json"}), 415, "unsupported content type"),
        # over the byte bound (300 kB), declared and streamed without a length
        (client.post("/predict", content=b"\xff" * 400_000, headers={"content-type": "image/jpeg"}), 413, "exceeds the limit"),
        (client.post("/predict", content=iter([b"\xff" * 100_000] * 4), headers={"content-type": "image/jpeg"}), 413, "exceeds the limit"),
        # over the pixel bound (1 MP): a small file of many pixels
        (client.post("/predict", content=image_bytes(np.zeros((1200, 1200), dtype=np.uint8)), headers={"content-type": "image/png"}), 413, "too large"),
        # a form without a file, and two files on the single-image endpoint
        (client.post("/predict", files={"note": (None, "x")}), 422, "holds no file"),
        (client.post("/predict", files=[("a", ("a.png", b"1")), ("b", ("b.png", b"2"))]), 422, "takes one image"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        if words:
            assert words in response.json()["detail"], response.text
    assert client.get("/health").status_code == 200  # still serving


def test_the_server_follows_the_alias_without_failing_a_request(server, shared_data):
    client, root, weights = server
    normal, _ = xray_pair(shared_data)
    data = normal.read_bytes()
    seen, failures, stop = [], [], threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=client.base_url, timeout=30) as own:
            while not stop.is_set():
                response = own.post("/predict", content=data, headers={"content-type": "image/jpeg"})
                if response.status_code != 200:
                    failures.append(response.status_code)
                else:
                    seen.append(response.json()["model"]["version"])

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        registry.set_alias(root, "tinynet", "champion", "v0002")
        deadline = time.monotonic() + 15
        while client.get("/health").json()["version"] != "v0002":
            assert time.monotonic() < deadline, "the server did not follow the alias within 15 s (poll 1 s)"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert seen[0] == "v0001" and seen[-1] == "v0002"
    after = client.post("/predict", content=data, headers={"content-type": "image/jpeg"}).json()
    assert after["threshold"] == 0.3
    assert after["probability"] == pytest.approx(expected_probability(weights["v0002"], normal), abs=1e-6)
