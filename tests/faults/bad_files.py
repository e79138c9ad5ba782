"""Odd and broken inputs mixed into a copy of the real dataset.

``add_odd_but_valid`` writes files the pipeline must process (other formats, modes, EXIF
rotation, non-ASCII names); ``add_bad`` writes files it must quarantine, returning the
relpath of each with a word its quarantine reason must contain.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def link_or_copy_tree(source: Path, target: Path) -> None:
    """Hard-link every file (copying across file systems): a 5,216-image copy in a blink."""
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in {".jpeg", ".jpg", ".png"}:
            continue
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, out)
        except OSError:
            out.write_bytes(path.read_bytes())


def _real_gray(shared: Path, index: int) -> Image.Image:
    return Image.open(sorted((shared / "train" / "NORMAL").iterdir())[index]).convert("L")


def add_odd_but_valid(shared: Path, root: Path) -> dict[str, Image.Image]:
    """Valid images in unusual shapes; returns relpath -> the upright gray image it holds."""
    normal, pneumonia = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    out: dict[str, Image.Image] = {}

    def save(folder: Path, name: str, image: Image.Image, upright: Image.Image, **kwargs) -> None:
        image.save(folder / name, **kwargs)
        out[(folder / name).relative_to(root).as_posix()] = upright

    gray = _real_gray(shared, 0)
    save(normal, "IM-9001-0001.png", gray, gray)
    save(normal, "IM-9002-0001.bmp", gray, gray)
    sixteen = Image.fromarray((np.asarray(gray, np.uint16) * 257).astype(np.uint16))
    save(normal, "IM-9003-0001.png", sixteen, gray)
    save(pneumonia, "person9004_bacteria_1.png", gray.convert("RGBA"), gray)
    save(pneumonia, "person9005_virus_1.jpeg", gray.convert("CMYK"), gray, quality=95)
    save(normal, "IM-9006-0001.png", gray.convert("P"), gray)
    # Stored sideways, with EXIF orientation 6 saying "rotate 90° clockwise to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    save(normal, "IM-9007-0001.jpeg", gray.transpose(Image.Transpose.ROTATE_90), gray, exif=exif, quality=95)
    save(pneumonia, "person9008_bactérie_ñ_1.jpeg", gray, gray, quality=90)
    return out


def add_junk(root: Path) -> dict[str, str]:
    """OS metadata the manifest skips and counts: relpath -> a word of the reason."""
    junk = {
        "train/NORMAL/.DS_Store": ".DS_Store",
        "train/PNEUMONIA/._person1_virus_1.jpeg": "AppleDouble",
        "train/Thumbs.db": "Thumbs.db",
        "train/NORMAL/__MACOSX/._IM-0001-0001.jpeg": "__MACOSX",
    }
    for relpath in junk:
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(b"\x00\x05\x16\x07 metadata")
    return junk


def add_bad(shared: Path, root: Path, outside: Path) -> dict[str, str]:
    """Files that must be quarantined: relpath -> a word their reason must contain."""
    normal, pneumonia = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    real = (sorted((shared / "train" / "NORMAL").iterdir())[1]).read_bytes()
    bad: dict[str, str] = {}

    def put(path: Path, data: bytes, word: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        bad[path.relative_to(root).as_posix()] = word

    put(normal / "IM-9101-0001.jpeg", real[:600] + bytes(range(256)) * 8, "")  # corrupt scan
    put(normal / "IM-9102-0001.jpeg", real[: len(real) // 2], "truncated")
    put(pneumonia / "person9103_virus_1.jpeg", b"", "empty")
    put(pneumonia / "person9104_virus_1.jpeg", b"<html>not a picture</html>", "not an image")
    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG")  # 81 MP of zeros: tiny file, huge decode
    put(normal / "IM-9105-0001.png", buffer.getvalue(), "too large")
    put(root / "train" / "COVID" / "covid-1.jpeg", real, "unknown class")
    put(normal / "notes.txt", b"radiologist notes", "not an image")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "elsewhere.jpeg").write_bytes(real)
    (normal / "IM-9106-0001.jpeg").symlink_to(outside / "elsewhere.jpeg")
    bad["train/NORMAL/IM-9106-0001.jpeg"] = "outside"
    # Formats outside the allow-list, named like JPEGs; EPS would go to Ghostscript.
    gray = _real_gray(shared, 2)
    for number, kind in enumerate(("TIFF", "GIF", "WEBP", "JPEG2000", "ICO"), start=9107):
        buffer = io.BytesIO()
        gray.resize((128, 128)).save(buffer, format=kind)
        put(normal / f"IM-{number}-0001.jpeg", buffer.getvalue(), "not allowed")
    put(pneumonia / "person9112_virus_1.jpeg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n", "format eps not allowed")
    # A hidden but valid image: quarantined, so that the user sees it and decides.
    put(pneumonia / ".person9999_bacteria_1.jpeg", real, "hidden file")
    # A file name that is not UTF-8, shown with the byte escaped.
    try:
        with open(os.path.join(os.fsencode(normal), b"IM-8010-0001-caf\xe9.jpeg"), "wb") as handle:
            handle.write(real)
        bad["train/NORMAL/IM-8010-0001-caf\\xe9.jpeg"] = "not valid utf-8"
    except OSError:  # a file system that refuses such names: nothing to test there
        pass
    # Empty splits are fine: no images, nothing to quarantine.
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "val" / name).mkdir(parents=True, exist_ok=True)
    return bad
