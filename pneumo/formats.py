"""Which image formats are read, and the name of the format of a file that is refused.

Pillow knows dozens of formats; an X-ray here is a JPEG, a PNG or a BMP. Every image the
pipeline opens goes through ``open_image``, which passes an explicit allow-list to
``Image.open(..., formats=...)``: Pillow then tries only those plugins, so no other parser
ever sees the bytes, and the EPS plugin, which hands files to Ghostscript, never runs.

MPO (JPEG's multi-picture variant, written by some cameras and phones) is allowed too:
it is a JPEG whose first picture is read like any other. Pillow's JPEG plugin opens it
(and then reports the format as MPO); there is no separate MPO opener to list.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP")  # Pillow format names, as passed to Image.open
ALLOWED_SHOWN = ", ".join(ALLOWED_FORMATS)

# Leading bytes of formats a refused file may really be: enough to name it in the reason,
# without handing the file to any parser. Checked in order.
_SIGNATURES: tuple[tuple[str, re.Pattern[bytes]], ...] = tuple(
    (name, re.compile(pattern, re.DOTALL))
    for name, pattern in (
        ("JPEG", rb"\xff\xd8\xff"),
        ("PNG", rb"\x89PNG\r\n\x1a\n"),
        ("BMP", rb"BM"),
        ("TIFF", rb"II\*\x00|MM\x00\*|II\+\x00|MM\x00\+"),
        ("GIF", rb"GIF8[79]a"),
        ("WEBP", rb"RIFF....WEBP"),
        ("JPEG 2000", rb"\x00\x00\x00\x0cjP  \r\n\x87\n|\xff\x4f\xff\x51"),
        ("ICO", rb"\x00\x00\x01\x00"),
        ("CUR", rb"\x00\x00\x02\x00"),
        ("EPS", rb"%!PS|\xc5\xd0\xd3\xc6"),
        ("PDF", rb"%PDF-"),
        ("PSD", rb"8BPS"),
        ("DDS", rb"DDS "),
        ("QOI", rb"qoif"),
        ("PPM", rb"P[1-7]\s"),
        ("AVIF", rb"....ftypavi[fs]"),
        ("HEIF", rb"....ftyp(?:heic|heix|hevc|mif1|msf1)"),
        ("DICOM", rb".{128}DICM"),
    )
)
_SNIFF_BYTES = 132


class FormatNotAllowed(ValueError):
    """A readable file in a format outside ALLOWED_FORMATS; the message names the format."""


def sniff_format(head: bytes) -> str | None:
    """The format the leading bytes of a file announce, or None if none of the known ones."""
    for name, signature in _SIGNATURES:
        if signature.match(head):
            return name
    return None


def _head(source: str | Path | BinaryIO) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            return handle.read(_SNIFF_BYTES)
    at = source.tell()
    try:
        source.seek(0)  # Image.open reads a file object from its start too
        return source.read(_SNIFF_BYTES)
    finally:
        source.seek(at)


def open_image(source: str | Path | BinaryIO) -> Image.Image:
    """``Image.open`` with the allow-list: reads the header only, like Image.open.

    Raises FormatNotAllowed when the bytes announce another format (TIFF, GIF, WebP,
    EPS, ...), and Pillow's UnidentifiedImageError when they are no known image at all.
    """
    try:
        return Image.open(source, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        found = sniff_format(_head(source))
        if found is not None and found not in ALLOWED_FORMATS:
            raise FormatNotAllowed(f"format {found} not allowed (allowed: {ALLOWED_SHOWN})") from None
        raise
