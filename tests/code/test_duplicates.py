"""Perceptual fingerprints: a re-saved copy stays close, another film does not, and the pair search misses nothing."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pneumo import duplicates


def film(seed: int) -> Image.Image:
    """A smooth random gray picture (structure at several scales, like a radiograph)."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8))
    return noise.filter(ImageFilter.GaussianBlur(6)).point(lambda v: max(0, min(255, (v - 128) * 6 + 128)))


@pytest.mark.parametrize("how", ["jpeg q50", "png", "half size", "aspect changed"])
def test_a_resaved_copy_is_near_and_another_film_is_far(tmp_path, how):
    original = tmp_path / "a.jpeg"
    film(1).save(original, quality=90)
    image = Image.open(original)
    copy = tmp_path / ("b.png" if how == "png" else "b.jpeg")
    if how == "half size":
        image = image.resize((130, 150))
    elif how == "aspect changed":
        image = image.resize((400, 200))
    image.save(copy, **({} if how == "png" else {"quality": 50 if how == "jpeg q50" else 90}))
    other = tmp_path / "c.jpeg"
    film(2).save(other, quality=90)
    a, b, c = (duplicates.fingerprint(p) for p in (original, copy, other))
    assert duplicates.distance(a, b) <= duplicates.NEAR_BITS < duplicates.distance(a, c)


def test_what_cannot_be_decoded_has_no_fingerprint(tmp_path):
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"<html>not an image</html>")
    assert duplicates.fingerprint(bad) is None


def test_the_pair_search_finds_every_close_pair_that_all_pairs_would(tmp_path):
    rng = np.random.default_rng(0)
    films = rng.integers(0, 2, (600, duplicates.HASH_BITS), dtype=np.uint8)
    copies = films[:200].copy()
    for row in copies:  # copies 1..112 bits from their film
        row[rng.choice(row.size, rng.integers(1, duplicates.NEAR_BITS + 1), replace=False)] ^= 1
    rows = np.concatenate([films, copies])
    fingerprints = [base64.b64encode(np.packbits(row).tobytes()).decode() for row in rows] + [None]
    bits = rows.astype(np.int32)
    all_pairs = bits @ (1 - bits).T + (1 - bits) @ bits.T  # Hamming distances, every pair
    truth = {(i, j) for i, j in zip(*np.nonzero(np.triu(all_pairs <= duplicates.NEAR_BITS, 1)))}
    found = duplicates.near_pairs(fingerprints)
    assert {(i, j) for i, j, _ in found} == truth and len(truth) == 200
    assert all(d == all_pairs[i, j] for i, j, d in found)


def test_groups_join_through_any_tie():
    groups = duplicates.Groups(5)
    assert groups.join(0, 3) and groups.join(3, 4) and not groups.join(0, 4)
    assert groups.find(4) == groups.find(0) != groups.find(1)


def test_the_mirror_print_is_the_mirror_image_s_own_and_held_out_films_get_turned_prints(tmp_path):
    original, mirrored = tmp_path / "a.png", tmp_path / "b.png"
    film(3).save(original)
    film(3).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    a, b = duplicates.fingerprints(original, turned=True), duplicates.fingerprints(mirrored)
    assert duplicates.distance(a.mirrored, b.plain) == 0
    assert duplicates.distance(a.plain, b.plain) > duplicates.NEAR_BITS
    assert len(a.turned) == len(duplicates.TURNS) + len(duplicates.CROPS) and b.turned == ()
    turned = tmp_path / "c.png"
    film(3).rotate(3, Image.Resampling.BILINEAR).save(turned)
    c = duplicates.fingerprint(turned)
    assert duplicates.distance(a.plain, c) > duplicates.NEAR_BITS >= min(duplicates.distance(t, c) for t in a.turned)
