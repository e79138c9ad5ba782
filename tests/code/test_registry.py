import json
import multiprocessing
import threading

import numpy as np
import pytest
import torch

from pneumo import promotion, registry, storage
from pneumo.config import SplitConfig, seed_transform
from pneumo.model import TinyNet, predict_proba


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TinyNet().state_dict()


def test_versions_increment_and_cards_are_filled_in(tmp_path):
    reg = str(tmp_path)
    assert registry.list_versions(reg, "tinynet") == []
    assert registry.register(reg, "tinynet", _weights(0), {"metrics": {"val": {"auc": 0.9}}}) == "v0001"
    assert registry.register(reg, "tinynet", _weights(1), {"metrics": {"val": {"auc": 0.8}}}) == "v0002"
    assert registry.list_versions(reg, "tinynet") == ["v0001", "v0002"]
    card = registry.load_card(reg, "tinynet", "v0002")
    assert isinstance(card, registry.Card)
    assert card.version == "v0002" and card.model_name == "tinynet"
    assert card.metrics == {"val": {"auc": 0.8}}
    assert (tmp_path / "tinynet" / "v0001" / "model.pt").is_file()


def test_load_roundtrip_gives_identical_predictions(tmp_path):
    torch.manual_seed(3)
    model = TinyNet()
    # Non-default running statistics, so the test fails if buffers are not stored.
    model.train()
    model(torch.randn(64, 140) * 3 + 1)
    version = registry.register(str(tmp_path), "tinynet", model.state_dict(), {})
    X = np.random.default_rng(0).normal(size=(20, 140)).astype(np.float32)
    loaded = registry.load_model(str(tmp_path), "tinynet", version)
    assert not loaded.training
    np.testing.assert_array_equal(predict_proba(loaded, X), predict_proba(model, X))
    state = registry.load_state_dict(str(tmp_path), "tinynet", version)
    assert torch.equal(state["norm1.running_mean"], model.norm1.running_mean)


def test_a_crashed_claim_is_skipped_not_reused(tmp_path):
    reg = str(tmp_path)
    registry.register(reg, "m", _weights(0), {})
    orphan = tmp_path / "m" / "v0002" / "model.pt"  # a run that died before writing its card
    orphan.parent.mkdir()
    orphan.write_bytes(b"partial")
    assert registry.list_versions(reg, "m") == ["v0001"]
    assert registry.register(reg, "m", _weights(1), {}) == "v0003"
    assert orphan.read_bytes() == b"partial"
    with pytest.raises(FileNotFoundError):
        registry.load_state_dict(reg, "m", "v0002")


def test_a_card_that_is_not_json_claims_no_version(tmp_path):
    with pytest.raises(TypeError):
        registry.register(str(tmp_path), "m", _weights(0), {"when": object()})
    assert storage.list_uris(str(tmp_path)) == []


def _register_many(reg: str, worker: int, barrier, count: int) -> None:
    barrier.wait()
    for i in range(count):
        tag = worker * 100 + i
        weights = {k: torch.full_like(v, float(tag)) if v.is_floating_point() else v for k, v in _weights(0).items()}
        registry.register(reg, "racy", weights, {"tag": tag})


def _assert_ten_distinct_intact_versions(reg: str) -> None:
    versions = registry.list_versions(reg, "racy")
    assert len(versions) == 10
    tags = []
    for version in versions:
        tag = registry.load_card(reg, "racy", version).tag
        # The weights under each card are the ones registered with it: nothing overwritten.
        assert torch.all(registry.load_state_dict(reg, "racy", version)["hidden1.weight"] == tag)
        tags.append(tag)
    assert sorted(tags) == sorted(w * 100 + i for w in (1, 2) for i in range(5))


