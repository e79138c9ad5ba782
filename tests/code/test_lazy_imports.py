"""A run that trains and scores nothing must not pay for torch, scikit-learn, matplotlib or scipy (seconds each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "sklearn", "matplotlib", "scipy")


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_pipeline_and_its_tasks_loads_no_training_or_scoring_library():
    # A fresh interpreter: what `python flows/full.py` and `pneumo run` import before the flow starts.
    # The flow's tasks import them inside their bodies, where training and scoring happen.
    code = ("import sys, flows.full, flows.predict, cli, cli.run, cli.runs\n"
            f"print(' '.join(sorted(name for name in {HEAVY!r} if name in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "", f"imported at start: {loaded.stdout.strip()} (import them where they are used)"
