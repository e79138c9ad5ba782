"""Reading DICOM films: the header's facts, and the pixels as a radiologist's viewer shows them.

Every image the pipeline opens goes through ``images.open_checked`` (and its header-only
readers); a file whose bytes announce DICOM (``DICM`` at byte 128) is handed to this module
instead of Pillow. The result is the same thing a JPEG gives: an 8-bit gray picture, so every
recipe, the manifest's fingerprints, prediction, serving and the batch flow read DICOM alike.

The pixels (PS3.3 C.11): the Modality LUT (RescaleSlope/Intercept or a Modality LUT
Sequence), then the VOI LUT Sequence or the WindowCenter/Width when the header has one,
else the whole range the stored values can take (BitsStored, signed or not, through the
Modality LUT: the range, not the film's own min/max, so one burnt-in marker cannot rescale a
film and an 8-bit film is read exactly as its JPEG twin is), ``MONOCHROME1`` inverted
(bone black in the file, shown white), then scaled to 0..255.

Refused with a reason (the quarantine's): objects without pixels (structured reports,
presentation states), multi-frame objects, colour films (RGB/YBR/palette), a Modality other
than projection radiography, a non-chest ``BodyPartExamined``, lateral ``ViewPosition``
(unless accepted: ``transform.accept_lateral``), BitsStored above 16, more pixels than the
bound, and transfer syntaxes without an installed decoder (named in the reason). The first
six are read from the header alone (``screen``): the manifest stage quarantines them as out
of scope (well-formed objects that are not frontal chest films, not bad data), and every
decode checks them again (prediction and serving read files no manifest listed).

No reason or error raised here carries a header value that could identify a patient: only
the coded facts above (body part, view, photometric interpretation, transfer syntax).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

MAGIC_OFFSET, MAGIC = 128, b"DICM"
EXTENSIONS = {".dcm", ".dicom"}
# BodyPartExamined values (a CS, upper case) that mean a chest film; any other present value is refused.
CHEST_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "PORT CHEST"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}
# Modality values (PS3.3 C.7.3.1.1.1) of projection radiographs: CR and DX (computed and digital
# radiography), RG (radiographic imaging, film digitizers), DR (retired, still written by some
# digital systems) and OT (other: secondary captures of films). A missing Modality is accepted.
# Anything else (CT, MR, US, NM, PT, MG, XA, RF, ...) is another kind of picture of the body.
RADIOGRAPHY_MODALITIES = {"CR", "DX", "DR", "RG", "OT"}
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class DicomRejected(ValueError):
    """The DICOM file cannot be used as a chest film; the message is the quarantine's reason."""


HEADER_SLACK = 16_000_000  # header bytes allowed beside the pixels (overlays, private tags, icons)


def max_file_bytes(max_pixels: int) -> int:
    """The largest DICOM file read: 16-bit pixels within the pixel bound, plus the header."""
    return 2 * max_pixels + HEADER_SLACK


def is_dicom(head: bytes) -> bool:
    """Whether the leading bytes are a DICOM Part 10 file (the preamble, then ``DICM``)."""
    return head[MAGIC_OFFSET : MAGIC_OFFSET + 4] == MAGIC


