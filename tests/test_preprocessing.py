"""preprocess_image / preprocess_case, and the preprocess stage on a tiny hand-made project."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from unetops.config import PreprocessConfig
from unetops.errors import UnetopsError
from unetops.io import load_arrays, write_png
from unetops.preprocessing import preprocess_case, preprocess_image, read_split
from unetops.stages import preprocess

PLAIN = PreprocessConfig(standardize=False, clahe=False, gamma=1.0, mask_outside_fov=False)


def textured(height: int = 40, width: int = 52, seed: int = 0) -> np.ndarray:
    """A smooth gray uint8 image with structure (so CLAHE has something to equalise)."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 2)
    return cv2.normalize(noise, None, 20, 200, cv2.NORM_MINMAX).astype(np.uint8)


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(image * 255).astype(np.uint8)


# --- the steps equal OpenCV's -------------------------------------------------------------------

@pytest.mark.parametrize("clip, grid", [(2.0, 8), (7.0, 7)])
def test_clahe_equals_opencv(clip, grid):
    gray = textured()
    cfg = PLAIN.model_copy(update={"clahe": True, "clahe_clip_limit": clip,
                                   "clahe_tile_grid": grid})
    expected = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(gray)
    out = preprocess_image(gray, None, cfg)
    assert out.shape == (40, 52, 1)
    np.testing.assert_array_equal(as_uint8(out[..., 0]), expected)
    assert not np.array_equal(expected, gray)


def test_gamma_equals_opencv_lut():
    gray = textured()
    table = np.array([((i / 255.0) ** (1 / 1.2)) * 255 for i in range(256)]).astype(np.uint8)
    out = preprocess_image(gray, None, PLAIN.model_copy(update={"gamma": 1.2}))
    np.testing.assert_array_equal(as_uint8(out[..., 0]), cv2.LUT(gray, table))


def test_all_steps_off_only_rescales():
    gray = textured()
    out = preprocess_image(gray, None, PLAIN)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], gray / 255.0, atol=1e-7)


# --- channels -----------------------------------------------------------------------------------

def test_channel_choice():
    rgb = np.stack([np.full((6, 7), v, np.uint8) for v in (10, 100, 200)], axis=2)
    green = preprocess_image(rgb, None, PLAIN)
    assert green.shape == (6, 7, 1) and np.allclose(green, 100 / 255)
    luminance = preprocess_image(rgb, None, PLAIN.model_copy(update={"channel": "luminance"}))
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(as_uint8(luminance[..., 0]), expected)
    colour = preprocess_image(rgb, None, PLAIN.model_copy(update={"channel": "rgb"}))
    np.testing.assert_allclose(colour[0, 0], np.array([10, 100, 200]) / 255, atol=1e-7)