@pytest.mark.slow  # several processes
def test_concurrent_processes_get_distinct_versions(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_register_many, args=(str(tmp_path), w, barrier, 5)) for w in (1, 2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    _assert_ten_distinct_intact_versions(str(tmp_path))


def test_concurrent_threads_get_distinct_versions(tmp_path):
    barrier = threading.Barrier(2)
    errors = []

    def run(worker):
        try:
            _register_many(str(tmp_path), worker, barrier, 5)
        except Exception as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=run, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _assert_ten_distinct_intact_versions(str(tmp_path))


@pytest.mark.parametrize("name", ["", "Upper", "-x", "x" * 65, "a b"])
def test_bad_model_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="invalid model name"):
        registry.register(str(tmp_path), name, _weights(0), {})
    with pytest.raises(ValueError, match="invalid alias"):
        registry.get_alias(str(tmp_path), "ok", name)
    assert storage.list_uris(str(tmp_path)) == []


@pytest.mark.parametrize("name", ["../../etc", "../x", "/abs", "a/b", "a\\b", "a..b", ".hidden", ".."])
def test_path_like_names_are_called_unsafe_paths(tmp_path, name):
    """Issue 12 item 9: '../../etc' is an unsafe path, not merely an "invalid alias"."""
    with pytest.raises(ValueError, match="unsafe path") as refused:
        registry.register(str(tmp_path), name, _weights(0), {})
    assert "invalid" not in str(refused.value)
    with pytest.raises(ValueError, match="unsafe path") as refused:
        registry.get_alias(str(tmp_path), "ok", name)
    assert "invalid alias" not in str(refused.value) and "as alias" in str(refused.value)
    assert storage.list_uris(str(tmp_path)) == []


@pytest.mark.parametrize("name", ["tinynet", "pneumo-tinynet_v2.1", "0", "x" * 64])
def test_good_model_names_are_accepted(name):
    assert registry.validate_model_name(name) == name


def test_aliases_point_at_versions(tmp_path):
    reg = str(tmp_path)
    assert registry.get_alias(reg, "m", "champion") is None
    v1 = registry.register(reg, "m", _weights(0), {"n": 1})
    v2 = registry.register(reg, "m", _weights(1), {"n": 2})
    registry.set_alias(reg, "m", "champion", v1)
    assert registry.get_alias(reg, "m", "champion") == "v0001"
    assert registry.load_card(reg, "m", "champion").n == 1
    registry.set_alias(reg, "m", "champion", v2)
    assert registry.get_alias(reg, "m", "champion") == "v0002"
    assert torch.equal(registry.load_state_dict(reg, "m", "champion")["hidden1.weight"], _weights(1)["hidden1.weight"])
    # Aliases are not versions.
    assert registry.list_versions(reg, "m") == ["v0001", "v0002"]
    with pytest.raises(FileNotFoundError):
        registry.set_alias(reg, "m", "latest", "v0009")
    with pytest.raises(FileNotFoundError):
        registry.load_card(reg, "m", "no-such-alias")


def test_registry_on_s3(monkeypatch):
    moto = pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage._s3_client.cache_clear()
    try:
        with moto.mock_aws():
            storage.s3_client().create_bucket(Bucket="models")
            reg = "s3://models/registry"
            assert registry.register(reg, "tinynet", _weights(0), {}) == "v0001"
            assert registry.register(reg, "tinynet", _weights(1), {}) == "v0002"
            registry.set_alias(reg, "tinynet", "champion", "v0001")
            assert registry.list_versions(reg, "tinynet") == ["v0001", "v0002"]
            state = registry.load_state_dict(reg, "tinynet", "champion")
            assert torch.equal(state["hidden1.weight"], _weights(0)["hidden1.weight"])
    finally:
        storage._s3_client.cache_clear()


# --- Champion / challenger --------------------------------------------------------------


def _val(roc_auc, accuracy=0.8):
    return {"roc_auc": roc_auc, "accuracy": accuracy, "f1": 0.8, "precision": 0.8, "recall": 0.8, "specificity": 0.8}