def read(handle: BinaryIO, *, pixels: bool = True):
    """The pydicom Dataset in ``handle`` (from its start); without the pixel data when ``pixels`` is False."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    handle.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values; the checks below decide
            return pydicom.dcmread(handle, stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as error:
        raise DicomRejected(f"unreadable DICOM header ({type(error).__name__})") from None


# What a film's pixels need to be screened, decoded and shown as this module shows them. A shard
# keeps val and test films for the shift suite's views (pneumo.shard_files): of a DICOM film, a copy
# with these elements only, so no patient, study, institution, date or private tag is written.
PIXEL_KEYWORDS = (
    "SOPClassUID", "Modality", "BodyPartExamined", "ViewPosition", "SamplesPerPixel", "PhotometricInterpretation",
    "PlanarConfiguration", "NumberOfFrames", "Rows", "Columns", "PixelSpacing", "ImagerPixelSpacing",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept", "RescaleSlope",
    "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "PixelData",
)


def pixels_only(data: bytes) -> bytes:
    """The DICOM file ``data`` with only its PIXEL_KEYWORDS (and the transfer syntax): the same picture, no patient data."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset

    source = read(io.BytesIO(data))
    copy = pydicom.Dataset()
    for keyword in PIXEL_KEYWORDS:
        if keyword in source:
            copy[keyword] = source[keyword]
    copy.file_meta = FileMetaDataset()
    copy.file_meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
    copy.file_meta.MediaStorageSOPClassUID = source.get("SOPClassUID", pydicom.uid.SecondaryCaptureImageStorage)
    copy.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[hashlib.sha256(data).hexdigest()])
    buffer = io.BytesIO()
    copy.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _code(value) -> str:
    """A coded header value as shown in a reason: letters, digits, spaces and _-^ only, at most 24 characters."""
    return re.sub(r"[^A-Za-z0-9 _^-]", "?", str(value).strip())[:24]


def screen(ds, *, accept_lateral: bool = False) -> None:
    """DicomRejected when the header says the object is not a frontal chest film this pipeline reads.

    Header only (works on a Dataset read with ``stop_before_pixels``): the manifest stage's
    screen, and the first part of every decode's ``check``.
    """
    if "PixelData" not in ds and "Rows" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", "unknown")
        raise DicomRejected(f"DICOM object without pixel data ({_code(sop)}): not an image")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomRejected(f"multi-frame DICOM ({frames} frames): one film per file expected")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in MONOCHROME:
        raise DicomRejected(f"colour DICOM ({_code(photometric) or 'no PhotometricInterpretation'}): "
                            "chest films are MONOCHROME1 or MONOCHROME2")
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality and modality not in RADIOGRAPHY_MODALITIES:
        raise DicomRejected(f"not a projection radiograph (Modality {_code(modality)}): "
                            f"{', '.join(sorted(RADIOGRAPHY_MODALITIES))} films only")
    part = str(ds.get("BodyPartExamined") or "").strip().upper()
    if part and part not in CHEST_PARTS:
        raise DicomRejected(f"not a chest film (BodyPartExamined {_code(part)})")
    view = str(ds.get("ViewPosition") or "").strip().upper()
    if view in LATERAL_VIEWS and not accept_lateral:
        raise DicomRejected(f"lateral view (ViewPosition {view}): frontal films only (transform.accept_lateral keeps them)")


def check(ds, max_pixels: int, *, accept_lateral: bool = False) -> tuple[int, int]:
    """(width, height) of a chest film this pipeline can read, from the header; DicomRejected otherwise."""
    screen(ds, accept_lateral=accept_lateral)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    bits = int(ds.get("BitsStored") or 0)
    if not 1 <= bits <= 16:
        raise DicomRejected(f"BitsStored {bits} not supported (1 to 16)")
    if rows < 1 or cols < 1:
        raise DicomRejected(f"empty image: {cols}x{rows} pixels")
    if rows * cols > max_pixels:
        raise DicomRejected(f"too large: {cols}x{rows} pixels exceeds max_pixels={max_pixels}")
    return cols, rows


def header_size(handle: BinaryIO) -> tuple[int, int]:
    """(width, height) from the header's Columns/Rows, without reading the pixel data."""
    ds = read(handle, pixels=False)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows < 1 or cols < 1:
        raise DicomRejected("DICOM object without pixel data (no Rows/Columns): not an image")
    return cols, rows


def view_position(ds) -> str | None:
    """The film's ViewPosition (PA, AP, ...), upper case, or None when the header has none."""
    view = _code(ds.get("ViewPosition") or "").upper()
    return view or None


