"""Stage 1: turn a ``--source`` string into a local dataset folder and a Manifest.

Accepted sources (see ACCEPTED_FORMS): a Kaggle dataset handle, a local folder, a local
``.zip``, an ``s3://`` zip, or an ``s3://`` prefix. ``fetch`` materializes any of them as a
local folder under ``cache_dir``; ``find_dataset_root`` picks the folder holding
``train/{NORMAL,PNEUMONIA}``; ``build_manifest`` lists and hashes every image in it.

Every folder ``fetch`` creates is filled under a temporary name and then renamed, so a
killed run never leaves a half-filled folder that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict

from pneumo import dicom, duplicates, storage, tables
from pneumo.manifest import CLASSES, SPLITS, ImageRecord, Manifest, QuarantineEntry, SkippedEntry, is_junk, junk_reason
from pneumo.workdir import DOWNLOADS

ACCEPTED_FORMS = (
    "kaggle:OWNER/DATASET (optionally pinned as kaggle:OWNER/DATASET/versions/N), "
    "a local folder in the Kaggle layout (e.g. /data/chest_xray), a local .zip file, "
    "s3://bucket/path/archive.zip, or s3://bucket/prefix holding the Kaggle layout"
)
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".dcm", ".dicom"}
_KAGGLE_HANDLE = re.compile(r"^([\w.-]+)/([\w.-]+)(?:/versions/(\d+))?$")
_CHUNK = 1 << 20


class SourceUnavailable(RuntimeError):
    """The source exists in principle but cannot be reached now (no credentials, no network)."""


class UnsafeArchive(ValueError):
    """A zip archive that would write outside its target, explode in size, or is corrupt."""


class Source(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["kaggle", "dir", "zip", "s3_zip", "s3_prefix"]
    location: str  # Kaggle "owner/dataset", a resolved local path, or an s3:// URI
    version: int | None = None  # a pinned Kaggle dataset version


# --------------------------------------------------------------------------- sources


def parse_source(source: str) -> Source:
    """Classify ``source``; local paths must exist, remote ones are not contacted."""
    text = str(source).strip()
    if text.startswith("kaggle:"):
        match = _KAGGLE_HANDLE.fullmatch(text[len("kaggle:"):])
        if not match:
            raise ValueError(f"invalid Kaggle source {text!r}. Accepted forms: {ACCEPTED_FORMS}.")
        owner, dataset, version = match.groups()
        return Source(kind="kaggle", location=f"{owner}/{dataset}", version=int(version) if version else None)
    if storage.is_s3(text):
        bucket, key = storage.split_s3(text)
        kind = "s3_zip" if key.lower().endswith(".zip") else "s3_prefix"
        return Source(kind=kind, location=f"s3://{bucket}/{key}")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", text):
        raise ValueError(f"unsupported source scheme in {text!r}. Accepted forms: {ACCEPTED_FORMS}.")
    if not text:
        raise ValueError(f"empty source. Accepted forms: {ACCEPTED_FORMS}.")
    path = Path(text).expanduser()
    if path.is_dir():
        return Source(kind="dir", location=str(path.resolve()))
    if path.is_file() and path.suffix.lower() == ".zip":
        return Source(kind="zip", location=str(path.resolve()))
    if path.exists():
        raise ValueError(f"source {text!r} is a file but not a .zip archive. Accepted forms: {ACCEPTED_FORMS}.")
    raise ValueError(f"source path {text!r} does not exist. Accepted forms: {ACCEPTED_FORMS}.")


def source_fingerprint(source: str, *, verify: bool = False) -> str:
    """A cheap sha256 that changes when the source's content changes; a cache key, not a checksum.

    - folder: every file's (relative path, size, mtime_ns), from stat only;
    - local zip: its resolved path, size and mtime_ns;
    - s3 zip: the object's ETag and size (one HEAD request);
    - s3 prefix: every listed key with its ETag and size (list_objects_v2);
    - kaggle: the handle plus the dataset's current version number, asked from the Kaggle
      API (the GetDataset call kagglehub itself makes); a pinned ``/versions/N`` handle is
      used as is, without a request. Raises SourceUnavailable when Kaggle can't be reached.

    Size and mtime cannot see a file rewritten with the same size and its mtime set back
    (``touch -d``, ``cp -p``, ``rsync -t``, some editors and sync tools). ``verify=True``
    (``--verify-source``) reads every byte of a local folder or zip instead: the sha256 of
    each file's content. S3 ETags and Kaggle versions already change with the content.
    """
    parsed = parse_source(source)
    if parsed.kind == "dir":
        parts = [f"dir:{parsed.location}" + (":sha256" if verify else "")]
        root = Path(parsed.location)
        for folder, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(folder, name)
                try:
                    info = path.stat()
                except FileNotFoundError:  # a broken symlink
                    info = path.lstat()
                if verify and stat.S_ISREG(info.st_mode):
                    parts.append(f"{path.relative_to(root).as_posix()}\0{_sha256_file(path)[0]}")
                else:
                    parts.append(f"{path.relative_to(root).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}")
    elif parsed.kind == "zip" and verify:
        parts = [f"zip:{parsed.location}:sha256", _sha256_file(Path(parsed.location))[0]]
    elif parsed.kind == "zip":
        info = Path(parsed.location).stat()
        parts = [f"zip:{parsed.location}", str(info.st_size), str(info.st_mtime_ns)]
    elif parsed.kind == "s3_zip":
        bucket, key = storage.split_s3(parsed.location)
        with storage.s3_errors(parsed.location, "HeadObject"):
            head = storage.s3_client().head_object(Bucket=bucket, Key=key)
        parts = [f"s3_zip:{parsed.location}", head["ETag"], str(head["ContentLength"])]
    elif parsed.kind == "s3_prefix":
        parts = [f"s3_prefix:{parsed.location}"]
        parts += [f"{key}\0{etag}\0{size}" for key, etag, size in _list_s3_prefix(parsed.location)]
    else:
        version = parsed.version or _kaggle_current_version(parsed.location)
        parts = [f"kaggle:{parsed.location}/versions/{version}"]
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def fetch(source: str, cache_dir: str | Path, *, progress: Callable[[str], None] | None = None) -> Path:
    """Return a local folder holding the dataset; pass it to find_dataset_root.

    A folder source is returned as is. Archives and remote sources land under ``cache_dir``
    in folders named after their content, and are reused on the next call.
    """
    say = progress or (lambda message: None)
    parsed = parse_source(source)
    cache_dir = Path(cache_dir)
    if parsed.kind == "dir":
        return Path(parsed.location)
    if parsed.kind == "zip":
        return _extract_cached(Path(parsed.location), cache_dir, say)
    if parsed.kind == "s3_zip":
        local_zip = cache_dir / "downloads" / source_fingerprint(source)[:16] / Path(parsed.location).name
        if local_zip.exists():
            say(f"reusing downloaded {local_zip}")
        else:
            say(f"downloading {parsed.location}")
            storage.download_file(parsed.location, local_zip)  # atomic: temp name, then rename
        return _extract_cached(local_zip, cache_dir, say)
    if parsed.kind == "s3_prefix":
        target = cache_dir / "s3" / source_fingerprint(source)[:16]
        return _publish_dir(target, lambda tmp: _download_s3_prefix(parsed.location, tmp, say), say)
    return _fetch_kaggle(parsed, cache_dir, say)


def _publish_dir(target: Path, fill: Callable[[Path], None], say: Callable[[str], None]) -> Path:
    """Fill a temporary folder next to ``target``, then rename it into place (or reuse target)."""
    if target.is_dir():
        say(f"reusing {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=storage.temp_prefix(), suffix=".partial"))
    try:
        fill(tmp)
        storage.honour_umask(tmp, 0o777)  # mkdtemp made it 0700
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another run: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def sweep_workdir(workdir: str | Path, started: float) -> list[Path]:
    """Remove temporaries that killed runs left in a local workdir (see storage.sweep_temporaries).

    Published dataset folders under ``downloads/`` hold the user's files as they came and
    are not searched: a dataset may hold dot-files of its own.
    """
    downloads = Path(workdir, DOWNLOADS)

    def published(folder: Path) -> bool:
        parts = folder.relative_to(downloads).parts if folder.is_relative_to(downloads) else ()
        return (len(parts) == 2 and parts[0] in ("extracted", "s3")) or (len(parts) == 5 and parts[0] == "kaggle")

    if not Path(workdir).is_dir():
        return []
    return storage.sweep_temporaries(workdir, started, prune=published)


def _extract_cached(zip_path: Path, cache_dir: Path, say: Callable[[str], None]) -> Path:
    say(f"hashing {zip_path}")
    digest = _sha256_file(zip_path)[0]
    target = cache_dir / "extracted" / digest[:16]
    if not target.is_dir():
        say(f"extracting {zip_path} into {target}")
    return _publish_dir(target, lambda tmp: safe_extract_zip(zip_path, tmp), say)


def _list_s3_prefix(uri: str) -> list[tuple[str, str, int]]:
    bucket, key = storage.split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    with storage.s3_errors(uri, "ListObjectsV2"):
        objects = [(obj["Key"], obj["ETag"], obj["Size"]) for page in pages for obj in page.get("Contents", [])]
    if not objects:
        raise ValueError(f"no objects under {uri}. Accepted forms: {ACCEPTED_FORMS}.")
    return sorted(objects)


def _download_s3_prefix(uri: str, target: Path, say: Callable[[str], None]) -> None:
    bucket, key = storage.split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    objects = _list_s3_prefix(uri)
    say(f"downloading {len(objects)} objects from {uri}")
    for object_key, _, _ in objects:
        if object_key.endswith("/"):  # a "folder" marker object
            continue
        relpath = _checked_member_path(object_key[len(prefix):], uri)
        storage.download_file(f"s3://{bucket}/{object_key}", target / relpath)


# --------------------------------------------------------------------------- kaggle


def _kaggle_current_version(handle: str) -> int:
    from kagglehub.clients import build_kaggle_client
    from kagglehub.exceptions import handle_call
    from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetRequest

    owner, dataset = handle.split("/")
    request = ApiGetDatasetRequest()
    request.owner_slug, request.dataset_slug = owner, dataset
    try:
        with build_kaggle_client() as client:
            found = handle_call(lambda: client.datasets.dataset_api_client.get_dataset(request))
    except _kaggle_errors() as error:
        raise SourceUnavailable(_kaggle_help(handle, "could not look up its current version", error)) from error
    if not found.current_version_number:
        raise SourceUnavailable(_kaggle_help(handle, "the Kaggle API returned no version number", None))
    return found.current_version_number


def _fetch_kaggle(parsed: Source, cache_dir: Path, say: Callable[[str], None]) -> Path:
    import kagglehub

    version = parsed.version or _kaggle_current_version(parsed.location)
    target = cache_dir / "kaggle" / parsed.location / "versions" / str(version)

    def download(tmp: Path) -> None:
        say(f"downloading kaggle:{parsed.location} version {version}")
        try:
            # output_dir keeps kagglehub's files under cache_dir instead of ~/.cache/kagglehub.
            kagglehub.dataset_download(f"{parsed.location}/versions/{version}", output_dir=str(tmp))
        except _kaggle_errors() as error:
            raise SourceUnavailable(_kaggle_help(parsed.location, "the download failed", error)) from error

    return _publish_dir(target, download, say)


def _kaggle_errors() -> tuple[type[Exception], ...]:
    import requests
    from kagglehub import exceptions

    return (
        requests.RequestException,  # no network, refused, HTTP 401/403/404/5xx
        exceptions.UnauthenticatedError,
        exceptions.CredentialError,
        exceptions.BackendError,
        exceptions.DataCorruptionError,
        exceptions.NotFoundError,
        ValueError,  # e.g. a malformed ~/.kaggle/kaggle.json
    )


def _kaggle_help(handle: str, what: str, error: Exception | None) -> str:
    from kagglehub.config import get_kaggle_credentials

    try:
        have_credentials = get_kaggle_credentials() is not None
    except ValueError:
        have_credentials = False
    detail = f" ({type(error).__name__}: {_redact(' '.join(str(error).split()))})" if error else ""
    found = "Kaggle credentials were found" if have_credentials else "no Kaggle credentials were found"
    return (
        f"Could not get Kaggle dataset '{handle}': {what}{detail}; {found}. "
        "To download from Kaggle, create an API token at https://www.kaggle.com/settings and either "
        "set the KAGGLE_USERNAME and KAGGLE_KEY environment variables or save the token as "
        '~/.kaggle/kaggle.json ({"username": ..., "key": ...}), and check that kaggle.com can be reached. '
        "To work offline, pass --source /path/to/chest_xray (a folder in the Kaggle layout) "
        "or --source /path/to/archive.zip instead."
    )


def _redact(text: str) -> str:
    """Remove any credential value that an underlying error message might echo."""
    from kagglehub.config import get_kaggle_credentials

    secrets = [os.environ.get(name) for name in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    try:
        credentials = get_kaggle_credentials()
    except ValueError:
        credentials = None
    if credentials:
        secrets += [credentials.key, credentials.api_key]
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------- archives


def _checked_member_path(name: str, archive: str | Path) -> PurePosixPath:
    """The entry's relative path, or UnsafeArchive if it could land outside the target."""
    if not name or "\0" in name:
        raise UnsafeArchive(f"unsafe entry {name!r} in {archive}: empty name or NUL byte")
    if "\\" in name:
        raise UnsafeArchive(f"unsafe entry {name!r} in {archive}: backslashes (Windows path separators)")
    if name.startswith("/") or re.match(r"^[a-zA-Z]:", name):
        raise UnsafeArchive(f"unsafe entry {name!r} in {archive}: absolute path")
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise UnsafeArchive(f"unsafe entry {name!r} in {archive}: '..' would escape the target folder")
    return path


