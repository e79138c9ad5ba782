"""The batch flow holds its workdir against `pneumo gc` as `pneumo run` does, never caches a chunk whose
files could not be read, and says when it was served from the cache (issue 23, item 8 and a note)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flows.predict import predict_batch
from pneumo import predict
from pneumo.config import BatchOptions
from tests.helpers import pneumo_command, task_states
from tests.predict_helpers import register_two


def _films(shared_data: Path, root: Path, per_class: int = 3) -> Path:
    for name in ("NORMAL", "PNEUMONIA"):
        (root / name).mkdir(parents=True)
        for path in sorted((shared_data / "train" / name).iterdir())[:per_class]:
            shutil.copy2(path, root / name / path.name)
    return root


def _run(input: str, registry: str, workdir: Path):
    state = predict_batch(input, BatchOptions(registry=registry, workdir=str(workdir), chunk_size=3, workers=2,
                                              runner="threads"), return_state=True)
    assert state.is_completed(), state.message
    return state.result(), state.message, task_states(state.state_details.flow_run_id, expected=("score-chunk",))


def test_gc_refuses_while_a_batch_run_scores_a_zip_it_extracted(shared_data, tmp_path, monkeypatch):
    """Before: the batch flow wrote no run record, so `pneumo gc --yes --keep-recent 0` removed the extracted
    zip mid-run and the run ended 'scored 0 of 6 (6 quarantined)', exit 0."""
    registry, workdir = str(tmp_path / "registry"), tmp_path / "work"
    register_two(registry)
    archive = shutil.make_archive(str(tmp_path / "films"), "zip", _films(shared_data, tmp_path / "films"))
    real, gc_runs = predict.score_inputs, []

    def gc_then_score(*args):
        if not gc_runs:  # `pneumo gc` in another process, while the flow is scoring its first chunk
            gc_runs.append(subprocess.run(
                pneumo_command("gc", "--workdir", str(workdir), "--registry", registry, "--keep-recent", "0", "--yes"),
                capture_output=True, text=True, timeout=120))
        return real(*args)

    monkeypatch.setattr(predict, "score_inputs", gc_then_score)
    summary, _, _ = _run(archive, registry, workdir)
    gc = gc_runs[0]
    assert gc.returncode == 1 and "a run is in progress in" in gc.stderr, gc.stdout + gc.stderr
    assert (summary["scored"], summary["quarantined"]) == (6, 0)
    assert list((workdir / "downloads").iterdir()), "the extracted zip is still there"
    # Once the run is over, its record no longer holds the workdir.
    after = subprocess.run(pneumo_command("gc", "--workdir", str(workdir), "--registry", registry, "--keep-recent", "0"),
                           capture_output=True, text=True, timeout=120)
    assert after.returncode == 0 and "in progress" not in after.stderr and "downloads" in after.stdout


def test_a_chunk_whose_file_was_missing_is_not_cached_and_the_summary_says_what_was(shared_data, tmp_path, monkeypatch):
    """Before: a chunk scored while one of its files was gone was cached with that file's 'no such file', and
    every re-run returned the same quarantine even once the file was back."""
    registry, workdir = str(tmp_path / "registry"), tmp_path / "work"
    register_two(registry)
    root = _films(shared_data, tmp_path / "films")
    victim = sorted((root / "PNEUMONIA").iterdir())[0]
    aside = tmp_path / "aside"
    real = predict.score_inputs

    def score_while_one_file_is_gone(registry_, model_name, version, images):
        if not any(Path(image.path) == victim for image in images):
            return real(registry_, model_name, version, images)
        os.replace(victim, aside)  # gone for this chunk's scoring only; back as it was (same size and mtime)
        try:
            return real(registry_, model_name, version, images)
        finally:
            os.replace(aside, victim)

    monkeypatch.setattr(predict, "score_inputs", score_while_one_file_is_gone)
    first, _, states = _run(str(root), registry, workdir)
    assert (first["scored"], first["quarantined"]) == (5, 1) and sorted(states["score-chunk"]) == ["Completed", "Completed"]
    monkeypatch.setattr(predict, "score_inputs", real)

    second, message, states = _run(str(root), registry, workdir)
    assert (second["scored"], second["quarantined"]) == (6, 0), "the chunk with the missing file is scored again"
    assert sorted(states["score-chunk"]) == ["Cached", "Completed"]  # the other chunk still comes from the cache
    assert message.endswith("; 1 of 2 chunks from the cache")

    third, message, states = _run(str(root), registry, workdir)
    assert third["scored"] == 6 and states["score-chunk"] == ["Cached", "Cached"]
    assert (third["cached_chunks"], third["chunks"]) == (2, 2) and "; cache hit: " in message


@pytest.mark.parametrize("cached, says", [((0, 2), None), ((1, 2), "1 of 2 chunks from the cache"),
                                          ((2, 2), "cache hit: the same input and version were scored before")])
def test_the_batch_summary_says_how_much_came_from_the_cache(cached, says):
    from pneumo.summary import batch_summary, batch_text, predict_outcome

    rows = [{"relpath": "a.png", "label": "NORMAL", "warnings": "", "error": None}]
    summary = batch_summary("tinynet v0001", 0.5, "in", rows, "out.csv", None, cached)
    for text in (predict_outcome(summary), batch_text(summary, 1.0)):
        assert (says in text) if says else ("cache" not in text)
