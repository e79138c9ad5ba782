"""The manifest: one record per image of the dataset, and the images that could not be used."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pneumo import storage

CLASSES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
SPLITS = ("train", "val", "test")


class ImageRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    relpath: str  # POSIX path relative to Manifest.root, e.g. "train/NORMAL/IM-0115-0001.jpeg"
    split: Literal["train", "val", "test"]  # the split the source put it in
    label: int  # 0 NORMAL, 1 PNEUMONIA
    patient_id: str
    bytes: int
    sha256: str


class QuarantineEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    relpath: str
    stage: str  # which stage refused it: "manifest", "transform", ...
    reason: str


class Manifest(BaseModel):
    root: str  # local folder the relpaths resolve against; not part of the digest
    records: list[ImageRecord]
    quarantine: list[QuarantineEntry] = []

    def digest(self) -> str:
        """The dataset version: a sha256 over records and quarantine, independent of where root is."""
        payload = {
            "records": [r.model_dump() for r in sorted(self.records, key=lambda r: r.relpath)],
            "quarantine": [q.model_dump() for q in sorted(self.quarantine, key=lambda q: q.relpath)],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per source split and class name."""
        out: dict[str, dict[str, int]] = {}
        for record in self.records:
            by_class = out.setdefault(record.split, {name: 0 for name in CLASSES})
            by_class[CLASSES[record.label]] += 1
        return out


def save_manifest(manifest: Manifest, directory: str) -> str:
    """Write the manifest under a name derived from its digest; return its URI."""
    uri = storage.join(directory, f"manifest-{manifest.digest()[:16]}.json")
    # Same digest can come from another copy of the data: keep root pointing at this one.
    if not storage.exists(uri) or load_manifest(uri).root != manifest.root:
        storage.write_bytes(uri, manifest.model_dump_json(indent=1).encode())
    return uri


def load_manifest(uri: str) -> Manifest:
    return Manifest.model_validate_json(storage.read_bytes(uri))


class ManifestRef(BaseModel):
    """What stage 1 hands downstream: where the manifest is and what it holds."""

    model_config = ConfigDict(frozen=True)

    uri: str
    digest: str
    root: str
    n_images: int
    n_quarantined: int
    counts: dict[str, dict[str, int]]

    @classmethod
    def from_manifest(cls, manifest: Manifest, uri: str) -> "ManifestRef":
        return cls(
            uri=uri,
            digest=manifest.digest(),
            root=manifest.root,
            n_images=len(manifest.records),
            n_quarantined=len(manifest.quarantine),
            counts=manifest.counts(),
        )
