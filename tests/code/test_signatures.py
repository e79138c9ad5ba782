"""Signed records: the key lives outside the workdir, and only bytes signed with it under their own name are read."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from pneumo import signatures
from pneumo.signatures import SignatureError, sign, verify
from tasks.result_storage import SignedResultStorage

KEY = b"k" * 32


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv(signatures.KEY_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_the_key_file_is_made_once_readable_by_its_owner_only(home):
    key = signatures.load_key()
    path = home / ".config" / "pneumo" / "results.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32 and signatures.load_key() == key


def test_a_key_file_others_can_read_or_a_linked_one_is_refused(home):
    signatures.load_key()
    path = home / ".config" / "pneumo" / "results.key"
    path.chmod(0o644)
    with pytest.raises(ValueError, match="can be read by others"):
        signatures.load_key()
    path.chmod(0o600)
    os.rename(path, home / "elsewhere")
    path.symlink_to(home / "elsewhere")
    with pytest.raises(ValueError, match="regular file"):
        signatures.load_key()


def test_the_environment_key_wins_and_must_be_long(home, monkeypatch):
    monkeypatch.setenv(signatures.KEY_ENV, "x" * 40)
    assert signatures.load_key() == b"x" * 40
    assert not (home / ".config").exists()
    monkeypatch.setenv(signatures.KEY_ENV, "short")
    with pytest.raises(ValueError, match="too short"):
        signatures.load_key()


def test_only_bytes_signed_with_the_key_under_their_own_name_are_read():
    signed = sign("abc", b"payload", KEY)
    assert verify("abc", signed, KEY) == b"payload"
    with pytest.raises(SignatureError, match="not signed"):
        verify("abc", b"payload", KEY)
    with pytest.raises(SignatureError, match="does not match"):
        verify("abc", signed.replace(b"payload", b"pAyload"), KEY)
    with pytest.raises(SignatureError, match="does not match"):
        verify("other", signed, KEY)  # a valid record moved under another cache key
    with pytest.raises(SignatureError, match="does not match"):
        verify("abc", signed, b"z" * 32)


def test_the_result_storage_refuses_a_planted_record_with_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(signatures.KEY_ENV, "y" * 40)
    store = SignedResultStorage(root=str(tmp_path))
    store.write_path("key1", b'{"result": 1}')
    assert store.read_path("key1") == b'{"result": 1}'
    (tmp_path / "key1").write_bytes(b'{"metadata": {"serializer": {"type": "pickle"}}, "result": "gASV"}')
    with caplog.at_level(logging.WARNING), pytest.raises(SignatureError):
        store.read_path("key1")
    assert "refused cached result" in caplog.text and "key1" in caplog.text
    with pytest.raises(ValueError, match="not a plain file name"):
        store.read_path("../outside")


# --------------------------------------------------------------------------- planted records that are no records (issue 23, item 3)

PLANTED = r"""
import json, os, resource, sys
from pathlib import Path

from pneumo import signatures, storage
from tasks.result_storage import SignedResultStorage

root, name, kind = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
store = SignedResultStorage(root=str(root))
store.write_path("good", b"content")  # imports, key and the first write are in the baseline
if kind == "sparse":
    with open(root / name, "wb") as handle:
        handle.truncate(2 * 2**30)  # 2 GB, no block on disk
else:
    os.mkfifo(root / name)
# The most this check may take; without it a regression would read 2 GB or more (three copies before).
vm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, ((vm + 512 * 1024) * 1024, resource.getrlimit(resource.RLIMIT_AS)[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    store.read_path(name)
    said = "read"
except (signatures.SignatureError, storage.Unreadable) as error:
    said = f"refused: {error}"
except MemoryError:
    said = "MemoryError"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"said": said, "peak_growth_kb": peak, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "good": store.read_path("good").decode()}))
