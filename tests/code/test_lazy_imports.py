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


@pytest.mark.slow  # a fresh interpreter
def test_a_runs_result_storage_resolves_without_importing_every_prefect_collection(prefect_server, tmp_path):
    # Prefect loads a block named by its slug through its block registry, which first imports every installed
    # collection (prefect-aws, prefect-dask: ~1.2 s of CPU per run); the tasks get the saved block itself.
    code = ("import sys\nfrom prefect.results import resolve_result_storage\nfrom tasks.options import result_storage\n"
            f"block = resolve_result_storage(result_storage({str(tmp_path)!r}), _sync=True)\n"
            "assert block._block_document_id is not None, 'unsaved: task subprocesses could not resolve it'\n"
            "print(' '.join(sorted(name for name in ('prefect_aws', 'prefect_dask') if name in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "", f"imported to resolve the result storage: {loaded.stdout.strip()}"


@pytest.mark.slow  # a fresh interpreter
def test_training_and_its_pictures_import_no_compiler_and_no_pyplot():
    # torch.use_deterministic_algorithms imports torch._inductor (and torch._dynamo): ~1.8 s of CPU per training
    # process, for a compile option of a model that is never compiled. pyplot: a global figure list (not
    # thread-safe) and a display backend, for pictures that are only saved.
    code = ("import sys, numpy as np\nfrom pneumo.config import seed_train\nfrom pneumo.train import train\n"
            "from pneumo import plots\n"
            "rng = np.random.default_rng(0)\nX = rng.normal(size=(64, 140)).astype('float32')\ny = np.arange(64) % 2\n"
            "result = train(X, y, X, y, seed_train(epochs=2))\n"
            "assert plots.learning_curves(result.history, None).startswith(b'\\x89PNG')\n"
            "print(' '.join(sorted(name for name in ('torch._inductor', 'torch._dynamo', 'matplotlib.pyplot')"
            " if name in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "", f"imported to train and draw: {loaded.stdout.strip()}"
