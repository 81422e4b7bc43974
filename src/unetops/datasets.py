"""Dataset sources: pinned archives, mirror-first fetching, safe extraction, conversion to data/raw.

Every official archive is pinned by SHA256 (:data:`ARCHIVES`). :func:`fetch_archive` looks in the
cache (``cfg.paths.archives``), then in the offline mirror named by ``UNETOPS_MIRROR`` (the layout
of ``../shared/datasets``; a relative path is relative to the project root), then at the official
address (through pooch's HTTP downloader, short timeouts). A file whose digest differs is never
used: it is deleted (a mirror file is only reported, the mirror is the user's) and the error names
the file and both digests.

Archives are read member by member in memory (:class:`SafeArchive`), after every member name has
been checked, so nothing is extracted to disk: absolute paths, ``..`` and links are refused.

Each dataset is one converter in :data:`CONVERTERS` that writes ``images/<case>.png`` (8-bit RGB or
gray), ``masks/<case>.png`` (values exactly as the source had them), ``fov/<case>.png`` (only for
an official FOV) into a staging folder through :class:`RawWriter`. Case names:

- STARE: ``im0001`` … (the file stems); no group (seed 000's split lives in the split stage).
- DRIVE: ``21_training`` … ``40_training`` (group ``train``) and ``01_test`` … ``20_test``
  (group ``test``): the stems of DRIVE's own image files, so per-image results match the literature.
- ISBI 2012: ``isbi_00`` … ``isbi_29`` (slice index of ``train-volume.tif``; group ``train``).
- folder: the image file stems; synthetic: the generator's names.
"""

import hashlib
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pooch
import requests
import tifffile

from unetops.config import Config
from unetops.console import console, log, track
from unetops.errors import UnetopsError
from unetops.io import atomic_path, decode_image, read_image, write_csv, write_png

MIRROR_ENV = "UNETOPS_MIRROR"
#: (connect, read) seconds: an unreachable server fails fast and the message suggests the mirror.
NETWORK_TIMEOUT = (5, 30)
TIFF_SUFFIXES = {".tif", ".tiff"}


@dataclass(frozen=True)
class Archive:
    """One official file: where it sits in the mirror, its pinned digest and size, its address."""

    mirror_path: str
    sha256: str
    size: int
    url: str | None
    note: str = ""

    @property
    def name(self) -> str:
        return PurePosixPath(self.mirror_path).name


_STARE = "https://cecas.clemson.edu/~ahoover/stare/probing"
_ISBI = "http://brainiac2.mit.edu/isbi_challenge/sites/default/files"

#: The pinned archives, keyed by file name (also their name in ``data/archives/``).
ARCHIVES: dict[str, Archive] = {
    archive.name: archive for archive in (
        Archive("stare/stare-images.tar",
                "af85fda344032b06aabb416fdbe5858a88cf6d264df0533d092b913533b8038c", 18677760,
                f"{_STARE}/stare-images.tar"),
        Archive("stare/labels-ah.tar",
                "4d739b4ffe39e38d3d7c16e22c8520f529bfc842eb819dee65092ef85c798555", 215040,
                f"{_STARE}/labels-ah.tar"),
        Archive("stare/labels-vk.tar",
                "3f5ab1433d6f798ffc8f57509e2cfefa49c7bcf77e05872146cf41135b60b2df", 286720,
                f"{_STARE}/labels-vk.tar"),
        Archive("drive/DRIVE.zip",
                "f6e9d8d9faee31fb9038222db620c099a9951b86e1e0cbd09c52858e374d3446", 29756949,
                None, "DRIVE is distributed after registration at "
                      "https://drive.grand-challenge.org/"),
        Archive("isbi2012/train-volume.tif",
                "261a389e692cf0457dab989f57e4acc0224c0ee07f9a84a766a5f858110c0a52", 7868160,
                f"{_ISBI}/train-volume.tif"),
        Archive("isbi2012/train-labels.tif",
                "ca6df7beca0a7ecb21975db088fa504056d419f6705beff9136b9dca8a023659", 7868160,
                f"{_ISBI}/train-labels.tif"),
    )
}


# --- fetching ---------------------------------------------------------------------------------

