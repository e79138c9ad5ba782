"""The manifest: one record per image of the dataset, and the images that could not be used."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pneumo import storage
from pneumo.labels import CLASSES  # noqa: F401 (label 0, label 1; imported from here by the data modules)

SPLITS = ("train", "val", "test")

# Files and folders that operating systems and archivers leave beside the data, and why each
# is skipped. macOS AppleDouble files ("._" + the name of a real file) are matched by prefix.
OS_METADATA = {
    "__MACOSX": "OS metadata: macOS archive folder (__MACOSX)",
    ".DS_Store": "OS metadata: macOS folder settings (.DS_Store)",
    "Thumbs.db": "OS metadata: Windows folder settings (Thumbs.db)",
    "desktop.ini": "OS metadata: Windows folder settings (desktop.ini)",
}
APPLEDOUBLE_REASON = "OS metadata: macOS AppleDouble file (._*)"


def junk_reason(name: str) -> str | None:
    """Why a file or folder named ``name`` is OS metadata and skipped, or None when it is not."""
    if name.startswith("._"):
        return APPLEDOUBLE_REASON
    return OS_METADATA.get(name)


def is_junk(name: str) -> bool:
    """OS metadata or any other hidden name (a leading '.'): never data when searching or listing inputs.

    The manifest is stricter with hidden files in a class folder: it quarantines them with
    their reason (they are often copies set aside on purpose), and skips only OS metadata.
    """
    return name.startswith(".") or junk_reason(name) is not None


class ImageRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    relpath: str  # POSIX path relative to Manifest.root, e.g. "train/NORMAL/IM-0115-0001.jpeg"
    split: Literal["train", "val", "test"]  # the split the source put it in
    label: int  # 0 NORMAL, 1 PNEUMONIA
    patient_id: str
    bytes: int
    sha256: str
    # Perceptual hash of the picture (pneumo.duplicates): finds re-encoded or resized copies.
    # None when the image could not be decoded (the transform quarantines it) or in manifests
    # written before fingerprints, whose digest stays what it was.
    fingerprint: str | None = None
    # The same hash of the mirror image (finds mirrored copies), and for the films of a source's
    # test and val splits of their turned and cropped renderings (duplicates.TURNS, CROPS).
    # None as fingerprint is, and turned_fingerprints for the films of train.
    mirror_fingerprint: str | None = None
    turned_fingerprints: tuple[str, ...] | None = None
    # From a DICOM header (None for other files; left out of the digest then, so earlier
    # manifests keep theirs): the ViewPosition (PA, AP) and mm per pixel.
    view: str | None = None
    pixel_spacing: float | None = None


class QuarantineEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    relpath: str
    stage: str  # which stage refused it: "manifest", "transform", ...
    reason: str
    # A well-formed file that is not a frontal chest film (a lateral, a CT, a structured report:
    # pneumo.dicom.screen): listed with its reason, not counted as bad data (max_bad_fraction).
    # Left out of the digest when False, so earlier manifests keep theirs.
    out_of_scope: bool = False


class SkippedEntry(BaseModel):
    """A file of a split folder left out on purpose: OS metadata such as ``.DS_Store``."""

    model_config = ConfigDict(frozen=True)

    relpath: str
    reason: str


class Manifest(BaseModel):
    # The local folder the relpaths resolve against, when known: set by build_manifest and
    # by load_manifest(uri, root). Never saved: the file is named by its content, so every
    # copy of the same data shares it, and a root stored there would name whichever copy
    # wrote it last. Where the pixels come from travels in the run's own ManifestRef.
    root: str | None = Field(default=None, exclude=True)
    records: list[ImageRecord]
    quarantine: list[QuarantineEntry] = []
    skipped: list[SkippedEntry] = []

    def digest(self) -> str:
        """The dataset version: a sha256 over everything in the file, independent of where root is."""
        payload = {
            "records": [r.model_dump(exclude_none=True) for r in sorted(self.records, key=lambda r: r.relpath)],
            "quarantine": [q.model_dump(exclude_defaults=True) for q in sorted(self.quarantine, key=lambda q: q.relpath)],
        }
        if self.skipped:  # only when present: folders without OS junk keep their earlier digest
            payload["skipped"] = [e.model_dump() for e in sorted(self.skipped, key=lambda e: e.relpath)]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def images_root(self) -> str:
        """The folder to read the images from; an error if this manifest was loaded without one."""
        if not self.root:
            raise ValueError(
                "this manifest does not say where its images are: load it with "
                "load_manifest(uri, root=...) using the root of the run's own ManifestRef"
            )
        return self.root

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per source split and class name."""
        out: dict[str, dict[str, int]] = {}
        for record in self.records:
            by_class = out.setdefault(record.split, {name: 0 for name in CLASSES})
            by_class[CLASSES[record.label]] += 1
        return out


def save_manifest(manifest: Manifest, directory: str) -> str:
    """Write the manifest under a name derived from its digest; return its URI.

    The file holds only what the digest covers (no root), so an existing file of the
    same name already has these contents and is left as it is.
    """
    uri = storage.join(directory, f"manifest-{manifest.digest()[:16]}.json")
    if not storage.exists(uri):
        storage.write_bytes(uri, manifest.model_dump_json(indent=1).encode())
    return uri


def load_manifest(uri: str, root: str | None = None) -> Manifest:
    """The manifest at ``uri``, its images under ``root`` (the run's ManifestRef.root).

    A ``root`` written into the file by an older version is ignored: it may name another copy.
    """
    data = json.loads(storage.read_bytes(uri))
    data.pop("root", None)
    return Manifest.model_validate({**data, "root": root})


class ManifestRef(BaseModel):
    """What stage 1 hands downstream: where the manifest is and what it holds."""

    model_config = ConfigDict(frozen=True)

    uri: str
    digest: str
    root: str  # the local folder this run's images are in: the only source of where pixels come from
    n_images: int
    n_quarantined: int
    counts: dict[str, dict[str, int]]
    n_skipped: int = 0  # OS metadata files left out (manifest.skipped)

    @classmethod
    def from_manifest(cls, manifest: Manifest, uri: str) -> "ManifestRef":
        return cls(
            uri=uri,
            digest=manifest.digest(),
            root=manifest.images_root(),
            n_images=len(manifest.records),
            n_quarantined=len(manifest.quarantine),
            counts=manifest.counts(),
            n_skipped=len(manifest.skipped),
        )
