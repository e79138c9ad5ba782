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