def shown_path(path: Path, cfg: Config) -> str:
    """``path`` as messages show it: relative to the project root when inside it."""
    try:
        return Path(path).resolve().relative_to(cfg.paths.root.resolve()).as_posix()
    except ValueError:
        return str(path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _mismatch(where: str, archive: Archive, path: Path, digest: str,
              action: str = "") -> UnetopsError:
    size = path.stat().st_size if path.exists() else 0
    truncated = f"; truncated, {size} of {archive.size} bytes" if size < archive.size else ""
    return UnetopsError(f"{where}: SHA256 mismatch (expected {archive.sha256}, got {digest})"
                        f"{truncated}{action}")


def mirror_root(cfg: Config) -> Path | None:
    """The folder named by ``UNETOPS_MIRROR`` (relative to the project root), or None if unset."""
    value = os.environ.get(MIRROR_ENV, "").strip()
    if not value:
        return None
    root = cfg.paths.abs(Path(value).expanduser())
    if not root.is_dir():
        raise UnetopsError(f"{MIRROR_ENV}={value}: folder not found")
    return root


def _copy_verified(source: Path, target: Path, archive: Archive) -> None:
    """Copy ``source`` to ``target`` atomically, hashing on the way; a mismatch leaves no file."""
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != archive.sha256:
            raise _mismatch(str(source), archive, source, digest.hexdigest(),
                            "; the mirror must hold byte-identical copies of the official files")


def _download(archive: Archive, target: Path, shown_target: str) -> None:
    """Fetch the official address into ``target`` (atomically) and verify the digest."""
    if archive.url is None:
        raise UnetopsError(f"{archive.name}: no public download address ({archive.note}); "
                           f"put it at {shown_target} or set {MIRROR_ENV} to a folder holding "
                           f"{archive.mirror_path}")
    log.info("downloading %s", archive.url)
    downloader = pooch.HTTPDownloader(timeout=NETWORK_TIMEOUT, progressbar=console.is_terminal)
    with atomic_path(target) as tmp:
        try:
            downloader(archive.url, str(tmp), None)
        except requests.RequestException as exc:
            raise UnetopsError(f"{archive.url}: download failed ({exc.__class__.__name__}); "
                               f"set {MIRROR_ENV} to a folder with copies of the archives "
                               "(layout of ../shared/datasets)") from None
        digest = sha256_of(tmp)
        if digest != archive.sha256:
            raise _mismatch(archive.url, archive, tmp, digest, "; the download was deleted")


def fetch_archive(name: str, cfg: Config) -> Path:
    """The verified local copy of ``ARCHIVES[name]``: from the cache, else the mirror, else the web.

    A cached file with the wrong digest is deleted and reported (run again to fetch it anew);
    a mirror file with the wrong digest is an error too, never a silent fallback to the network.
    """
    archive = ARCHIVES[name]
    cached = cfg.paths.archives / archive.name
    if cached.is_file():
        digest = sha256_of(cached)
        if digest == archive.sha256:
            return cached
        error = _mismatch(shown_path(cached, cfg), archive, cached, digest,
                          "; deleted it, run again to fetch a fresh copy")
        cached.unlink()
        raise error
    mirror = mirror_root(cfg)
    if mirror is not None and (mirror / archive.mirror_path).is_file():
        log.info("copying %s from the mirror", archive.mirror_path)
        _copy_verified(mirror / archive.mirror_path, cached, archive)
        return cached
    if mirror is not None:
        log.warning("%s is not in the mirror %s; trying the official address", archive.mirror_path,
                    mirror)
    _download(archive, cached, shown_path(cached, cfg))
    return cached


# --- safe reading of archives -----------------------------------------------------------------

def unsafe_reason(name: str) -> str | None:
    """Why a member name could write outside the extraction folder, or None if it cannot."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        return "absolute path"
    if ".." in PurePosixPath(posix).parts:
        return "parent-directory reference"
    return None


class SafeArchive:
    """A tar or zip archive whose members were all checked when it was opened.

    Refuses the whole archive (``<archive>: unsafe member <name> (<why>)``) if any member has an
    absolute path, a ``..`` component, or is a link or device; then serves regular files by name.
    """

    def __init__(self, path: Path, shown: str):
        self.path, self.shown = Path(path), shown
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, object] = {}
        try:
            if zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                infos = self._zip.infolist()
                for info in infos:
                    self._check(info.filename, self._zip_kind(info))
                self._members = {i.filename: i for i in infos if not i.is_dir()}
            else:
                self._tar = tarfile.open(self.path)
                members = self._tar.getmembers()
                for member in members:
                    self._check(member.name, self._tar_kind(member))
                self._members = {m.name: m for m in members if m.isfile()}
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            self.close()
            raise UnetopsError(f"{shown}: not a readable archive ({_reason(exc)})") from None
        except UnetopsError:
            self.close()
            raise

    @staticmethod
    def _zip_kind(info: zipfile.ZipInfo) -> str | None:
        return "symbolic link" if stat.S_ISLNK(info.external_attr >> 16) else None

    @staticmethod
    def _tar_kind(member: tarfile.TarInfo) -> str | None:
        if member.issym():
            return "symbolic link"
        if member.islnk():
            return "hard link"
        if not (member.isfile() or member.isdir()):
            return "device or special file"
        return None

    def _check(self, name: str, kind: str | None) -> None:
        reason = unsafe_reason(name) or kind
        if reason:
            raise UnetopsError(f"{self.shown}: unsafe member {name} ({reason})")

    @property
    def names(self) -> list[str]:
        """Regular files, sorted."""
        return sorted(self._members)

    def read(self, name: str) -> bytes:
        if name not in self._members:
            raise UnetopsError(f"{self.shown}: missing member {name}")
        try:
            if self._zip is not None:
                return self._zip.read(self._members[name])
            return self._tar.extractfile(self._members[name]).read()
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise UnetopsError(f"{self.shown}: member {name} is unreadable "
                               f"({_reason(exc)})") from None

    def close(self) -> None:
        for handle in (self._zip, self._tar):
            if handle is not None:
                handle.close()

    def __enter__(self) -> "SafeArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


# --- decoding ---------------------------------------------------------------------------------

def image_8bit(image: np.ndarray, where: str) -> np.ndarray:
    """Images are stored 8-bit: other depths are scaled min–max per image (logged)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    log.warning("%s: %s image scaled min-max to 8 bits", where, image.dtype)
    values = image.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((values - low) * scale).astype(np.uint8)


def mask_as_stored(mask: np.ndarray, where: str) -> np.ndarray:
    """A mask's values unchanged (0/1, 0/255, labels …) as a gray uint8/uint16 array for PNG.

    Colour masks collapse to their channel maximum (a gray mask saved as RGB keeps its values);
    whether the values are binary is the split stage's validation, not decided here.
    """
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if mask.dtype in (np.uint8, np.uint16):
        return mask
    if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
        raise UnetopsError(f"{where}: mask has non-integer values (expect 0/1, 0/255 or boolean)")
    if mask.min() < 0 or mask.max() > 65535:
        raise UnetopsError(f"{where}: mask values outside 0..65535 (expect 0/1, 0/255 or boolean)")
    return mask.astype(np.uint8 if mask.max() <= 255 else np.uint16)


class RawWriter:
    """Writes one case at a time into the staging copy of ``data/raw`` and remembers its group."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.rows: list[dict[str, str]] = []
        self._seen: set[str] = set()

    def add(self, case: str, image: np.ndarray, mask: np.ndarray, fov: np.ndarray | None = None,
            group: str = "", where: str = "") -> None:
        where = where or case
        if case in self._seen:
            raise UnetopsError(f"{where}: case {case} appears twice")
        self._seen.add(case)
        write_png(self.root / "images" / f"{case}.png", image_8bit(image, where))
        write_png(self.root / "masks" / f"{case}.png", mask_as_stored(mask, where))
        if fov is not None:
            fov = fov.max(axis=2) if fov.ndim == 3 else fov
            write_png(self.root / "fov" / f"{case}.png", fov > 0)
        self.rows.append({"case": case, "group": group})

    def write_cases(self) -> int:
        frame = pd.DataFrame(self.rows, columns=["case", "group"]).sort_values("case")
        write_csv(self.root / "cases.csv", frame)
        return len(frame)


# --- the datasets -----------------------------------------------------------------------------

def _open(name: str, cfg: Config) -> SafeArchive:
    path = fetch_archive(name, cfg)
    return SafeArchive(path, shown_path(path, cfg))


def convert_stare(cfg: Config, out: RawWriter) -> None:
    """Hoover's 20 STARE images with the ``ah`` or ``vk`` labels (``data.stare_labels``)."""
    labeller = cfg.data.stare_labels
    with _open(f"labels-{labeller}.tar", cfg) as labels:
        labels_shown, masks = labels.shown, {}
        for name in labels.names:
            match = re.fullmatch(rf"(?:.*/)?(im\d{{4}})\.{labeller}\.ppm\.gz", name)
            if match:
                masks[match[1]] = (name, labels.read(name))
    with _open("stare-images.tar", cfg) as images:
        members = [(m[1], n) for n in images.names
                   if (m := re.fullmatch(r"(?:.*/)?(im\d{4})\.ppm\.gz", n))]
        for case, name in track(members, "STARE", total=len(members)):
            if case not in masks:
                raise UnetopsError(f"{labels_shown}: no label for {case}")
            where = f"{images.shown}:{name}"
            out.add(case, decode_image(images.read(name), name),
                    decode_image(masks[case][1], masks[case][0]), where=where)


def convert_drive(cfg: Config, out: RawWriter) -> None:
    """DRIVE's official 20 training and 20 test images, ``1st_manual`` labels, official FOV."""
    with _open("DRIVE.zip", cfg) as archive:
        pattern = r"(.*?)(training|test)/images/(\d+)_(training|test)\.tif"
        members = [(m, n) for n in archive.names if (m := re.fullmatch(pattern, n))]
        if not members:
            raise UnetopsError(f"{archive.shown}: no DRIVE images (training/images/*.tif)")
        for match, name in track(members, "DRIVE", total=len(members)):
            prefix, folder, number = match[1], match[2], match[3]
            base = f"{prefix}{folder}"
            out.add(f"{number}_{folder}", decode_image(archive.read(name), name),
                    decode_image(archive.read(f"{base}/1st_manual/{number}_manual1.gif"), name),
                    fov=decode_image(archive.read(f"{base}/mask/{number}_{folder}_mask.gif"), name),
                    group="train" if folder == "training" else "test",
                    where=f"{archive.shown}:{name}")


def _read_volume(name: str, cfg: Config) -> np.ndarray:
    path = fetch_archive(name, cfg)
    try:
        volume = tifffile.imread(path)
    except (ValueError, OSError, tifffile.TiffFileError) as exc:
        raise UnetopsError(f"{shown_path(path, cfg)}: not a readable TIFF "
                           f"({_reason(exc)})") from None
    if volume.ndim != 3:
        raise UnetopsError(f"{shown_path(path, cfg)}: expected a stack of 2-D slices, "
                           f"got shape {volume.shape}")
    return volume


def convert_isbi2012(cfg: Config, out: RawWriter) -> None:
    """The 30 labelled ISBI 2012 EM slices; the mask is the membrane (label 0), stored as 255."""
    volume = _read_volume("train-volume.tif", cfg)
    labels = _read_volume("train-labels.tif", cfg)
    if volume.shape != labels.shape:
        raise UnetopsError(f"train-labels.tif: shape {labels.shape} differs from "
                           f"train-volume.tif {volume.shape}")
    for index in track(range(len(volume)), "ISBI 2012", total=len(volume)):
        membrane = np.where(labels[index] == 0, 255, 0).astype(np.uint8)
        out.add(f"isbi_{index:02d}", volume[index], membrane, group="train")


def convert_synthetic(cfg: Config, out: RawWriter) -> None:
    """Seeded fundus-like images with exact masks and FOVs (no network)."""
    from unetops.synthetic import synthetic_dataset

    spec = cfg.data.synthetic
    cases = synthetic_dataset(spec.n_images, spec.size, spec.seed)
    for case, image, mask, fov in track(cases, "synthetic", total=spec.n_images):
        out.add(case, image, mask, fov=fov)


def _files_by_stem(folder: Path, key: str, cfg: Config) -> dict[str, Path]:
    """Regular, non-hidden files of ``folder`` keyed by stem (``x.ppm.gz`` → ``x``)."""
    shown = shown_path(folder, cfg)
    if not folder.is_dir():
        raise UnetopsError(f"{shown}: folder not found ({key})")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stem = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
        stem = PurePosixPath(stem).stem
        if stem in files:
            raise UnetopsError(f"{shown}: two files with the stem {stem} "
                               f"({files[stem].name}, {path.name})")
        files[stem] = path
    if not files:
        raise UnetopsError(f"{shown}: no image files ({key})")
    return files


def folder_layout(cfg: Config) -> tuple[Path, Path, Path | None]:
    """Images, masks and optional FOV folders; an nnU-Net raw folder needs ``images`` only."""
    spec = cfg.data.folder
    images = cfg.paths.abs(spec.images)
    if spec.masks is not None:
        masks = cfg.paths.abs(spec.masks)
    elif (images / "imagesTr").is_dir() and (images / "labelsTr").is_dir():
        images, masks = images / "imagesTr", images / "labelsTr"
    else:
        raise UnetopsError("data.folder.masks: required unless data.folder.images is an nnU-Net "
                           "raw dataset folder (with imagesTr/ and labelsTr/)")
    return images, masks, cfg.paths.abs(spec.fov) if spec.fov is not None else None


def pair_by_stem(images: dict[str, Path], masks: dict[str, Path], cfg: Config) -> dict[str, Path]:
    """Case → image file. An nnU-Net channel suffix ``_0000`` is dropped to find the label."""
    cases: dict[str, Path] = {}
    for stem, path in images.items():
        case = stem
        if case not in masks and case.endswith("_0000") and case[:-5] in masks:
            case = case[:-5]
        if case not in masks:
            raise UnetopsError(f"{shown_path(path, cfg)}: no mask with the same file stem in "
                               f"{shown_path(next(iter(masks.values())).parent, cfg)}")
        cases[case] = path
    for stem, path in masks.items():
        if stem not in cases:
            raise UnetopsError(f"{shown_path(path, cfg)}: no image with the same file stem in "
                               f"{shown_path(next(iter(images.values())).parent, cfg)}")
    return cases


def convert_folder(cfg: Config, out: RawWriter) -> None:
    """A user's image/mask pairs (any OpenCV/tifffile format), matched by file stem.

    The optional FOV folder is matched the same way; without one, no FOV is written and the split
    stage gives every case an all-ones FOV (FOV estimation only makes sense for fundus photos).
    """
    images_dir, masks_dir, fov_dir = folder_layout(cfg)
    images = _files_by_stem(images_dir, "data.folder.images", cfg)
    masks = _files_by_stem(masks_dir, "data.folder.masks", cfg)
    cases = pair_by_stem(images, masks, cfg)
    fovs = _files_by_stem(fov_dir, "data.folder.fov", cfg) if fov_dir is not None else None
    for case, image_path in track(sorted(cases.items()), "folder", total=len(cases)):
        fov = None
        if fovs is not None:
            if case not in fovs:
                raise UnetopsError(f"{shown_path(image_path, cfg)}: no FOV with the same file stem "
                                   f"in {shown_path(fov_dir, cfg)}")
            fov = read_image(fovs[case], shown_path(fovs[case], cfg))
        shown, mask_shown = shown_path(image_path, cfg), shown_path(masks[case], cfg)
        mask = mask_as_stored(read_image(masks[case], mask_shown), mask_shown)
        out.add(case, read_image(image_path, shown), mask, fov=fov, where=shown)


#: One converter per ``data.dataset``.
CONVERTERS: dict[str, Callable[[Config, RawWriter], None]] = {
    "stare": convert_stare,
    "drive": convert_drive,
    "isbi2012": convert_isbi2012,
    "folder": convert_folder,
    "synthetic": convert_synthetic,
}


def convert(cfg: Config, staging: Path) -> int:
    """Convert ``cfg.data.dataset`` into ``staging`` (the future ``data/raw``); returns #cases."""
    writer = RawWriter(staging)
    CONVERTERS[cfg.data.dataset](cfg, writer)
    if not writer.rows:
        raise UnetopsError(f"data.dataset: {cfg.data.dataset} gave no cases")
    return writer.write_cases()


__all__ = ["ARCHIVES", "Archive", "CONVERTERS", "MIRROR_ENV", "RawWriter", "SafeArchive",
           "convert", "fetch_archive", "mirror_root", "sha256_of", "unsafe_reason"]
