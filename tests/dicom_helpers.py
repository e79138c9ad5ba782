"""DICOM files made from the shared films with pydicom: real Part 10 structure, every case the reader meets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Distinctive values planted in every identifying tag: the privacy test greps all outputs for them.
PLANTED = {
    "PatientName": "Zzyzx^Quillfeather",
    "PatientID": "PID-7Q3X9-PLANTED",
    "PatientBirthDate": "19230917",
    "AccessionNumber": "ACC88Q41PLANT",
    "InstitutionName": "Quillfeather Memorial Infirmary",
}


def film_pixels(path: str | Path) -> np.ndarray:
    """The film's 8-bit gray pixels, as the pipeline decodes them."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def dicom_dataset(
    pixels: np.ndarray,
    *,
    bits: int = 8,
    photometric: str = "MONOCHROME2",
    window: bool = False,
    rescale: bool = False,
    voi_lut: bool = False,
    tags: dict | None = None,
    patient_id: str | None = None,
):
    """A CR Dataset holding the 8-bit ``pixels`` at ``bits`` stored bits, displayed as the same picture.

    Values are scaled to the stored range (v * (2**bits - 1) / 255, rounded: exact back to v).
    ``window`` stores them with an offset and a WindowCenter/Width that undoes it (the film
    looks wrong without the window); ``rescale`` adds a RescaleIntercept that the window is
    expressed in. MONOCHROME1 stores the inverse.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    top = 2**bits - 1
    values = np.rint(pixels.astype(np.float64) * top / 255.0)
    if photometric == "MONOCHROME1":
        values = top - values
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    for name, value in {**PLANTED, **(tags or {})}.items():
        setattr(ds, name, value)
    if patient_id is not None:
        ds.PatientID = patient_id
    if window or voi_lut:  # 16 bits stored, the picture at an offset: only the window (or LUT) maps it back
        offset, stored_bits = 1000, 16
        values = values + offset
        if window:
            ds.WindowCenter, ds.WindowWidth = offset + top / 2 + 0.5, top + 1
            if rescale:  # modality values = stored - offset: the window is in those units
                ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -offset, 1, "US"
                ds.WindowCenter = top / 2 + 0.5
        else:  # a VOI LUT Sequence from [offset, offset + top] to 16-bit output
            from pydicom.dataset import Dataset

            item = Dataset()
            item.LUTDescriptor = [top + 1, offset, 16]
            item.add_new(0x00283006, "US", [int(v) for v in np.rint(np.arange(top + 1) * 65535.0 / top)])  # LUTData
            ds.VOILUTSequence = [item]
        bits = stored_bits
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = values.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    return ds


# Every kind of object the header alone shows is no frontal chest film, with its reason.
ODD_OBJECTS = {
    "lateral": "lateral view (ViewPosition LL): frontal films only (transform.accept_lateral keeps them)",
    "knee": "not a chest film (BodyPartExamined KNEE)",
    "ct": "not a projection radiograph (Modality CT): CR, DR, DX, OT, RG films only",
    "rgb": "colour DICOM (RGB): chest films are MONOCHROME1 or MONOCHROME2",
    "two-frames": "multi-frame DICOM (2 frames): one film per file expected",
    "report": "DICOM object without pixel data (Basic Text SR Storage): not an image",
}


def odd_object(film: np.ndarray, name: str):
    """The Dataset of ODD_OBJECTS[name], made from the 8-bit gray ``film``."""
    tags = {"lateral": {"ViewPosition": "LL"}, "knee": {"BodyPartExamined": "KNEE"}, "ct": {"Modality": "CT"}}
    ds = dicom_dataset(np.concatenate([film, film]) if name == "two-frames" else film, tags=tags.get(name))
    if name == "rgb":
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = np.repeat(film[..., None], 3, axis=2).tobytes()
    elif name == "two-frames":
        ds.Rows, ds.NumberOfFrames = film.shape[0], 2
    elif name == "report":
        for tag in ("PixelData", "Rows", "Columns"):
            delattr(ds, tag)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    return ds


def write_dicom(path: str | Path, ds, *, syntax: str | None = None) -> Path:
    """Save ``ds`` as a Part 10 file, compressed to ``syntax`` (an encoder pydicom has) when given."""
    if syntax is not None:
        ds.compress(syntax)
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def gray_jpeg(pixels: np.ndarray) -> bytes:
    """The 8-bit gray film as a one-component baseline JPEG (the shared films are 3-component)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def dicom_from_jpeg(path: str | Path, jpeg: bytes, pixels_shape: tuple[int, int], **tags):
    """A gray JPEG's own bytes encapsulated as JPEG Baseline DICOM (as RSNA's files are)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = dicom_dataset(np.zeros(pixels_shape, np.uint8), tags=tags)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return write_dicom(path, ds)


PLANTED_PATIENT_PREFIX = "PIDQX"  # every planted PatientID starts with it: PIDQX + the Kaggle patient number


def rsna_source(films: Path, target: Path, *, jpeg: bool = True) -> Path:
    """An RSNA-layout source made of the Kaggle-layout films under ``films`` (train/{NORMAL,PNEUMONIA}).

    ``stage_2_train_images/{patientId}.dcm`` (a gray JPEG encapsulated as JPEG Baseline, as
    RSNA's are, or uncompressed 8-bit) and ``stage_2_train_labels.csv`` with RSNA's columns:
    a PNEUMONIA film gets two box rows, a NORMAL one a single row with empty box fields.
    The file name is an anonymous uid; the header's PatientID is the planted one of the
    film's Kaggle patient, so one patient's films share it and the split can group them.
    """
    from pneumo.download import parse_patient_id

    images = target / "stage_2_train_images"
    images.mkdir(parents=True)
    lines = ["patientId,x,y,width,height,Target"]
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        for film in sorted((films / "train" / name).iterdir()):
            uid = str(uuid_of(film.name))
            pixels = film_pixels(film)
            patient = PLANTED_PATIENT_PREFIX + parse_patient_id(film.name)
            if jpeg:
                dicom_from_jpeg(images / f"{uid}.dcm", gray_jpeg(pixels), pixels.shape, PatientID=patient)
            else:
                write_dicom(images / f"{uid}.dcm", dicom_dataset(pixels, patient_id=patient))
            lines += [f"{uid},10,20,30,40,1", f"{uid},50,60,70,80,1"] if label else [f"{uid},,,,,0"]
    (target / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    return target


def uuid_of(name: str):
    import hashlib
    import uuid

    return uuid.UUID(hashlib.sha256(name.encode()).hexdigest()[:32])


def png_twin(rsna: Path, target: Path) -> Path:
    """The films of the RSNA-layout source ``rsna`` as PNGs with a ``labels.csv`` (``path,label,patient``).

    Each PNG holds the pixels its DICOM displays (the encapsulated JPEG, decoded by the
    pipeline), the same label, and in ``patient`` the header's PatientID: with the same
    patient salt both sources hash each patient to the same id, so the carve puts the same
    films in val and test, and a comparison of the two runs is paired.
    """
    import csv

    import pydicom

    from pneumo import images

    labels: dict[str, int] = {}
    with open(rsna / "stage_2_train_labels.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            labels[row["patientId"]] = int(row["Target"])
    (target / "images").mkdir(parents=True)
    lines = ["path,label,patient"]
    for uid, label in sorted(labels.items()):
        path = rsna / "stage_2_train_images" / f"{uid}.dcm"
        with open(path, "rb") as handle, images.open_checked(handle, 50_000_000) as image:
            image.convert("L").save(target / "images" / f"{uid}.png")
        patient = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)
        lines.append(f"images/{uid}.png,{label},{patient}")
    (target / "labels.csv").write_text("\n".join(lines) + "\n")
    return target