@pytest.mark.parametrize(
    "challenger, champion_version, champion, promoted",
    [
        (0.70, None, None, True),  # the first model becomes champion, whatever it scores
        (None, None, None, True),
        (0.91, "v0001", 0.90, True),  # strictly greater wins
        (0.90, "v0001", 0.90, False),  # a tie keeps the champion
        (0.89, "v0001", 0.90, False),
        (None, "v0001", 0.90, False),  # no metric never wins
        (0.50, "v0001", None, True),  # any number beats a champion without the metric
    ],
)
def test_compare_promotes_only_a_strictly_better_challenger(challenger, champion_version, champion, promoted):
    champion_val = None if champion_version is None else _val(champion)
    comparison = promotion.compare("roc_auc", _val(challenger), champion_version, champion_val, basis="test")
    assert comparison.promoted is promoted
    assert comparison.metric == "roc_auc" and comparison.split == "val"
    assert comparison.challenger_value == challenger
    assert comparison.champion_version == champion_version
    assert comparison.champion_value == (None if champion_version is None else champion)
    assert comparison.reason
    json.dumps(comparison.to_json())  # goes into the card as is


def test_compare_uses_the_configured_metric():
    challenger, champion = _val(0.95, accuracy=0.70), _val(0.90, accuracy=0.80)
    assert promotion.compare("roc_auc", challenger, "v0001", champion).promoted is True
    by_accuracy = promotion.compare("accuracy", challenger, "v0001", champion)
    assert by_accuracy.promoted is False
    assert (by_accuracy.challenger_value, by_accuracy.champion_value) == (0.70, 0.80)


@pytest.mark.parametrize("metric", ["loss", "n", "confusion_matrix", "", "ROC_AUC"])
def test_unknown_champion_metrics_are_refused(metric):
    with pytest.raises(ValueError, match="invalid champion metric"):
        promotion.compare(metric, _val(0.9), None, None)


def _versions(reg, model, *aucs):
    """Register one version per val ROC AUC; returns their names."""
    return [registry.register(reg, model, _weights(i), {"metrics": {"val": _val(auc)}}) for i, auc in enumerate(aucs)]


def test_promotion_follows_the_comparison_and_is_idempotent(tmp_path):
    reg = str(tmp_path)
    (v1,) = _versions(reg, "m", 0.80)
    first = promotion.promote(reg, "m", v1, _val(0.80), "roc_auc")
    assert first.is_champion is True and first.champion_version is None
    assert registry.get_alias(reg, "m", "champion") == v1
    again = promotion.promote(reg, "m", v1, _val(0.80), "roc_auc")  # a retry changes nothing
    assert again.is_champion is True and again.reason == "v0001 is already champion"
    assert registry.read_promotion(reg, "m", v1) == first.to_json()  # the first outcome is kept

    v2, v3 = _versions(reg, "m", 0.79, 0.85)
    worse = promotion.promote(reg, "m", v2, _val(0.79), "roc_auc")
    assert worse.is_champion is False and worse.champion_version == v1 and "does not beat" in worse.reason
    assert registry.get_alias(reg, "m", "champion") == v1
    assert registry.model_ref(reg, "m", v2).promotion == worse.to_json()

    better = promotion.promote(reg, "m", v3, _val(0.85), "roc_auc")
    assert better.is_champion is True and better.champion_version == v1
    assert registry.get_alias(reg, "m", "champion") == v3


def test_a_promotion_by_hand_moves_the_champion_without_comparing(tmp_path):
    reg = str(tmp_path)
    v1, v2 = _versions(reg, "m", 0.90, 0.10)
    registry.set_alias(reg, "m", "champion", v1)
    outcome = promotion.promote(reg, "m", v2, _val(0.10), "roc_auc", force=True)
    assert outcome.is_champion is True and outcome.reason == "promoted by hand"
    assert registry.get_alias(reg, "m", "champion") == v2


