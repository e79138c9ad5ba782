"""Issue 15 items 3-7 and 17: nothing read back from the registry is trusted.

A card edited after registration, a card that would fail requests, stray and broken version
folders, symbolic links, the history of alias moves, and the modes files are written with.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import stat

import pytest
import torch

from pneumo import registry, storage
from pneumo.model import TinyNet


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TinyNet().state_dict()


@pytest.fixture
def umask():
    """Set the process umask for one test and give the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mask, mode):
    """Item 17: mkstemp's 0600 is not kept when the temporary is renamed into place."""
    umask(mask)
    root = str(tmp_path / "registry")
    version = registry.register(root, "m", _weights(0), {})
    registry.set_alias(root, "m", "latest", version)
    storage.write_json(str(tmp_path / "plain.json"), {"x": 1})
    storage.write_bytes(str(tmp_path / "once.bin"), b"x", if_absent=True)
    _, token = storage.read_with_token(str(tmp_path / "cas.json"))
    storage.compare_and_swap(str(tmp_path / "cas.json"), b"{}", token)
    storage.download_file(str(tmp_path / "plain.json"), tmp_path / "copy.json")
    written = [
        tmp_path / "registry" / "m" / version / "model.pt",
        tmp_path / "registry" / "m" / version / "card.json",
        tmp_path / "registry" / "m" / "aliases" / "latest.json",
        tmp_path / "plain.json", tmp_path / "once.bin", tmp_path / "cas.json", tmp_path / "copy.json",
    ]
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written}
    assert modes == {path.name: oct(mode) for path in written}


# --- helpers ----------------------------------------------------------------------------------


def _registry_of_two(root) -> str:
    """v0001 (champion) and v0002 (latest), cards as the pipeline writes them."""
    from tests.predict_helpers import register_two

    register_two(str(root))
    return str(root)


def _card_path(root, version: str, model_name: str = "tinynet"):
    return pathlib.Path(root, model_name, version, "card.json")


def _edit(card: dict, edit: str) -> None:
    """The issue's edits of a card (and a field no pneumo knows yet: the rule is generic)."""
    if edit == "threshold":
        card["threshold"] = 0.001
    elif edit == "labels swapped":
        card["labels"] = {"0": "PNEUMONIA", "1": "NORMAL"}
    elif edit == "transform":
        card["config"]["transform"].update(crop_fraction=0.3, grid=[10, 7])
    elif edit == "a field added later":
        card["stress_val"] = {"threshold": 0.9}
    elif edit == "a metric":
        card["metrics"]["val"]["roc_auc"] = 0.999


# --- item 3: a card edited after registration ---------------------------------------------------


@pytest.mark.parametrize("edit", ["threshold", "labels swapped", "transform", "a field added later", "a metric"])
def test_a_card_edited_after_registration_is_refused_like_a_corrupt_model(tmp_path, edit):
    from pneumo import promotion
    from pneumo.predict import CardError, Predictor

    root = _registry_of_two(tmp_path / "registry")
    path = _card_path(root, "v0001")
    card = json.loads(path.read_text())
    _edit(card, edit)
    path.write_text(json.dumps(card, indent=2))

    with pytest.raises(registry.CorruptModel, match=r"tinynet v0001: .*v0001[/\\]card\.json was edited after registration"):
        registry.load_card(root, "tinynet", "v0001")
    with pytest.raises(CardError, match=r"card\.json was edited after registration"):
        Predictor.from_registry(root, alias="champion")
    assert Predictor.from_registry(root, version="v0002").version == "v0002"  # the intact one still serves
    # Promotion handles it like a corrupt model.pt: skipped with its reason, never compared.
    outcome = promotion.promote(root, "tinynet", "v0002", {"roc_auc": 0.5}, "roc_auc")
    assert outcome.is_champion and any("v0001" in note and "edited after registration" in note for note in outcome.notes)


