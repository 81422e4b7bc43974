"""The shared error overlay: colours inside the FOV only, any image type, the image dimmed."""

import numpy as np

from unetops.overlays import OVERLAY_COLOURS, error_overlay, grayscale


def test_grayscale_takes_integer_float_gray_and_rgb_images():
    assert grayscale(np.full((2, 2), 65535, np.uint16)).max() == 1.0
    np.testing.assert_allclose(grayscale(np.full((2, 2, 3), 255, np.uint8)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(grayscale(np.full((2, 2), 1.7, np.float32)), 1.0)
    np.testing.assert_allclose(grayscale(np.full((2, 2, 1), 0.25, np.float32)), 0.25)


def test_hits_misses_and_false_alarms_inside_the_fov_on_the_dimmed_image():
    image = np.full((2, 3), 200, np.uint8)
    truth = np.array([[1, 1, 0], [1, 0, 0]], bool)
    predicted = np.array([[1, 0, 1], [1, 0, 1]], bool)
    fov = np.array([[1, 1, 1], [0, 1, 0]], bool)
    out = error_overlay(image, predicted, truth, fov)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == OVERLAY_COLOURS["tp"]
    assert tuple(out[0, 1]) == OVERLAY_COLOURS["fn"]
    assert tuple(out[0, 2]) == OVERLAY_COLOURS["fp"]
    assert tuple(out[1, 1]) == (90, 90, 90)  # true negative: 0.45 x 200
    assert tuple(out[1, 0]) == tuple(out[1, 2]) == (30, 30, 30)  # outside the FOV: 0.15 x 200
