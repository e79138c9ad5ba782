"""The batch scoring flow on inputs from outside training (issue 15, items 12 and 13)."""

from __future__ import annotations

import os
import shutil
import threading

from flows.predict import predict_batch
from pneumo.config import BatchOptions
from tests.predict_helpers import register_two, xray_pair


def test_a_symlinked_class_folder_and_a_fifo_are_reported_and_recall_without_positives_is_na(tmp_path, shared_data):
    """Before: `PNEUMONIA -> /outside` was skipped without a word (`scored 1 of 2`), the labelled
    set of NORMAL films alone reported `recall 0.000`, and a FIFO named b.jpeg blocked the run."""
    registry_root = str(tmp_path / "registry")
    register_two(registry_root)
    outside = tmp_path / "outside"
    outside.mkdir()
    _, pneumonia = xray_pair(shared_data)
    shutil.copy2(pneumonia, outside / pneumonia.name)
    root = tmp_path / "in"
    (root / "NORMAL").mkdir(parents=True)
    for path in sorted((shared_data / "train" / "NORMAL").iterdir())[:2]:
        shutil.copy2(path, root / "NORMAL" / path.name)
    os.mkfifo(root / "NORMAL" / "b.jpeg")
    (root / "PNEUMONIA").symlink_to(outside, target_is_directory=True)

    done = threading.Event()

    def unblock() -> None:  # on code that waits on the FIFO, give it EOF after 60 s: a failure, not a hang
        if not done.wait(60):
            os.close(os.open(root / "NORMAL" / "b.jpeg", os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    batch = BatchOptions(registry=registry_root, workdir=str(tmp_path / "work"), runner="threads", workers=1)
    state = predict_batch(str(root), batch, return_state=True)
    done.set()
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["files"], summary["scored"], summary["quarantined"]) == (4, 2, 2)
    assert summary["metrics"]["n"] == 2 and summary["metrics"]["recall"] is None
