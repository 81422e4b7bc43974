import gzip
import hashlib
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from unetops.cli import app
from unetops.datasets import ARCHIVES
from unetops.errors import UnetopsError
from unetops.io import read_image
from unetops.stages import download
from tests.conftest import SYNTHETIC
from tests.test_datasets import make_tar, pin


def cli(stage: str):
    """Run ``unetops <stage>`` in the current project; returns (exit code, the error lines)."""
    result = CliRunner().invoke(app, [stage, "--params", "params.yaml"])
    errors = [line for line in result.output.splitlines() if line.startswith("unetops: error:")]
    return result.exit_code, errors


def tiny_image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def tiny_mask(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed + 100).random((size, size)) > 0.7


def make_folder(root: Path, fov: bool = False) -> Path:
    """JPEG/PNG/TIFF images with a 1-bit PNG, a 0/1 PNG and a boolean TIFF mask."""
    for sub in ("images", "masks") + (("fov",) if fov else ()):
        (root / sub).mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "a.jpg"), tiny_image(0))
    cv2.imwrite(str(root / "images" / "b.png"), tiny_image(1)[..., ::-1])
    tifffile.imwrite(root / "images" / "c.tif", tiny_image(2))
    Image.fromarray(tiny_mask(0)).save(root / "masks" / "a.png")  # mode "1": a 1-bit PNG
    cv2.imwrite(str(root / "masks" / "b.png"), tiny_mask(1).astype(np.uint8))
    tifffile.imwrite(root / "masks" / "c.tif", tiny_mask(2))
    if fov:
        for case in "abc":
            cv2.imwrite(str(root / "fov" / f"{case}.png"), np.full((16, 16), 255, np.uint8))
    return root


def folder_params(root: Path, fov: bool = False) -> dict:
    folder = {"images": str(root / "images"), "masks": str(root / "masks")}
    if fov:
        folder["fov"] = str(root / "fov")
    return {"data": {"dataset": "folder", "folder": folder}}


def test_synthetic_writes_exact_masks_and_fovs(project):
    cfg = project(**SYNTHETIC)
    download.run(cfg)
    cases = pd.read_csv(cfg.paths.raw_cases, keep_default_na=False)
    assert list(cases.columns) == ["case", "group"] and len(cases) == 8
    for case in cases["case"]:
        image = read_image(cfg.paths.raw / "images" / f"{case}.png")
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert set(np.unique(read_image(cfg.paths.raw / "masks" / f"{case}.png"))) == {0, 1}
        assert (cfg.paths.raw / "fov" / f"{case}.png").is_file()


def test_folder_of_mixed_formats_keeps_mask_values(project, tmp_path):
    cfg = project(**folder_params(make_folder(tmp_path / "user")))
    download.run(cfg)
    raw = cfg.paths.raw
    assert sorted(p.stem for p in (raw / "images").iterdir()) == ["a", "b", "c"]
    assert np.array_equal(read_image(raw / "images" / "b.png"), tiny_image(1))
    assert set(np.unique(read_image(raw / "masks" / "a.png"))) == {0, 255}
    assert set(np.unique(read_image(raw / "masks" / "b.png"))) == {0, 1}
    assert np.array_equal(read_image(raw / "masks" / "c.png") > 0, tiny_mask(2))
    assert not (raw / "fov").exists()


def test_folder_fov_folder_is_used(project, tmp_path):
    cfg = project(**folder_params(make_folder(tmp_path / "user", fov=True), fov=True))
    download.run(cfg)
    assert sorted(p.name for p in (cfg.paths.raw / "fov").iterdir()) == ["a.png", "b.png", "c.png"]


def test_nnunet_raw_layout(project, tmp_path):
    dataset = tmp_path / "Dataset001_Vessels"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for case in ("vessels_001", "vessels_002", "vessels_003"):
        cv2.imwrite(str(dataset / "imagesTr" / f"{case}_0000.png"), tiny_image(3))
        cv2.imwrite(str(dataset / "labelsTr" / f"{case}.png"), tiny_mask(3).astype(np.uint8))
    cfg = project(data={"dataset": "folder", "folder": {"images": str(dataset)}})
    download.run(cfg)
    assert pd.read_csv(cfg.paths.raw_cases)["case"].tolist() == ["vessels_001", "vessels_002",
                                                                  "vessels_003"]


def test_non_integer_mask_names_the_mask_file(project, tmp_path):
    user = make_folder(tmp_path / "user")
    (user / "masks" / "c.tif").unlink()
    tifffile.imwrite(user / "masks" / "c.tif", np.full((16, 16), 0.5, np.float32))
    cfg = project(**folder_params(user))
    with pytest.raises(UnetopsError, match="^user/masks/c.tif: mask has non-integer values"):
        download.run(cfg)


