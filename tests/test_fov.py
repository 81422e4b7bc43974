import zipfile

import cv2
import numpy as np
import pytest

from unetops.fov import estimate_fov


def fundus_like(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dim-to-bright red disk on noisy dark ground, a dark lesion inside, a speck outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (0.4 * size) ** 2
    image = rng.integers(0, 12, (size, size, 3)).astype(np.uint8)
    gradient = np.linspace(60, 220, size)[None, :].repeat(size, 0)
    image[disk, 0] = gradient[disk].astype(np.uint8)
    image[disk, 1] = 60
    image[size // 2 - 4:size // 2 + 4, size // 2 - 4:size // 2 + 4] = 0
    image[2:5, 2:5, 0] = 250
    return image, disk


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_disk_is_found_with_holes_filled_and_specks_dropped():
    image, disk = fundus_like()
    fov = estimate_fov(image)
    assert fov.dtype == bool and fov.shape == disk.shape
    assert iou(fov, disk) > 0.97
    assert fov[48, 48], "the dark lesion inside the FOV must be filled"
    assert not fov[3, 3], "a bright speck outside the disk is not the largest component"


def test_gray_and_16_bit_images_work():
    image, disk = fundus_like()
    assert iou(estimate_fov(image[..., 0]), disk) > 0.97
    assert iou(estimate_fov(image[..., 0].astype(np.uint16) * 257), disk) > 0.97


def test_uniform_image_has_everything_inside():
    assert estimate_fov(np.full((16, 20, 3), 7, np.uint8)).all()


def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        estimate_fov(np.zeros((2, 3, 4, 5), np.uint8))


@pytest.mark.mirror
def test_matches_drive_official_fov(mirror):
    with zipfile.ZipFile(mirror / "drive" / "DRIVE.zip") as archive:
        for number in ("21", "30", "40"):
            data = archive.read(f"DRIVE/training/images/{number}_training.tif")
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            gif = archive.read(f"DRIVE/training/mask/{number}_training_mask.gif")
            official = cv2.imdecode(np.frombuffer(gif, np.uint8), cv2.IMREAD_GRAYSCALE) > 0
            assert iou(estimate_fov(image), official) > 0.98, number
