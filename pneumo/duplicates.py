"""The same film under two names: exact copies (same sha256) and near copies (same picture, other bytes).

Each image gets a perceptual fingerprint when the manifest reads its bytes: a 1024-bit
difference hash (dHash) of a 33x32 gray thumbnail, from a reduced decode (libjpeg's DCT
scaling, about a millisecond). A re-encoded or resized copy keeps most bits; two films
differ in many. On the shared train split (5,216 films, 224x224), 4,200 re-encoded,
resized and PNG copies of 600 films were at most 68 bits from their original (74 in an
earlier sample), while the closest two distinct films were 153 bits apart (two patients)
and 174 (one patient's two films). ``NEAR_BITS`` = 112 sits in the middle of that gap:
38 bits above the farthest copy seen, 41 below the closest distinct films
(``python benchmarks/duplicates.py --seed 0`` and ``--seed 1``).

A mirrored copy is 260 to 460 bits from its original, a copy turned by 3 degrees about 200,
one cropped by 2 % a side about 130: so each image also gets the dHash of its mirror image
(the thumbnail's columns reversed), and each held-out film (a source's test and val) the
dHashes of itself turned by TURNS and cropped by CROPS; a train image within NEAR_BITS of
any of them is a copy. dHash keeps about 1 degree of turn or 1 % of crop within NEAR_BITS,
so the grid catches turns of 1 to 5 degrees and centred crops of 1 to 5 % a side. On the
shared train split (``python benchmarks/held_out_copies.py``): 300 mirrored copies at most
26 bits from the mirror print, turned (1-5 degrees) and cropped (1-5 %) copies at most 118
from the nearest turned print (all within 112 but 3 of the 1,500 crops); no two
distinct films within 112 bits either way: the closest are 178 bits apart under the
mirror, 145 between a film and another's turned prints. Not caught: a crop off one side
only, a turn and a crop together, a turn on an enlarged canvas (about 140 to 320 bits).

A 64-bit dHash was tried first and is useless on chest films: 812 pairs of different
patients' films had identical 64-bit hashes. They all look alike at 9x8 pixels.

Finding the close pairs among n images does not compare all n^2 pairs: bit-sampling LSH
(Indyk-Motwani) puts two images in one bucket of a table when they agree on that table's
``SAMPLE_BITS`` bit positions, and only images sharing a bucket are compared. Were bits
flipped independently, a copy 74 bits away would be missed by all ``TABLES`` tables with
probability 1e-7, one 112 bits away with 1.3e-3; two films a typical 383 bits apart meet
in a table with probability 2e-4, about 1e8 comparisons for 112,000 images. The positions
come from a fixed seed, so the pairs found are the same on every run.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from pneumo import images

GRID = 32  # the thumbnail is GRID + 1 columns by GRID rows: GRID * GRID bits
HASH_BITS = GRID * GRID
HASH_BYTES = HASH_BITS // 8
NEAR_BITS = 112  # fingerprints at most this many bits apart are one film (see the module docstring)
SAMPLE_BITS = 20  # bit positions per LSH table
TABLES = 64
SEED = 20260
# Above this many pixels an image is not fingerprinted (the transform refuses it later,
# with its reason, under its own max_pixels).
MAX_PIXELS = 50_000_000
# The held-out films' (a source's test and val) turned and cropped fingerprints: a copy turned
# by 1 to 5 degrees either way, or cropped by 1 to 5 % a side, lands near one of them (dHash
# keeps about 1 degree or 1 % of crop within NEAR_BITS; see the module docstring).
TURNS = (-4.0, -2.0, 2.0, 4.0)
CROPS = (0.02, 0.04)


class Prints(NamedTuple):
    """The fingerprints of one image: as it is, mirrored, and (when asked) turned and cropped."""

    plain: str
    mirrored: str
    turned: tuple[str, ...]  # one per TURNS angle, then one per CROPS fraction; () unless asked


def fingerprint(path: str | Path) -> str | None:
    """The dHash of the image at ``path`` (base64 of 1024 bits), or None if it cannot be decoded."""
    prints = fingerprints(path)
    return prints.plain if prints else None


def fingerprints(path: str | Path, turned: bool = False) -> Prints | None:
    """The image's dHash (base64 of 1024 bits), that of its mirror image, and with ``turned`` those
    of its TURNS rotations and CROPS crops; None if it cannot be decoded.

    The thumbnail is the picture as shown (EXIF orientation applied) at a fixed shape
    whatever its aspect ratio, so a copy resized without keeping its aspect keeps its hash;
    each bit says whether a thumbnail pixel is brighter than its left-hand neighbour.
    Errors are not raised: the transform stage decodes every image again and quarantines
    the bad ones with their reason.
    """
    try:
        # Any view: which films a run keeps is the manifest's screen (dicom.screen), not the fingerprint's.
        with open(path, "rb") as handle, images.open_checked(handle, MAX_PIXELS, accept_lateral=True) as image:
            # JPEG: decode at the smallest DCT scale that leaves at least 64 pixels a side.
            image.draft("L", (2 * GRID, 2 * GRID))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            gray = image.convert("L")
            thumb = _thumbnail(gray)
            variants = tuple(_dhash(_thumbnail(v)) for v in _turned(gray)) if turned else ()
    except Exception:  # any decoder failure: no fingerprint; the transform reports the image
        return None
    # The mirror image's thumbnail is this one's columns reversed (the box filter is symmetric).
    return Prints(_dhash(thumb), _dhash(thumb[:, ::-1]), variants)


def _thumbnail(gray: Image.Image) -> np.ndarray:
    return np.asarray(gray.resize((GRID + 1, GRID), Image.Resampling.BOX), dtype=np.int16)


def _dhash(thumb: np.ndarray) -> str:
    return base64.b64encode(np.packbits(thumb[:, 1:] > thumb[:, :-1]).tobytes()).decode()


def _turned(gray: Image.Image) -> list[Image.Image]:
    """The picture turned by each of TURNS (black corners, as an editor leaves them), then cropped by each of CROPS."""
    width, height = gray.size
    out = [gray.rotate(angle, Image.Resampling.BILINEAR) for angle in TURNS]
    for fraction in CROPS:
        dx, dy = fraction * width, fraction * height
        out.append(gray.resize((width, height), Image.Resampling.BILINEAR, box=(dx, dy, width - dx, height - dy)))
    return out


def _bits(fingerprints: list[str]) -> np.ndarray:
    """(n, HASH_BYTES) uint8 of base64 fingerprints."""
    raw = b"".join(base64.b64decode(f) for f in fingerprints)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(fingerprints), HASH_BYTES)


def distance(a: str, b: str) -> int:
    """Bits in which two fingerprints differ."""
    x = _bits([a, b])
    return int(np.unpackbits(x[0] ^ x[1]).sum())


def near_pairs(fingerprints: list[str | None], max_bits: int = NEAR_BITS) -> list[tuple[int, int, int]]:
    """Pairs (i, j, distance), i < j, whose fingerprints differ in at most ``max_bits`` bits.

    Candidates come from the LSH tables only; each is then checked on all bits. Images
    without a fingerprint pair with none.
    """
    index = np.array([i for i, f in enumerate(fingerprints) if f is not None], dtype=np.int64)
    if len(index) < 2:
        return []
    packed = _bits([fingerprints[i] for i in index])
    words = packed.view(np.uint64)  # (n, HASH_BITS / 64), for fast XOR + popcount
    rng = np.random.default_rng(SEED)
    found: dict[tuple[int, int], int] = {}
    for _ in range(TABLES):
        positions = np.sort(rng.choice(HASH_BITS, SAMPLE_BITS, replace=False))
        sampled = (packed[:, positions // 8] >> (7 - positions % 8).astype(np.uint8)) & 1
        keys = (sampled.astype(np.uint64) << np.arange(SAMPLE_BITS, dtype=np.uint64)).sum(axis=1)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        # Members of a bucket are contiguous once sorted: pair every position with the one
        # `step` places on while both hold the same key; no such pair means no bigger bucket.
        for step in range(1, len(order)):
            same = keys[step:] == keys[:-step]
            if not same.any():
                break
            _keep_close(order[:-step][same], order[step:][same], words, max_bits, found)
    return sorted((int(index[a]), int(index[b]), d) for (a, b), d in found.items())


def _keep_close(a: np.ndarray, b: np.ndarray, words: np.ndarray, max_bits: int, found: dict) -> None:
    """Add the candidate pairs (a[k], b[k]) within ``max_bits`` to ``found``, a block at a time."""
    block = 1 << 16
    for start in range(0, len(a), block):
        x, y = a[start:start + block], b[start:start + block]
        dist = np.bitwise_count(words[x] ^ words[y]).sum(axis=1)
        for k in np.flatnonzero(dist <= max_bits):
            i, j = int(x[k]), int(y[k])
            found[(min(i, j), max(i, j))] = int(dist[k])


class Groups:
    """Union-find over n items: items joined by any tie end in one group."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> bool:
        """Put i and j in one group; True if they were in two."""
        a, b = self.find(i), self.find(j)
        if a == b:
            return False
        self.parent[max(a, b)] = min(a, b)
        return True
