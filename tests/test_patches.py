"""The patch sampler: shapes, centres in the FOV / on vessels, exact crops, padding, seeding, symmetries."""

import numpy as np
import pytest

from unetops.patches import PatchSampler, random_dihedral, sample_patches


def case(height=40, width=50, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((height, width, channels), dtype=np.float32)
    mask = (rng.random((height, width)) < 0.1).astype(np.uint8)
    fov = np.ones((height, width), np.uint8)
    return image, mask, fov


def test_shapes_and_dtypes_with_and_without_weights():
    image, mask, fov = case(channels=3)
    rng = np.random.default_rng(0)
    x, y = sample_patches([image], [mask], [fov], n=5, size=16, rng=rng)
    assert x.shape == (5, 16, 16, 3) and y.shape == (5, 16, 16, 1)
    assert x.dtype == y.dtype == np.float32
    x, y, w = sample_patches([image], [mask], [fov], 5, 16, rng, weights=[mask * 2.0 + 1.0])
    assert w.shape == (5, 16, 16) and w.dtype == np.float32
    np.testing.assert_array_equal(w, y[..., 0] * 2.0 + 1.0)


def test_patches_are_exact_crops_of_their_image():
    height, width = 30, 45
    coords = np.arange(height * width, dtype=np.float32).reshape(height, width)
    other = coords + 10_000
    fov = np.ones((height, width), np.uint8)
    x, y = sample_patches([coords, other], [fov, fov * 0], [fov, fov], 50, 8,
                          np.random.default_rng(1))
    for patch, labels in zip(x[..., 0], y[..., 0]):
        top, left = divmod(int(patch[0, 0]) % 10_000, width)
        source = coords if patch[0, 0] < 10_000 else other
        np.testing.assert_array_equal(patch, source[top:top + 8, left:left + 8])
        assert labels.max() == (1.0 if source is coords else 0.0)


def test_centres_lie_in_the_fov_and_on_vessels_when_asked():
    image, mask, fov = case(60, 60)
    fov[:] = 0
    fov[20:40, 25:45] = 1
    image[..., 0] = fov  # the centre pixel of every patch shows whether it is in the FOV
    x, y = sample_patches([image], [mask], [fov], 200, 12, np.random.default_rng(2),
                          vessel_fraction=1.0)
    assert (x[:, 6, 6, 0] == 1).all()
    assert (y[:, 6, 6, 0] == 1).all()
    x, y = sample_patches([image], [mask], [fov], 200, 12, np.random.default_rng(2))
    assert (x[:, 6, 6, 0] == 1).all()
    assert 0 < y[:, 6, 6, 0].mean() < 0.5


def test_vessel_fraction_sets_the_share_of_vessel_centres():
    image, mask, fov = case(80, 80)
    _, y = sample_patches([image], [mask], [fov], 100, 8, np.random.default_rng(3),
                          vessel_fraction=0.5)
    assert y[:, 4, 4, 0].sum() >= 50


def test_images_smaller_than_the_patch_become_reflect_padded_tiles():
    image, mask, fov = case(10, 14)
    x, y = sample_patches([image], [mask], [fov], 3, 20, np.random.default_rng(4))
    expected = np.pad(image, ((5, 5), (3, 3), (0, 0)), mode="reflect")
    for patch in x:
        np.testing.assert_array_equal(patch, expected)
    np.testing.assert_array_equal(y[0, ..., 0], np.pad(mask, ((5, 5), (3, 3)), mode="reflect"))


def test_same_seed_same_patches_other_seed_other_patches():
    image, mask, fov = case()
    sampler = PatchSampler([image], [mask], [fov], 16)
    a = sampler.sample(10, np.random.default_rng(7))
    b = sampler.sample(10, np.random.default_rng(7))
    c = sampler.sample(10, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_foreground_fraction_and_mismatched_inputs():
    image, mask, fov = case()
    sampler = PatchSampler([image], [mask], [fov], 8)
    assert 0.05 < sampler.foreground_fraction() < 0.15
    with pytest.raises(ValueError, match="mask"):
        PatchSampler([image], [mask[:-1]], [fov], 8)
    with pytest.raises(ValueError, match="channels"):
        PatchSampler([image, np.zeros((40, 50, 3), np.float32)], [mask, mask], [fov, fov], 8)


def _symmetries(patch: np.ndarray) -> list[np.ndarray]:
    """The 8 images of a square patch under rotations by 90° and mirrorings."""
    turns = [np.rot90(patch, k) for k in range(4)]
    return turns + [np.flip(turn, 0) for turn in turns]


def test_random_dihedral_maps_image_mask_and_weights_by_one_symmetry_each():
    image, mask, fov = case(channels=2)
    x, y, w = sample_patches([image], [mask], [fov], 200, 8, np.random.default_rng(5),
                             weights=[image[..., 0] * 3])
    tx, ty, tw = random_dihedral((x, y, w), np.random.default_rng(6))
    assert (tx.shape, ty.shape, tw.shape) == (x.shape, y.shape, w.shape)
    used = set()
    for patch, labels, weights, moved, moved_labels, moved_weights in zip(x, y, w, tx, ty, tw):
        matches = [k for k, image_k in enumerate(_symmetries(patch))
                   if np.array_equal(image_k, moved)]
        assert len(matches) == 1  # random pixels: no two symmetries of a patch coincide
        k = matches[0]
        np.testing.assert_array_equal(_symmetries(labels)[k], moved_labels)
        np.testing.assert_array_equal(_symmetries(weights)[k], moved_weights)
        used.add(k)
    assert used == set(range(8))
    np.testing.assert_array_equal(x, sample_patches([image], [mask], [fov], 200, 8,
                                                    np.random.default_rng(5))[0])  # input intact
    again = random_dihedral((x, y, w), np.random.default_rng(6))
    np.testing.assert_array_equal(again[0], tx)