def test_gray_input_gives_one_channel_or_three_for_rgb():
    gray = textured()
    assert preprocess_image(gray, None, PLAIN).shape == (40, 52, 1)
    rgb = preprocess_image(gray, None, PLAIN.model_copy(update={"channel": "rgb"}))
    assert rgb.shape == (40, 52, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_sixteen_bit_input_is_scaled_to_eight_bit_range():
    gray = textured().astype(np.uint16) * 257
    np.testing.assert_allclose(preprocess_image(gray, None, PLAIN)[..., 0],
                               textured() / 255.0, atol=1e-6)


# --- FOV-aware standardisation --------------------------------------------------------------------

def fundus_like(size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    fov = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2).astype(np.uint8)
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 1] = np.where(fov > 0, 100 + (textured(size, size) // 5), 0)
    return image, fov


def test_standardization_uses_fov_pixels_only():
    image, fov = fundus_like()
    cfg = PLAIN.model_copy(update={"standardize": True})
    out = preprocess_image(image, fov, cfg)[..., 0]
    inside = fov > 0
    assert out[inside].min() == 0.0 and out[inside].max() == 1.0
    brighter_outside = image.copy()
    brighter_outside[~inside, 1] = 255
    np.testing.assert_array_equal(preprocess_image(brighter_outside, fov, cfg)[..., 0][inside],
                                  out[inside])


def test_standardization_clip_sigma_saturates_outliers():
    image, fov = fundus_like()
    image[24, 24, 1] = 255
    cfg = PLAIN.model_copy(update={"standardize": True, "standardize_clip_sigma": 2.0})
    out = preprocess_image(image, fov, cfg)[..., 0]
    minmax = preprocess_image(image, fov, PLAIN.model_copy(update={"standardize": True}))[..., 0]
    assert out[24, 24] == 1.0
    assert out[fov > 0].std() > 2 * minmax[fov > 0].std()


def test_outside_fov_is_zero_by_default_and_defaults_are_orobix():
    image, fov = fundus_like()
    cfg = PreprocessConfig()
    assert (cfg.channel, cfg.standardize, cfg.clahe_clip_limit, cfg.clahe_tile_grid, cfg.gamma) \
        == ("green", True, 2.0, 8, 1.2)
    out = preprocess_image(image, fov, cfg)
    assert out.dtype == np.float32 and out.shape == (48, 48, 1)
    assert (out[fov == 0] == 0).all() and out.max() <= 1.0 and out[fov > 0].max() > 0.5


def test_constant_image_gives_zeros_not_nan():
    out = preprocess_image(np.full((10, 10), 77, np.uint8), None, PreprocessConfig())
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_empty_fov_is_an_error():
    with pytest.raises(UnetopsError, match="^fov: empty field of view"):
        preprocess_image(textured(), np.zeros((40, 52), np.uint8), PreprocessConfig())


def test_fov_of_another_size_is_an_error():
    with pytest.raises(UnetopsError, match="^fov: shape"):
        preprocess_image(textured(), np.ones((40, 50), np.uint8), PreprocessConfig())


# --- resize -------------------------------------------------------------------------------------

def test_native_size_by_default_and_resize_keeps_masks_binary():
    image = np.dstack([textured(200, 120)] * 3)
    mask = np.zeros((200, 120), bool)
    mask[50:150, 40:44] = True
    fov = np.ones((200, 120), np.uint8) * 255
    out, out_mask, out_fov = preprocess_case(image, mask, fov, PreprocessConfig())
    assert out.shape == (200, 120, 1) and out_mask.shape == (200, 120)
    cfg = PreprocessConfig(resize_max_side=64)
    out, out_mask, out_fov = preprocess_case(image, mask, fov, cfg)
    assert out.shape == (64, 38, 1)
    assert out_mask.shape == out_fov.shape == (64, 38)
    assert out_mask.dtype == np.uint8 and set(np.unique(out_mask)) == {0, 1}
    assert set(np.unique(out_fov)) == {1}
    assert preprocess_image(image, fov, cfg).shape == out.shape
    small = PreprocessConfig(resize_max_side=500)
    assert preprocess_case(image, mask, fov, small)[0].shape == (200, 120, 1)


# --- the stage ----------------------------------------------------------------------------------

def disc(size: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:size[0], :size[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2).astype(np.uint8)


def write_tiny_project(root: Path, subsets: dict[str, str], size=(36, 44)) -> None:
    """Fundus-like cases as 8-bit PNGs under data/raw and their data/split.csv."""
    rows = []
    for index, (case, subset) in enumerate(subsets.items()):
        rng = np.random.default_rng(index)
        fov = disc(size, (size[0] // 2, size[1] // 2), min(size) // 2 - 1)
        mask = np.zeros(size, np.uint8)
        cv2.line(mask, (3, int(rng.integers(5, size[0] - 5))), (size[1] - 3, size[0] // 2), 1, 2)
        mask &= fov
        image = np.zeros((*size, 3), np.uint8)
        image[..., 0] = fov * 180
        image[..., 1] = fov * (120 + rng.integers(0, 40, size)) - mask * 60
        image[..., 2] = fov * 40
        paths = {key: f"data/raw/{key}s/{case}.png" for key in ("image", "mask", "fov")}
        write_png(root / paths["image"], image)
        write_png(root / paths["mask"], mask * 255)
        write_png(root / paths["fov"], fov * 255)
        rows.append({"case": case, "subset": subset, **paths})
    (root / "data").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "data" / "split.csv", index=False)


CASES = {"c1": "train", "c2": "train", "c3": "val", "c4": "test"}


def test_stage_writes_every_case(project, tmp_path):
    cfg = project()
    write_tiny_project(tmp_path, CASES)
    preprocess.run(cfg)
    files = sorted(p.name for p in cfg.paths.preprocessed.iterdir())
    assert files == ["c1.npz", "c2.npz", "c3.npz", "c4.npz"]
    arrays = load_arrays(cfg.paths.preprocessed / "c3.npz")
    assert arrays["image"].dtype == np.float32 and arrays["image"].shape == (36, 44, 1)
    assert 0.0 <= arrays["image"].min() and arrays["image"].max() <= 1.0
    for key in ("mask", "fov"):
        assert arrays[key].dtype == np.uint8 and set(np.unique(arrays[key])) == {0, 1}


def test_stage_rgb_channel(project, tmp_path):
    cfg = project(preprocess={"channel": "rgb"})
    write_tiny_project(tmp_path, CASES)
    preprocess.run(cfg)
    assert load_arrays(cfg.paths.preprocessed / "c1.npz")["image"].shape == (36, 44, 3)


def test_empty_fov_stops_the_stage_naming_file_and_rule(project, tmp_path):
    cfg = project()
    write_tiny_project(tmp_path, CASES)
    preprocess.run(cfg)
    before = {p.name: p.read_bytes() for p in cfg.paths.preprocessed.iterdir()}
    write_png(tmp_path / "data/raw/fovs/c3.png", np.zeros((36, 44), np.uint8))
    with pytest.raises(UnetopsError) as err:
        preprocess.run(cfg)
    message = str(err.value)
    assert message.startswith("data/raw/fovs/c3.png: FOV must not be empty")
    assert "\n" not in message
    assert {p.name: p.read_bytes() for p in cfg.paths.preprocessed.iterdir()} == before
    assert [p.name for p in cfg.paths.data.iterdir() if p.name.startswith(".")] == []


def test_non_binary_mask_stops_the_stage_writing_nothing(project, tmp_path):
    cfg = project()
    write_tiny_project(tmp_path, CASES)
    grey = np.zeros((36, 44), np.uint8)
    grey[:, :10], grey[:, 10:20] = 128, 255
    write_png(tmp_path / "data/raw/masks/c2.png", grey)
    with pytest.raises(UnetopsError, match=r"^data/raw/masks/c2.png: must be binary"):
        preprocess.run(cfg)
    assert not cfg.paths.preprocessed.exists()


def test_mask_of_another_size_stops_the_stage_naming_it(project, tmp_path):
    cfg = project()
    write_tiny_project(tmp_path, CASES)
    write_png(tmp_path / "data/raw/masks/c4.png", np.zeros((30, 44), np.uint8))
    with pytest.raises(UnetopsError, match=r"^data/raw/masks/c4.png: must have the image's size"):
        preprocess.run(cfg)
    assert not cfg.paths.preprocessed.exists()


def test_implausible_foreground_fraction_names_the_output(project, tmp_path):
    cfg = project(preprocess={"foreground_fraction": [0.6, 1.0]})
    write_tiny_project(tmp_path, CASES)
    with pytest.raises(UnetopsError, match=r"^data/preprocessed/c1.npz: mask must cover 0.6–1"):
        preprocess.run(cfg)
    assert not cfg.paths.preprocessed.exists()


def test_bad_foreground_range_is_a_config_error(project):
    with pytest.raises(UnetopsError, match="preprocess.foreground_fraction"):
        project(preprocess={"foreground_fraction": [0.5, 0.1]})


def test_split_without_fov_column_is_an_error(project, tmp_path):
    cfg = project()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "split.csv").write_text("case,subset,image,mask\n")
    with pytest.raises(UnetopsError, match="^data/split.csv: missing column"):
        read_split(cfg)
