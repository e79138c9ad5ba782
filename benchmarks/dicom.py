"""DICOM against JPEG: featurizing speed, and a model trained on the same films either way.

speed:   films from the shared copy upscaled to 2,048 x 2,048 with film grain (as
         benchmarks/synthesize.py makes them), each saved as a JPEG (quality 89), as an
         uncompressed 16-bit DICOM (explicit VR little endian) and as a JPEG Baseline DICOM
         holding that JPEG (as RSNA's files are); pneumo.transform.featurize timed on one
         process under every recipe (seed: method fast; the others: resample), wall and CPU
         time (process_time) per film, the best of ``--repeats`` passes over the films of one
         kind, with the ratio dicom16 / jpeg per recipe and the load average.
quality: N films of whole patients as an RSNA-layout source of DICOM files
         (tests/dicom_helpers.rsna_source: a gray JPEG encapsulated, as RSNA's are, the
         header's PatientID the film's patient) and as PNGs of the pixels those DICOMs show
         with a labels.csv whose ``patient`` column is the same PatientID
         (tests/dicom_helpers.png_twin). One fixed patient salt: both sources hash each
         patient to the same id, so the carve puts the same films in val and test (checked:
         ``same_val_and_test_films``) and the comparison is paired. The full flow on each with
         the same settings; val and test metrics with their 95 % intervals (bootstrapped by
         patient) from each card.

    python benchmarks/dicom.py speed --films 8
    python benchmarks/dicom.py quality --films 1000   # a Prefect server (PREFECT_API_URL) or an ephemeral one
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pneumo.config import recipe  # noqa: E402
from pneumo.recipes import DEFAULT_RECIPE, RECIPES  # noqa: E402
from pneumo.transform import featurize  # noqa: E402
from pneumo.workdir import PATIENT_SALT_ENV  # noqa: E402
from tests.dicom_helpers import dicom_dataset, dicom_from_jpeg, png_twin, rsna_source, write_dicom  # noqa: E402

SHARED = Path(os.environ.get("PNEUMO_SHARED_DATA") or REPO.parent / "shared" / "data" / "chest_xray_224")
SIDE, GRAIN_SIGMA, JPEG_QUALITY = 2048, 3.0, 89


def make_films(shared: Path, out: Path, count: int) -> list[tuple[Path, Path, Path]]:
    """(jpeg, uncompressed 16-bit dicom, jpeg-baseline dicom) of ``count`` films at SIDE x SIDE."""
    sources = sorted((shared / "train" / "PNEUMONIA").iterdir())[:count]
    made = []
    for index, source in enumerate(sources):
        rng = np.random.default_rng(index)
        with Image.open(source) as image:
            big = np.asarray(image.convert("L").resize((SIDE, SIDE), Image.Resampling.BICUBIC), np.float32)
        pixels = np.clip(big + rng.normal(0, GRAIN_SIGMA, big.shape), 0, 255).round().astype(np.uint8)
        jpeg = out / f"{index}.jpeg"
        Image.fromarray(pixels).save(jpeg, "JPEG", quality=JPEG_QUALITY)
        raw = write_dicom(out / f"{index}-16bit.dcm", dicom_dataset(pixels, bits=16))
        wrapped = dicom_from_jpeg(out / f"{index}-jpeg.dcm", jpeg.read_bytes(), pixels.shape)
        made.append((jpeg, raw, wrapped))
    return made


def best_ms(paths: list[Path], config, repeats: int) -> dict[str, float]:
    """{"wall", "cpu"}: ms per film, the best of ``repeats`` consecutive passes over ``paths``
    (as a source of one kind is read)."""
    best = {"wall": float("inf"), "cpu": float("inf")}
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for path in paths:
            featurize(str(path), config)
        best["wall"] = min(best["wall"], 1000 * (time.perf_counter() - wall) / len(paths))
        best["cpu"] = min(best["cpu"], 1000 * (time.process_time() - cpu) / len(paths))
    return best


def speed(films: int, repeats: int, recipes: list[str]) -> dict:
    kinds = ("jpeg", "dicom16", "dicom_jpeg")
    with tempfile.TemporaryDirectory(prefix="pneumo-dicom-bench-") as folder:
        made = make_films(SHARED, Path(folder), films)
        sizes = {kind: int(np.mean([t[i].stat().st_size for t in made])) for i, kind in enumerate(kinds)}
        report = {"films": films, "side": SIDE, "mean_bytes": sizes, "load_before": os.getloadavg()[0],
                  "ms_per_film": {}, "cpu_ms_per_film": {}, "dicom16_over_jpeg": {}}
        for name in recipes:
            config = recipe(name).transform
            best = {kind: best_ms([t[i] for t in made], config, repeats) for i, kind in enumerate(kinds)}
            for measure, key in (("wall", "ms_per_film"), ("cpu", "cpu_ms_per_film")):
                report[key] |= {f"{name}/{kind}": round(best[kind][measure], 1) for kind in kinds}
            report["dicom16_over_jpeg"][name] = {measure: round(best["dicom16"][measure] / best["jpeg"][measure], 2)
                                                 for measure in ("wall", "cpu")}
        report["load_after"] = os.getloadavg()[0]
    return report


def held_out(manifest_uri: str) -> dict[str, list[str]]:
    """The file stems (the films' uids) the carve put in val and test, sorted: the same in both runs when paired."""
    from pneumo.manifest import load_manifest
    from pneumo.splits import assign_splits

    splits = assign_splits(load_manifest(manifest_uri))
    return {name: sorted(Path(relpath).stem for relpath, split in splits.items() if split == name) for name in ("val", "test")}


def quality(films: int, epochs: int) -> dict:
    """The same films as an RSNA-layout DICOM source and as PNGs with a labels.csv, one patient key: paired."""
    from flows.full import full
    from tests.helpers import copy_patient_subset

    os.environ.setdefault(PATIENT_SALT_ENV, "pneumo-dicom-benchmark")  # both sources hash PatientIDs alike
    report: dict = {"patient_salt": "fixed ($" + PATIENT_SALT_ENV + ")", "epochs": epochs}
    held: dict[str, dict[str, list[str]]] = {}
    with tempfile.TemporaryDirectory(prefix="pneumo-dicom-quality-") as folder:
        base = Path(folder)
        kaggle = copy_patient_subset(SHARED, base / "kaggle", films // 2)
        rsna = rsna_source(kaggle, base / "rsna")
        sources = {"png": png_twin(rsna, base / "png"), "dicom": rsna}
        for kind, source in sources.items():
            start = time.perf_counter()
            state = full(source=str(source), workdir=str(base / f"work-{kind}"), run={"runner": "threads"},
                         train={"epochs": epochs}, return_state=True)
            summary = state.result()
            card = json.loads(Path(summary["card"]).read_text())
            held[kind] = held_out(summary["manifest"])
            report[kind] = {"images": summary["images"], "quarantined": summary["quarantined"],
                            "seconds": round(time.perf_counter() - start)} | {
                split: {metric: card["metrics"][split][metric] for metric in ("roc_auc", "accuracy", "n")}
                | {"roc_auc_ci95": card["metrics"][split]["ci95"].get("roc_auc"),
                   "accuracy_ci95": card["metrics"][split]["ci95"].get("accuracy")} for split in ("val", "test")}
    report["same_val_and_test_films"] = held["png"] == held["dicom"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=["speed", "quality"])
    parser.add_argument("--films", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=recipe(DEFAULT_RECIPE).train.epochs)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="speed: comma-separated recipe names")
    args = parser.parse_args(argv)
    if args.section == "speed":
        report = speed(args.films, args.repeats, args.recipes.split(","))
    else:
        report = quality(args.films, args.epochs)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
