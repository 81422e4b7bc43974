import gzip
import hashlib
import io
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from unetops import datasets
from unetops.datasets import (ARCHIVES, SafeArchive, decode_image, fetch_archive, mask_as_stored,
                              unsafe_reason)
from unetops.errors import UnetopsError


def make_tar(path: Path, members: dict[str, bytes],
             links: dict[str, tuple[bytes, str]] | None = None) -> Path:
    """A tar of regular files, plus links {name: (type, target)} (tarfile.SYMTYPE / LNKTYPE)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return path


def pin(monkeypatch, name: str, path: Path, url: str | None = None) -> None:
    """Pin ``ARCHIVES[name]`` to the digest of a test file (as if it were the official one)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    pinned = replace(ARCHIVES[name], sha256=digest, size=len(data), url=url)
    monkeypatch.setitem(ARCHIVES, name, pinned)


# --- member checks ----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "reason"), [
    ("/etc/passwd", "absolute path"),
    ("C:\\Windows\\evil.dll", "absolute path"),
    ("../evil.txt", "parent-directory reference"),
    ("images/../../evil.txt", "parent-directory reference"),
    ("images\\..\\..\\evil.txt", "parent-directory reference"),
    ("images/im0001.ppm.gz", None),
    ("a..b/c.png", None),
])
def test_unsafe_member_names(name, reason):
    assert unsafe_reason(name) == reason


def test_tar_with_parent_member_is_refused_before_reading(tmp_path):
    archive = make_tar(tmp_path / "x.tar", {"ok.png": b"1", "../evil.txt": b"owned"})
    with pytest.raises(UnetopsError) as err:
        SafeArchive(archive, "x.tar")
    assert str(err.value) == "x.tar: unsafe member ../evil.txt (parent-directory reference)"
    assert not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.parametrize(("kind", "reason"), [(tarfile.SYMTYPE, "symbolic link"),
                                              (tarfile.LNKTYPE, "hard link")])
def test_tar_links_are_refused(tmp_path, kind, reason):
    archive = make_tar(tmp_path / "x.tar", {"a.png": b"1"}, {"b.png": (kind, "/etc/passwd")})
    with pytest.raises(UnetopsError, match=rf"^x.tar: unsafe member b.png \({reason}\)$"):
        SafeArchive(archive, "x.tar")


def test_zip_symlink_and_absolute_members_are_refused(tmp_path):
    link = zipfile.ZipInfo("link.png")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "l.zip", "w") as archive:
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(UnetopsError, match=r"^l.zip: unsafe member link.png \(symbolic link\)$"):
        SafeArchive(tmp_path / "l.zip", "l.zip")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as archive:
        archive.writestr("/abs.png", b"1")
    with pytest.raises(UnetopsError, match=r"unsafe member /abs.png \(absolute path\)"):
        SafeArchive(tmp_path / "a.zip", "a.zip")


def test_safe_archive_serves_regular_files(tmp_path):
    archive = make_tar(tmp_path / "x.tar", {"d/b.png": b"bee", "a.png": b"ay"})
    with SafeArchive(archive, "x.tar") as opened:
        assert opened.names == ["a.png", "d/b.png"]
        assert opened.read("d/b.png") == b"bee"
        with pytest.raises(UnetopsError, match="^x.tar: missing member c.png$"):
            opened.read("c.png")


def test_truncated_tar_is_not_readable(tmp_path):
    full = make_tar(tmp_path / "x.tar", {"a.png": bytes(5000), "b.png": bytes(5000)}).read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[:700])
    unreadable = "^cut.tar: (not a readable archive|member .* is unreadable)"
    with pytest.raises(UnetopsError, match=unreadable):
        with SafeArchive(tmp_path / "cut.tar", "cut.tar") as opened:
            [opened.read(name) for name in opened.names]


# --- decoding ---------------------------------------------------------------------------------

def test_decode_gzipped_ppm_as_rgb():
    image = np.zeros((4, 5, 3), np.uint8)
    image[..., 0] = 200
    ok, ppm = cv2.imencode(".ppm", image[..., ::-1])
    decoded = decode_image(gzip.compress(ppm.tobytes()), "im0001.ppm.gz")
    assert decoded.shape == (4, 5, 3) and decoded[0, 0].tolist() == [200, 0, 0]


def test_decode_lzw_tiff_without_imagecodecs():
    image = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    ok, tif = cv2.imencode(".tif", image[..., ::-1])  # OpenCV writes LZW-compressed TIFF
    assert np.array_equal(decode_image(tif.tobytes(), "01_test.tif"), image)


def test_decode_bool_tiff_keeps_values():
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.array([[True, False]]))
    assert decode_image(buffer.getvalue(), "m.tif").tolist() == [[True, False]]


def test_not_an_image_names_the_file():
    with pytest.raises(UnetopsError, match="^notes.png: not a readable image"):
        decode_image(b"hello, not a picture", "notes.png")


