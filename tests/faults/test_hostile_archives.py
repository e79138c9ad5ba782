"""Hostile or broken archives are refused with a clear error, and nothing lands outside the target."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from tests.helpers import full_flow as full  # flat settings; the run's own go into its run section
from pneumo.download import UnsafeArchive, safe_extract_zip
from tests.helpers import all_paths, write_kaggle_zip


def zip_with(path: Path, *entries: tuple[zipfile.ZipInfo | str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ok/first.txt", b"written first if validation were lazy")
        for info, data in entries:
            archive.writestr(info, data)
    return path


def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def deflated(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


@pytest.mark.parametrize(
    "entry, data, limits, says",
    [
        ("../evil.txt", b"x", {}, "'..' would escape"),
        ("ok/../../evil.txt", b"x", {}, "'..' would escape"),
        ("/tmp/evil.txt", b"x", {}, "absolute path"),
        ("C:/Windows/evil.txt", b"x", {}, "absolute path"),
        ("..\\..\\evil.txt", b"x", {}, "backslashes"),
        (symlink_entry("ok/link"), b"/etc/passwd", {}, "symbolic link"),
        (deflated("ok/bomb.bin"), bytes(4 * 2**20), {}, "zip bomb"),
        ("ok/big.bin", bytes(5000), {"max_total_bytes": 4096}, "expands to more than 4096 bytes"),
        ("ok/second.txt", b"x", {"max_members": 1}, "more than the limit of 1"),
    ],
)
def test_unsafe_archives_are_refused_before_anything_is_written(tmp_path, entry, data, limits, says):
    zip_path = zip_with(tmp_path / "evil.zip", (entry, data))
    target = tmp_path / "work" / "target"
    target.mkdir(parents=True)
    before = all_paths(tmp_path)
    with pytest.raises(UnsafeArchive, match=says) as error:
        safe_extract_zip(zip_path, target, **limits)
    assert all_paths(tmp_path) == before  # nothing written anywhere, not even ok/first.txt
    name = entry.filename if isinstance(entry, zipfile.ZipInfo) else entry
    if not limits:
        assert repr(name) in str(error.value)  # the message names the bad entry


def test_truncated_archive_is_refused(tmp_path):
    zip_path = write_kaggle_zip(tmp_path / "archive.zip")
    zip_path.write_bytes(zip_path.read_bytes()[: zip_path.stat().st_size // 2])
    target = tmp_path / "target"
    with pytest.raises(UnsafeArchive, match="archive is truncated or corrupt"):
        safe_extract_zip(zip_path, target)
    assert not target.exists()


def test_corrupt_member_is_refused_and_stays_inside_target(tmp_path):
    payload = b"PAYLOAD-" * 64
    zip_path = zip_with(tmp_path / "crc.zip", ("ok/data.bin", payload))
    raw = bytearray(zip_path.read_bytes())
    at = raw.find(payload)
    raw[at + 10] ^= 0xFF  # flip one stored byte: the CRC no longer matches
    zip_path.write_bytes(bytes(raw))
    target = tmp_path / "work" / "target"
    target.mkdir(parents=True)
    outside_before = all_paths(tmp_path) - {p for p in all_paths(tmp_path) if p.startswith("work/target/")}
    with pytest.raises(UnsafeArchive, match="archive is truncated or corrupt"):
        safe_extract_zip(zip_path, target)
    outside_after = {p for p in all_paths(tmp_path) if not p.startswith("work/target/")}
    assert outside_after == outside_before


def test_symlink_already_in_target_cannot_redirect_writes(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "ok").symlink_to(outside)
    zip_path = tmp_path / "a.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("ok/evil.txt", b"x")
    with pytest.raises(UnsafeArchive, match="resolves outside"):
        safe_extract_zip(zip_path, target)
    assert list(outside.iterdir()) == []


def test_safe_zip_is_extracted_whole(tmp_path):
    zip_path = write_kaggle_zip(tmp_path / "archive.zip")
    safe_extract_zip(zip_path, tmp_path / "out")
    with zipfile.ZipFile(zip_path) as archive:
        expected = {n.rstrip("/") for n in archive.namelist()}
        assert all_paths(tmp_path / "out") >= expected
        name = "chest_xray/train/NORMAL/IM-0115-0001.jpeg"
        assert (tmp_path / "out" / name).read_bytes() == archive.read(name)




def test_the_flow_refuses_a_zip_slip_source_and_writes_nothing_outside(tmp_path):
    zip_path = write_kaggle_zip(tmp_path / "archive.zip")
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr("chest_xray/../../escaped.txt", b"owned")
    workdir = tmp_path / "work"
    before = all_paths(tmp_path)
    with pytest.raises(UnsafeArchive, match="would escape"):
        full(source=str(zip_path), workdir=str(workdir), runner="threads", retries=0)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    # Only the workdir's own bookkeeping appeared; no extracted folder looks complete.
    new = all_paths(tmp_path) - before
    assert all(p == "work" or p.startswith("work/") for p in new), sorted(new)
    assert not any("/extracted/" in p and p.endswith(".jpeg") for p in new)
