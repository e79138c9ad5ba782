"""pneumo gc: what a workdir can lose, and that it loses nothing a version, an alias or a run needs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from pneumo import cleanup, registry, storage
from tests.helpers import invoke
from tests.predict_helpers import card, state_dict

LATER = time.time() + 10 * 86400  # "now" for a plan in which every file is old


def _index(n: int) -> bytes:
    return json.dumps({"shards": [{"name": f"train-{n}.h5"}], "n": n}).encode()


def _layout(workdir: str) -> dict[str, str]:
    """A workdir with two datasets: v0001 (champion) was built from the first, v0002 (latest) from
    the second; the third dataset's outputs belong to no version. Returns the interesting URIs."""
    j = lambda *parts: storage.join(workdir, *parts)  # noqa: E731
    uris = {}
    for n, name in ((1, "one"), (2, "two"), (3, "three")):
        manifest = hashlib.sha256(name.encode()).hexdigest()
        index = _index(n)
        index_digest = hashlib.sha256(index).hexdigest()
        shards = j("shards", f"{manifest[:16]}-ed527e13-786efb8c-n1000")
        storage.write_bytes(storage.join(shards, "index.json"), index)
        storage.write_bytes(storage.join(shards, f"train-{n}.h5"), b"h" * 5000 * n)
        storage.write_bytes(j("manifests", f"manifest-{manifest[:16]}.json"), b"{}" * 100)
        storage.write_bytes(j("stats", f"sizes-{manifest[:16]}.json"), b"{}")
        storage.write_bytes(j("reports", f"quarantine-{index_digest[:16]}.json"), b"{}")
        uris[name] = {"manifest": manifest, "shards_digest": index_digest, "shards": shards}
        if n < 3:
            weights = state_dict(n)
            registry.register(j("registry"), "tinynet", weights, {
                **card(weights), "data": {"manifest_digest": manifest, "shards_digest": index_digest, "counts": {}},
            })
    registry.set_alias(j("registry"), "tinynet", "champion", "v0001")
    registry.set_alias(j("registry"), "tinynet", "latest", "v0002")
    storage.write_bytes(j("shards", "c0ffee-unfinished", "train-0000.h5"), b"k" * 700)  # a killed run's: no index
    storage.write_bytes(j("downloads", "extracted", "0123456789abcdef", "train", "a.jpeg"), b"j" * 300)
    storage.write_bytes(j("predictions", "tinynet", "v0001", "aaaa.csv"), b"p" * 10)
    storage.write_bytes(j("predictions", "tinynet", "v0042", "bbbb.csv"), b"p" * 20)  # of no version
    storage.write_bytes(j("prefect-results", "some-result"), b"r" * 10)
    return uris


def _removable(plan: cleanup.Plan) -> set[str]:
    return {item.uri for item in plan.removable}


def _expected_removable(workdir: str, uris) -> set[str]:
    three = uris["three"]
    j = lambda *parts: storage.join(workdir, *parts)  # noqa: E731
    return {
        three["shards"],
        j("manifests", f"manifest-{three['manifest'][:16]}.json"),
        j("stats", f"sizes-{three['manifest'][:16]}.json"),
        j("reports", f"quarantine-{three['shards_digest'][:16]}.json"),
        j("shards", "c0ffee-unfinished"),
        j("downloads", "extracted", "0123456789abcdef"),
        j("predictions", "tinynet", "v0042"),
    }


@pytest.mark.slow  # trains and registers versions: in `make test`, not `make test-fast`
def test_the_plan_keeps_what_registered_versions_need_and_lists_the_rest_with_sizes(tmp_path):
    workdir = str(tmp_path / "work")
    uris = _layout(workdir)
    plan = cleanup.plan(workdir, now=LATER)
    assert _removable(plan) == _expected_removable(workdir, uris)
    sizes = {item.uri: item.bytes for item in plan.items}
    assert sizes[uris["three"]["shards"]] == 15000 + len(_index(3))
    reasons = {item.uri: item.keep for item in plan.kept}
    assert reasons[uris["one"]["shards"]] == reasons[uris["two"]["shards"]] == "a registered version's shards"
    assert plan.versions == ["tinynet v0001", "tinynet v0002"]
    # the registry and Prefect's results are never even listed
    assert not [item for item in plan.items if "/registry/" in item.uri or "prefect-results" in item.uri]


def test_nothing_is_removed_without_yes_and_only_the_removable_with_it(tmp_path, monkeypatch):
    workdir = str(tmp_path / "work")
    uris = _layout(workdir)
    for path in Path(workdir).rglob("*"):  # two days old: nothing is recent
        os.utime(path, (time.time() - 2 * 86400,) * 2)
    before = sorted(str(p) for p in Path(workdir).rglob("*") if p.is_file())
    listed = invoke("gc", "--workdir", workdir)
    assert listed.exit_code == 0, listed.output
    assert "7 removable" in listed.output and "add --yes" in listed.output
    assert sorted(str(p) for p in Path(workdir).rglob("*") if p.is_file()) == before
    removed = invoke("gc", "--workdir", workdir, "--yes")
    assert removed.exit_code == 0, removed.output
    assert "removed 7 item(s)" in removed.output
    for uri in _expected_removable(workdir, uris):
        assert not Path(uri).exists(), uri
    assert not Path(workdir, "shards", "c0ffee-unfinished").exists()  # empty folders go too
    for name in ("one", "two"):
        assert Path(uris[name]["shards"], "index.json").exists()
    assert Path(workdir, "prefect-results", "some-result").exists()
    assert registry.load_state_dict(str(Path(workdir, "registry")), "tinynet", "latest")  # intact
    again = cleanup.plan(workdir)
    assert not again.removable


