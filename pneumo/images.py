"""Reading image files: which formats are opened, which way up a picture is, how it becomes gray.

Every image the pipeline opens goes through ``open_image``, which passes an explicit
allow-list to ``Image.open(..., formats=...)``: Pillow knows dozens of formats, but an X-ray
here is a JPEG, a PNG or a BMP, so Pillow tries only those plugins, no other parser ever
sees the bytes, and the EPS plugin, which hands files to Ghostscript, never runs.
MPO (JPEG's multi-picture variant, written by some cameras and phones) is allowed too: it
is a JPEG whose first picture is read like any other. Pillow's JPEG plugin opens it (and
then reports the format as MPO); there is no separate MPO opener to list.

On top of that: ``open_checked`` refuses empty, unknown, oversized and broken files with an
``ImageRejected`` whose message is the quarantine's reason, ``decode_errors`` does the same
for problems found while decoding, ``to_gray`` turns any accepted mode into one float32 gray
layer, the orientation is read from the header alone, and JPEGs can be decoded at a reduced
scale (``Image.draft``) or only down to a given row (``open_top_rows``).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumo import dicom
from pneumo.config import TransformConfig

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP")  # Pillow format names, as passed to Image.open
ALLOWED_SHOWN = ", ".join(ALLOWED_FORMATS)
JPEG_FORMATS = {"JPEG", "MPO"}  # what Pillow reports for files its JPEG plugin opened

EXIF_ORIENTATION = 0x0112
# EXIF orientations 5 to 8 turn the picture by 90 degrees: the displayed width is the stored height.
SWAPS_AXES = {5, 6, 7, 8}
# Chunks of a PNG walked to find an eXIf chunk after the pixel data (Pillow writes 64 KB IDATs).
PNG_MAX_CHUNKS = 4096

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

# DICOM films above this many pixels are box-averaged before resampling (decode_reduced).
DICOM_REDUCE_ABOVE = 1_000_000

# Largest image file read from disk for prediction: the server's per-upload bound. The
# shared X-rays are 5 KB to 3 MB; a bigger file is refused before a byte of it is read.
MAX_FILE_BYTES = 20_000_000


class FormatNotAllowed(ValueError):
    """A readable file in a format outside ALLOWED_FORMATS; the message names the format."""


class ImageRejected(ValueError):
    """The file cannot be used as an image; the message is the reason, for the quarantine."""


# --- Opening ------------------------------------------------------------------------------


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


@contextlib.contextmanager
def binary_source(source: str | Path | bytes | BinaryIO) -> Iterator[BinaryIO]:
    """A seekable binary handle on a path, bytes or a file object; only a file opened here is closed here."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            yield handle
    elif source.seekable():
        source.seek(0)  # read from the start, whatever the caller read before
        yield source
    else:  # a pipe or socket: the decoder seeks, so read it whole
        yield io.BytesIO(source.read())