def test_the_registry_key_refuses_a_recomputed_digest(tmp_path, monkeypatch):
    """Without a key the digest catches edits, not a writer who recomputes it; with
    PNEUMO_REGISTRY_KEY (kept outside the registry) a recomputed digest is refused too."""
    monkeypatch.setenv(registry.KEY_ENV, "a key that lives outside the registry")
    root = _registry_of_two(tmp_path / "registry")
    path = _card_path(root, "v0001")
    card = json.loads(path.read_text())
    assert set(card["integrity"]) == {"card_sha256", "hmac_sha256"}
    assert registry.load_card(root, "tinynet", "v0001").threshold == 0.5
    _edit(card, "threshold")
    path.write_text(json.dumps(registry.seal_card(card)))  # digest recomputed, no key
    with pytest.raises(registry.CorruptCard, match="not signed with the registry key"):
        registry.load_card(root, "tinynet", "v0001")
    path.write_text(json.dumps(registry.seal_card(card, b"a guessed key")))
    with pytest.raises(registry.CorruptCard, match="wrong HMAC"):
        registry.load_card(root, "tinynet", "v0001")
    # The documented limit: without the key, a writer who recomputes the digest is not detected.
    monkeypatch.delenv(registry.KEY_ENV)
    assert registry.load_card(root, "tinynet", "v0001").threshold == 0.001


def test_a_card_without_its_integrity_record_is_refused(tmp_path):
    root = _registry_of_two(tmp_path / "registry")
    path = _card_path(root, "v0001")
    card = json.loads(path.read_text())
    del card["integrity"]
    _edit(card, "threshold")
    path.write_text(json.dumps(card))
    with pytest.raises(registry.CorruptCard, match=r"card\.json has no integrity record"):
        registry.load_card(root, "tinynet", "v0001")


# --- item 4: the whole card against a schema ---------------------------------------------------


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("labels", {"0": "NORMAL"}, "labels"),
        ("labels", {"0": "NORMAL", "1": "NORMAL"}, "labels"),
        ("labels", {"0": "NORMAL", "1": "PNEUMONIA", "2": "COVID"}, "labels"),
        ("threshold", 1.5, "threshold"),
        ("threshold", "0.5", "threshold"),
        ("config", {"transform": {"grid": [0, 7]}}, "config.transform.grid"),
        ("files", {"report.html": {"sha256": "x", "bytes": 1}}, "files.report.html.sha256"),
    ],
)
def test_a_card_that_would_fail_requests_is_refused_at_load_naming_the_field(tmp_path, field, value, named):
    """Item 4: labels {"0": "NORMAL"} made every PNEUMONIA answer a KeyError (a 500 from the server)."""
    from tests.predict_helpers import card as make_card
    from tests.predict_helpers import state_dict

    from pneumo.predict import CardError, Predictor

    weights = state_dict(1)
    bad = {**make_card(weights), field: value}
    with pytest.raises(CardError, match=rf"field {re.escape(named)}\b"):
        Predictor(weights, bad, model_name="tinynet", version="v0001")
    with pytest.raises(registry.CorruptCard, match=rf"field {re.escape(named)}\b"):
        registry.register(str(tmp_path / "refused"), "tinynet", weights, bad)
    assert registry.list_versions(str(tmp_path / "refused"), "tinynet") == []  # no number claimed

    # A card sealed by a writer without the schema (an older pneumo, or a forger without the key).
    root = _registry_of_two(tmp_path / "registry")
    path = _card_path(root, "v0001")
    written = {**json.loads(path.read_text()), field: value}
    path.write_text(json.dumps(registry.seal_card(written)))
    with pytest.raises(registry.CorruptCard, match=rf"v0001[/\\]card\.json does not fit the card schema: .*field {re.escape(named)}\b"):
        registry.load_card(root, "tinynet", "v0001")
    with pytest.raises(CardError, match=rf"field {re.escape(named)}\b"):
        Predictor.from_registry(root, alias="champion")


def test_a_card_copied_from_another_version_is_refused(tmp_path):
    root = _registry_of_two(tmp_path / "registry")
    _card_path(root, "v0002").write_bytes(_card_path(root, "v0001").read_bytes())
    with pytest.raises(registry.CorruptCard, match="is the card of tinynet v0001, not of tinynet v0002"):
        registry.load_card(root, "tinynet", "v0002")