def safe_extract_zip(
    zip_path: str | Path,
    target_dir: str | Path,
    *,
    max_total_bytes: int = 20 * 2**30,
    max_ratio: int = 200,
    max_members: int = 1_000_000,
) -> None:
    """Extract a zip, refusing (UnsafeArchive) anything that could escape or exhaust the disk.

    Every entry is checked before the first byte is written: '..' and absolute names,
    symlinks, member count, declared total size, and the compression ratio of members of
    1 MiB or more (smaller ones cannot be a bomb; the total limit covers many of them).
    Sizes are enforced again while streaming because headers can lie. On error, a partial
    extraction may remain in ``target_dir``: extract into a fresh folder (fetch does).
    """
    target = Path(target_dir)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            if len(members) > max_members:
                raise UnsafeArchive(f"{zip_path} has {len(members)} entries, more than the limit of {max_members}")
            _check_no_file_is_a_folder(_checked_members(members, zip_path, max_total_bytes, max_ratio), zip_path)
            written = 0
            real_target = os.path.realpath(target)
            for info in members:
                destination = target / info.filename
                # Guards against symlinks already sitting in target_dir, which names alone can't see.
                if os.path.commonpath([real_target, os.path.realpath(destination)]) != real_target:
                    raise UnsafeArchive(f"entry {info.filename!r} in {zip_path} resolves outside {target}")
                written += _extract_member(archive, info, destination, zip_path, max_total_bytes - written)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise UnsafeArchive(f"archive is truncated or corrupt: {zip_path}: {error}") from error