def test_a_missing_alias_compares_with_the_best_registered_version(tmp_path, caplog):
    """Issue 12 item 7: with versions present, a lost champion.json does not promote "the first model"."""
    reg = str(tmp_path)
    v1, v2, v3 = _versions(reg, "m", 0.95, 0.70, 0.728)
    outcome = promotion.promote(reg, "m", v3, _val(0.728), "roc_auc")
    assert outcome.is_champion is False
    assert outcome.champion_version == v1 and outcome.champion_value == 0.95
    assert "best registered version" in outcome.basis
    assert any("alias champion of m is missing" in note for note in outcome.notes)
    assert "alias champion of m is missing" in caplog.text
    assert registry.get_alias(reg, "m", "champion") is None

    v4 = _versions(reg, "m", 0.97)[0]
    assert promotion.promote(reg, "m", v4, _val(0.97), "roc_auc").is_champion is True


def test_a_broken_alias_is_named_as_such(tmp_path):
    """Issue 12 item 9: champion.json naming v9999."""
    reg = str(tmp_path)
    v1, v2 = _versions(reg, "m", 0.90, 0.80)
    storage.write_json(str(tmp_path / "m" / "aliases" / "champion.json"), {"version": "v9999"})
    message = "alias champion of m points at v9999, which does not exist"
    with pytest.raises(registry.BrokenAlias, match=message):
        registry.get_alias(reg, "m", "champion")
    assert registry.describe_alias(reg, "m", "champion").startswith(f"broken: {message}")  # the run summary
    assert registry.describe_alias(reg, "m", "latest") == "not set"
    with pytest.raises(FileNotFoundError, match=message):
        registry.resolve(reg, "m", "champion")
    with pytest.raises(FileNotFoundError, match=message):
        registry.load_card(reg, "m", "champion")
    # A promotion says so, treats it as no champion (issue 23 item 4), and so repairs the alias.
    outcome = promotion.promote(reg, "m", v2, _val(0.80), "roc_auc")
    assert any(message in note and note.endswith("treated as no champion") for note in outcome.notes)
    assert outcome.is_champion is True and outcome.champion_version is None
    assert registry.get_alias(reg, "m", "champion") == v2


BROKEN_POINTERS = {  # issue 23 item 4: what champion.json held when predict, serve, list and promote fell over
    "v9999": b'{"version": "v9999"}', "dotdot": b'{"version": "../x"}', "empty": b"{}", "list": b"[]",
    "version-list": b'{"version": ["v0001"]}', "not-json": b'{"version": ', "newline": b'{"version": "v0001\\n"}',
    "escape": b'{"version": "\\u001b]0;owned\\u0007"}',
}


@pytest.mark.parametrize("content", BROKEN_POINTERS.values(), ids=BROKEN_POINTERS.keys())
def test_a_broken_champion_alias_is_named_listed_and_repaired_by_a_promotion(tmp_path, content, caplog):
    """Issue 23 item 4: on main `{}` raised KeyError, `[]` and a version list TypeError (unhashable in
    models list), and a broken alias stayed broken when the challenger did not beat the best other version."""
    reg = str(tmp_path)
    v1, v2 = _versions(reg, "m", 0.90, 0.80)
    alias_file = tmp_path / "m" / "aliases" / "champion.json"
    alias_file.parent.mkdir(parents=True)
    alias_file.write_bytes(content)
    with pytest.raises(registry.BrokenAlias) as broken:
        registry.get_alias(reg, "m", "champion")
    said = str(broken.value)
    assert str(alias_file) in said and "\n" not in said and "\x1b" not in said and said.startswith("alias champion of m ")
    with pytest.raises(FileNotFoundError, match="alias champion of m"):
        registry.load_card(reg, "m", "champion")
    problems = []
    assert registry.aliases_by_version(reg, "m", problems.append) == {}  # the listing goes on
    assert problems == [said]

    outcome = promotion.promote(reg, "m", v2, _val(0.80), "roc_auc")  # worse than v1: promoted all the same
    assert outcome.is_champion and f"{said}: treated as no champion" in outcome.notes
    assert f"{said}: treated as no champion" in caplog.text
    assert registry.get_alias(reg, "m", "champion") == v2
    (move,) = registry.alias_history(reg, "m", "champion")
    assert move["to"] == v2 and move["repaired"] == said and move["how"] == "automatic"


