"""`pneumo drift SOURCE`: the verdict first, then the figures; one line when there is nothing to compare with."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from tests.helpers import invoke, pneumo_command
from tests.predict_helpers import register_two, register_with_reference

pytestmark = pytest.mark.slow  # `pneumo drift` processes and a reference of real films


def test_a_version_registered_before_references_says_so_in_one_line(shared_data, tmp_path):
    registry_root = str(tmp_path / "registry")
    register_two(registry_root)  # hand-made cards without reference.json, as every version before drift checks
    films = tmp_path / "films"
    films.mkdir()
    for path in sorted((shared_data / "train" / "NORMAL").iterdir())[:3]:
        shutil.copy2(path, films / path.name)
    result = invoke("drift", str(films), "--registry", registry_root)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "tinynet v0001 has no reference (registered before drift checks): nothing to compare with"]


def test_a_zip_of_class_folders_too_small_for_a_verdict_says_so_first(shared_data, tmp_path, prefect_server):
    import subprocess

    registry_root = str(tmp_path / "registry")
    register_with_reference(registry_root, shared_data)
    archive = tmp_path / "films.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for name in ("NORMAL", "PNEUMONIA"):
            for path in sorted((shared_data / "train" / name).iterdir())[300:325]:
                bundle.write(path, f"ward/{name}/{path.name}")
    args = ["drift", str(archive), "--registry", registry_root, "--workdir", str(tmp_path / "work")]
    shown = subprocess.run(pneumo_command(*args), capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["verdict: too few films", "50 film(s): a verdict needs at least 100"]
    as_json = invoke(*args, "--json")  # in this process: the model and Prefect are loaded already
    record = json.loads(as_json.output.splitlines()[0])
    assert record["verdict"] == "too few films" and record["n_films"] == 50 and record["against"] == "tinynet v0001"
    missing = invoke("drift", str(tmp_path / "nowhere"), "--registry", registry_root)
    assert missing.exit_code == 2 and "nowhere" in missing.output and len(missing.output.splitlines()) == 1