def _checked_members(
    members: list[zipfile.ZipInfo], zip_path: str | Path, max_total_bytes: int, max_ratio: int
) -> dict[PurePosixPath, str]:
    """Each entry's path -> its name in the archive, once every entry's name, kind and sizes are checked."""
    declared = 0
    seen: dict[PurePosixPath, str] = {}
    for info in members:
        path = _checked_member_path(info.filename, zip_path)
        if path in seen:  # extracted, the second would silently replace the first
            raise UnsafeArchive(f"entry {info.filename!r} appears twice in {zip_path}; remove one copy")
        seen[path] = info.filename
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchive(f"unsafe entry {info.filename!r} in {zip_path}: symbolic link")
        declared += info.file_size
        if declared > max_total_bytes:
            raise UnsafeArchive(f"{zip_path} expands to more than {max_total_bytes} bytes (at entry {info.filename!r})")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= _CHUNK and ratio > max_ratio:
            raise UnsafeArchive(
                f"entry {info.filename!r} in {zip_path} has compression ratio {ratio:.0f} "
                f"(limit {max_ratio}): likely a zip bomb"
            )
    return seen


def _check_no_file_is_a_folder(seen: dict[PurePosixPath, str], zip_path: str | Path) -> None:
    files = {path for path, name in seen.items() if not name.endswith("/")}
    for path, name in seen.items():
        for parent in path.parents:
            if parent in files:  # a file and, at once, the folder of another entry
                raise UnsafeArchive(
                    f"entry {name!r} in {zip_path} needs a folder {parent.as_posix()!r}, "
                    f"but the archive also holds a file {seen[parent]!r} by that name"
                )