def _model_pt(tmp_path, version):
    return tmp_path / "m" / version / "model.pt"


def test_cards_record_the_sha256_of_each_file(tmp_path):
    import hashlib

    reg = str(tmp_path)
    version = registry.register(reg, "m", _weights(0), {}, extra_files={"model.onnx": b"onnx bytes"})
    card = registry.load_card(reg, "m", version)
    weights = _model_pt(tmp_path, version).read_bytes()
    assert card.files["model.pt"].model_dump() == {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)}
    assert card.files["model.onnx"].model_dump() == registry.file_entry(b"onnx bytes")
    assert (tmp_path / "m" / version / "model.onnx").read_bytes() == b"onnx bytes"


def test_a_flipped_byte_in_model_pt_is_refused_by_name(tmp_path):
    """Issue 12 item 8: one flipped byte in the tensor data used to load silently."""
    reg = str(tmp_path)
    version = registry.register(reg, "m", _weights(0), {})
    path = _model_pt(tmp_path, version)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(registry.CorruptModel, match=r"m v0001: .*model\.pt is corrupt: expected sha256 [0-9a-f]{64}"):
        registry.load_state_dict(reg, "m", version)
    with pytest.raises(registry.CorruptModel):
        registry.load_model(reg, "m", version)


def test_a_state_dict_of_another_shape_is_refused_by_name(tmp_path):
    """Issue 12 item 8: a valid state_dict of a different shape, even with a card that records its hash."""
    import io

    from pneumo.config import TransformConfig

    reg = str(tmp_path)
    card = {"config": {"transform": seed_transform().model_dump(mode="json")}}  # 10 x 14 = 140 features
    version = registry.register(reg, "m", _weights(0), card)
    buffer = io.BytesIO()
    torch.save(TinyNet(n_features=99).state_dict(), buffer)
    _model_pt(tmp_path, version).write_bytes(buffer.getvalue())
    card_path = tmp_path / "m" / version / "card.json"
    rewritten = json.loads(card_path.read_text())
    rewritten["files"]["model.pt"] = registry.file_entry(buffer.getvalue())  # hash and card digest recomputed:
    card_path.write_text(json.dumps(registry.seal_card(rewritten)))  # only the shape check can tell
    with pytest.raises(registry.CorruptModel, match=r"m v0001: .* not the weights of a TinyNet with 140 features"):
        registry.load_state_dict(reg, "m", version)


def test_every_recipe_loads_its_own_weights(tmp_path):
    """The shape check counts every pooling part: robust pools max and mean on 7 x 10 cells, 140 inputs."""
    from pneumo.recipes import RECIPES
    from pneumo.config import recipe as named

    for name in RECIPES:
        recipe = named(name)
        card = {"config": {"transform": recipe.transform.model_dump(mode="json")}}
        weights = TinyNet(n_features=recipe.transform.n_features).state_dict()
        version = registry.register(str(tmp_path), name, weights, card)
        loaded = registry.load_state_dict(str(tmp_path), name, version)
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_a_corrupt_champion_is_skipped_for_the_best_intact_version(tmp_path):
    reg = str(tmp_path)
    v1, v2, v3 = _versions(reg, "m", 0.80, 0.99, 0.90)
    registry.set_alias(reg, "m", "champion", v2)
    _model_pt(tmp_path, v2).write_bytes(b"not a model")
    outcome = promotion.promote(reg, "m", v3, _val(0.90), "roc_auc")
    assert any(note.startswith("champion v0002 skipped for comparison: m v0002") for note in outcome.notes)
    assert outcome.champion_version == v1 and outcome.is_champion is True
    assert registry.get_alias(reg, "m", "champion") == v3


