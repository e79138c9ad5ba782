"""Registry names and champion metrics, without torch: `pneumo run` checks them before anything starts."""

from __future__ import annotations

import re
from typing import Literal, get_args

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

# Validation metrics a champion can be chosen on; for each of them, higher is better.
# "stress_roc_auc" is the ROC AUC on the stress val (val under random strong jitters, pneumo.shift):
# the default, since clean val rewards shortcuts of the training period (issue 16).
ChampionMetric = Literal["stress_roc_auc", "roc_auc", "accuracy", "f1", "precision", "recall", "specificity"]
CHAMPION_METRICS: tuple[str, ...] = get_args(ChampionMetric)
DEFAULT_CHAMPION_METRIC: ChampionMetric = "stress_roc_auc"


def metric_label(metric: str) -> str:
    """How a champion metric is named in decisions: "stress-val roc_auc", "val accuracy"."""
    return f"stress-val {metric.removeprefix('stress_')}" if metric.startswith("stress_") else f"val {metric}"


def validate_model_name(name: str, what: str = "model name") -> str:
    """Refuse names that could escape the registry or clash on case-insensitive stores."""
    if isinstance(name, str) and ("/" in name or "\\" in name or ".." in name or name.startswith(".") or "\0" in name):
        raise ValueError(f"unsafe path {name!r} as {what}: it could point outside the registry ('/', '\\', '..' or a leading '.')")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name