def _extract_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, destination: Path, zip_path: str | Path, budget: int
) -> int:
    """Write one entry at ``destination``, at most its declared size and ``budget`` bytes; return the bytes written."""
    written = 0
    try:
        if info.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            return 0
        destination.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, open(destination, "wb") as sink:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > info.file_size or written > budget:
                    raise UnsafeArchive(f"entry {info.filename!r} in {zip_path} expands beyond its declared size")
                sink.write(chunk)
    except OSError as error:  # named by its entry: the temporary folder means nothing to the user
        raise OSError(error.errno, f"cannot extract entry {info.filename!r} from {zip_path}: "
                      f"{error.strerror or error}") from None
    return written


# --------------------------------------------------------------------------- layout


def _is_dataset_root(folder: Path) -> bool:
    """The Kaggle layout's root (train/NORMAL or train/PNEUMONIA), or a folder holding a labels table."""
    train = folder / "train"
    kaggle = train.is_dir() and any((train / name).is_dir() for name in CLASSES)
    return kaggle or tables.table_in(folder) is not None


def _has_image(folder: Path) -> bool:
    """At least one file the manifest would take (stops at the first)."""
    if not folder.is_dir():
        return False
    with os.scandir(folder) as entries:
        return any(
            entry.is_file() and not junk_reason(entry.name) and not entry.name.startswith(".")
            and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
            for entry in entries
        )


