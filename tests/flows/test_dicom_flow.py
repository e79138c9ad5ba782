"""A hospital's films end to end: an RSNA-layout source of DICOM files (made from the shared films) runs to a
champion, which `pneumo predict`, the batch flow and `pneumo serve` apply to DICOM; and no patient data
planted in the headers appears in anything the pipeline wrote, logged or published."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from flows.full import full
from flows.predict import predict_batch
from pneumo.config import BatchOptions
from pneumo.manifest import load_manifest
from tests.dicom_helpers import ODD_OBJECTS, PLANTED, PLANTED_PATIENT_PREFIX, film_pixels, odd_object, rsna_source, write_dicom
from tests.faults.test_security import read_everything_prefect_kept
from tests.helpers import free_port, pneumo_command, wait_for_port

pytestmark = pytest.mark.xdist_group("test_dicom_flow")
# Every identifying value planted in the headers; none may appear in any output.
NEEDLES = [PLANTED_PATIENT_PREFIX, *(value for name, value in PLANTED.items() if name != "PatientID"),
           *PLANTED["PatientName"].split("^"), "Quillfeather", "Zzyzx"]


@pytest.fixture(scope="module")
def dicom_run(small_source, tmp_path_factory):
    """One run over ~160 DICOM films, a lateral one (kept: the run asks for laterals) and five objects that are no
    chest films (a knee, a CT, colour, two frames, a report: quarantined, 3 % of the files, under the default 1 %
    max_bad_fraction since none is bad data); then predict, the batch flow and serve on DICOM."""
    base = tmp_path_factory.mktemp("dicom")
    source = rsna_source(small_source, base / "rsna")
    film = film_pixels(next((small_source / "train" / "NORMAL").iterdir()))
    images = source / "stage_2_train_images"
    for name in ODD_OBJECTS:
        write_dicom(images / f"{name}.dcm", odd_object(film, name))
    with (source / "stage_2_train_labels.csv").open("a") as table:
        table.write("".join(f"{name},,,,,0\n" for name in ODD_OBJECTS))
    workdir = base / "work"
    # A fixed salt: the patients' hashes, hence the carved val and test, are the same on every run (a workdir's own
    # random salt could leave this small source's val with one class, which the threshold refuses).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PNEUMO_PATIENT_SALT", "pneumo-tests-dicom-flow")
        state = full(source=str(source), workdir=str(workdir), run={"shard_size": 100, "runner": "threads"},
                     transform={"accept_lateral": True}, train={"epochs": 2, "patience": 2}, return_state=True)
    assert state.is_completed(), state.message
    outputs = {"run": state.message}

    one = next(images.glob("*.dcm"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    predicted = subprocess.run(pneumo_command("predict", "--workdir", str(workdir), "--json", str(one)),
                               capture_output=True, text=True, timeout=300, env=env)
    outputs["predict"] = predicted.stdout + predicted.stderr

    batch = predict_batch(str(images), BatchOptions(workdir=str(workdir), runner="threads"), return_state=True)
    outputs["batch"] = batch.message

    port, log = free_port(), base / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen(pneumo_command("serve", "--workdir", str(workdir), "--port", str(port)),
                                  stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(port, timeout=120)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                raw = client.post("/predict", content=one.read_bytes(), headers={"content-type": "application/dicom"})
                form = client.post("/predict", files={"file": ("x.dcm", one.read_bytes(), "application/octet-stream")})
        finally:
            server.terminate()
            server.wait(timeout=20)
    outputs["serve"] = log.read_text() + raw.text + form.text
    return {"source": source, "workdir": workdir, "state": state, "predicted": predicted, "batch": batch,
            "raw": raw, "form": form, "one": one, "outputs": outputs}


def test_an_rsna_source_of_dicom_films_runs_to_a_champion(dicom_run):
    workdir, result = dicom_run["workdir"], dicom_run["state"].result()
    assert result["registered"] is True
    champion = json.loads((workdir / "registry" / "tinynet" / "aliases" / "champion.json").read_text())
    assert champion["version"] == result["version"]
    manifest = load_manifest(next((workdir / "manifests").glob("manifest-*.json")).as_posix())
    assert len(manifest.records) >= 150 and all(r.relpath.endswith(".dcm") for r in manifest.records)
    assert all(r.patient_id.startswith("h-") for r in manifest.records)  # the header's PatientID, salted and hashed
    assert {r.view for r in manifest.records} == {"PA", "LL"}  # the lateral kept, as asked, its view recorded
    report = json.loads(next((workdir / "reports").glob("quarantine-*.json")).read_text())
    assert {e["relpath"]: (e["stage"], e["reason"]) for e in report["entries"]} == {
        f"stage_2_train_images/{name}.dcm": ("manifest", reason) for name, reason in ODD_OBJECTS.items() if name != "lateral"}
    assert (report["n_out_of_scope"], report["bad_fraction"]) == (5, 0.0)
    card = json.loads(Path(result["card"]).read_text())
    assert card["config"]["transform"]["accept_lateral"] is True


def test_predict_the_batch_flow_and_serve_read_dicom(dicom_run):
    predicted = dicom_run["predicted"]
    assert predicted.returncode == 0, predicted.stderr
    row = json.loads(predicted.stdout.splitlines()[0])
    assert row["label"] in ("NORMAL", "PNEUMONIA") and 0 <= row["probability"] <= 1
    summary = dicom_run["batch"].result()
    assert summary["scored"] == summary["files"] - 5 and summary["quarantined"] == 5  # the model takes laterals, as trained
    for response in (dicom_run["raw"], dicom_run["form"]):
        assert response.status_code == 200, response.text
        assert response.json()["probability"] == pytest.approx(row["probability"], abs=1e-6)


def test_no_patient_data_in_anything_the_pipeline_writes(dicom_run):
    runs = [dicom_run[name].state_details.flow_run_id for name in ("state", "batch")]  # the two flows' runs
    texts = list(dicom_run["outputs"].values()) + [read_everything_prefect_kept(runs)]
    for path in dicom_run["workdir"].rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    everything = "\n".join(texts)
    assert "stage_2_train_images/" in everything and "h-" in everything  # the search does see the outputs
    assert any(p.name == "report.html" for p in dicom_run["workdir"].rglob("report.html"))
    sample = dicom_run["one"].read_bytes().decode("latin-1")
    assert all(needle in sample for needle in NEEDLES)  # and the films do hold every planted value
    for needle in NEEDLES:
        assert needle not in everything, f"{needle!r} leaked"
