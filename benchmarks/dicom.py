"""DICOM against JPEG: featurizing speed, and a model trained on the same films either way.

speed:   films from the shared copy upscaled to 2,048 x 2,048 with film grain (as
         benchmarks/synthesize.py makes them), each saved as a JPEG (quality 89), as an
         uncompressed 16-bit DICOM (explicit VR little endian) and as a JPEG Baseline DICOM
         holding that JPEG (as RSNA's files are); pneumo.transform.featurize timed on one
         process under the seed recipe (method fast) and the default recipe (resample).
quality: N films of whole patients, once in the Kaggle layout (the shared JPEGs) and once as an
         RSNA-layout source of DICOM files made from them (tests/dicom_helpers.rsna_source);
         the full flow on each with the same settings; val and test metrics with their 95 %
         intervals (bootstrapped by patient) from each card.

    python benchmarks/dicom.py speed --films 8
    python benchmarks/dicom.py quality --films 1000 --epochs 40   # needs a Prefect server (PREFECT_API_URL)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pneumo.config import recipe  # noqa: E402
from pneumo.recipes import DEFAULT_RECIPE  # noqa: E402
from pneumo.transform import featurize  # noqa: E402
from tests.dicom_helpers import dicom_dataset, dicom_from_jpeg, rsna_source, write_dicom  # noqa: E402

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


def best_seconds(paths: list[Path], config, repeats: int) -> float:
    """Seconds per film, the best of ``repeats`` passes over ``paths``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            featurize(str(path), config)
        best = min(best, (time.perf_counter() - start) / len(paths))
    return best


def speed(films: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="pneumo-dicom-bench-") as folder:
        made = make_films(SHARED, Path(folder), films)
        sizes = {kind: int(np.mean([triple[i].stat().st_size for triple in made])) for i, kind in enumerate(("jpeg", "dicom16", "dicom_jpeg"))}
        report = {"films": films, "side": SIDE, "mean_bytes": sizes, "ms_per_film": {}}
        for name in ("seed", DEFAULT_RECIPE):
            config = recipe(name).transform
            for i, kind in enumerate(("jpeg", "dicom16", "dicom_jpeg")):
                report["ms_per_film"][f"{name}/{kind}"] = round(1000 * best_seconds([t[i] for t in made], config, repeats), 1)
            report["ms_per_film"][f"{name}/dicom16_over_jpeg"] = round(
                report["ms_per_film"][f"{name}/dicom16"] / report["ms_per_film"][f"{name}/jpeg"], 2)
    return report


def _subset(shared: Path, target: Path, films: int) -> Path:
    """About ``films`` shared films of whole patients, half per class, in the Kaggle layout."""
    from pneumo.download import parse_patient_id

    for name in ("NORMAL", "PNEUMONIA"):
        by_patient: dict[str, list[Path]] = {}
        for path in sorted((shared / "train" / name).iterdir()):
            by_patient.setdefault(parse_patient_id(path.name), []).append(path)
        chosen = 0
        for patient in sorted(by_patient, key=lambda p: hashlib.sha256(p.encode()).hexdigest()):
            (target / "train" / name).mkdir(parents=True, exist_ok=True)
            for path in by_patient[patient]:
                shutil.copy2(path, target / "train" / name / path.name)
            chosen += len(by_patient[patient])
            if chosen >= films // 2:
                break
    return target


def quality(films: int, epochs: int) -> dict:
    from flows.full import full

    report = {}
    with tempfile.TemporaryDirectory(prefix="pneumo-dicom-quality-") as folder:
        base = Path(folder)
        kaggle = _subset(SHARED, base / "kaggle", films)
        sources = {"jpeg": kaggle, "dicom": rsna_source(kaggle, base / "rsna")}
        for kind, source in sources.items():
            state = full(source=str(source), workdir=str(base / f"work-{kind}"), run={"runner": "threads"},
                         train={"epochs": epochs}, return_state=True)
            card = json.loads(Path(state.result()["card"]).read_text())
            report[kind] = {split: {metric: card["metrics"][split][metric] for metric in ("roc_auc", "accuracy", "n")}
                            | {"roc_auc_ci95": card["metrics"][split]["ci95"].get("roc_auc")} for split in ("val", "test")}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=["speed", "quality"])
    parser.add_argument("--films", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=recipe(DEFAULT_RECIPE).train.epochs)
    args = parser.parse_args(argv)
    report = speed(args.films, args.repeats) if args.section == "speed" else quality(args.films, args.epochs)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