def test_only_aliased_keeps_the_inputs_of_aliased_versions_only(tmp_path):
    workdir = str(tmp_path / "work")
    uris = _layout(workdir)
    registry.set_alias(storage.join(workdir, "registry"), "tinynet", "latest", "v0001")  # v0002 loses its alias
    plan = cleanup.plan(workdir, only_aliased=True, now=LATER)
    assert plan.versions == ["tinynet v0001"]
    assert uris["two"]["shards"] in _removable(plan) and uris["one"]["shards"] not in _removable(plan)


def test_recent_outputs_and_what_a_recent_run_used_are_kept(tmp_path):
    workdir = str(tmp_path / "work")
    uris = _layout(workdir)
    for path in Path(workdir).rglob("*"):
        os.utime(path, (time.time() - 2 * 86400,) * 2)
    fresh = Path(workdir, "downloads", "extracted", "0123456789abcdef", "train", "a.jpeg")
    os.utime(fresh, None)  # just written
    with cleanup.recording_run(workdir) as record:  # a cache hit on the third dataset's shards
        record.update(manifest_digest=uris["three"]["manifest"], shards_digest=uris["three"]["shards_digest"])
    plan = cleanup.plan(workdir, keep_recent=3600)
    kept = {item.uri: item.keep for item in plan.kept}
    assert kept[uris["three"]["shards"]] == "used by a recent run"
    assert kept[str(fresh.parents[1])].startswith("recent: modified")
    assert _removable(plan) == {
        storage.join(workdir, "shards", "c0ffee-unfinished"), storage.join(workdir, "predictions", "tinynet", "v0042"),
    }


def test_a_running_run_blocks_every_removal(tmp_path):
    workdir = str(tmp_path / "work")
    _layout(workdir)
    with cleanup.recording_run(workdir) as record:
        plan = cleanup.plan(workdir, now=LATER - 10 * 86400)
        assert [r["run_id"] for r in plan.running] == [record["run_id"]]
        with pytest.raises(cleanup.RunInProgress, match="a run is in progress"):
            cleanup.remove(cleanup.plan(workdir, now=LATER))
        result = invoke("gc", "--workdir", workdir, "--keep-recent", "0", "--yes")
        assert result.exit_code == 1 and "nothing removed" in result.output
    assert all(Path(uri).exists() for uri in _expected_removable(workdir, _layout_uris(workdir)))
    # A record left "running" by a killed process does not block forever.
    dead = {**record, "state": "running", "pid": 2**22 + 12345, "run_id": "dead"}
    storage.write_json(storage.join(workdir, "runs", "dead.json"), dead)
    assert not cleanup.is_live(dead, time.time())
    assert not cleanup.plan(workdir, now=LATER).running


def _layout_uris(workdir: str) -> dict:
    """The URIs ``_layout`` made, recomputed without writing."""
    out = {}
    for n, name in ((1, "one"), (2, "two"), (3, "three")):
        manifest = hashlib.sha256(name.encode()).hexdigest()
        out[name] = {
            "manifest": manifest, "shards_digest": hashlib.sha256(_index(n)).hexdigest(),
            "shards": storage.join(workdir, "shards", f"{manifest[:16]}-ed527e13-786efb8c-n1000"),
        }
    return out


def test_a_run_records_its_state_and_what_it_used(tmp_path):
    workdir = str(tmp_path / "work")
    with pytest.raises(RuntimeError):
        with cleanup.recording_run(workdir) as record:
            uri = storage.join(workdir, "runs", f"{record['run_id']}.json")
            assert storage.read_json(uri)["state"] == "running"
            raise RuntimeError("boom")
    saved = storage.read_json(uri)
    assert saved["state"] == "failed" and saved["finished_at"] and saved["pid"] == os.getpid()


@pytest.mark.slow  # an S3 endpoint: in `make test`, not `make test-fast`
def test_gc_works_on_an_s3_workdir(s3_bucket):
    workdir = f"s3://{s3_bucket}/work"
    uris = _layout(workdir)
    plan = cleanup.plan(workdir, now=LATER)
    assert _removable(plan) == _expected_removable(workdir, uris)
    freed = cleanup.remove(plan)
    assert freed == sum(item.bytes for item in plan.removable) > 15000
    left = set(storage.list_uris(workdir))
    assert not [u for u in left if any(u.startswith(r) for r in _expected_removable(workdir, uris))]
    assert storage.join(uris["one"]["shards"], "index.json") in left
    assert storage.join(workdir, "prefect-results", "some-result") in left
    assert not cleanup.plan(workdir, now=LATER).removable