# --- item 5: only {model}/vNNNN/ is a version; a bad version is skipped and named ---------------


def test_only_a_vnnnn_folder_under_the_model_is_a_version(tmp_path):
    root = _registry_of_two(tmp_path / "registry")
    archive = pathlib.Path(root, "tinynet", "archive")
    archive.mkdir()
    shutil.copytree(pathlib.Path(root, "tinynet", "v0002"), archive / "v0003")  # a version moved aside
    assert registry.list_versions(root, "tinynet") == ["v0001", "v0002"]
    with pytest.raises(registry.VersionNotFound, match="no version 'v0003' of tinynet .*versions: v0001, v0002$"):
        registry.resolve(root, "tinynet", "v0003")
    assert registry.register(root, "tinynet", _weights(3), {}) == "v0003"


def _break_versions(root) -> None:
    """v0003: a truncated card.json; v0004: model.pt missing."""
    from tests.predict_helpers import card as make_card
    from tests.predict_helpers import state_dict

    for seed in (3, 4):
        registry.register(root, "tinynet", state_dict(seed), make_card(state_dict(seed)))
    path = _card_path(root, "v0003")
    path.write_bytes(path.read_bytes()[:499])
    pathlib.Path(root, "tinynet", "v0004", "model.pt").unlink()


def test_a_bad_version_is_skipped_named_and_the_rest_goes_on(tmp_path):
    from pneumo import promotion
    from pneumo.predict import CardError, Predictor

    root = _registry_of_two(tmp_path / "registry")
    _break_versions(root)
    assert registry.list_versions(root, "tinynet") == ["v0001", "v0002", "v0003", "v0004"]
    with pytest.raises(registry.CorruptCard, match=r"tinynet v0003: .*v0003[/\\]card\.json is not a readable card: JSONDecodeError"):
        registry.verify_version(root, "tinynet", "v0003")
    with pytest.raises(registry.CorruptModel, match=r"tinynet v0004: .*v0004[/\\]model\.pt is missing"):
        registry.verify_version(root, "tinynet", "v0004")
    with pytest.raises(CardError, match=r"v0003[/\\]card\.json is not a readable card"):
        Predictor.from_registry(root, version="v0003")
    with pytest.raises(CardError, match=r"v0004[/\\]model\.pt is missing"):
        Predictor.from_registry(root, version="v0004")

    # With champion.json gone, promotion compares with the best intact version and names the rest.
    pathlib.Path(root, "tinynet", "aliases", "champion.json").unlink()
    registry.register(root, "tinynet", _weights(5), {"metrics": {"val": {"roc_auc": 0.95}}})
    outcome = promotion.promote(root, "tinynet", "v0005", {"roc_auc": 0.95}, "roc_auc")
    assert outcome.champion_version in ("v0001", "v0002") and outcome.is_champion
    notes = " | ".join(outcome.notes)
    assert re.search(r"v0003 skipped .*v0003[/\\]card\.json", notes) and re.search(r"v0004 skipped .*v0004[/\\]model\.pt", notes)
    assert registry.get_alias(root, "tinynet", "champion") == "v0005"


# --- item 6: symbolic links in the registry ----------------------------------------------------


def test_a_linked_version_folder_is_refused_by_name_and_never_promoted(tmp_path):
    from pneumo import promotion
    from pneumo.predict import CardError, Predictor

    elsewhere = _registry_of_two(tmp_path / "elsewhere")
    root = str(tmp_path / "registry")
    registry.register(root, "tinynet", _weights(0), {})
    registry.set_alias(root, "tinynet", "champion", "v0001")
    pathlib.Path(root, "tinynet", "v0002").symlink_to(pathlib.Path(elsewhere, "tinynet", "v0002"))

    assert registry.list_versions(root, "tinynet") == ["v0001", "v0002"]  # seen, so that it can be named
    link = re.escape(str(pathlib.Path(root, "tinynet", "v0002")))
    with pytest.raises(registry.CorruptCard, match=rf"tinynet v0002: {link} is a symbolic link .*refused"):
        registry.load_card(root, "tinynet", "v0002")
    with pytest.raises(CardError, match="is a symbolic link"):
        Predictor.from_registry(root, version="v0002")
    with pytest.raises(registry.CorruptModel, match="is a symbolic link"):
        promotion.promote(root, "tinynet", "v0002", {"roc_auc": 1.0}, "roc_auc", force=True)
    assert registry.get_alias(root, "tinynet", "champion") == "v0001"
    # A new version never writes through the link: the number is skipped.
    assert registry.register(root, "tinynet", _weights(3), {}) == "v0003"
    assert sorted(p.name for p in pathlib.Path(elsewhere, "tinynet", "v0002").iterdir()) == ["card.json", "model.onnx", "model.pt"]


