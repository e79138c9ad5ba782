"""Security: safe weight loading, no leaked credentials, contained names, validated parameters."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from tests.helpers import full_flow as full  # flat settings; the run's own go into its run section
from pneumo import registry, shard_files, storage
from pneumo.model import TinyNet

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "dummy-aws-secret-4f1c9e",
    "AWS_SESSION_TOKEN": "dummy-aws-session-7d2b0a",
    "KAGGLE_KEY": "dummy-kaggle-key-91e3cc",
}


# --------------------------------------------------------------------------- torch.load


def torch_load_calls() -> list[tuple[Path, ast.Call]]:
    calls = []
    for folder in ("pneumo", "tasks", "flows", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            source = path.read_text()
            assert "from torch import load" not in source, f"{path} hides torch.load behind an alias"
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    calls.append((path, node))
    return calls


def test_torch_load_is_only_ever_called_with_weights_only():
    calls = torch_load_calls()
    assert calls, "expected the registry to load weights with torch.load"
    for path, call in calls:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("weights_only") == "True", f"{path}:{call.lineno} calls torch.load without weights_only=True"


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.marker}",))


def test_a_malicious_model_file_is_refused_without_running_its_code(tmp_path):
    root = str(tmp_path / "registry")
    version = registry.register(root, "tinynet", TinyNet().state_dict(), {"metrics": {}})
    model_pt = tmp_path / "registry" / "tinynet" / version / "model.pt"
    Exploit.marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"weights": Exploit()}, buffer)  # a pickle that runs a command when loaded unsafely
    model_pt.write_bytes(buffer.getvalue())
    with pytest.raises(registry.CorruptModel):  # its sha256 is not the card's, and weights_only refuses it
        registry.load_state_dict(root, "tinynet", version)
    assert not Exploit.marker.exists()


# --------------------------------------------------------------------------- credentials


def read_everything_prefect_kept(run_ids: list[str]) -> str:
    """Every log line, artifact and parameter the Prefect server holds for these flow runs, as one string
    (the runs' own: the session's server also keeps every other test's)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    run_ids = sorted(set(map(str, run_ids)))
    assert run_ids, "no flow run to read"

    def everything(read):
        items, offset = [], 0
        while page := read(limit=200, offset=offset):
            items += page
            offset += len(page)
        return items

    runs = FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
    with get_client(sync_client=True) as client:
        logs = everything(lambda **page: client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)), **page))
        artifacts = everything(lambda **page: client.read_artifacts(flow_run_filter=runs, **page))
        flow_runs = client.read_flow_runs(flow_run_filter=runs)
    assert len(flow_runs) == len(run_ids) and logs
    parts = [log.message for log in logs]
    parts += [json.dumps(a.data, default=str) + str(a.description) for a in artifacts]
    parts += [json.dumps(r.parameters, default=str) for r in flow_runs]
    return "\n".join(parts)


def test_credentials_never_reach_logs_artifacts_cards_or_errors(small_source, tmp_path):
    env = {**os.environ, **SECRETS, "KAGGLE_USERNAME": "someone", "PREFECT_API_URL": PREFECT_API_URL.value()}
    workdir = tmp_path / "work"
    good = subprocess.run(
        [sys.executable, "flows/full.py", "--source", str(small_source), "--workdir", str(workdir),
         "--epochs", "3", "--train.patience", "3", "--run.runner", "threads", "--recipe", "robust3"],  # any recipe
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    # A failing Kaggle download (no network here) must explain itself without the key.
    bad = subprocess.run(
        [sys.executable, "flows/full.py", "--workdir", str(tmp_path / "kaggle"), "--run.retries", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert bad.returncode == 1
    assert "KAGGLE_USERNAME" in bad.stderr and "--source" in bad.stderr

    outputs = [good.stdout, good.stderr, bad.stdout, bad.stderr]
    outputs.append(read_everything_prefect_kept(re.findall(r"/runs/flow-run/([0-9a-f-]{36})", "".join(outputs))))
    for path in [*workdir.rglob("*"), *(tmp_path / "kaggle").rglob("*")]:
        if path.is_file():
            outputs.append(path.read_bytes().decode("latin-1"))
    everything = "\n".join(outputs)
    assert "tinynet" in everything and "v0001" in everything  # the search does see the outputs
    for name, secret in SECRETS.items():
        assert secret not in everything, f"{name} leaked"


# --------------------------------------------------------------------------- names and prefixes


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "..", "", "Upper", "x" * 80, "bad name"])
def test_model_names_cannot_escape_the_registry(name, tmp_path):
    with pytest.raises(ValueError, match="model name"):
        registry.register(str(tmp_path / "registry"), name, TinyNet().state_dict(), {})
    with pytest.raises(Exception, match="model name"):
        full(source=str(tmp_path), workdir=str(tmp_path / "work"), model_name=name)
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_a_tampered_index_cannot_point_outside_its_folder(tmp_path):
    folder = tmp_path / "shards" / "x"
    folder.mkdir(parents=True)
    (tmp_path / "secret.h5").write_bytes(b"not yours")
    storage.write_json(str(folder / "index.json"), {
        "transform": {}, "shards": [{"name": "../../secret.h5", "split": "train", "count": 1, "sha256": "0" * 64}],
    })
    with pytest.raises(shard_files.CorruptShard, match="unexpected shard name"):
        shard_files.load_split(str(folder / "index.json"), "train")


def test_a_zip_entry_cannot_escape_through_the_download_cache(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("train/NORMAL/../../../../escape.txt", b"x")
    with pytest.raises(ValueError, match="escape"):
        full(source=str(archive), workdir=str(tmp_path / "work"), retries=0)
    assert not list(tmp_path.parent.glob("escape.txt")) and not list(tmp_path.rglob("escape.txt"))


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "params, says",
    [
        ({"percentile": 150}, "percentile"),
        ({"shard_size": 0}, "shard_size"),
        ({"runner": "gpu"}, "runner"),
        ({"max_bad_fraction": 2}, "max_bad_fraction"),
        ({"train": {"epochs": 0}}, "epochs"),
        ({"train": {"loss": "mse"}}, "loss"),
        ({"transform": {"crop_fraction": 0.7}}, "crop_fraction"),
        ({"split": {"val_fraction": -1}}, "val_fraction"),
    ],
)
def test_bad_flow_parameters_get_clear_errors(params, says, tmp_path):
    with pytest.raises(Exception, match=says):
        full(source=str(tmp_path), workdir=str(tmp_path / "work"), **params)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("args, says", [(["--epochs", "0"], "epochs"), (["--run.percentile", "abc"], "percentile")])
def test_bad_cli_options_exit_2_with_a_message(args, says):
    run = subprocess.run([sys.executable, "flows/full.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert says in run.stderr