def _decoded(ds) -> np.ndarray:
    from pydicom.pixels import get_decoder, pixel_array

    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    name = f"{getattr(syntax, 'name', syntax)} ({syntax})"
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError, TypeError):
        raise DicomRejected(f"no pixel decoder for transfer syntax {name}") from None
    if not decoder.is_available:
        raise DicomRejected(f"no pixel handler installed for transfer syntax {name}: "
                            "install pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg")
    # Pillow's libjpeg-turbo first where it decodes the syntax: the same decoder as a JPEG film's,
    # so a film and its JPEG Baseline DICOM give the same pixels (pylibjpeg's libjpeg rounds its
    # inverse DCT differently, by one gray level here and there).
    plugin = "pillow" if "pillow" in decoder.available_plugins else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, decoding_plugin=plugin)
    except Exception as error:  # any decoder's failure is this file's fault: a reason, not a crash
        raise DicomRejected(f"corrupt DICOM pixel data ({name}: {type(error).__name__}: {str(error)[:160]})") from None


def plain_jpeg(ds) -> bytes | None:
    """The encapsulated JPEG of a film that is shown exactly as its JPEG decodes, else None.

    JPEG Baseline, 8 bits, MONOCHROME2, no LUT, window or rescale: such a frame is handed
    to Pillow as the JPEG it is, so it takes the JPEG films' reduced-scale decodes (and gives
    their features exactly). RSNA's films are all of this kind.
    """
    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEGBaseline8Bit

    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    plain = (
        syntax == JPEGBaseline8Bit
        and str(ds.PhotometricInterpretation).strip() == "MONOCHROME2"
        and int(ds.BitsStored) == 8
        and not any(name in ds for name in ("ModalityLUTSequence", "VOILUTSequence", "WindowCenter"))
        and float(ds.get("RescaleSlope") or 1) == 1
        and float(ds.get("RescaleIntercept") or 0) == 0
    )
    if not plain:
        return None
    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # broken encapsulation: the full decode names the problem
        return None


def _lut_range(descriptor) -> tuple[float, float]:
    bits = int(descriptor[2])
    return 0.0, float(2**bits - 1)


def _display_range(ds, windowed: str) -> tuple[float, float]:
    """The values the displayed array can take after the Modality and VOI steps."""
    if windowed == "lut":
        return _lut_range(ds.VOILUTSequence[0].LUTDescriptor)
    if "ModalityLUTSequence" in ds:
        return _lut_range(ds.ModalityLUTSequence[0].LUTDescriptor)
    bits = int(ds.BitsStored)
    low, high = (0, 2**bits - 1) if int(ds.get("PixelRepresentation") or 0) == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    slope, intercept = float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)
    low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high


def gray8(ds) -> np.ndarray:
    """The film as a viewer shows it, as uint8 (0 black, 255 white); ``check`` first.

    The display steps act on each stored value alone, so they run once per possible value
    (at most 65,536) into a lookup table, and the picture is one lookup: a tenth of the time
    of running them over a 2,048 x 2,048 film's float copies. The table is indexed by the
    stored bits as unsigned integers (``_raw_values``), so signed films need no shifted copy.
    """
    stored = _native(ds)
    if stored is None:
        stored = _decoded(ds)
    if stored.ndim != 2:
        raise DicomRejected(f"pixel data of shape {stored.shape}: one gray frame expected")
    if stored.dtype.kind not in "ui" or stored.dtype.itemsize > 2:
        return display(ds, stored)
    raw = stored.view(stored.dtype.str.replace("i", "u"))  # same size and byte order (pydicom keeps big-endian data so)
    return lookup(display(ds, _raw_values(ds, stored.dtype)), raw)


# Uncompressed little-endian pixel data is read in place (np.frombuffer), without pydicom's copy.
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # Implicit and Explicit VR Little Endian