def test_a_linked_file_in_a_version_is_refused_by_name(tmp_path):
    root = _registry_of_two(tmp_path / "registry")
    model_pt = pathlib.Path(root, "tinynet", "v0001", "model.pt")
    outside = tmp_path / "outside.pt"
    outside.write_bytes(model_pt.read_bytes())
    model_pt.unlink()
    model_pt.symlink_to(outside)
    with pytest.raises(registry.CorruptModel, match=r"v0001[/\\]model\.pt is a symbolic link"):
        registry.load_state_dict(root, "tinynet", "v0001")


# --- item 7: the history of alias moves --------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def any_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return f"s3://{request.getfixturevalue('s3_bucket')}/registry"


@pytest.mark.slow  # an S3 endpoint: in `make test`, not `make test-fast`
def test_every_alias_move_is_kept_with_who_when_and_why(any_root):
    from pneumo import promotion

    registry.register(any_root, "m", _weights(0), {"metrics": {"val": {"roc_auc": 0.9}}})
    assert promotion.promote(any_root, "m", "v0001", {"roc_auc": 0.9}, "roc_auc").is_champion
    registry.register(any_root, "m", _weights(1), {"metrics": {"val": {"roc_auc": 0.9}}})
    registry.set_alias(any_root, "m", "latest", "v0002")
    assert not promotion.promote(any_root, "m", "v0002", {"roc_auc": 0.9}, "roc_auc").is_champion  # a tie
    promotion.promote(any_root, "m", "v0002", {"roc_auc": 0.9}, "roc_auc", force=True, reason="reader study")

    moves = registry.alias_history(any_root, "m", "champion")
    assert [(m["from"], m["to"], m["how"]) for m in moves] == [(None, "v0001", "automatic"), ("v0001", "v0002", "by hand")]
    assert moves[0]["reason"] == "no champion yet: the first model becomes champion"
    assert moves[1]["reason"] == "promoted by hand: reader study"
    assert all(m["by"] and m["at"] < n["at"] for m, n in zip(moves, moves[1:]))
    assert [(m["to"], m["how"]) for m in registry.alias_history(any_root, "m", "latest")] == [("v0002", "automatic")]


