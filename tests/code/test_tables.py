"""Sources labelled by a table (the RSNA layout as it is, a generic labels.csv) and patients from DICOM headers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pneumo import workdir as layout
from pneumo.dicom import patient_hash
from pneumo.download import build_manifest, check_source, find_dataset_root
from tests.dicom_helpers import dicom_dataset, film_pixels, write_dicom

RSNA_HEADER = "patientId,x,y,width,height,Target\n"


@pytest.fixture(scope="module")
def pixels(shared_data):
    return film_pixels(sorted((shared_data / "train" / "NORMAL").iterdir())[0])


def _dcm(path: Path, pixels, patient: str = "PAT-1") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dicom(path, dicom_dataset(pixels, patient_id=patient))


def _reasons(manifest) -> dict[str, str]:
    return {entry.relpath: entry.reason for entry in manifest.quarantine}


def test_rsna_layout_as_is(tmp_path, pixels):
    images = tmp_path / "rsna" / "stage_2_train_images"
    for name, patient in (("a", "P1"), ("b", "P1"), ("c", "P2"), ("conflict", "P3"), ("odd", "P4"), ("stray", "P5")):
        _dcm(images / f"{name}.dcm", pixels, patient)
    _dcm(tmp_path / "rsna" / "stage_2_test_images" / "unlabelled.dcm", pixels)  # RSNA's test set: never read
    (tmp_path / "rsna" / "stage_2_train_labels.csv").write_text(
        RSNA_HEADER + "a,,,,,0\nb,1,2,3,4,1\nb,5,6,7,8,1\nc,,,,,0\nconflict,,,,,0\nconflict,1,2,3,4,1\n"
        "odd,,,,,2\nmissing,,,,,1\n"
    )
    assert check_source(str(tmp_path)).kind == "dir"
    root = find_dataset_root(tmp_path)
    assert root == (tmp_path / "rsna").resolve()
    manifest = build_manifest(root, salt="pepper")
    records = {r.relpath: r for r in manifest.records}
    assert {k: (r.label, r.split) for k, r in records.items()} == {
        "stage_2_train_images/a.dcm": (0, "train"), "stage_2_train_images/b.dcm": (1, "train"),  # b's box rows collapse
        "stage_2_train_images/c.dcm": (0, "train"),
    }
    assert records["stage_2_train_images/a.dcm"].patient_id == records["stage_2_train_images/b.dcm"].patient_id
    assert records["stage_2_train_images/a.dcm"].patient_id == patient_hash("P1", "pepper") != patient_hash("P1", "salt")
    assert records["stage_2_train_images/c.dcm"].view == "PA"
    assert _reasons(manifest) == {
        "stage_2_train_images/conflict.dcm": "conflicting rows in stage_2_train_labels.csv: Target 0 and 1",
        "stage_2_train_images/odd.dcm": "unknown label in stage_2_train_labels.csv: Target '2' (expected 0 or 1)",
        "stage_2_train_images/missing.dcm": "missing file: named in stage_2_train_labels.csv but not in the source",
        "stage_2_train_images/stray.dcm": "no row in stage_2_train_labels.csv: the file has no label",
    }


def test_a_generic_labels_csv(tmp_path, pixels):
    for name in ("n.dcm", "p.dcm", "v.dcm", "dup.dcm", "bad.dcm", "split.dcm", "extra.dcm", "sub/q.dcm"):
        _dcm(tmp_path / name, pixels, patient="HEADER-ID")
    (tmp_path / "labels.csv").write_text(
        "path,label,patient,split\nn.dcm,NORMAL,,\np.dcm,pneumonia,alice,train\nv.dcm,0,alice,val\n"
        "sub/q.dcm,1,bob,test\ndup.dcm,0,,\ndup.dcm,0,,\nbad.dcm,COVID,,\nsplit.dcm,1,,holdout\n"
        "../outside.dcm,1,,\ngone.dcm,1,,\n"
    )
    manifest = build_manifest(find_dataset_root(tmp_path), salt="pepper")
    records = {r.relpath: r for r in manifest.records}
    assert {k: (r.label, r.split) for k, r in records.items()} == {
        "n.dcm": (0, "train"), "p.dcm": (1, "train"), "v.dcm": (0, "val"), "sub/q.dcm": (1, "test"),
    }
    assert records["p.dcm"].patient_id == records["v.dcm"].patient_id == patient_hash("alice", "pepper")
    assert records["n.dcm"].patient_id == patient_hash("HEADER-ID", "pepper")  # no patient column value: the header's
    assert _reasons(manifest) == {
        "dup.dcm": "duplicate rows in labels.csv: 2 rows name this file",
        "bad.dcm": "unknown label in labels.csv: 'COVID' (expected NORMAL, PNEUMONIA, 0 or 1)",
        "split.dcm": "unknown split in labels.csv: 'holdout' (expected train, val or test)",
        "../outside.dcm": "labels.csv line 10: path outside the source folder",
        "gone.dcm": "missing file: named in labels.csv but not in the source",
        "extra.dcm": "no row in labels.csv: the file has no label",
    }
    text = manifest.model_dump_json()
    assert "alice" not in text and "HEADER-ID" not in text


def test_a_table_without_its_columns_is_refused_with_its_name(tmp_path, pixels):
    _dcm(tmp_path / "a.dcm", pixels)
    (tmp_path / "labels.csv").write_text("file,class\na.dcm,NORMAL\n")
    with pytest.raises(ValueError, match=r"^labels.csv: no column path, label \(columns: file, class\)$"):
        check_source(str(tmp_path))


def test_a_table_that_lacks_a_class_is_refused_before_any_stage(tmp_path, pixels):
    _dcm(tmp_path / "a.dcm", pixels)
    (tmp_path / "labels.csv").write_text("path,label\na.dcm,NORMAL\n")
    with pytest.raises(ValueError, match="labels.csv: train films labelled PNEUMONIA"):
        check_source(str(tmp_path))


def test_a_table_beside_split_folders_is_ambiguous(tmp_path, pixels):
    _dcm(tmp_path / "train" / "NORMAL" / "a.dcm", pixels)
    (tmp_path / "labels.csv").write_text("path,label\ntrain/NORMAL/a.dcm,PNEUMONIA\n")
    with pytest.raises(ValueError, match="holds both labels.csv and split folders"):
        build_manifest(tmp_path)


def test_the_patient_salt_is_the_workdirs_secret(tmp_path, monkeypatch):
    monkeypatch.delenv(layout.PATIENT_SALT_ENV, raising=False)
    salt = layout.patient_salt(str(tmp_path))
    path = tmp_path / "secrets" / "patient-salt"
    assert len(salt) == 64 and layout.patient_salt(str(tmp_path)) == salt
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    monkeypatch.setenv(layout.PATIENT_SALT_ENV, "mine")
    assert layout.patient_salt(str(tmp_path)) == "mine"


def test_a_zip_of_an_rsna_source_is_read_as_the_folder_is(tmp_path, pixels):
    import zipfile

    from pneumo.download import fetch

    for name, target in (("a", 0), ("b", 1)):
        _dcm(tmp_path / "rsna" / "stage_2_train_images" / f"{name}.dcm", pixels, patient=name)
    (tmp_path / "rsna" / "stage_2_train_labels.csv").write_text(RSNA_HEADER + "a,,,,,0\nb,1,2,3,4,1\n")
    archive = tmp_path / "rsna.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted((tmp_path / "rsna").rglob("*")):
            out.write(path, path.relative_to(tmp_path).as_posix())
    assert check_source(str(archive)).kind == "zip"
    root = find_dataset_root(fetch(str(archive), tmp_path / "cache"))
    records = build_manifest(root, salt="pepper").records
    assert sorted((r.relpath, r.label) for r in records) == [
        ("stage_2_train_images/a.dcm", 0), ("stage_2_train_images/b.dcm", 1)]
