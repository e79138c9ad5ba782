"""Storage: the same atomic, create-if-absent semantics on local paths and on a real S3 endpoint."""

from __future__ import annotations

import pytest

from pneumo import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/prefix"


def test_write_read_roundtrip(root):
    uri = storage.join(root, "a", "b.json")
    assert not storage.exists(uri)
    storage.write_json(uri, {"x": 1})
    assert storage.exists(uri)
    assert storage.read_json(uri) == {"x": 1}
    assert storage.list_uris(root) == [uri]


def test_if_absent_never_replaces(root):
    uri = storage.join(root, "v0001", "card.json")
    storage.write_bytes(uri, b"first", if_absent=True)
    with pytest.raises(storage.AlreadyExists):
        storage.write_bytes(uri, b"second", if_absent=True)
    assert storage.read_bytes(uri) == b"first"


def test_upload_download_and_local_copy(root, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(bytes(range(256)) * 4096)
    uri = storage.join(root, "shards", "train-0000.h5")
    storage.upload_file(source, uri)
    with storage.local_copy(uri) as path:
        assert path.read_bytes() == source.read_bytes()
    target = tmp_path / "out" / "copy.bin"
    storage.download_file(uri, target)
    assert target.read_bytes() == source.read_bytes()


def test_missing_object_raises_file_not_found(root):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nope"))


def test_local_write_leaves_no_temporary_files(tmp_path):
    uri = str(tmp_path / "x" / "data.bin")
    storage.write_bytes(uri, b"payload")
    storage.write_bytes(uri, b"payload2")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["data.bin"]
    assert storage.read_bytes(uri) == b"payload2"


def test_join_and_split():
    assert storage.join("s3://b/p/", "x", "/y") == "s3://b/p/x/y"
    assert storage.split_s3("s3://bucket/key/part") == ("bucket", "key/part")
    with pytest.raises(ValueError):
        storage.split_s3("s3:///nobucket")