def missing_class_folders(root: str | Path) -> list[str]:
    """The class folders (``train/PNEUMONIA``) that a split of the dataset at ``root`` lacks or holds no image in.

    Training, evaluation and the carving of val and test need both classes in train, and a
    val or test split the source brings needs both too; checked before any stage starts.
    """
    root = Path(root)
    missing = []
    for split in SPLITS:
        if split != "train" and not (root / split).is_dir():
            continue  # carved from train
        missing += [f"{split}/{name}" for name in CLASSES if not _has_image(root / split / name)]
    return missing


def missing_class_folders_in_zip(names: list[str]) -> list[str]:
    """missing_class_folders for the member names of a .zip (its shallowest dataset copy)."""
    found: dict[tuple[str, ...], set[tuple[str, str]]] = {}  # dataset root inside the zip -> (split, class) with images
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or any(junk_reason(part) for part in parts):
            continue
        split, label, file = parts[-3:]
        if split in SPLITS and label in CLASSES:
            with_images = found.setdefault(parts[:-3], set())
            if not file.startswith(".") and PurePosixPath(file).suffix.lower() in IMAGE_EXTENSIONS:
                with_images.add((split, label))
    with_images = found[min(found, key=len)] if found else set()
    splits = {"train"} | {split for split, _ in with_images}
    return [f"{split}/{name}" for split in SPLITS if split in splits for name in CLASSES if (split, name) not in with_images]


def missing_labels(root: Path) -> list[str]:
    """missing_class_folders for a table source: the classes its table gives no train film; ValueError if unreadable."""
    table = tables.read_table(tables.table_in(root))
    found = {row.label for row in table.rows.values() if row.split == "train"}
    return [f"{table.name}: train films labelled {name}" for label, name in enumerate(CLASSES) if label not in found]


def kaggle_credentials_found() -> bool:
    """Whether kagglehub finds credentials (environment or ~/.kaggle/kaggle.json), without any network call."""
    from kagglehub.config import get_kaggle_credentials

    try:
        return get_kaggle_credentials() is not None
    except ValueError:  # a malformed kaggle.json
        return False


KAGGLE_CREDENTIALS_HINT = (
    "create an API token at https://www.kaggle.com/settings and set KAGGLE_USERNAME and KAGGLE_KEY, or save it as "
    "~/.kaggle/kaggle.json; or work offline with --source /path/to/chest_xray (a folder in the Kaggle layout) or a .zip of it"
)


def check_source(source: str) -> Source:
    """``source`` parsed, once its layout looks usable (checked in a second, before any stage starts): else ValueError."""
    parsed = parse_source(source)
    missing: list[str] = []
    if parsed.kind == "dir":
        folder = Path(parsed.location)
        classes = [name for name in CLASSES if (folder / name).is_dir()]
        if classes:  # .../chest_xray/train: one level too deep
            raise ValueError(f"this is one split's folder (it holds {'/ and '.join(classes)}/); "
                             f"pass the folder above it: --source {folder.parent}")
        root = find_dataset_root(folder)
        missing = missing_labels(root) if tables.table_in(root) else missing_class_folders(root)
    elif parsed.kind == "zip":
        if not zipfile.is_zipfile(parsed.location):
            raise ValueError("not a readable zip archive; give the dataset's .zip or its unpacked folder")
        with zipfile.ZipFile(parsed.location) as archive:
            names = archive.namelist()
        if not any(PurePosixPath(name).name in tables.TABLES for name in names):  # a table is checked once unpacked
            missing = missing_class_folders_in_zip(names)
    elif parsed.kind == "kaggle" and not kaggle_credentials_found():
        raise ValueError(f"no Kaggle credentials found: {KAGGLE_CREDENTIALS_HINT}")
    if missing:
        raise ValueError(f"no images in {', '.join(missing)}; every split needs both classes "
                         "(train/NORMAL and train/PNEUMONIA, and the same in val/ and test/ when the source has them)")
    return parsed