def read_file(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ImageRejected for anything else.

    Opened without blocking, so a FIFO (or a device) named ``b.jpeg`` is refused instead of
    waiting for a writer; the size is checked on the open file before reading, and the read
    itself stops one byte past the bound, so a file that grows meanwhile is refused too.
    OSError (missing file, no permission) is left to the caller.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(21, "Is a directory", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not a regular file (a pipe, device or socket)")
        if info.st_size > max_bytes:
            raise ImageRejected(f"too large: {info.st_size} bytes exceeds the limit of {max_bytes} bytes")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageRejected(f"too large: more than {max_bytes} bytes (the file grew while read)")
    return data


def header_size(source: str | Path | BinaryIO) -> tuple[int, int]:
    """(width, height) as displayed, from the header alone: DICOM's Rows/Columns, else Pillow's header
    parse with the EXIF rotation. Errors are open_image's, or DicomRejected for a DICOM file."""
    if dicom.is_dicom(_head(source)):
        with binary_source(source) as handle:
            return dicom.header_size(handle)
    with open_image(source) as image:
        return oriented_size(image)


def decode_cost(data: bytes) -> int:
    """Bytes one decode of this image may take at its peak (pixels, their gray copy, the features'
    working arrays), from the header alone; 0 when the header does not parse (the decode refuses it).

    Measured on a 7000 x 7000 RGB PNG: 0.94 GB, 19 bytes per pixel; gray images about half.
    """
    try:
        if dicom.is_dicom(data[:_SNIFF_BYTES]):  # colour DICOM is refused before its pixels are decoded
            width, height = dicom.header_size(io.BytesIO(data))
            return width * height * 12  # pixels, a decoder's copy (compressed), 8-bit and float32 gray, slack
        with open_image(io.BytesIO(data)) as image:
            width, height = image.size
            colour = len(image.getbands()) >= 3 or image.mode == "P"
    except Exception:  # not an image, or a broken header: refused by the decode itself, at no cost
        return 0
    return width * height * (20 if colour else 10)


def open_checked(handle: BinaryIO, max_pixels: int, *, accept_lateral: bool = False) -> Image.Image:
    """Open from the header only, refusing empty, unknown and oversized images before any pixel is decoded.

    Raises ImageRejected with the reason. ``handle`` is read from its start.
    A DICOM file is the exception: its header is checked (pneumo.dicom.check, the same pixel
    bound) and its pixels decoded here, to the 8-bit gray picture a viewer shows; a lateral
    DICOM film is refused unless ``accept_lateral``.
    """
    handle.seek(0)
    head = handle.read(_SNIFF_BYTES)
    if not head:
        raise ImageRejected("empty file (0 bytes)")
    if dicom.is_dicom(head):
        return open_dicom(handle, max_pixels, accept_lateral=accept_lateral)
    handle.seek(0)
    try:
        with warnings.catch_warnings():
            # PIL's own bomb guard: its warning (above Image.MAX_IMAGE_PIXELS, ~89 MP by
            # default) counts as a refusal too, so the limit is the lower of the two.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = open_image(handle)  # JPEG, PNG or BMP only: no other parser sees the bytes
    except FormatNotAllowed as error:
        raise ImageRejected(str(error)) from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image (cannot identify image file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(f"too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        if isinstance(error, EOFError) or "truncated" in str(error).lower():
            raise ImageRejected("truncated header") from None
        raise ImageRejected(f"unreadable header ({type(error).__name__}: {error})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageRejected(f"too large: {width}x{height} pixels exceeds max_pixels={max_pixels}")
    if width < 1 or height < 1:
        image.close()
        raise ImageRejected(f"empty image: {width}x{height} pixels")
    return image


def open_dicom(handle: BinaryIO, max_pixels: int, *, accept_lateral: bool = False) -> Image.Image:
    """The DICOM film in ``handle`` as an 8-bit gray PIL image (format "DICOM"); ImageRejected with the reason."""
    size = handle.seek(0, io.SEEK_END)
    if size > dicom.max_file_bytes(max_pixels):  # pydicom reads elements whole: bound the file before parsing it
        raise ImageRejected(f"too large: a DICOM file of {size} bytes exceeds {dicom.max_file_bytes(max_pixels)} "
                            f"bytes (2 bytes per pixel of max_pixels={max_pixels}, plus the header)")
    try:
        ds = dicom.read(handle)
        dicom.check(ds, max_pixels, accept_lateral=accept_lateral)
        if (frame := dicom.plain_jpeg(ds)) is not None:
            return open_checked(io.BytesIO(frame), max_pixels)  # decoded as the JPEG it is
        image = Image.fromarray(dicom.gray8(ds))
    except dicom.DicomRejected as error:
        raise ImageRejected(str(error)) from None
    image.format = "DICOM"  # for reasons that name the format; never a JPEG to the reduced decodes
    return image


# --- Orientation --------------------------------------------------------------------------
#
# One reading of the EXIF orientation, from the header alone. ``Image.getexif()`` is avoided
# on purpose: for a PNG it decodes the whole image to look for an eXIf chunk after the pixel
# data, which would turn the size stage's header pass (and prediction's size warnings) into
# full decodes. The rotation the pixels finally get is ImageOps.exif_transpose's, after load.


def header_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 to 8) stored in the header, 1 when there is none.

    Reads the EXIF bytes the header parser already kept in ``image.info`` (JPEG APP1, a
    PNG eXIf chunk placed before the pixels), else a PNG's eXIf chunk after the pixels,
    found from the chunk headers alone (``_trailing_png_exif``).
    """
    raw = image.info.get("exif") or _trailing_png_exif(image)
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # a broken EXIF block is not a broken image; the transform decides
        return 1
    orientation = exif.get(EXIF_ORIENTATION, 1)
    return orientation if isinstance(orientation, int) else 1


def _trailing_png_exif(image: Image.Image) -> bytes | None:
    """A PNG's eXIf chunk that follows the pixel data, which only ``load()`` would read.

    Walks the chunk headers, seeking over each chunk's data (a 20 MB PNG holds a few hundred
    chunks); gives up after PNG_MAX_CHUNKS. The file position is left where it was.
    """
    handle = getattr(image, "fp", None)
    if image.format != "PNG" or handle is None:
        return None
    at = handle.tell()
    try:
        handle.seek(8)  # past the signature
        for _ in range(PNG_MAX_CHUNKS):
            head = handle.read(8)
            if len(head) < 8 or head[4:] == b"IEND":
                return None
            length = int.from_bytes(head[:4], "big")
            if head[4:] == b"eXIf":
                return handle.read(min(length, 1 << 16))
            handle.seek(length + 4, io.SEEK_CUR)  # the data and its CRC
        return None
    except (OSError, ValueError):
        return None
    finally:
        handle.seek(at)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as displayed, i.e. after its EXIF rotation."""
    width, height = image.size
    if header_orientation(image) in SWAPS_AXES:
        return height, width
    return width, height


# --- Decoding -----------------------------------------------------------------------------


@contextlib.contextmanager
def decode_errors(image: Image.Image) -> Iterator[None]:
    """Decoding problems of ``image`` as ImageRejected, with the reason for the quarantine."""
    try:
        yield
    except ImageRejected:
        raise
    except Image.DecompressionBombError as error:
        raise ImageRejected(f"too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageRejected(_decode_failure(image, error)) from None


def _decode_failure(image: Image.Image, error: Exception) -> str:
    kind = image.format or "image"
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return f"truncated {kind}"
    return f"corrupt {kind} ({type(error).__name__}: {error})"


def to_gray(image: Image.Image) -> np.ndarray:
    """One float32 gray layer in [0, 1]: the mean of the colour channels, alpha dropped."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit scans; PIL opens 16-bit PNGs as I;16 or I. Larger values cannot be 16-bit.
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if mode == "F":
        raise ImageRejected("unsupported mode F (floating-point pixels have no known range)")
    if mode in ("L", "LA", "La", "1"):
        layer = image.getchannel(0) if mode != "1" else image.convert("L")
        return np.asarray(layer, dtype=np.float32) / 255.0
    if mode not in ("RGB", "RGBA", "RGBa", "RGBX"):
        # P, PA, CMYK, YCbCr, LAB, HSV...: PIL knows how to turn each into RGB (or RGBA).
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    # The channel sum in 16-bit integers, then one float32 layer: the same values as a float32
    # mean of the three channels (the sum is exact either way), at a third of the memory
    # (a 7000 x 7000 RGB PNG: 0.2 GB of float32 here instead of 0.6 GB, then 0.2 more for the mean).
    rgb = np.asarray(image)[..., :3]
    total = rgb.sum(axis=2, dtype=np.uint16)
    del rgb
    return total.astype(np.float32) / np.float32(3) / np.float32(255.0)


def decode_gray(source: str | Path | bytes | BinaryIO, config: TransformConfig) -> np.ndarray:
    """The picture at the resample method's reduced scale (``decode_reduced``), refusing bad files.

    ``source`` is a path, the file's bytes, or a binary file object (read from its start).
    Raises ImageRejected with the reason, as ``transform.featurize`` does.
    """
    with binary_source(source) as handle:
        with open_checked(handle, config.max_pixels, accept_lateral=config.accept_lateral) as image:
            with decode_errors(image):
                return decode_reduced(image, config)


def decode_reduced(image: Image.Image, config: TransformConfig) -> np.ndarray:
    """float32 gray in [0, 1], upright, decoded at the smallest JPEG scale (libjpeg's 1/2 to 1/8,
    via Image.draft) that still leaves the crop ``cell_pixels`` samples per cell side."""
    rows, cols = config.grid
    kept = 1.0 - 2.0 * config.crop_fraction
    need_w = math.ceil(cols * config.cell_pixels / kept)
    need_h = math.ceil(rows * config.cell_pixels / kept)
    if image.format in JPEG_FORMATS:
        if oriented_size(image) != image.size:  # a 90-degree EXIF rotation swaps the stored axes
            need_w, need_h = need_h, need_w
        image.draft("L", (need_w, need_h))
    elif image.format == "DICOM" and image.width * image.height > DICOM_REDUCE_ABOVE:
        # Decoded whole (an uncompressed 2,048 x 2,048 film): box-averaged to the scale draft would
        # pick for a JPEG, as cheap to resample as a JPEG's reduced decode. Smaller films cost
        # little at full scale and keep their exact pixels (the same features as a PNG of them).
        factor = max((f for f in (8, 4, 2) if image.width // f >= need_w and image.height // f >= need_h), default=1)
        if factor > 1:
            return to_gray(image.reduce(factor))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return to_gray(image)


def open_top_rows(handle: BinaryIO, rows: int) -> Image.Image | None:
    """The baseline JPEG in ``handle`` opened as if it had ``rows`` rows, or None.

    Only the height field of the frame header changes: libjpeg stops after ``rows`` rows
    and skips the rest of the entropy-coded data without decoding it. None for anything
    else (progressive, lossless, a header that does not parse), and for a file that does
    not end with the end marker: a truncated file must still fail to decode, as it does
    when decoded whole. The caller has opened the file once already (``open_checked``);
    only the height differs.
    """
    handle.seek(-2, io.SEEK_END)
    if handle.read(2) != b"\xff\xd9":
        return None
    at = 2
    while True:
        handle.seek(at)
        head = handle.read(9)
        if len(head) < 9 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker in (0xC0, 0xC1):  # SOF0/SOF1: baseline and extended sequential Huffman
            if int.from_bytes(head[5:7], "big") <= rows:
                return None
            handle.seek(0)
            return Image.open(_Patched(handle, at + 5, rows.to_bytes(2, "big")))
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # another frame type, or scan data before any frame header
        else:
            at += 2 + int.from_bytes(head[2:4], "big")


class _Patched:
    """A file read through with the bytes at ``at`` replaced by ``patch``.

    Cheaper than a patched copy of the file: a fresh ~200 KB buffer per image costs more
    in page faults than the rest of the overhead together.
    """

    def __init__(self, handle, at: int, patch: bytes):
        self._handle, self._at, self._patch = handle, at, patch
        self._position = handle.tell()

    def read(self, size: int = -1) -> bytes:
        start = self._position
        data = self._handle.read(size)
        self._position += len(data)
        if start < self._at + len(self._patch) and self._position > self._at:
            low, high = max(self._at - start, 0), min(self._at + len(self._patch) - start, len(data))
            data = data[:low] + self._patch[start + low - self._at : start + high - self._at] + data[high:]
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = self._handle.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position