"""


def _plant(tmp_path, kind: str) -> dict:
    import json
    import subprocess
    import sys

    env = {**os.environ, signatures.KEY_ENV: "q" * 40}
    # A FIFO blocks a plain open() forever; the timeout only turns such a regression into a failure.
    run = subprocess.run([sys.executable, "-c", PLANTED, str(tmp_path), "a" * 32, kind], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.slow  # subprocesses
def test_a_2_gb_record_is_refused_by_its_size_before_it_is_read(tmp_path):
    found = _plant(tmp_path, "sparse")
    print(f"2 GB sparse record: peak RSS {found['peak_kb'] / 1024:.0f} MB, grown by {found['peak_growth_kb']} KB while refused")
    assert found["said"].startswith("refused: ") and "2147483648 bytes, more than the" in found["said"], found
    assert found["peak_growth_kb"] < 16 * 1024, found  # under 16 MB for a 2 GB file: the bytes were never read
    assert found["good"] == "content"  # the store still reads its own records


@pytest.mark.slow  # subprocesses
def test_a_fifo_planted_as_a_record_is_refused_without_waiting_for_a_writer(tmp_path):
    found = _plant(tmp_path, "fifo")
    assert found["said"].startswith("refused: ") and "not a regular file" in found["said"], found


def test_a_linked_record_is_refused_and_a_record_is_checked_as_it_streams(tmp_path, monkeypatch):
    from pneumo import storage

    monkeypatch.setenv(signatures.KEY_ENV, "y" * 40)
    store = SignedResultStorage(root=str(tmp_path / "records"))
    big = os.urandom(3 * 2**20 + 7)  # more than one chunk of the stream, not a multiple of it
    store.write_path("big", big)
    assert store.read_path("big") == big
    signed = (tmp_path / "records" / "big").read_bytes()
    (tmp_path / "records" / "big").write_bytes(signed[:-1] + bytes([signed[-1] ^ 1]))  # the last byte changed
    with pytest.raises(SignatureError, match="does not match"):
        store.read_path("big")
    (tmp_path / "records" / "short").write_bytes(b"pneumo-signed-v1 abc")
    with pytest.raises(SignatureError, match="not signed"):
        store.read_path("short")
    (tmp_path / "elsewhere").write_bytes(signed)
    (tmp_path / "records" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(storage.Unreadable, match="symbolic link"):
        store.read_path("linked")


def test_an_s3_record_over_the_cap_is_refused_by_its_length(s3_bucket, monkeypatch):
    from pneumo import storage
    from tasks import result_storage

    monkeypatch.setenv(signatures.KEY_ENV, "y" * 40)
    monkeypatch.setattr(result_storage, "MAX_RECORD_BYTES", 1024)
    store = SignedResultStorage(root=f"s3://{s3_bucket}/prefect-results")
    store.write_path("small", b"x" * 100)
    assert store.read_path("small") == b"x" * 100
    storage.write_bytes(f"s3://{s3_bucket}/prefect-results/large", b"y" * 4096)
    with pytest.raises(storage.Unreadable, match="4096 bytes, more than the 1024 allowed"):
        store.read_path("large")


# With the end-to-end run of `make test-fast`: the worker that has started the session's Prefect server.
@pytest.mark.xdist_group("test_full_flow")
def test_a_locations_block_is_saved_once_per_process_and_api(prefect_server, tmp_path):
    """Each task asks for its result storage; a save is ~0.26 s of CPU (client and server), so it is made once."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.result_storage import signed_storage_block

    root = str(tmp_path / "prefect-results")
    first = signed_storage_block(root)
    assert first._block_document_id is not None  # saved: task subprocesses resolve it from the API
    with get_client(sync_client=True) as client:
        saved = client.read_block_document(first._block_document_id)
    again = signed_storage_block(root)
    with get_client(sync_client=True) as client:
        unchanged = client.read_block_document(first._block_document_id)
    assert again is first and unchanged.data == saved.data == {"root": root}
    assert unchanged.updated == saved.updated  # not written again
    other = signed_storage_block(str(tmp_path / "elsewhere"))
    assert other._block_document_id not in (None, first._block_document_id) and other.root.endswith("elsewhere")
    with temporary_settings({PREFECT_API_URL: prefect_server.rstrip("/") + "/"}):  # another API URL: saved there too
        through_another_url = signed_storage_block(root)
    assert through_another_url is not first and through_another_url._block_document_id == first._block_document_id