def test_failed_download_keeps_the_previous_raw(project, tmp_path):
    cfg = project(**SYNTHETIC)
    download.run(cfg)
    before = sorted(p.name for p in (cfg.paths.raw / "images").iterdir())
    user = make_folder(tmp_path / "user")
    (user / "images" / "b.png").write_text("not an image")
    project(**folder_params(user))
    assert cli("download")[0] == 1
    assert sorted(p.name for p in (cfg.paths.raw / "images").iterdir()) == before
    assert [p.name for p in cfg.paths.data.iterdir() if p.name.startswith(".")] == []


# --- bad input through the CLI: one line, exit code 1 -------------------------------------------

def test_cli_wrong_digest_in_mirror(project, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "stare").mkdir(parents=True)
    (mirror / "stare" / "labels-ah.tar").write_bytes(b"a wrong file")
    monkeypatch.setenv("UNETOPS_MIRROR", str(mirror))
    cfg = project()
    code, errors = cli("download")
    got = hashlib.sha256(b"a wrong file").hexdigest()
    assert code == 1
    assert errors == [f"unetops: error: {mirror}/stare/labels-ah.tar: SHA256 mismatch (expected "
                      f"{ARCHIVES['labels-ah.tar'].sha256}, got {got}); truncated, 12 of 215040 "
                      "bytes; the mirror must hold byte-identical copies of the official files"]
    assert not cfg.paths.raw.exists() and not (cfg.paths.archives / "labels-ah.tar").exists()


def test_cli_truncated_archive_is_deleted(project, monkeypatch):
    monkeypatch.delenv("UNETOPS_MIRROR", raising=False)
    cfg = project()
    cached = cfg.paths.archives / "labels-ah.tar"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\0" * 512)
    code, errors = cli("download")
    got = hashlib.sha256(b"\0" * 512).hexdigest()
    assert code == 1
    assert errors == ["unetops: error: data/archives/labels-ah.tar: SHA256 mismatch (expected "
                      f"{ARCHIVES['labels-ah.tar'].sha256}, got {got}); truncated, 512 of 215040 "
                      "bytes; deleted it, run again to fetch a fresh copy"]
    assert not cached.exists() and not cfg.paths.raw.exists()


def test_cli_tar_with_parent_member(project, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "stare").mkdir(parents=True)
    evil = make_tar(mirror / "stare" / "labels-ah.tar",
                    {"im0001.ah.ppm.gz": gzip.compress(b"P5 1 1 255\n\0"), "../evil.txt": b"owned"})
    pin(monkeypatch, "labels-ah.tar", evil)
    monkeypatch.setenv("UNETOPS_MIRROR", str(mirror))
    cfg = project()
    code, errors = cli("download")
    assert code == 1
    assert errors == ["unetops: error: data/archives/labels-ah.tar: unsafe member ../evil.txt "
                      "(parent-directory reference)"]
    assert not cfg.paths.raw.exists()
    assert not list(tmp_path.rglob("evil.txt"))


def test_cli_file_that_is_not_an_image(project, tmp_path):
    user = make_folder(tmp_path / "user")
    (user / "images" / "b.png").write_text("a text file, not a picture")
    project(**folder_params(user))
    code, errors = cli("download")
    assert code == 1
    assert errors == ["unetops: error: user/images/b.png: not a readable image"]


def test_cli_empty_folder(project, tmp_path):
    (tmp_path / "user" / "images").mkdir(parents=True)
    (tmp_path / "user" / "masks").mkdir()
    project(**folder_params(tmp_path / "user"))
    code, errors = cli("download")
    assert code == 1
    assert errors == ["unetops: error: user/images: no image files (data.folder.images)"]


def test_cli_unpaired_image(project, tmp_path):
    user = make_folder(tmp_path / "user")
    (user / "masks" / "c.tif").unlink()
    project(**folder_params(user))
    code, errors = cli("download")
    assert code == 1
    assert errors == ["unetops: error: user/images/c.tif: no mask with the same file stem in "
                      "user/masks"]


def test_cli_unknown_params_key(project):
    project()
    Path("params.yaml").write_text("data:\n  dataset: synthetic\n  colour: red\n")
    code, errors = cli("download")
    assert code == 1
    assert errors == ["unetops: error: params.yaml: data.colour: unknown key"]


@pytest.mark.mirror
def test_stare_vk_labels_are_selectable(project, mirror):
    cfg = project(data={"dataset": "stare", "stare_labels": "vk"})
    download.run(cfg)
    with tarfile.open(mirror / "stare" / "labels-vk.tar") as labels:
        ppm = gzip.decompress(labels.extractfile("im0001.vk.ppm.gz").read())
    expected = cv2.imdecode(np.frombuffer(ppm, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(read_image(cfg.paths.raw / "masks" / "im0001.png"), expected)
    assert len(pd.read_csv(cfg.paths.raw_cases)) == 20