def _val_index(folder, features, labels, transform) -> str:
    """An index.json with one val shard holding ``features``/``labels``."""
    from pneumo import shard_files
    from pneumo.config import SplitConfig

    spec = shard_files.ShardSpec(
        root=str(folder), manifest_digest="0" * 64, split_config=SplitConfig(), transform=transform,
        split="val", number=0, start=0, stop=len(labels), records=(), uri=str(folder / "val-0000.h5"),
    )
    ids = [f"p{i}" for i in range(len(labels))]
    shard_files._write_h5(folder / "val-0000.h5", spec, features, labels, ids, ids, [])
    result = shard_files.ShardResult(
        uri=spec.uri, split="val", number=0, count=len(labels),
        class_counts={"NORMAL": int((labels == 0).sum()), "PNEUMONIA": int((labels == 1).sum())},
        sha256=shard_files._sha256_file(folder / "val-0000.h5"),
    )
    return shard_files.write_index(
        [result], str(folder / "index.json"), manifest_digest="0" * 64, transform=transform, split_config=SplitConfig()
    )


def test_the_champion_is_rescored_on_this_runs_val_split(tmp_path):
    from pneumo import evaluate
    from pneumo.config import TransformConfig

    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 140)).astype(np.float32)
    labels = (np.arange(60) % 2).astype(np.uint8)
    transform = seed_transform(size=(300, 400))
    index_uri = _val_index(tmp_path, features, labels, transform)
    reg = str(tmp_path / "reg")
    stale = {"val": _val(0.999)}  # what the champion scored on an older val split
    card = {"metrics": stale, "config": {"train": {"threshold": 0.5}, "transform": transform.model_dump(mode="json")}}
    version = registry.register(reg, "m", _weights(4), card)

    metrics, basis = promotion.champion_val_metrics(reg, "m", version, index_uri)
    expected = evaluate.metrics(labels, predict_proba(_weights(4), features), 0.5)
    assert metrics == expected and metrics["roc_auc"] != 0.999
    assert basis.startswith("re-scored")

    # A champion made from another transform cannot read these features: its card decides.
    other = {**card, "config": {**card["config"], "transform": seed_transform(size=(100, 100)).model_dump(mode="json")}}
    version = registry.register(reg, "m", _weights(5), other)
    metrics, basis = promotion.champion_val_metrics(reg, "m", version, index_uri)
    assert metrics == stale["val"] and basis == "champion's card (other val images, features computed differently)"

    # ...and says when those figures come from this run's val images: same data, split and stress jitters.
    same_data = {**other, "data": {"manifest_digest": "0" * 64}, "config": {**other["config"], "split": SplitConfig().model_dump(mode="json")}}
    version = registry.register(reg, "m", _weights(6), same_data)
    metrics, basis = promotion.champion_val_metrics(reg, "m", version, index_uri)
    assert metrics == stale["val"]
    assert basis == "champion's card (the same val images and stress jitters, features computed differently)"


def test_model_ref_carries_the_cards_comparison(tmp_path):
    comparison = promotion.compare("roc_auc", _val(0.8), None, None)
    version = registry.register(str(tmp_path), "m", _weights(0), {"metrics": {}, "champion_comparison": comparison.to_json()})
    assert registry.model_ref(str(tmp_path), "m", version).champion_comparison == comparison.to_json()


def _pneumo_imports(module) -> set[str]:
    """The pneumo modules ``module`` imports, at the top or inside a function."""
    import ast
    import inspect

    found = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and node.module == "pneumo":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumo."):
            found.add(node.module.split(".")[1])
    return found


def test_the_registry_stores_and_imports_nothing_that_trains_or_scores():
    from pneumo import evaluate, train

    assert not _pneumo_imports(registry) & {"evaluate", "train", "shard_files", "shards", "promotion", "plots", "register"}
    # Scoring lives with the model: evaluation and training do not import each other.
    assert "train" not in _pneumo_imports(evaluate) and "evaluate" not in _pneumo_imports(train)
