"""Duplicates in a dataset: exact copies, near copies, and the threshold that tells copies from distinct films.

On a Kaggle-layout folder (default: the shared train split) it prints
  1. fingerprint cost per image (the manifest's extra work) and how long the manifest takes;
  2. groups of byte-identical files, how many join two patients, how many cross splits
     under patient-only splitting (the code before content grouping);
  3. for thresholds of the 1024-bit fingerprint, the pairs within it (all pairs compared,
     no LSH): byte-identical, other bytes of one patient, other bytes of two patients, and
     how many of them patient-only splitting put on two sides;
  4. the distances of made copies (re-encoded, resized, PNG, brightness) to their originals;
  5. the closest distinct films (one patient / two patients) and, with --sheet DIR,
     side-by-side PNGs of them;
  6. the LSH pair search against the all-pairs answer (recall on the films plus their
     copies) and its time on 112,000 fingerprints.

    python benchmarks/duplicates.py [--data ../shared/data/chest_xray_224] [--copies 300] [--seed 0] [--sheet /tmp/pairs]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pneumo import duplicates
from pneumo.download import build_manifest
from pneumo.manifest import Manifest
from pneumo.splits import assign_splits

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224"
THRESHOLDS = (0, 32, 64, 96, 112, 128, 152, 160, 192, 256)


def patient_only(manifest: Manifest) -> dict[str, str]:
    """The splits as they were before content grouping: no shared sha256, no fingerprints."""
    records = [r.model_copy(update={"sha256": hashlib.sha256(r.relpath.encode()).hexdigest(), "fingerprint": None})
               for r in manifest.records]
    return assign_splits(Manifest(root=manifest.root, records=records))


def words(fingerprints: list[str]) -> np.ndarray:
    raw = b"".join(base64.b64decode(f) for f in fingerprints)
    return np.frombuffer(raw, dtype=np.uint64).reshape(len(fingerprints), -1)


def all_distances(w: np.ndarray) -> np.ndarray:
    """Upper-triangle distances, row by row (i < j), as one int16 array."""
    return np.concatenate([np.bitwise_count(w[i] ^ w[i + 1:]).sum(axis=1).astype(np.int16) for i in range(len(w) - 1)])


def copies_of(path: Path) -> dict[str, bytes]:
    image = Image.open(path)
    image.load()
    w, h = image.size

    def saved(im: Image.Image, fmt: str = "JPEG", **options) -> bytes:
        buffer = io.BytesIO()
        im.save(buffer, fmt, **options)
        return buffer.getvalue()

    return {
        "JPEG q50": saved(image, quality=50),
        "JPEG q95": saved(image, quality=95),
        "PNG": saved(image, "PNG"),
        "half size": saved(image.resize((w // 2, h // 2))),
        "300x250 (aspect changed)": saved(image.resize((300, 250))),
        "1024x1024 q90": saved(image.resize((1024, 1024)), quality=90),
        "brightness +10": saved(Image.eval(image, lambda x: min(255, x + 10))),
        "2% cropped (not a copy here)": saved(image.crop((w // 50, h // 50, w - w // 50, h - h // 50))),
    }


def fingerprint_bytes(data: bytes, scratch: Path) -> str:
    scratch.write_bytes(data)
    return duplicates.fingerprint(scratch)


def side_by_side(pairs: list[tuple[int, str, str]], root: Path, out: Path) -> None:
    tiles = []
    for d, a, b in pairs:
        tile = Image.new("L", (460, 250), 255)
        tile.paste(Image.open(root / a).convert("L").resize((224, 224)), (0, 0))
        tile.paste(Image.open(root / b).convert("L").resize((224, 224)), (236, 0))
        ImageDraw.Draw(tile).text((5, 230), f"{d} bits  {Path(a).name} | {Path(b).name}", fill=0)
        tiles.append(tile)
    sheet = Image.new("L", (460, 250 * len(tiles)), 255)
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (0, 250 * i))
    sheet.save(out)
    print(f"  wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--copies", type=int, default=300, help="films copied each way for the copy distances")
    parser.add_argument("--seed", type=int, default=0, help="seeds which films are copied")
    parser.add_argument("--scale", type=int, default=112_000, help="fingerprints in the LSH timing")
    parser.add_argument("--sheet", type=Path, default=None, help="folder for side-by-side PNGs of the closest pairs")
    args = parser.parse_args()

    paths = sorted(args.data.glob("train/*/*"))
    start = time.perf_counter()
    for path in paths:
        duplicates.fingerprint(path)
    per_image = (time.perf_counter() - start) / len(paths)
    start = time.perf_counter()
    manifest = build_manifest(args.data)
    built = time.perf_counter() - start
    records = sorted(manifest.records, key=lambda r: r.relpath)
    print(f"1. {len(records)} images: fingerprint {1000 * per_image:.2f} ms/image on one thread; "
          f"manifest (sha256 + fingerprint, threads) {built:.1f} s; no fingerprint: {sum(r.fingerprint is None for r in records)}")

    old = patient_only(manifest)
    new = assign_splits(manifest)
    moved = sum(old[r.relpath] != new[r.relpath] for r in records)
    print(f"   splits now (patient and content) against patient-only: {moved} images moved")
    by_sha = defaultdict(list)
    for r in records:
        by_sha[r.sha256].append(r)
    groups = [g for g in by_sha.values() if len(g) > 1]
    print(f"2. byte-identical groups: {len(groups)} ({sum(map(len, groups))} files, {sum(len(g) - 1 for g in groups)} surplus copies); "
          f"joining two patients: {sum(len({r.patient_id for r in g}) > 1 for g in groups)}; "
          f"across splits under patient-only splitting: {sum(len({old[r.relpath] for r in g}) > 1 for g in groups)}")

    w = words([r.fingerprint for r in records])
    d = all_distances(w)
    i, j = np.triu_indices(len(records), 1)
    sha = np.array([r.sha256 for r in records])
    patient = np.array([r.patient_id for r in records])
    split = np.array([old[r.relpath] for r in records])
    same_bytes, same_patient, crossed = sha[i] == sha[j], patient[i] == patient[j], split[i] != split[j]
    print(f"3. all {len(d):,} pairs; byte-identical pairs are {int(d[same_bytes].max())} bits apart at most")
    print("   bits <=  | same bytes | other bytes, one patient | other bytes, two patients | of those, across splits (patient-only)")
    for t in THRESHOLDS:
        m = d <= t
        print(f"   {t:8d}  | {int(np.sum(m & same_bytes)):10d} | {int(np.sum(m & ~same_bytes & same_patient)):24d} | "
              f"{int(np.sum(m & ~same_bytes & ~same_patient)):26d} | {int(np.sum(m & ~same_bytes & crossed)):10d}")

    rng = np.random.default_rng(args.seed)
    sample = rng.choice(len(records), size=min(args.copies, len(records)), replace=False)
    scratch = Path("/tmp") / f"pneumo-duplicates-{time.time_ns()}.img"
    by_kind: dict[str, list[int]] = defaultdict(list)
    made: list[str] = []
    try:
        for k in sample:
            for kind, data in copies_of(args.data / records[k].relpath).items():
                f = fingerprint_bytes(data, scratch)
                by_kind[kind].append(duplicates.distance(f, records[k].fingerprint))
                if "cropped" not in kind:
                    made.append(f)
    finally:
        scratch.unlink(missing_ok=True)
    print(f"4. copies of {len(sample)} films: bits from their original")
    for kind, ds in by_kind.items():
        ds = np.array(ds)
        print(f"   {kind:30s} max {ds.max():4d}  p99 {np.percentile(ds, 99):6.1f}  median {np.median(ds):5.1f}")
    copy_max = max(max(v) for k, v in by_kind.items() if "cropped" not in k)

    other, own = d[~same_bytes & ~same_patient], d[~same_bytes & same_patient]
    print(f"5. closest distinct films: two patients {int(other.min())} bits, one patient {int(own.min())} bits; "
          f"largest copy distance {copy_max}; NEAR_BITS {duplicates.NEAR_BITS}")
    for name, mask in (("two-patients", ~same_bytes & ~same_patient), ("one-patient", ~same_bytes & same_patient)):
        idx = np.flatnonzero(mask)
        idx = idx[np.argsort(d[idx], kind="stable")[:4]]
        pairs = [(int(d[x]), records[i[x]].relpath, records[j[x]].relpath) for x in idx]
        for p in pairs:
            print(f"   {name}: {p[0]} bits  {p[1]}  {p[2]}  (splits {old[p[1]]}/{old[p[2]]})")
        if args.sheet:
            args.sheet.mkdir(parents=True, exist_ok=True)
            side_by_side(pairs, args.data, args.sheet / f"closest-{name}.png")

    fps = [r.fingerprint for r in records] + made
    truth = all_distances(words(fps))
    ti, tj = np.triu_indices(len(fps), 1)
    want = {(int(a), int(b)) for a, b in zip(ti[truth <= duplicates.NEAR_BITS], tj[truth <= duplicates.NEAR_BITS])}
    start = time.perf_counter()
    got = {(a, b) for a, b, _ in duplicates.near_pairs(fps)}
    took = time.perf_counter() - start
    print(f"6. LSH on {len(fps)} fingerprints (films + copies): {len(got & want)} of {len(want)} pairs within "
          f"{duplicates.NEAR_BITS} bits found, {len(got - want)} wrong, {took:.1f} s")
    # A large set: each real fingerprint with 150-300 of its bits flipped stands for another film.
    base = np.unpackbits(np.frombuffer(b"".join(base64.b64decode(f) for f in fps[: len(records)]), np.uint8).reshape(len(records), -1), axis=1)
    rows = base[rng.integers(0, len(records), args.scale)]
    for row in rows:
        row[rng.choice(row.size, rng.integers(150, 300), replace=False)] ^= 1
    big = [base64.b64encode(np.packbits(row).tobytes()).decode() for row in rows]
    start = time.perf_counter()
    pairs = duplicates.near_pairs(big)
    print(f"   LSH on {args.scale:,} fingerprints: {time.perf_counter() - start:.1f} s, {len(pairs)} pairs within {duplicates.NEAR_BITS} bits")


if __name__ == "__main__":
    main()