def find_dataset_root(path: str | Path, *, max_depth: int = 6) -> Path:
    """The shallowest folder under ``path`` that has ``train/NORMAL`` or ``train/PNEUMONIA``.

    The Kaggle archive holds the dataset twice (``chest_xray/`` and a nested
    ``chest_xray/chest_xray/``) plus ``__MACOSX`` junk: the shallowest copy wins, junk is
    never a candidate, and two candidates at the same depth are an error, not a guess.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; expected a folder holding train/NORMAL and train/PNEUMONIA")
    level = [path]
    for _ in range(max_depth + 1):
        found = [folder for folder in level if _is_dataset_root(folder)]
        if len(found) > 1:
            listed = ", ".join(str(folder) for folder in found)
            raise ValueError(f"several dataset copies at the same depth under {path}: {listed}; pass one of them")
        if found:
            return found[0].resolve()
        level = [
            child
            for folder in level
            for child in sorted(folder.iterdir())
            if child.is_dir() and not child.is_symlink() and not is_junk(child.name)
        ]
        if not level:
            break
    raise ValueError(
        f"no dataset found under {path}: expected a folder with train/NORMAL and train/PNEUMONIA "
        "(and optionally val/ and test/ with the same class folders), as in the Kaggle "
        "chest-xray-pneumonia archive chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg, "
        f"or a folder holding a labels table ({' or '.join(tables.TABLES)}; see docs/data.md)"
    )


# --------------------------------------------------------------------------- manifest


def parse_patient_id(filename: str) -> str:
    """The patient number in a Kaggle file name, as a canonical integer string.

    ``person1000_virus_1681.jpeg`` -> "1000"; ``IM-0115-0001.jpeg`` -> "115";
    ``NORMAL2-IM-1427-0001.jpeg`` -> "1427". Both naming schemes share one number space
    here: merging a ``personN`` with an ``IM-N`` patient can only group more images
    together, which never leaks a patient across splits. Names that fit neither scheme
    fall back to the file stem, so each such image is its own patient.
    """
    name = PurePosixPath(filename).name
    match = re.match(r"^person(\d+)_", name, re.IGNORECASE) or re.search(r"(?:^|-)IM-(\d+)-", name, re.IGNORECASE)
    return str(int(match.group(1))) if match else PurePosixPath(name).stem


def _sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _hash_image(path: Path, split: str, accept_lateral: bool = False) -> tuple[str, int, duplicates.Prints | None, dicom.HeaderFacts | None]:
    """sha256, size, perceptual fingerprints of one image (they read a reduced decode) and, for DICOM,
    the header's facts; a held-out (test or val) film's prints include its turned and cropped
    renderings, which train copies are compared with. A DICOM object the header's screen refuses
    is not decoded: it has no prints."""
    sha256, size = _sha256_file(path)
    facts = dicom.header_facts(path, accept_lateral=accept_lateral)
    if facts and facts.refused:
        return sha256, size, None, facts
    return sha256, size, duplicates.fingerprints(path, turned=split != "train"), facts


def shown_name(name: str) -> str:
    """``name`` as valid UTF-8: bytes of a file name that are not UTF-8 are shown escaped.

    os.walk hands such bytes over as lone surrogates, which JSON cannot encode:
    b"caf\xe9.jpeg" -> "caf\\xe9.jpeg".
    """
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def build_manifest(
    root: str | Path, *, progress: Callable[[int, int], None] | None = None, salt: str | None = None,
    accept_lateral: bool = False,
) -> Manifest:
    """List and hash every image under ``root/{train,val,test}/{NORMAL,PNEUMONIA}/``, or every file
    a labels table at ``root`` names (pneumo.tables).

    ``salt`` hashes patient ids from DICOM headers and tables (pneumo.workdir.patient_salt);
    without one a fresh random salt is used, so no id is ever written in clear.

    DICOM objects whose header says they are not frontal chest films (``dicom.screen``: no
    pixels, multi-frame, colour, another modality or body part, a lateral view unless
    ``accept_lateral``) are quarantined here with their reason, marked ``out_of_scope``: they
    are listed, and do not count as bad data toward ``max_bad_fraction``.

    Only those three split folders are read (the Kaggle archive's nested duplicate tree
    and ``__MACOSX`` sit beside them). Every file in them is accounted for: an image
    record, a QuarantineEntry with its reason (including names that are not valid UTF-8,
    shown escaped, and hidden files such as ``.person1_virus_1.jpeg``), or, for OS
    metadata (``.DS_Store``, ``._*``, ``__MACOSX/``, ``Thumbs.db``), a SkippedEntry.
    """
    root = Path(root)
    if not _is_dataset_root(root):
        raise ValueError(f"{root} has no train/NORMAL or train/PNEUMONIA folder; use find_dataset_root first")
    listing = _Listing(root)
    if table := tables.table_in(root):
        if any((root / split).is_dir() for split in SPLITS):
            raise ValueError(f"{root} holds both {table.name} and split folders (train/...): "
                             "two ways of labelling the films; keep one")
        listing.add_table(tables.read_table(table))
    else:
        for split in SPLITS:
            listing.add_split(split)
    records, screened = _hash_records(listing.images, progress, salt or secrets.token_hex(32), accept_lateral)
    return Manifest(
        root=str(listing.resolved_root),
        records=records,
        quarantine=listing.quarantine + screened,
        skipped=listing.skipped,
    )


class _Listing:
    """What a walk of the dataset found: the images to hash, the files refused with why, the junk skipped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.resolved_root = root.resolve()
        self.images: list[tuple[str, str, int, Path, str | None]] = []  # relpath, split, label, path, patient
        self.quarantine: list[QuarantineEntry] = []
        self.skipped: list[SkippedEntry] = []

    def refuse(self, path: Path, reason: str) -> None:
        relpath = shown_name(path.relative_to(self.root).as_posix())
        self.quarantine.append(QuarantineEntry(relpath=relpath, stage="manifest", reason=shown_name(reason)))

    def skip(self, path: Path, reason: str) -> None:
        """Skip a junk file, or every file of a junk folder (each is counted)."""
        files = [path]
        if path.is_dir() and not path.is_symlink():
            files = [Path(folder, name) for folder, _, names in sorted(os.walk(path)) for name in sorted(names)]
        for file in files:
            self.skipped.append(SkippedEntry(relpath=shown_name(file.relative_to(self.root).as_posix()), reason=reason))

    def outside(self, path: Path) -> bool:
        """A symlink (file or folder) that leads out of the dataset."""
        return path.is_symlink() and not path.resolve().is_relative_to(self.resolved_root)

    def add_split(self, split: str) -> None:
        split_dir = self.root / split
        if not split_dir.is_dir():
            return
        if self.outside(split_dir):
            self.refuse(split_dir, "symlinked folder points outside the dataset (not read)")
            return
        for class_dir in sorted(split_dir.iterdir()):
            if junk := junk_reason(class_dir.name):
                self.skip(class_dir, junk)
            elif not class_dir.is_dir():
                self.refuse(class_dir, "file outside any class folder (expected NORMAL or PNEUMONIA)")
            elif self.outside(class_dir):  # the same rule as for a file: its files are never read
                self.refuse(class_dir, "symlinked folder points outside the dataset (not read)")
            else:
                self.add_class_folder(split, class_dir)

    def add_class_folder(self, split: str, class_dir: Path) -> None:
        for folder, dirnames, filenames in os.walk(class_dir):
            for name in [d for d in dirnames if junk_reason(d)]:
                self.skip(Path(folder, name), junk_reason(name))
            for name in [d for d in dirnames if Path(folder, d).is_symlink() and not junk_reason(d)]:
                # os.walk does not follow it: say so rather than lose its files without a word
                self.refuse(Path(folder, name), "symlinked folder inside a class folder (not followed)")
            dirnames[:] = sorted(d for d in dirnames if not junk_reason(d))
            for name in sorted(filenames):
                path = Path(folder, name)
                relpath = path.relative_to(self.root).as_posix()
                if junk := junk_reason(name):
                    self.skip(path, junk)
                elif problem := self.problem(path, relpath, class_dir):
                    self.refuse(path, problem)
                else:
                    self.images.append((relpath, split, CLASSES.index(class_dir.name), path, None))

    def add_table(self, table: tables.Table) -> None:
        """The files a labels table names, its refusals, and the files of its image folder it does not name."""
        refused = set()
        for relpath, reason in table.refused:
            if relpath not in refused:  # one entry per file: the first reason found
                refused.add(relpath)
                self.quarantine.append(QuarantineEntry(relpath=shown_name(relpath), stage="manifest", reason=reason))
        for relpath, row in sorted(table.rows.items()):
            path = self.root / relpath
            if problem := self.table_problem(path, relpath, table.name):
                self.refuse(path, problem)
            else:
                self.images.append((relpath, row.split, row.label, path, row.patient))
        listed = set(table.rows) | refused | {table.name}
        for folder, dirnames, filenames in os.walk(self.root / table.image_folder):
            dirnames[:] = sorted(d for d in dirnames if not is_junk(d))
            for name in sorted(filenames):
                path = Path(folder, name)
                relpath = path.relative_to(self.root).as_posix()
                if junk := junk_reason(name):
                    self.skip(path, junk)
                elif relpath not in listed and not (folder == str(self.root) and name.endswith(".csv")):
                    self.refuse(path, f"no row in {table.name}: the file has no label")

    def table_problem(self, path: Path, relpath: str, table: str) -> str | None:
        """Why a file a table names is not taken as an image, or None."""
        if not _is_utf8(relpath):
            return "file name is not valid UTF-8"
        if not path.exists() and not path.is_symlink():
            return f"missing file: named in {table} but not in the source"
        if any(part.startswith(".") for part in PurePosixPath(relpath).parts):
            return "hidden file (name starts with '.'): rename it to use it"
        if self.outside(path) or not path.resolve().is_relative_to(self.resolved_root):
            return "symlink points outside the dataset"
        if not path.is_file():
            return "not a regular file (a folder, broken symlink, device or pipe)"
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            return f"not an image file (extension '{path.suffix or '(none)'}')"
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        return None

    def problem(self, path: Path, relpath: str, class_dir: Path) -> str | None:
        """Why a file of a class folder is not taken as an image, or None."""
        if not _is_utf8(relpath):
            return "file name is not valid UTF-8"
        if path.name.startswith("."):
            # Hidden files are often partial copies or files set aside on purpose; the user decides by renaming it.
            return "hidden file (name starts with '.'): rename it to use it"
        if class_dir.name not in CLASSES:
            return f"unknown class folder '{class_dir.name}' (expected NORMAL or PNEUMONIA)"
        if path.parent != class_dir:
            return f"inside a subfolder of class folder '{class_dir.name}'"
        if self.outside(path):
            return "symlink points outside the dataset"
        if not path.is_file():
            return "not a regular file (broken symlink, device or pipe)"
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            return f"not an image file (extension '{path.suffix or '(none)'}')"
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        return None