def test_concurrent_promotions_keep_one_history_entry_per_move(tmp_path):
    """The compare-and-swap decides; every move that happened has its entry, none twice."""
    import threading

    from pneumo import promotion

    root = str(tmp_path / "registry")
    for seed in range(6):
        registry.register(root, "m", _weights(seed), {"metrics": {"val": {"roc_auc": 0.5 + seed / 20}}})
    outcomes = []

    def run(version: str) -> None:
        outcomes.append(promotion.promote(root, "m", version, {"roc_auc": 0.5 + int(version[1:]) / 20}, "roc_auc"))

    threads = [threading.Thread(target=run, args=(f"v{n:04d}",)) for n in range(1, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    moves = registry.alias_history(root, "m", "champion")
    assert registry.get_alias(root, "m", "champion") == "v0006" == moves[-1]["to"]
    assert [m["from"] for m in moves[1:]] == [m["to"] for m in moves[:-1]]  # an unbroken chain
    assert len(moves) == sum(o.is_champion and o.reason != f"{o.champion_version} is already champion" for o in outcomes)


# --- the commands (a new process each: slow) ---------------------------------------------------


@pytest.mark.slow
def test_models_commands_skip_and_name_bad_versions(tmp_path, shared_data):
    """Item 5 (and 6) through `pneumo models list/show/promote` and `pneumo predict --version`."""
    from tests.helpers import run_pneumo
    from tests.predict_helpers import xray_pair

    root = _registry_of_two(tmp_path / "registry")
    _break_versions(root)  # v0003 truncated card, v0004 without model.pt
    shutil.copytree(pathlib.Path(root, "tinynet", "v0002"), pathlib.Path(root, "tinynet", "archive", "v0002"))
    elsewhere = _registry_of_two(tmp_path / "elsewhere")
    pathlib.Path(root, "tinynet", "v0005").symlink_to(pathlib.Path(elsewhere, "tinynet", "v0001"))

    listed = run_pneumo("models", "list", "--registry", root)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["v0001", "v0002"]
    skipped = {line.split()[3].rstrip(":"): line for line in listed.stderr.splitlines() if line.startswith("pneumo: skipped")}
    assert set(skipped) == {"v0003", "v0004", "v0005"}
    assert "v0003/card.json is not a readable card" in skipped["v0003"]
    assert "v0004/model.pt is missing" in skipped["v0004"]
    assert "v0005 is a symbolic link" in skipped["v0005"]

    shown = run_pneumo("models", "show", "v0003", "--registry", root)
    assert shown.returncode == 2 and "v0003/card.json is not a readable card" in shown.stderr and "Traceback" not in shown.stderr
    normal, _ = xray_pair(shared_data)
    predicted = run_pneumo("predict", str(normal), "--registry", root, "--version", "v0003")
    assert predicted.returncode == 2 and "v0003/card.json" in predicted.stderr and "Traceback" not in predicted.stderr
    promoted = run_pneumo("models", "promote", "v0005", "--registry", root)
    assert promoted.returncode == 2 and "is a symbolic link" in promoted.stderr
    assert registry.get_alias(root, "tinynet", "champion") == "v0001"


@pytest.mark.slow
def test_models_show_champion_tells_the_truth_after_a_promotion_by_hand(tmp_path):
    """Item 7: it printed the card's registration-time "not promoted" for the new champion."""
    from pneumo import promotion
    from tests.helpers import run_pneumo

    root = str(tmp_path / "registry")
    registry.register(root, "m", _weights(0), {"metrics": {"val": {"roc_auc": 0.9}}})
    promotion.promote(root, "m", "v0001", {"roc_auc": 0.9}, "roc_auc")
    comparison = promotion.compare("roc_auc", {"roc_auc": 0.9}, "v0001", {"roc_auc": 0.9})
    registry.register(root, "m", _weights(1), {"metrics": {"val": {"roc_auc": 0.9}}, "champion_comparison": comparison.to_json()})

    def show_champion() -> dict[str, str]:
        shown = run_pneumo("models", "show", "champion", "--registry", root, "--model-name", "m")
        assert shown.returncode == 0, shown.stderr
        return {line.split()[0]: line for line in shown.stdout.splitlines()[1:]}

    promoted = run_pneumo("models", "promote", "v0002", "--registry", root, "--model-name", "m")
    assert promoted.returncode == 0, promoted.stderr
    lines = show_champion()
    assert "not promoted: val roc_auc 0.9000 does not beat 0.9000" in lines["registered"]  # as registered, and said so
    assert re.search(r"champion +since \S+, by hand by \S+@\S+: promoted by hand$", lines["champion"])

    back = run_pneumo("models", "promote", "v0001", "--registry", root, "--model-name", "m", "--reason", "rollback")
    assert back.returncode == 0, back.stderr
    assert re.search(r"champion +since \S+, by hand by \S+: promoted by hand: rollback$", show_champion()["champion"])


def test_an_extracted_download_folder_honours_the_umask(tmp_path, umask):
    """Item 17: mkdtemp's 0700 folder is renamed into place as the dataset folder."""
    import zipfile

    from pneumo import download

    umask(0o022)
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("chest_xray/train/NORMAL/a.jpeg", b"not read here")
    folder = download.fetch(str(archive), tmp_path / "cache")
    assert oct(stat.S_IMODE(folder.stat().st_mode)) == oct(0o755)
