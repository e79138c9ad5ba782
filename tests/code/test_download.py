"""pneumo.download: sources, safe extraction, dataset layout, patient ids, manifest, Kaggle."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from pneumo import download
from tests.helpers import KAGGLE_IMAGES, free_port, jpeg_bytes, write_kaggle_tree, write_kaggle_zip
from pneumo.download import (
    SourceUnavailable,
    UnsafeArchive,
    build_manifest,
    fetch,
    find_dataset_root,
    parse_patient_id,
    parse_source,
    source_fingerprint,
)

# --------------------------------------------------------------------------- sources


def test_parse_source_accepts_every_form(tmp_path):
    zip_path = write_kaggle_zip(tmp_path / "archive.zip")
    assert parse_source("kaggle:paultimothymooney/chest-xray-pneumonia").model_dump() == {
        "kind": "kaggle",
        "location": "paultimothymooney/chest-xray-pneumonia",
        "version": None,
    }
    assert parse_source("kaggle:owner/data-set/versions/2").version == 2
    assert parse_source(str(tmp_path)) == download.Source(kind="dir", location=str(tmp_path.resolve()))
    assert parse_source(str(zip_path)).kind == "zip"
    assert parse_source("s3://bucket/path/Archive.ZIP").kind == "s3_zip"
    assert parse_source("s3://bucket/datasets/chest_xray").model_dump()["kind"] == "s3_prefix"


@pytest.mark.parametrize(
    "source, says",
    [
        ("/no/such/folder", "does not exist"),
        ("kaggle:no-slash", "invalid Kaggle source"),
        ("kaggle:a/b/c", "invalid Kaggle source"),
        ("https://example.com/data.zip", "unsupported source scheme"),
        ("", "empty source"),
    ],
)
def test_parse_source_rejects_bad_input_listing_accepted_forms(source, says):
    with pytest.raises(ValueError, match=says) as error:
        parse_source(source)
    assert "kaggle:OWNER/DATASET" in str(error.value) and "s3://" in str(error.value)


def test_parse_source_rejects_a_file_that_is_not_a_zip(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a .zip"):
        parse_source(str(tmp_path / "notes.txt"))


# --------------------------------------------------------------------------- fingerprints


def test_folder_fingerprint_stays_when_nothing_changes_and_moves_when_a_file_does(tmp_path):
    root = write_kaggle_tree(tmp_path / "data")
    first = source_fingerprint(str(root))
    assert source_fingerprint(str(root)) == first

    image = root / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    stat_before = image.stat()
    image.write_bytes(image.read_bytes()[::-1])  # same size, new content
    os.utime(image, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 1_000_000_000))
    second = source_fingerprint(str(root))
    assert second != first

    (root / "train" / "NORMAL" / "IM-0200-0001.jpeg").write_bytes(jpeg_bytes(99))
    assert source_fingerprint(str(root)) not in {first, second}


def test_zip_fingerprint_moves_when_the_archive_is_replaced(tmp_path):
    zip_path = write_kaggle_zip(tmp_path / "archive.zip")
    first = source_fingerprint(str(zip_path))
    assert source_fingerprint(str(zip_path)) == first
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr("chest_xray/train/NORMAL/IM-0300-0001.jpeg", jpeg_bytes(5))
    assert source_fingerprint(str(zip_path)) != first


# --------------------------------------------------------------------------- fetch + layout


def test_kaggle_shaped_zip_gives_one_copy_and_no_junk(tmp_path):
    zip_path = write_kaggle_zip(tmp_path / "archive.zip")
    root = find_dataset_root(fetch(str(zip_path), tmp_path / "cache"))
    assert root.name == "chest_xray" and root.parent.name != "chest_xray"  # not the nested duplicate

    manifest = build_manifest(root)
    assert sorted(r.relpath for r in manifest.records) == sorted(f"{s}/{c}/{n}" for s, c, n in KAGGLE_IMAGES)
    assert manifest.quarantine == []
    assert manifest.counts() == {
        "train": {"NORMAL": 2, "PNEUMONIA": 3},
        "val": {"NORMAL": 1, "PNEUMONIA": 1},
        "test": {"NORMAL": 1, "PNEUMONIA": 1},
    }


def test_fetch_zip_twice_reuses_the_extraction(tmp_path):
    zip_path = write_kaggle_zip(tmp_path / "archive.zip")
    cache = tmp_path / "cache"
    messages: list[str] = []
    first = fetch(str(zip_path), cache, progress=messages.append)
    assert any("extracting" in m for m in messages)
    image = first / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    mtime_before = image.stat().st_mtime_ns

    messages.clear()
    second = fetch(str(zip_path), cache, progress=messages.append)
    assert second == first
    assert not any("extracting" in m for m in messages)
    assert image.stat().st_mtime_ns == mtime_before
    # Only the finished folder is left: no temporary ".partial" folders.
    assert [p.name for p in (cache / "extracted").iterdir()] == [first.name]


def test_fetch_folder_returns_it_resolved(tmp_path):
    root = write_kaggle_tree(tmp_path / "data")
    assert fetch(str(tmp_path / "data" / ".." / "data"), tmp_path / "cache") == root.resolve()
    assert not (tmp_path / "cache").exists()


def test_failed_extraction_leaves_no_folder_that_looks_complete(tmp_path):
    zip_path = tmp_path / "bad.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("chest_xray/train/NORMAL/IM-0001-0001.jpeg", jpeg_bytes(1))
        archive.writestr("../escape.txt", "x")
    with pytest.raises(UnsafeArchive):
        fetch(str(zip_path), tmp_path / "cache")
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []


def test_find_dataset_root_accepts_the_root_itself(tmp_path):
    root = tmp_path / "chest_xray_224"
    (root / "train" / "NORMAL").mkdir(parents=True)
    assert find_dataset_root(root) == root.resolve()


def test_find_dataset_root_ignores_macosx_and_prefers_the_shallowest_copy(tmp_path):
    write_kaggle_tree(tmp_path / "x" / "__MACOSX")  # same depth as the real copy: only its name rules it out
    write_kaggle_tree(tmp_path / "x" / "chest_xray" / "chest_xray")
    write_kaggle_tree(tmp_path / "x" / "chest_xray")
    assert find_dataset_root(tmp_path / "x") == (tmp_path / "x" / "chest_xray").resolve()


def test_find_dataset_root_refuses_two_copies_at_the_same_depth(tmp_path):
    write_kaggle_tree(tmp_path / "a" / "chest_xray")
    write_kaggle_tree(tmp_path / "b" / "chest_xray")
    with pytest.raises(ValueError, match="several dataset copies"):
        find_dataset_root(tmp_path)


def test_find_dataset_root_explains_the_expected_layout(tmp_path):
    (tmp_path / "images" / "NORMAL").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"train/NORMAL and train/PNEUMONIA"):
        find_dataset_root(tmp_path)


# --------------------------------------------------------------------------- patient ids + manifest


@pytest.mark.parametrize(
    "filename, patient",
    [
        ("person1000_bacteria_2931.jpeg", "1000"),
        ("person1000_virus_1681.jpeg", "1000"),
        ("person1_bacteria_1.jpeg", "1"),
        ("IM-0115-0001.jpeg", "115"),
        ("NORMAL2-IM-1427-0001.jpeg", "1427"),
        ("train/NORMAL/IM-0001-0001.jpeg", "1"),
        ("scan_ünïcode.png", "scan_ünïcode"),  # unknown scheme: the stem, never an error
        ("IM-abc.jpeg", "IM-abc"),
    ],
)
def test_parse_patient_id(filename, patient):
    assert parse_patient_id(filename) == patient


def test_manifest_records_every_image_with_hash_label_and_patient(tmp_path):
    root = write_kaggle_tree(tmp_path / "data")
    seen: list[tuple[int, int]] = []
    manifest = build_manifest(root, progress=lambda done, total: seen.append((done, total)))

    assert manifest.root == str(root.resolve())
    assert [r.relpath for r in manifest.records] == sorted(
        [f"{s}/{c}/{n}" for s, c, n in KAGGLE_IMAGES], key=lambda p: (("train", "val", "test").index(p.split("/")[0]), p)
    )
    for record in manifest.records:
        data = (root / record.relpath).read_bytes()
        assert record.sha256 == hashlib.sha256(data).hexdigest()
        assert record.bytes == len(data)
        assert record.label == (record.relpath.split("/")[1] == "PNEUMONIA")
        assert record.split == record.relpath.split("/")[0]
        assert record.patient_id == parse_patient_id(record.relpath)
    assert seen[-1] == (len(KAGGLE_IMAGES), len(KAGGLE_IMAGES))
    assert build_manifest(root).digest() == manifest.digest()  # deterministic


def test_manifest_quarantines_bad_files_and_skips_os_junk(tmp_path):
    root = write_kaggle_tree(tmp_path / "data")
    normal = root / "train" / "NORMAL"
    (normal / "IM-0500-0001.jpeg").write_bytes(b"")
    (normal / "notes.txt").write_text("not an image")
    (normal / "README").write_text("no extension")
    (normal / "._IM-0115-0001.jpeg").write_bytes(b"\x00\x05\x16\x07")
    (normal / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "COVID").mkdir()
    (root / "train" / "COVID" / "covid-1.jpeg").write_bytes(jpeg_bytes(3))
    outside = tmp_path / "secret.jpeg"
    outside.write_bytes(jpeg_bytes(4))
    (normal / "IM-0600-0001.jpeg").symlink_to(outside)
    (normal / "IM-0700-0001.jpeg").symlink_to(normal / "IM-0115-0001.jpeg")  # inside: a normal image
    (normal / "ÉCHO-ñandú.JPG").write_bytes(jpeg_bytes(5))  # non-ASCII, upper-case extension

    manifest = build_manifest(root)
    reasons = {q.relpath: q.reason for q in manifest.quarantine}
    assert reasons == {
        "train/COVID/covid-1.jpeg": "unknown class folder 'COVID' (expected NORMAL or PNEUMONIA)",
        "train/NORMAL/IM-0500-0001.jpeg": "empty file (0 bytes)",
        "train/NORMAL/IM-0600-0001.jpeg": "symlink points outside the dataset",
        "train/NORMAL/README": "not an image file (extension '(none)')",
        "train/NORMAL/notes.txt": "not an image file (extension '.txt')",
    }
    assert all(q.stage == "manifest" for q in manifest.quarantine)
    relpaths = {r.relpath for r in manifest.records}
    assert {"train/NORMAL/ÉCHO-ñandú.JPG", "train/NORMAL/IM-0700-0001.jpeg"} <= relpaths
    assert not any("._" in p or "DS_Store" in p for p in relpaths | set(reasons))
    # Every non-junk file is accounted for, as a record or with a reason.
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}
    junk = {p for p in files if p.rsplit("/", 1)[-1].startswith(".")}
    assert relpaths | set(reasons) == files - junk


def test_build_manifest_refuses_a_folder_without_the_layout(tmp_path):
    with pytest.raises(ValueError, match="find_dataset_root"):
        build_manifest(tmp_path)


# --------------------------------------------------------------------------- S3 (moto endpoint)


def test_s3_zip_and_prefix_are_fetched_and_fingerprinted(tmp_path, s3_bucket):
    from pneumo import storage

    zip_path = write_kaggle_zip(tmp_path / "archive.zip")
    storage.upload_file(zip_path, f"s3://{s3_bucket}/archives/chest_xray.zip")
    zip_source = f"s3://{s3_bucket}/archives/chest_xray.zip"
    root = find_dataset_root(fetch(zip_source, tmp_path / "cache"))
    assert len(build_manifest(root).records) == len(KAGGLE_IMAGES)

    tree = write_kaggle_tree(tmp_path / "tree")
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        storage.upload_file(path, f"s3://{s3_bucket}/data/{path.relative_to(tree).as_posix()}")
    prefix = f"s3://{s3_bucket}/data"
    first = source_fingerprint(prefix)
    assert source_fingerprint(prefix) == first
    local = fetch(prefix, tmp_path / "cache")
    assert local == tmp_path / "cache" / "s3" / first[:16]
    assert build_manifest(find_dataset_root(local)).digest() == build_manifest(tree).digest()

    storage.write_bytes(f"s3://{s3_bucket}/data/train/NORMAL/IM-0900-0001.jpeg", jpeg_bytes(9))
    assert source_fingerprint(prefix) != first


# --------------------------------------------------------------------------- Kaggle over HTTP
#
# kagglesdk has no setting for an arbitrary endpoint, but KAGGLE_API_ENVIRONMENT=TEST makes it
# call http://localhost:7777/api/v1/... over plain HTTP. HTTP_PROXY (honoured by requests)
# sends those calls, and the follow-up download from the storage URL Kaggle redirects to, to
# the fake server below on a free port, which answers as the Kaggle API and GCS would.

VERSION = 7
USER, KEY = "alice", "s3cr3t-kaggle-key-0123"


class FakeKaggle(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        url = urlsplit(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        auth = self.headers.get("Authorization")
        self.server.calls.append((url.path.rsplit("/", 1)[-1], body, auth))
        expected = "Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode()
        if auth != expected:
            error = {"code": 401, "message": "Unauthenticated"}
            return self.send(401, json.dumps(error).encode(), "application/json")
        slugs = (body.get("ownerSlug"), body.get("datasetSlug"))
        if url.path == "/api/v1/datasets.DatasetApiService/GetDataset" and slugs == ("owner", "xrays"):
            dataset = {"ref": "owner/xrays", "currentVersionNumber": VERSION}
            return self.send(200, json.dumps(dataset).encode(), "application/json")
        wanted_version = body.get("datasetVersionNumber") == VERSION
        if url.path == "/api/v1/datasets.DatasetApiService/DownloadDataset" and wanted_version:
            return self.send(302, b"", "text/plain", Location="http://storage.googleapis.test/bundle/archive.zip")
        self.send(404, json.dumps({"code": 404, "message": "Not found"}).encode(), "application/json")

    def do_GET(self):
        url = urlsplit(self.path)
        self.server.calls.append((url.netloc + url.path, None, self.headers.get("Authorization")))
        if url.path != "/bundle/archive.zip":
            return self.send(404, b"", "text/plain")
        data = self.server.archive
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        self.send(200, data, "application/zip", **{"X-Goog-Hash": f"md5={md5}"})


@pytest.fixture
def kaggle_env(tmp_path, monkeypatch):
    """No credentials anywhere, kagglesdk in its TEST environment; returns the fake home."""
    import kagglehub.config

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # kagglesdk reads ~/.kaggle itself
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    for name in (
        "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_KERNEL_RUN_TYPE", "TBE_RUNTIME_ADDR",
        "NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    kagglehub.config.clear_kaggle_credentials()
    return home


@pytest.fixture
def fake_kaggle(kaggle_env, tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKaggle)
    server.calls = []
    server.archive = write_kaggle_zip(tmp_path / "served.zip").read_bytes()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("http_proxy", proxy)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow  # kagglehub against a local HTTP endpoint
def test_kaggle_fetch_downloads_through_kagglehub_and_reuses_it(fake_kaggle, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    cache = tmp_path / "cache"

    local = fetch("kaggle:owner/xrays", cache)
    assert local == cache / "kaggle" / "owner" / "xrays" / "versions" / str(VERSION)
    manifest = build_manifest(find_dataset_root(local))
    assert sorted(r.relpath for r in manifest.records) == sorted(f"{s}/{c}/{n}" for s, c, n in KAGGLE_IMAGES)
    called = [name for name, _, _ in fake_kaggle.calls]
    assert called == ["GetDataset", "DownloadDataset", "storage.googleapis.test/bundle/archive.zip"]

    fake_kaggle.calls.clear()
    assert fetch("kaggle:owner/xrays", cache) == local
    assert [name for name, _, _ in fake_kaggle.calls] == ["GetDataset"]  # no second download
    assert not [p for p in local.parent.iterdir() if p.name.startswith(".")]  # no partial folders


@pytest.mark.slow  # a local HTTP endpoint: in `make test`, not `make test-fast`
def test_kaggle_fingerprint_is_the_current_version(fake_kaggle, kaggle_env):
    (kaggle_env / ".kaggle").mkdir()
    (kaggle_env / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
    current = source_fingerprint("kaggle:owner/xrays")
    assert current == source_fingerprint(f"kaggle:owner/xrays/versions/{VERSION}")
    assert current != source_fingerprint(f"kaggle:owner/xrays/versions/{VERSION - 1}")


def test_kaggle_without_credentials_explains_what_to_do(fake_kaggle, tmp_path):
    with pytest.raises(SourceUnavailable) as error:
        fetch("kaggle:owner/xrays", tmp_path / "cache")
    message = str(error.value)
    assert fake_kaggle.calls and all(auth is None for _, _, auth in fake_kaggle.calls)
    assert "\n" not in message
    for needed in ("owner/xrays", "no Kaggle credentials were found", "KAGGLE_USERNAME", "KAGGLE_KEY",
                   "~/.kaggle/kaggle.json", "--source /path/to/chest_xray", ".zip"):
        assert needed in message
    assert not (tmp_path / "cache" / "kaggle" / "owner" / "xrays" / "versions").exists()


def test_kaggle_rejected_key_never_appears_in_the_error(fake_kaggle, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", "wrong-" + KEY)
    with pytest.raises(SourceUnavailable, match="Kaggle credentials were found") as error:
        fetch("kaggle:owner/xrays", tmp_path / "cache")
    assert KEY not in str(error.value) and "KAGGLE_KEY" in str(error.value)


def test_kaggle_unreachable_is_source_unavailable(kaggle_env, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    nobody = f"http://127.0.0.1:{free_port()}"  # closed port: connection refused
    monkeypatch.setenv("HTTP_PROXY", nobody)
    monkeypatch.setenv("http_proxy", nobody)
    with pytest.raises(SourceUnavailable, match="--source /path/to/chest_xray") as error:
        fetch("kaggle:owner/xrays", tmp_path / "cache")
    assert KEY not in str(error.value)