def test_masks_keep_their_values():
    assert mask_as_stored(np.array([[0, 1]], np.uint8), "m").tolist() == [[0, 1]]
    assert mask_as_stored(np.array([[True, False]]), "m").tolist() == [[1, 0]]
    assert mask_as_stored(np.array([[0.0, 255.0]]), "m").dtype == np.uint8
    rgb = np.dstack([np.array([[0, 255]], np.uint8)] * 3)
    assert mask_as_stored(rgb, "m").tolist() == [[0, 255]]
    with pytest.raises(UnetopsError, match="^m: mask has non-integer values"):
        mask_as_stored(np.array([[0.0, 0.5]]), "m")


# --- fetching ---------------------------------------------------------------------------------

@pytest.fixture
def fake_mirror(tmp_path, monkeypatch):
    """A mirror folder holding a small stand-in for labels-ah.tar, pinned as if it were official."""
    mirror = tmp_path / "mirror"
    (mirror / "stare").mkdir(parents=True)
    archive = make_tar(mirror / "stare" / "labels-ah.tar", {"im0001.ah.ppm.gz": b"x"})
    pin(monkeypatch, "labels-ah.tar", archive)
    monkeypatch.setenv("UNETOPS_MIRROR", str(mirror))
    return mirror


def test_mirror_copy_is_cached_and_reverified(project, fake_mirror, monkeypatch):
    cfg = project()
    cached = fetch_archive("labels-ah.tar", cfg)
    assert cached == cfg.paths.archives / "labels-ah.tar"
    assert cached.read_bytes() == (fake_mirror / "stare" / "labels-ah.tar").read_bytes()
    monkeypatch.delenv("UNETOPS_MIRROR")
    assert fetch_archive("labels-ah.tar", cfg) == cached


def test_wrong_mirror_file_names_file_and_both_digests(project, fake_mirror):
    cfg = project()
    bad = fake_mirror / "stare" / "labels-ah.tar"
    bad.write_bytes(b"not the archive")
    got = hashlib.sha256(b"not the archive").hexdigest()
    with pytest.raises(UnetopsError) as err:
        fetch_archive("labels-ah.tar", cfg)
    expected = ARCHIVES["labels-ah.tar"].sha256
    assert str(err.value).startswith(f"{bad}: SHA256 mismatch (expected {expected}, got {got})")
    assert not cfg.paths.archives.exists() or not any(cfg.paths.archives.iterdir())


def test_bad_cached_file_is_deleted_and_reported(project):
    cfg = project()
    cached = cfg.paths.archives / "stare-images.tar"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half an archive")
    with pytest.raises(UnetopsError) as err:
        fetch_archive("stare-images.tar", cfg)
    message = str(err.value)
    assert message.startswith("data/archives/stare-images.tar: SHA256 mismatch (expected "
                              f"{ARCHIVES['stare-images.tar'].sha256}, got "
                              f"{hashlib.sha256(b'half an archive').hexdigest()})")
    assert "truncated, 15 of 18677760 bytes" in message
    assert not cached.exists()


def test_mirror_folder_must_exist(project, monkeypatch):
    cfg = project()
    monkeypatch.setenv("UNETOPS_MIRROR", "no/such/folder")
    with pytest.raises(UnetopsError, match="^UNETOPS_MIRROR=no/such/folder: folder not found$"):
        fetch_archive("labels-ah.tar", cfg)


def test_unreachable_server_suggests_the_mirror(project, monkeypatch, tmp_path):
    cfg = project()
    monkeypatch.delenv("UNETOPS_MIRROR", raising=False)
    url = "http://127.0.0.1:9/labels-ah.tar"  # the discard port: refused at once, no internet
    monkeypatch.setitem(ARCHIVES, "labels-ah.tar", replace(ARCHIVES["labels-ah.tar"], url=url))
    with pytest.raises(UnetopsError, match=rf"^{url}: download failed \(ConnectionError\); set "
                                           "UNETOPS_MIRROR"):
        fetch_archive("labels-ah.tar", cfg)
    assert not (cfg.paths.archives / "labels-ah.tar").exists()


def test_drive_without_mirror_explains_registration(project, monkeypatch):
    cfg = project()
    monkeypatch.delenv("UNETOPS_MIRROR", raising=False)
    with pytest.raises(UnetopsError, match=r"^DRIVE.zip: no public download address \(DRIVE is "
                                           r"distributed after registration"):
        fetch_archive("DRIVE.zip", cfg)


@pytest.mark.mirror
def test_pinned_digests_match_the_mirror(mirror):
    listed = dict(line.split()[::-1] for line in (mirror / "SHA256SUMS").read_text().splitlines())
    for archive in ARCHIVES.values():
        assert listed[archive.mirror_path] == archive.sha256
        assert (mirror / archive.mirror_path).stat().st_size == archive.size


def test_every_dataset_has_a_converter():
    from typing import get_args

    from unetops.config import DataConfig

    assert set(datasets.CONVERTERS) == set(get_args(DataConfig.model_fields["dataset"].annotation))