def _hash_records(
    images: list[tuple[str, str, int, Path, str | None]], progress: Callable[[int, int], None] | None, salt: str,
    accept_lateral: bool = False,
) -> tuple[list[ImageRecord], list[QuarantineEntry]]:
    """The records of ``images``, hashed and fingerprinted, and the DICOM objects the header's screen
    refused (out of scope); ``progress(done, total)`` every 500 images.

    The patient: the table's, else a DICOM header's PatientID, each salted and hashed (never
    written in clear); else the number in a Kaggle file name.
    """
    # hashlib and Pillow's decoder release the GIL, so threads hash files in parallel.
    records: list[ImageRecord] = []
    screened: list[QuarantineEntry] = []
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        hashed = pool.map(_hash_image, [image[3] for image in images], [image[1] for image in images],
                          [accept_lateral] * len(images))
        for done, ((relpath, split, label, _, given), (sha256, size, prints, facts)) in enumerate(zip(images, hashed), start=1):
            patient = given or (facts.patient_id if facts else None)
            if facts and facts.refused:
                screened.append(QuarantineEntry(relpath=relpath, stage="manifest", reason=facts.refused, out_of_scope=True))
            else:
                patient_id = dicom.patient_hash(patient, salt) if patient else parse_patient_id(relpath)
                records.append(_record(relpath, split, label, patient_id, sha256, size, prints, facts))
            if progress and (done % 500 == 0 or done == len(images)):
                progress(done, len(images))
    return records, screened


def _record(relpath: str, split: str, label: int, patient_id: str, sha256: str, size: int,
            prints: duplicates.Prints | None, facts: dicom.HeaderFacts | None) -> ImageRecord:
    return ImageRecord(
        relpath=relpath,
        split=split,
        label=label,
        patient_id=patient_id,
        bytes=size,
        sha256=sha256,
        fingerprint=prints and prints.plain,
        mirror_fingerprint=prints and prints.mirrored,
        turned_fingerprints=prints.turned if prints and prints.turned else None,
        view=facts.view if facts else None,
        pixel_spacing=facts.pixel_spacing if facts else None,
    )
