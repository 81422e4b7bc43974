import gzip

import cv2
import numpy as np
import pytest
import tifffile

from unetops.errors import UnetopsError
from unetops.io import atomic_dir, atomic_path, load_arrays, read_image, read_mask, save_arrays, write_png


def test_png_round_trip_rgb_gray_16bit(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    deep = np.random.default_rng(1).integers(0, 65536, (5, 7), dtype=np.uint16)
    write_png(tmp_path / "deep.png", deep)
    back = read_image(tmp_path / "deep.png")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, deep)


def test_reads_gzipped_ppm_and_tiff(tmp_path):
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    ok, ppm = cv2.imencode(".ppm", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (tmp_path / "a.ppm.gz").write_bytes(gzip.compress(ppm.tobytes()))
    np.testing.assert_array_equal(read_image(tmp_path / "a.ppm.gz"), rgb)
    tifffile.imwrite(tmp_path / "a.tif", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), rgb)


@pytest.mark.parametrize("stored", [np.uint8(1), np.uint8(255), True])
def test_masks_stored_any_binary_way(tmp_path, stored):
    mask = np.zeros((4, 4), bool)
    mask[1:3, 2] = True
    tifffile.imwrite(tmp_path / "m.tif", np.where(mask, stored, 0).astype(type(stored)))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif"), mask)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(UnetopsError, match=r"bad\.png: not a readable image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(UnetopsError, match=r"missing\.png: file not found"):
        read_image(tmp_path / "missing.png")


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_dir_swaps_whole_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_arrays_round_trip(tmp_path):
    image = np.random.default_rng(0).random((3, 4, 1), dtype=np.float32)
    save_arrays(tmp_path / "c.npz", image=image, mask=np.ones((3, 4), np.uint8))
    back = load_arrays(tmp_path / "c.npz")
    np.testing.assert_array_equal(back["image"], image)
    assert back["mask"].dtype == np.uint8


def test_same_arrays_same_bytes(tmp_path):
    image = np.random.default_rng(0).random((8, 8, 1), dtype=np.float32)
    save_arrays(tmp_path / "a.npz", image=image)
    save_arrays(tmp_path / "b.npz", image=image)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
