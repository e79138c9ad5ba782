import json
import multiprocessing
import threading

import numpy as np
import pytest
import torch

from pneumo import registry, storage
from pneumo.model import TinyNet
from pneumo.train import predict_proba


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TinyNet().state_dict()


def test_versions_increment_and_cards_are_filled_in(tmp_path):
    reg = str(tmp_path)
    assert registry.list_versions(reg, "tinynet") == []
    assert registry.register(reg, "tinynet", _weights(0), {"metrics": {"auc": 0.9}}) == "v0001"
    assert registry.register(reg, "tinynet", _weights(1), {"metrics": {"auc": 0.8}}) == "v0002"
    assert registry.list_versions(reg, "tinynet") == ["v0001", "v0002"]
    card = registry.load_card(reg, "tinynet", "v0002")
    assert card["version"] == "v0002" and card["model_name"] == "tinynet"
    assert card["metrics"] == {"auc": 0.8}
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
        tag = registry.load_card(reg, "racy", version)["tag"]
        # The weights under each card are the ones registered with it: nothing overwritten.
        assert torch.all(registry.load_state_dict(reg, "racy", version)["hidden1.weight"] == tag)
        tags.append(tag)
    assert sorted(tags) == sorted(w * 100 + i for w in (1, 2) for i in range(5))


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


@pytest.mark.parametrize("name", ["../x", "/abs", "", "Upper", "a/b", "a..b", ".hidden", "-x", "x" * 65, "a b"])
def test_bad_model_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="invalid model name"):
        registry.register(str(tmp_path), name, _weights(0), {})
    with pytest.raises(ValueError, match="invalid alias"):
        registry.get_alias(str(tmp_path), "ok", name)
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
    assert registry.load_card(reg, "m", "champion")["n"] == 1
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
    comparison = registry.compare("roc_auc", _val(challenger), champion_version, champion_val, basis="test")
    assert comparison["promoted"] is promoted
    assert comparison["metric"] == "roc_auc" and comparison["split"] == "val"
    assert comparison["challenger_value"] == challenger
    assert comparison["champion_version"] == champion_version
    assert comparison["champion_value"] == (None if champion_version is None else champion)
    assert comparison["reason"]
    json.dumps(comparison)  # goes into the card as is


def test_compare_uses_the_configured_metric():
    challenger, champion = _val(0.95, accuracy=0.70), _val(0.90, accuracy=0.80)
    assert registry.compare("roc_auc", challenger, "v0001", champion)["promoted"] is True
    by_accuracy = registry.compare("accuracy", challenger, "v0001", champion)
    assert by_accuracy["promoted"] is False
    assert (by_accuracy["challenger_value"], by_accuracy["champion_value"]) == (0.70, 0.80)


@pytest.mark.parametrize("metric", ["loss", "n", "confusion_matrix", "", "ROC_AUC"])
def test_unknown_champion_metrics_are_refused(metric):
    with pytest.raises(ValueError, match="invalid champion metric"):
        registry.compare(metric, _val(0.9), None, None)


def test_promotion_follows_the_comparison_and_is_idempotent(tmp_path):
    reg = str(tmp_path)
    v1 = registry.register(reg, "m", _weights(0), {})
    first = registry.compare("roc_auc", _val(0.80), None, None)
    assert registry.promote_if_better(reg, "m", v1, first) is True
    assert registry.get_alias(reg, "m", "champion") == v1
    assert registry.promote_if_better(reg, "m", v1, first) is True  # a retry changes nothing

    v2 = registry.register(reg, "m", _weights(1), {})
    worse = registry.compare("roc_auc", _val(0.79), v1, _val(0.80))
    assert registry.promote_if_better(reg, "m", v2, worse) is False
    assert registry.get_alias(reg, "m", "champion") == v1

    v3 = registry.register(reg, "m", _weights(2), {})
    better = registry.compare("roc_auc", _val(0.85), v1, _val(0.80))
    assert registry.promote_if_better(reg, "m", v3, better) is True
    assert registry.get_alias(reg, "m", "champion") == v3


def test_a_stale_comparison_never_moves_the_champion(tmp_path):
    """Two overlapping runs both beat v0001; only the first to promote wins."""
    reg = str(tmp_path)
    v1, v2, v3 = (registry.register(reg, "m", _weights(i), {}) for i in range(3))
    registry.set_alias(reg, "m", "champion", v1)
    beats_v1 = registry.compare("roc_auc", _val(0.95), v1, _val(0.80))
    assert registry.promote_if_better(reg, "m", v2, beats_v1) is True
    assert registry.promote_if_better(reg, "m", v3, beats_v1) is False
    assert registry.get_alias(reg, "m", "champion") == v2


def _val_index(folder, features, labels, transform) -> str:
    """An index.json with one val shard holding ``features``/``labels``."""
    from pneumo import shards
    from pneumo.config import SplitConfig

    spec = shards.ShardSpec(
        root=str(folder), manifest_digest="0" * 64, split_config=SplitConfig(), transform=transform,
        split="val", number=0, start=0, stop=len(labels), records=(), uri=str(folder / "val-0000.h5"),
    )
    ids = [f"p{i}" for i in range(len(labels))]
    shards._write_h5(folder / "val-0000.h5", spec, features, labels, ids, ids, [])
    result = shards.ShardResult(
        uri=spec.uri, split="val", number=0, count=len(labels),
        class_counts={"NORMAL": int((labels == 0).sum()), "PNEUMONIA": int((labels == 1).sum())},
        sha256=shards._sha256_file(folder / "val-0000.h5"),
    )
    return shards.write_index(
        [result], str(folder / "index.json"), manifest_digest="0" * 64, transform=transform, split_config=SplitConfig()
    )


def test_the_champion_is_rescored_on_this_runs_val_split(tmp_path):
    from pneumo import evaluate
    from pneumo.config import TransformConfig

    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 140)).astype(np.float32)
    labels = (np.arange(60) % 2).astype(np.uint8)
    transform = TransformConfig(size=(300, 400))
    index_uri = _val_index(tmp_path, features, labels, transform)
    reg = str(tmp_path / "reg")
    stale = {"val": _val(0.999)}  # what the champion scored on an older val split
    card = {"metrics": stale, "config": {"train": {"threshold": 0.5}, "transform": transform.model_dump(mode="json")}}
    version = registry.register(reg, "m", _weights(4), card)

    metrics, basis = registry.champion_val_metrics(reg, "m", version, index_uri)
    expected = evaluate.metrics(labels, predict_proba(_weights(4), features), 0.5)
    assert metrics == expected and metrics["roc_auc"] != 0.999
    assert basis.startswith("re-scored")

    # A champion made from another transform cannot read these features: its card decides.
    other = {**card, "config": {**card["config"], "transform": TransformConfig(size=(100, 100)).model_dump(mode="json")}}
    version = registry.register(reg, "m", _weights(5), other)
    metrics, basis = registry.champion_val_metrics(reg, "m", version, index_uri)
    assert metrics == stale["val"] and "card" in basis


def test_model_ref_carries_the_cards_comparison(tmp_path):
    comparison = registry.compare("roc_auc", _val(0.8), None, None)
    version = registry.register(str(tmp_path), "m", _weights(0), {"metrics": {}, "champion_comparison": comparison})
    assert registry.model_ref(str(tmp_path), "m", version).champion_comparison == comparison
