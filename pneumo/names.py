"""Registry names and champion metrics, without torch: `pneumo run` checks them before anything starts;
and ``printable``, how user or data text is shown on a terminal or in a log line.

Names are checked with ``fullmatch``: ``re.match`` with ``$`` lets a trailing newline through.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal, get_args

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Control characters (ESC, CR, VT, DEL, C1), format characters (bidi overrides, zero-width), line and
# paragraph separators (U+2028/9), surrogates: what can move a terminal's cursor, colour it, or fake a line.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

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
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name


def printable(text: Any) -> str:
    """``text`` as one safe line for a terminal or a log: every control, format or separator character
    escaped as Python writes it (``\\x1b``, ``\\r``, ``\\u2028``), the rest as is."""
    text = str(text)
    if text.isprintable():  # the common case: nothing to escape
        return text
    return "".join(_escaped(char) if unicodedata.category(char) in _UNSAFE_CATEGORIES else char for char in text)


def _escaped(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
