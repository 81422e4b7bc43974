"""Image and file I/O at the edges: every read names the file on failure, every write is atomic.

Atomic means written to a temporary name in the same folder and then ``os.replace``-d, so an
interrupted stage never leaves a half-written file that DVC could cache.
"""

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import tifffile

from unetops.errors import UnetopsError

TIFF_SUFFIXES = {".tif", ".tiff"}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix,
                                   dir=path.parent)
    except OSError as exc:
        raise UnetopsError(f"{path}: cannot write ({exc.strerror})") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        raise UnetopsError(f"{path}: cannot write ({exc.strerror})") from exc
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces the folder ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise UnetopsError(f"{path}: cannot write ({exc.strerror})") from exc
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise UnetopsError(f"{path}: cannot write ({exc.strerror})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(*folders: Path) -> None:
    """Fail in one line, before any work, when an output folder cannot take new files.

    It tries what :func:`atomic_path` will do (create the folder and a temporary file in it):
    permission bits alone do not tell (root, ACLs, read-only mounts).
    """
    for folder in folders:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".unetops-probe.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise UnetopsError(f"{folder}: cannot write ({exc.strerror})") from None
        os.close(fd)
        os.unlink(probe)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, frame) -> None:
    """Write a pandas DataFrame as CSV (no index), atomically."""
    write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode an image file's bytes (``.gz`` too): RGB ``(H, W, 3)`` or gray ``(H, W)``, native dtype.

    TIFFs go through tifffile (multi-page, bool, float) and fall back to OpenCV for compressions
    tifffile cannot decode without ``imagecodecs`` (DRIVE's LZW TIFFs); everything else is OpenCV.
    An alpha channel is dropped. ``name`` is what an error message shows.
    """
    suffix = PurePosixPath(name).suffix.lower()
    try:
        if suffix == ".gz":
            data = gzip.decompress(data)
            suffix = PurePosixPath(PurePosixPath(name).stem).suffix.lower()
        image = None
        if suffix in TIFF_SUFFIXES:
            try:
                image = tifffile.imread(io.BytesIO(data))
            except (ValueError, tifffile.TiffFileError):
                image = None
        if image is None:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if image is not None and image.ndim == 3:
                image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4
                                     else cv2.COLOR_BGR2RGB)
    except (OSError, EOFError, zlib.error, cv2.error) as exc:
        raise UnetopsError(f"{name}: not a readable image ({exc.__class__.__name__})") from None
    if image is None or np.asarray(image).size == 0:
        raise UnetopsError(f"{name}: not a readable image")
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if image.ndim == 3 and image.shape[2] in (2, 4):
        image = image[..., : image.shape[2] - 1]
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim != 2 and not (image.ndim == 3 and image.shape[2] == 3):
        raise UnetopsError(f"{name}: not a 2-D gray or RGB image (shape {image.shape})")
    return image


def read_image(path: Path, shown: str | None = None) -> np.ndarray:
    """Read any image OpenCV or tifffile can read (see :func:`decode_image`); errors show ``shown``."""
    shown = shown or str(path)
    if not Path(path).is_file():
        raise UnetopsError(f"{shown}: file not found")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnetopsError(f"{shown}: cannot read ({exc.strerror})") from None
    return decode_image(data, shown)


def read_mask(path: Path) -> np.ndarray:
    """Read a mask stored 0/1, 0/255 or boolean as a bool array (any nonzero pixel is foreground).

    Whether the file is really binary is the validation suite's job (``unetops.validation``).
    """
    mask = read_image(path)
    if mask.ndim == 3:
        mask = mask[..., 0]
    return mask > 0


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an 8- or 16-bit gray or RGB image as a lossless PNG, atomically."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise UnetopsError(f"{path}: cannot encode PNG")
    write_bytes(path, encoded.tobytes())


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Save named arrays as one ``.npz`` (lossless, deflate level 1), atomically and byte-reproducibly.

    ``np.savez_compressed`` stamps the current time into the zip, so identical arrays would give
    files with different DVC hashes; fixed timestamps make the same arrays the same bytes.
    """
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                             buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise UnetopsError(f"{path}: not a readable array file ({exc})") from exc
