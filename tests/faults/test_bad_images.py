"""Bad images in the dataset: each is processed correctly or quarantined with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROBUST3, full_flow as full  # flat settings; the run's own go into its run section
from pneumo import shard_files
from pneumo.config import TrainConfig, TransformConfig
from pneumo.download import shown_name
from pneumo.quarantine import TooMuchBadData
from pneumo.transform import featurize
from tests.faults.bad_files import add_bad, add_junk, add_odd_but_valid, link_or_copy_tree

# One xdist worker runs the whole module, so that its module fixture (mixed_run) is built once.
pytestmark = pytest.mark.xdist_group("test_bad_images")

QUICK = {"epochs": 2, "patience": 2}


def all_files(root: Path) -> set[str]:
    """Every file, named as the reports name it (bytes that are not UTF-8 escaped)."""
    return {shown_name(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def mixed_run(shared_data, small_source, tmp_path_factory):
    """About 160 real films plus odd-but-valid and bad files, through the flow.

    The bad files are about 9 % of these inputs: the run allows 15 % so that it completes (the
    default 1 % refusal is test_too_much_bad_input_fails_the_run_with_the_reasons's)."""
    root = tmp_path_factory.mktemp("mixed")
    link_or_copy_tree(small_source, root)
    odd = add_odd_but_valid(shared_data, root)
    bad = add_bad(shared_data, root, outside=tmp_path_factory.mktemp("outside"))
    junk = add_junk(root)
    summary = full(source=str(root), workdir=str(root.parent / "work"), train=QUICK, runner="processes",
                   max_bad_fraction=0.15, **ROBUST3)
    return root, odd, bad, junk, summary


def test_the_run_completes_and_quarantines_exactly_the_bad_files(mixed_run):
    root, _, bad, _, summary = mixed_run
    report = json.loads(Path(summary["quarantine_report"]).read_text())
    reasons = {entry["relpath"]: entry["reason"] for entry in report["entries"]}
    assert set(reasons) == set(bad)
    for relpath, word in bad.items():
        assert word in reasons[relpath].lower(), (relpath, reasons[relpath])
    assert report["n_quarantined"] == len(bad)


def test_shards_hold_exactly_the_good_files(mixed_run):
    root, odd, bad, junk, summary = mixed_run
    in_shards = []
    for split in ("train", "val", "test"):
        in_shards += shard_files.load_split(summary["shards_index"], split).originals().relpaths
    assert len(in_shards) == len(set(in_shards))
    assert set(in_shards) == all_files(root) - set(bad) - set(junk)
    assert set(odd) <= set(in_shards)
    report = json.loads(Path(summary["quarantine_report"]).read_text())
    n_accounted = report["n_in_shards"] + report["n_quarantined"] + report["n_skipped"]
    assert n_accounted == report["n_inputs"] == len(all_files(root))


def test_os_junk_is_skipped_and_reported_with_its_reason(mixed_run):
    *_, junk, summary = mixed_run
    report = json.loads(Path(summary["quarantine_report"]).read_text())
    reasons = {entry["relpath"]: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == set(junk)
    for relpath, word in junk.items():
        assert word in reasons[relpath], (relpath, reasons[relpath])
    assert sum(report["skipped_by_reason"].values()) == report["n_skipped"] == len(junk)


def test_odd_formats_give_the_features_of_the_upright_gray_image(mixed_run, tmp_path):
    root, odd, _, _, summary = mixed_run
    config = TransformConfig.stored(shard_files.read_index(summary["shards_index"])["transform"])
    features = {}
    for split in ("train", "val", "test"):
        part = shard_files.load_split(summary["shards_index"], split).originals()
        features.update(zip(part.relpaths, part.features))
    for relpath, upright in odd.items():
        reference = tmp_path / "upright.png"
        upright.save(reference)
        expected = featurize(reference, config)
        # JPEG re-encoding (CMYK, EXIF, non-ASCII) moves values a little; layout must match.
        assert np.corrcoef(features[relpath], expected)[0, 1] > 0.98, relpath
        assert np.abs(features[relpath] - expected).max() < 0.08, relpath


def test_too_much_bad_input_fails_the_run_with_the_reasons(small_source, shared_data, tmp_path):
    root = tmp_path / "data"
    link_or_copy_tree(small_source, root)
    bad = add_bad(shared_data, root, outside=tmp_path / "outside")
    workdir = tmp_path / "work"
    with pytest.raises(TooMuchBadData, match=r"quarantined, above the allowed 1\.0%") as error:
        full(source=str(root), workdir=str(workdir), train=QUICK, runner="threads", retries=0)
    assert "--run.max-bad-fraction" in str(error.value)
    # The report is written before the run stops, and no model was registered.
    report = json.loads(next((workdir / "reports").glob("quarantine-*.json")).read_text())
    assert {entry["relpath"] for entry in report["entries"]} == set(bad)
    assert not (workdir / "registry").exists()