def _native(ds) -> np.ndarray | None:
    """An uncompressed little-endian film's stored values as a view of its bytes, else None (pydicom decodes it).

    The bits above BitsStored are left in place: the display table masks them (``_raw_values``),
    as pydicom's decoder does.
    """
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    allocated, bits = int(ds.get("BitsAllocated") or 0), int(ds.get("BitsStored") or 0)
    if syntax not in NATIVE_SYNTAXES or allocated not in (8, 16) or bits > allocated:
        return None
    if int(ds.get("SamplesPerPixel") or 1) != 1 or not isinstance(ds.get("PixelData"), bytes):
        return None
    count = int(ds.Rows) * int(ds.Columns)
    if len(ds.PixelData) < count * allocated // 8:
        return None  # short: pydicom's decoder names the problem
    kind = "i" if int(ds.get("PixelRepresentation") or 0) else "u"
    return np.frombuffer(ds.PixelData, f"<{kind}{allocated // 8}", count=count).reshape(int(ds.Rows), int(ds.Columns))


def _raw_values(ds, dtype: np.dtype) -> np.ndarray:
    """The stored value (of ``dtype``) that each unsigned bit pattern of its size holds: the bits
    above BitsStored dropped, then sign-extended for a signed film. Index i of the result is pattern i."""
    raw = np.arange(2 ** (8 * dtype.itemsize), dtype=np.int64)
    bits = min(int(ds.get("BitsStored") or 8 * dtype.itemsize), 8 * dtype.itemsize)
    values = raw & (2**bits - 1)
    if dtype.kind == "i":
        values = np.where(values >= 2 ** (bits - 1), values - 2**bits, values)
    return values.astype(dtype)


LOOKUP_BLOCK = 1 << 17  # index values per np.take: numpy converts the index to intp first (8 bytes each)


def lookup(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[index]`` for a 2-D integer ``index``, in blocks of rows.

    One np.take over a 2,048 x 2,048 film converts its whole index to a fresh 32 MB intp array
    first; a block's conversion stays in the cache: half the time (5 ms instead of 10 here).
    """
    out = np.empty(index.shape, table.dtype)
    step = max(1, LOOKUP_BLOCK // max(index.shape[1], 1))
    for start in range(0, index.shape[0], step):
        np.take(table, index[start : start + step], out=out[start : start + step], mode="clip")
    return out


def display(ds, stored: np.ndarray) -> np.ndarray:
    """``stored`` values through the Modality LUT, the VOI LUT or window (else the stored range), MONOCHROME1, to uint8."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(stored, ds)
    windowed = "lut" if "VOILUTSequence" in ds else "window" if "WindowCenter" in ds and "WindowWidth" in ds else ""
    if windowed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    low, high = _display_range(ds, windowed)
    gray = np.clip((np.asarray(values, dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        gray = 1.0 - gray
    return np.rint(gray * 255.0).astype(np.uint8)


def patient_hash(patient_id: str, salt: str) -> str:
    """The salted hash that stands for a patient in everything written (16 hex digits)."""
    return "h-" + hashlib.sha256(f"{salt}\x00{patient_id}".encode()).hexdigest()[:16]


class HeaderFacts(NamedTuple):
    patient_id: str | None  # in clear: only ever written hashed (patient_hash)
    view: str | None  # ViewPosition: PA, AP, ...
    pixel_spacing: float | None  # mm per pixel (rows), PixelSpacing else ImagerPixelSpacing
    refused: str | None = None  # the screen's reason when the object is not a frontal chest film


def header_facts(path: str | Path, *, accept_lateral: bool = False) -> HeaderFacts | None:
    """What the manifest keeps from the header of the DICOM file at ``path``, with the screen's
    refusal if any; None for other files or a header that does not parse (the transform refuses it)."""
    with open(path, "rb") as handle:
        if not is_dicom(handle.read(MAGIC_OFFSET + 4)):
            return None
        try:
            ds = read(handle, pixels=False)
        except DicomRejected:
            return None  # the transform refuses it with its reason
    try:
        screen(ds, accept_lateral=accept_lateral)
        refused = None
    except DicomRejected as error:
        refused = str(error)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        spacing = float(spacing[0]) if spacing else None
    except (TypeError, ValueError, IndexError):
        spacing = None
    return HeaderFacts(str(ds.get("PatientID") or "").strip() or None, view_position(ds), spacing, refused)
