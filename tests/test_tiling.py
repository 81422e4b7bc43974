"""overlap_tile_predict with plain callables (no model), as MONAI tests sliding_window_inference."""

import numpy as np
import pytest

from unetops.tiling import fit_tile, gaussian_weight, overlap_tile_predict, tile_starts


def plus_one(batch):
    return batch + 1


def valid_plus_one(margin):
    """A `valid`-padding style callable: the output loses `margin` pixels on every side."""
    def predict(batch):
        return (batch + 1)[:, margin:-margin, margin:-margin]
    return predict


@pytest.fixture
def image():
    return np.random.default_rng(0).random((37, 29, 2), dtype=np.float32)


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
@pytest.mark.parametrize("flip_tta", [False, True])
def test_identity_plus_one_for_every_overlap_blend_and_tta(image, overlap, blend, flip_tta):
    out = overlap_tile_predict(image, plus_one, tile=16, overlap=overlap, blend=blend,
                               batch_size=3, flip_tta=flip_tta)
    assert out.shape == image.shape
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, image + 1, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 1), (31, 17, 3), (16, 16, 1), (15, 64, 1)])
@pytest.mark.parametrize("tile", [8, 13, (16, 24), 64])
def test_odd_sizes_and_tiles_larger_than_the_image(shape, tile):
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    out = overlap_tile_predict(image, plus_one, tile=tile, overlap=0.25, batch_size=2)
    assert out.shape == shape
    np.testing.assert_allclose(out, image + 1, atol=1e-5)


@pytest.mark.parametrize("margin", [1, 4])
@pytest.mark.parametrize("flip_tta", [False, True])
def test_valid_padding_callable_is_cropped_and_blended(image, margin, flip_tta):
    out = overlap_tile_predict(image, valid_plus_one(margin), tile=20, overlap=0.3,
                               flip_tta=flip_tta, margin=margin)
    np.testing.assert_allclose(out, image + 1, atol=1e-5)


def test_output_channels_follow_the_callable(image):
    out = overlap_tile_predict(image, lambda t: t[..., :1] * 2, tile=16)
    assert out.shape == image.shape[:2] + (1,)
    np.testing.assert_allclose(out[..., 0], image[..., 0] * 2, atol=1e-5)


def test_borders_get_mirrored_context_not_zeros():
    """A callable that reports its tile's mean sees the image's values even at the borders."""
    image = np.ones((10, 10, 1), np.float32)
    out = overlap_tile_predict(image, lambda t: np.broadcast_to(t.mean(axis=(1, 2), keepdims=True),
                                                                t.shape), tile=32)
    np.testing.assert_allclose(out, 1.0)


def test_flip_tta_averages_the_four_mirror_images():
    image = np.arange(12, dtype=np.float32).reshape(3, 4, 1)

    def left_column(batch):  # not flip-equivariant: every pixel gets its row's first value
        return np.broadcast_to(batch[:, :, :1], batch.shape)

    out = overlap_tile_predict(image, left_column, tile=(3, 4), flip_tta=True)
    rows = image[:, :, 0]
    expected = (rows[:, :1] + rows[:, -1:]) / 2  # the un-flipped and left-right-flipped views
    np.testing.assert_allclose(out[..., 0], np.broadcast_to(expected, (3, 4)), atol=1e-5)


def test_batches_have_one_shape_and_respect_batch_size(image):
    seen = []

    def record(batch):
        seen.append(batch.shape)
        return batch

    overlap_tile_predict(image, record, tile=8, overlap=0.0, batch_size=7)
    assert len(set(seen)) == 1
    assert seen[0][0] <= 7
    assert seen[0][1:3] == (8, 8)


def test_wrong_output_shape_is_reported(image):
    with pytest.raises(ValueError, match="margin 0"):
        overlap_tile_predict(image, valid_plus_one(2), tile=16)


def test_gaussian_weight_is_cached_positive_and_peaks_in_the_centre():
    weight = gaussian_weight((9, 15))
    assert weight is gaussian_weight((9, 15))
    assert not weight.flags.writeable
    assert weight.min() > 0
    assert weight[4, 7] == pytest.approx(1.0)
    assert weight[0, 0] < weight[4, 7]


def test_tile_starts_cover_the_axis_evenly():
    assert tile_starts(10, 16, 0.5) == [0]
    starts = tile_starts(100, 32, 0.25)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert max(np.diff(starts)) <= 32 * 0.75


@pytest.mark.parametrize("length,tile,overlap,expected", [
    (565, 512, 0.0, 288),    # two tiles needed: 2 x 288 (multiple of 8) covers 565
    (584, 512, 0.0, 296),
    (32, 256, 0.25, 32),     # smaller than a tile: the image itself, rounded up
    (30, 256, 0.25, 32),
    (512, 512, 0.25, 512),
])
def test_fit_tile_shrinks_to_what_the_tile_count_needs(length, tile, overlap, expected):
    fitted = fit_tile(length, tile, overlap, multiple=8)
    assert fitted == expected
    assert len(tile_starts(length, fitted, overlap)) == len(tile_starts(length, tile, overlap))


def test_fit_tile_for_valid_padding_keeps_the_offset_and_margin():
    fitted = fit_tile(100, 92, 0.0, multiple=8, offset=4, margin=10)
    assert (fitted - 4) % 8 == 0
    assert len(tile_starts(100, fitted - 20, 0.0)) == len(tile_starts(100, 92 - 20, 0.0))
