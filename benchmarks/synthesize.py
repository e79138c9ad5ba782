"""Realistic full-size chest X-ray JPEGs, made deterministically from the shared 224 x 224 copy.

The shared copy (../shared/data/chest_xray_224) is squashed to 224 x 224, so decoding it says
nothing about the speed on real Kaggle originals: those are about 400-2,900 px a side (mean
about 1,330 x 970, mostly landscape), mostly grayscale, some RGB, about 200 KB each. This
module upscales each shared image to a size drawn from that distribution, adds film grain
(the noise that makes real X-ray JPEGs cost their bytes) and saves it as a JPEG.

Every image is seeded by its own name, so the same inputs give the same bytes on any number
of processes.

    python benchmarks/synthesize.py --out /tmp/pneumo-kaggle-5840
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pneumo.download import parse_patient_id

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "chest_xray_224"

# Film grain and quality calibrated so the files average about 200 KB (measured: see README).
GRAIN_SIGMA = 3.0  # gray levels
JPEG_QUALITY = 89
RGB_SHARE = 0.10  # Kaggle's originals are mostly grayscale; some are stored as RGB
# The official test split's class counts (it is not in the shared copy).
TEST_COUNTS = {"NORMAL": 234, "PNEUMONIA": 390}


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def sample_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) like the Kaggle originals: heights around 970, widths about 1.38 x that."""
    height = float(np.clip(rng.lognormal(np.log(930), 0.28), 400, 2700))
    aspect = float(np.clip(rng.normal(1.38, 0.18), 0.9, 2.0))
    return int(np.clip(round(height * aspect), 400, 2900)), int(round(height))


def render(source: Path, target: Path, key: str) -> int:
    """Write one full-size JPEG made from ``source``, seeded by ``key``; return its byte count."""
    rng = _rng(key)
    width, height = sample_size(rng)
    rgb = rng.random() < RGB_SHARE
    with Image.open(source) as image:
        big = image.convert("L").resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0.0, GRAIN_SIGMA, (height, width)).astype(np.float32)
    pixels = np.clip(np.asarray(big, np.float32) + grain, 0, 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels)
    if rgb:
        picture = picture.convert("RGB")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    picture.save(tmp, "JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, target)  # a killed run never leaves a half-written image behind
    return target.stat().st_size


def _render_job(job: tuple[str, str, str]) -> int:
    source, target, key = job
    if Path(target).exists():
        return Path(target).stat().st_size
    return render(Path(source), Path(target), key)


def kaggle_layout_jobs(shared: Path, out: Path) -> list[tuple[str, str, str]]:
    """The 5,840-image stand-in for Kaggle's train + test: (source, target, seed key) triples.

    test/ holds whole held-back patients, 234 NORMAL + 390 PNEUMONIA as in the official test
    split. train/ holds every other shared image, plus a second rendition (other size and
    grain, same patient, name suffix ``_r2``) of as many train images as were held back, so
    train keeps Kaggle's 1,341 + 3,875 images and no patient sits on both sides.
    """
    jobs = []
    for name, n_test in TEST_COUNTS.items():
        files = sorted((shared / "train" / name).glob("*.jpeg"))
        by_patient: dict[str, list[Path]] = {}
        for path in files:
            by_patient.setdefault(parse_patient_id(path.name), []).append(path)
        order = sorted(by_patient, key=lambda p: hashlib.sha256(f"test:{p}".encode()).hexdigest())
        test, train = [], []
        for patient in order:  # whole patients, skipping any that would overshoot the count
            if len(test) + len(by_patient[patient]) <= n_test:
                test += by_patient[patient]
            else:
                train += by_patient[patient]
        if len(test) != n_test:
            raise ValueError(f"could not hold back exactly {n_test} {name} images by whole patients")
        train.sort()
        for path in test:
            jobs.append((str(path), str(out / "test" / name / path.name), f"test/{name}/{path.name}"))
        for path in train:
            jobs.append((str(path), str(out / "train" / name / path.name), f"train/{name}/{path.name}"))
        for path in train[:n_test]:
            second = f"{path.stem}_r2{path.suffix}"
            jobs.append((str(path), str(out / "train" / name / second), f"train/{name}/{second}"))
    return jobs


def synthesize(jobs: list[tuple[str, str, str]], workers: int | None = None) -> list[int]:
    """Render every job (skipping targets already there); return the byte count of each file."""
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_render_job, jobs, chunksize=16))


def ensure(out: Path, workers: int | None = None) -> None:
    """Synthesize the Kaggle-layout folder at ``out`` unless it is already there."""
    if not (out / "train").is_dir():
        print(f"synthesizing realistic JPEGs into {out} (once; deterministic) ...", file=sys.stderr)
        synthesize(kaggle_layout_jobs(SHARED, out), workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/synthesize.py",
        description="Make a Kaggle-layout folder of 5,840 realistic full-size chest X-ray JPEGs "
        "(train 1,341 + 3,875, test 234 + 390) from the shared 224 x 224 images. Deterministic.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to create (several GB free space is plenty)")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared 224 x 224 copy")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    args = parser.parse_args(argv)
    if not (args.shared / "train").is_dir():
        parser.error(f"{args.shared} has no train/ folder")
    sizes = synthesize(kaggle_layout_jobs(args.shared, args.out), args.workers)
    print(f"{len(sizes)} JPEGs in {args.out}, mean {np.mean(sizes) / 1000:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
