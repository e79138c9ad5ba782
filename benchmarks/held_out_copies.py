"""Mirrored, turned and cropped copies: how far they are from the prints meant to catch them, and
whether those prints flag distinct films (issue 23, item 5).

On a Kaggle-layout folder (default: the shared train split) it prints
  1. the cost of the prints per image: plain and mirror (every image), plus turned and
     cropped (held-out films only);
  2. false positives: for every film, the closest other film (other bytes) under the mirror
     print and under the turned and cropped prints, every film treated as held out
     (n x (n - 1) x 6 comparisons), and how many fall within NEAR_BITS;
  3. copies of --copies films (JPEG q90): mirrored, turned 1-5 degrees, cropped 1-5 % a side,
     cropped off one corner, turned and cropped: bits from the nearest print meant to catch them.

    python benchmarks/held_out_copies.py [--data ../shared/data/chest_xray_224] [--copies 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pneumo import duplicates

SHARED = Path(os.environ.get("PNEUMO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224")


def words(prints: list[str]) -> np.ndarray:
    raw = b"".join(base64.b64decode(p) for p in prints)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(prints), -1).view(np.uint64)


def made_copies(image: Image.Image, flip: bool) -> dict[str, Image.Image]:
    w, h = image.size
    sign = -1 if flip else 1
    out = {"mirror": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)}
    for degrees in (1, 2, 3, 4, 5):
        out[f"turned {degrees} deg"] = image.rotate(sign * degrees)
    for percent in (1, 2, 3, 4, 5):
        m = round(w * percent / 100)
        out[f"cropped {percent} %"] = image.crop((m, m, w - m, h - m))
    m = round(w * 0.02)
    out["cropped 4 % off one corner"] = image.crop((0, 0, w - 2 * m, h - 2 * m))
    out["cropped 2 %, turned 3 deg"] = out["cropped 2 %"].rotate(3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = sorted(args.data.glob("train/*/*"))
    if not paths:
        parser.error(f"no films under {args.data}/train: give --data")

    start = time.perf_counter()
    prints = [duplicates.fingerprints(p, turned=True) for p in paths]
    with_turned = (time.perf_counter() - start) / len(paths)
    start = time.perf_counter()
    for p in paths[:1000]:
        duplicates.fingerprints(p)
    plain = (time.perf_counter() - start) / min(1000, len(paths))
    print(f"1. {len(paths)} films: plain + mirror prints {1000 * plain:.2f} ms/image, with turned and cropped "
          f"{1000 * with_turned:.2f} ms/image (one thread)")

    sha = np.array([hashlib.sha256(p.read_bytes()).hexdigest() for p in paths])
    plain_w, mirror_w = words([p.plain for p in prints]), words([p.mirrored for p in prints])
    turned_w = words([t for p in prints for t in p.turned]).reshape(len(prints), -1, plain_w.shape[1])
    closest = {"mirror": [], "turned or cropped": []}
    for i in range(len(prints)):
        other = sha != sha[i]
        closest["mirror"].append(np.bitwise_count(plain_w[i] ^ mirror_w).sum(1)[other].min())
        closest["turned or cropped"].append(np.bitwise_count(plain_w[i] ^ turned_w).sum(2).min(1)[other].min())
    for kind, values in closest.items():
        values = np.array(values)
        print(f"2. closest distinct film under the {kind} prints: {values.min()} bits; films with another within "
              f"{duplicates.NEAR_BITS}: {int((values <= duplicates.NEAR_BITS).sum())} of {len(values)}")

    rng = np.random.default_rng(args.seed)
    rows: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        copy_path = Path(scratch) / "copy.jpeg"
        for k in rng.choice(len(paths), min(args.copies, len(paths)), replace=False):
            image = Image.open(paths[k])
            image.load()
            for kind, copy in made_copies(image, bool(k % 2)).items():
                buffer = io.BytesIO()
                copy.save(buffer, "JPEG", quality=90)
                copy_path.write_bytes(buffer.getvalue())
                f = words([duplicates.fingerprint(copy_path)])[0]
                catchers = np.concatenate([plain_w[k : k + 1], mirror_w[k : k + 1], turned_w[k]])
                rows.setdefault(kind, []).append(int(np.bitwise_count(f ^ catchers).sum(1).min()))
    print(f"3. copies of {args.copies} films, bits from the nearest of their original's prints:")
    for kind, values in rows.items():
        values = np.array(values)
        print(f"   {kind:28s} median {np.median(values):5.0f}  max {values.max():4d}  "
              f"within {duplicates.NEAR_BITS}: {100 * (values <= duplicates.NEAR_BITS).mean():5.1f} %")


if __name__ == "__main__":
    main()
