"""A default run takes the champion from a champion of the old recipe, decided on the stress val (issues 16, 24)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.full import full
from pneumo import registry
from pneumo.recipes import DEFAULT_RECIPE


def _run(source: Path, workdir: Path, **options) -> dict:
    run = {"shard_size": 150, "runner": "threads", "workers": 2, **options}
    state = full(source=str(source), workdir=str(workdir), run=run, return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def test_a_default_run_becomes_champion_over_an_old_robust3_champion_on_the_stress_val(subset_source, tmp_path):
    workdir = tmp_path / "workdir"
    old = _run(subset_source, workdir, recipe="robust3")
    old_card = json.loads(Path(old["card"]).read_text())
    assert old_card["recipe"] == "robust3" and old_card["threshold_rule"] == "stress_youden" and "views" not in old_card
    assert old_card["config"]["transform"]["views"]["count"] == 0 and old_card["config"]["transform"]["renditions"] == 12
    assert registry.get_alias(str(workdir / "registry"), "tinynet", "champion") == old["version"] == "v0001"

    new = _run(subset_source, workdir)  # every default: recipe, champion metric
    card = json.loads(Path(new["card"]).read_text())
    comparison = card["champion_comparison"]
    assert card["recipe"] == DEFAULT_RECIPE == "robust4"
    assert card["config"]["transform"]["views"]["count"] == 16 == card["views"]["count"]
    assert card["config"]["transform"]["renditions"] == 48 and "reference.json" in card["files"]
    assert comparison["metric"] == "stress_roc_auc" and comparison["decided_by"] == "stress-val roc_auc"
    assert comparison["champion_version"] == "v0001" and comparison["promoted"], comparison
    # robust4 scores a film with its views, robust3 in one pass: the old champion does not compute what this
    # run's rows are scored with, so its card decides, and its card's stress val is this run's (same data, split
    # and jitters).
    assert comparison["basis"] == "champion's card (the same val images and stress jitters, features computed differently)"
    assert comparison["champion_value"] == pytest.approx(old_card["metrics"]["stress_val"]["roc_auc"], abs=1e-12)
    assert comparison["challenger_value"] == card["metrics"]["stress_val"]["roc_auc"] > comparison["champion_value"]
    assert registry.get_alias(str(workdir / "registry"), "tinynet", "champion") == new["version"] == "v0002"

    # The card says how the threshold was chosen, shows the stress val with its CIs, and the stretches.
    assert card["threshold_rule"] == "stress_youden" and 0 < card["threshold"] < 1
    stress = card["metrics"]["stress_val"]
    assert stress["n"] == stress["jitters_per_image"] * card["metrics"]["val"]["n"]
    assert stress["ci95"]["roc_auc"][0] <= stress["roc_auc"] <= stress["ci95"]["roc_auc"][1]
    assert {"stretch_x0.82", "stretch_x1.22", "stretch_y0.82", "stretch_y1.22"} <= set(card["metrics"]["shift"]["val"]["per_shift"])
    assert card["training"]["averaged_from"] == 11 and card["training"]["epochs_run"] == 30
