"""Augmentations keep image, mask and FOV aligned and binary; seeded; the U-Net weight map."""

import math

import numpy as np
import pytest
from scipy import ndimage

from unetops.config import AugmentConfig
from unetops.transforms import (affine_matrix, augment_case, case_rng, elastic_deform,
                                elastic_displacement, photometric_jitter, unet_weight_map,
                                warp_case)

SHAPE = (60, 80)
GEOMETRIC_ONLY = AugmentConfig(brightness={"prob": 0.0}, contrast={"prob": 0.0},
                               gamma={"prob": 0.0}, noise={"prob": 0.0})
EVERYTHING = AugmentConfig(
    flip={"prob": 1.0}, rotate={"prob": 1.0, "max": 180.0}, zoom={"prob": 1.0, "max": 0.2},
    shear={"prob": 1.0, "max": 10.0}, elastic={"prob": 1.0, "alpha": 60.0, "sigma": 4.0},
    brightness={"prob": 1.0, "max": 0.1}, contrast={"prob": 1.0, "max": 0.2},
    gamma={"prob": 1.0, "max": 0.2}, noise={"prob": 1.0, "max": 0.05})


def shape_case(centre=(22, 32), radius=7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same off-centre disc drawn into image, mask and FOV (clear of the reflected borders)."""
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    drawn = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    return drawn[..., None].astype(np.float32), drawn.astype(np.uint8), drawn.astype(np.uint8)


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


GEOMETRIES = {
    "flip_lr": {"flip_lr": True},
    "flip_ud": {"flip_ud": True},
    "rotate_37": {"angle": 37.0},
    "rotate_90": {"angle": 90.0},
    "zoom_in": {"scale": 1.3},
    "zoom_out": {"scale": 0.8},
    "shear_15": {"shear": 15.0},
    "all_at_once": {"angle": -120.0, "scale": 1.1, "shear": -8.0, "flip_lr": True},
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_geometric_transform_keeps_image_mask_fov_aligned(name):
    image, mask, fov = shape_case()
    matrix = affine_matrix(SHAPE, **GEOMETRIES[name])
    out_image, out_mask, out_fov = warp_case(image, mask, fov, matrix)
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    drawn = out_image[..., 0] >= 0.5
    assert np.array_equal(drawn, out_mask > 0) and np.array_equal(out_mask, out_fov)
    assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) == {0, 1}
    expected = (matrix @ np.array([*centroid(mask), 1.0]))[:2]
    assert np.abs(centroid(out_mask) - expected).max() < 1.0
    area_ratio = out_mask.sum() / mask.sum()
    scale = GEOMETRIES[name].get("scale", 1.0)
    assert area_ratio == pytest.approx(scale ** 2, rel=0.15)


def test_flip_is_exact():
    image, mask, fov = shape_case()
    out_image, out_mask, _ = warp_case(image, mask, fov, affine_matrix(SHAPE, flip_lr=True))
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])
    np.testing.assert_array_equal(out_image, image[:, ::-1])


def test_rotation_reflects_borders():
    image = np.full((*SHAPE, 1), 0.7, np.float32)
    full = np.ones(SHAPE, np.uint8)
    out_image, _, out_fov = warp_case(image, full, full, affine_matrix(SHAPE, angle=45.0))
    assert np.allclose(out_image, 0.7) and (out_fov == 1).all()


def test_elastic_deformation_with_zero_strength_is_identity():
    image, mask, fov = shape_case()
    out = elastic_deform(image, mask, fov, alpha=0.0, sigma=4.0, rng=np.random.default_rng(0))
    for before, after in zip((image, mask, fov), out, strict=True):
        np.testing.assert_array_equal(after, before)


def test_elastic_deformation_moves_all_three_alike_and_stays_binary():
    image, mask, fov = shape_case(centre=(30, 40), radius=15)
    out_image, out_mask, out_fov = elastic_deform(image, mask, fov, alpha=60.0, sigma=4.0,
                                                  rng=np.random.default_rng(1))
    assert not np.array_equal(out_mask, mask)
    assert np.array_equal(out_image[..., 0] >= 0.5, out_mask > 0)
    assert np.array_equal(out_mask, out_fov)
    assert set(np.unique(out_mask)) == {0, 1} and iou(out_mask > 0, mask > 0) > 0.6


@pytest.mark.parametrize("sigma", [4.0, 16.0])
def test_elastic_amplitude_follows_alpha_over_sigma(sigma):
    field = elastic_displacement((240, 260), 400.0, sigma, np.random.default_rng(0))
    assert field.shape == (2, 240, 260) and field.dtype == np.float32
    assert field.std() == pytest.approx(0.163 * 400.0 / sigma, rel=0.3)
    assert not elastic_displacement((240, 260), 0.0, sigma, np.random.default_rng(0)).any()


def test_random_geometric_copies_stay_aligned():
    image, mask, fov = shape_case(centre=(30, 40), radius=15)
    cfg = GEOMETRIC_ONLY.model_copy(update={"elastic": EVERYTHING.elastic})
    for copy in range(1, 6):
        out_image, out_mask, out_fov = augment_case(image, mask, fov, cfg, case_rng(0, "a", copy))
        assert np.array_equal(out_image[..., 0] >= 0.5, out_mask > 0)
        assert np.array_equal(out_mask, out_fov)


def test_every_transform_on_keeps_masks_binary_and_image_in_range():
    image, mask, _ = shape_case(centre=(30, 40), radius=15)
    fov = np.ones(SHAPE, np.uint8)
    image = image * 0.6 + 0.2
    for copy in range(1, 6):
        out_image, out_mask, out_fov = augment_case(image, mask, fov, EVERYTHING,
                                                    case_rng(3, "case", copy))
        assert out_image.dtype == np.float32 and out_image.shape == image.shape
        assert 0.0 <= out_image.min() and out_image.max() <= 1.0
        assert set(np.unique(out_mask)) <= {0, 1} and out_mask.any()
        assert (out_fov == 1).all()


def test_same_seed_same_bytes_other_seed_other_bytes():
    image, mask, fov = shape_case(centre=(30, 40), radius=15)
    first = augment_case(image, mask, fov, EVERYTHING, case_rng(7, "c1", 1))
    again = augment_case(image, mask, fov, EVERYTHING, case_rng(7, "c1", 1))
    other = augment_case(image, mask, fov, EVERYTHING, case_rng(8, "c1", 1))
    other_copy = augment_case(image, mask, fov, EVERYTHING, case_rng(7, "c1", 2))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again, strict=True))
    assert first[0].tobytes() != other[0].tobytes()
    assert first[0].tobytes() != other_copy[0].tobytes()


def test_photometric_changes_only_the_image_inside_the_fov():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.8, (*SHAPE, 1)).astype(np.float32)
    fov = np.zeros(SHAPE, np.uint8)
    fov[10:50, 10:70] = 1
    out = photometric_jitter(image, fov, EVERYTHING, np.random.default_rng(1))
    outside = fov == 0
    np.testing.assert_array_equal(out[outside], image[outside])
    assert not np.allclose(out[~outside], image[~outside])
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_no_transform_enabled_returns_the_case_unchanged():
    image, mask, fov = shape_case()
    nothing = AugmentConfig(flip={"prob": 0}, rotate={"prob": 0}, zoom={"prob": 0},
                            shear={"prob": 0}, elastic={"prob": 0}, brightness={"prob": 0},
                            contrast={"prob": 0}, gamma={"prob": 0}, noise={"prob": 0})
    out = augment_case(image, mask, fov, nothing, np.random.default_rng(0))
    for before, after in zip((image, mask, fov), out, strict=True):
        np.testing.assert_array_equal(after, before)


# --- weight map ---------------------------------------------------------------------------------

def two_cells(gap: int = 4) -> np.ndarray:
    """Membrane (1) frame and a vertical membrane strip ``gap`` wide between two cells (0)."""
    mask = np.ones((30, 40), np.uint8)
    mask[2:28, 2:18] = 0
    mask[2:28, 18 + gap:38] = 0
    return mask


def test_weight_map_between_two_cells_matches_the_formula():
    gap, w0, sigma = 4, 10.0, 5.0
    mask = two_cells(gap)
    weights = unet_weight_map(mask, None, w0, sigma)
    n, n_membrane = mask.size, int(mask.sum())
    w_membrane, w_cell = n / (2 * n_membrane), n / (2 * (n - n_membrane))
    # every strip pixel is j+1 from one cell and gap-j from the other: d1 + d2 = gap + 1
    strip = weights[10:20, 18:18 + gap]
    expected = w_membrane + w0 * math.exp(-((gap + 1) ** 2) / (2 * sigma ** 2))
    np.testing.assert_allclose(strip, expected, rtol=1e-5)
    np.testing.assert_allclose(weights[mask == 0], w_cell, rtol=1e-6)
    assert weights.dtype == np.float32
    assert unet_weight_map(mask, None, 0.0, sigma).mean() == pytest.approx(1.0)  # class balance


def test_weight_map_equals_brute_force_distances():
    rng = np.random.default_rng(0)
    mask = np.ones((48, 48), np.uint8)
    for _ in range(8):
        y, x = rng.integers(2, 40, 2)
        mask[y:y + rng.integers(3, 9), x:x + rng.integers(3, 9)] = 0
    w0, sigma = 10.0, 5.0
    labels, count = ndimage.label(mask == 0)
    distances = np.sort(np.stack([ndimage.distance_transform_edt(labels != k)
                                  for k in range(1, count + 1)]), axis=0)
    term = w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma ** 2)) * (mask == 1)
    without = unet_weight_map(mask, None, 0.0, sigma)
    np.testing.assert_allclose(unet_weight_map(mask, None, w0, sigma), without + term, atol=2e-3)
    assert term.max() > 1.0


def test_weight_map_is_zero_outside_fov_and_has_no_term_for_one_cell():
    mask = np.ones((20, 20), np.uint8)
    mask[3:17, 3:17] = 0
    fov = np.zeros((20, 20), np.uint8)
    fov[:, :15] = 1
    weights = unet_weight_map(mask, fov, 10.0, 5.0)
    assert (weights[:, 15:] == 0).all()
    n = fov.sum()
    balanced = sorted([n / (2 * (mask * fov).sum()), n / (2 * ((1 - mask) * fov).sum())])
    np.testing.assert_allclose(np.unique(weights[:, :15]), balanced, rtol=1e-6)
