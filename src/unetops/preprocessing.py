"""Per-image intensity preprocessing, shared by the ``preprocess`` stage and ``unetops predict``.

The steps run in a fixed order, each switchable in ``params.yaml`` → ``preprocess``:

1. optional resize of large images (``resize_max_side``; area interpolation for the image,
   nearest neighbour for mask and FOV so they stay binary; native size by default),
2. channel: ``green`` (vessels have the highest contrast there), ``luminance`` or ``rgb``,
3. FOV-aware standardisation: z-score with the mean and SD of the field of view's pixels only
   (the black surround would otherwise dominate them), then rescaled to 0–255: the FOV's
   min..max by default (orobix's dataset z-score followed by a per-image min-max amounts to a
   per-image min-max, there over the whole image), or ±``standardize_clip_sigma`` SD when set,
   so a bright optic disc cannot squeeze the vessels' range,
4. CLAHE on the 8-bit image (OpenCV's; orobix clip 2.0 on 8×8 tiles, seed 001 7.0 on 7×7),
5. gamma correction through a 256-entry lookup table, ``out = 255·(in/255)^(1/gamma)``
   truncated to uint8 as orobix and seed 001 do (gamma 1.2 lifts the dark tones),
6. rescale to float32 [0, 1]; pixels outside the FOV set to 0 (``mask_outside_fov``).

Steps 4–5 work on uint8, as in orobix, so CLAHE and gamma are exactly OpenCV's on the same data.
The end of the module holds what both image stages share: reading ``data/split.csv`` and the
Great Expectations rules every stored case must meet.
"""

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import cv2
import numpy as np
import pandas as pd

from unetops.config import Config, PreprocessConfig
from unetops.console import track
from unetops.errors import UnetopsError
from unetops.validation import Rule

T = TypeVar("T")
R = TypeVar("R")

#: ITU-R BT.601 weights, as OpenCV's RGB2GRAY and orobix's ``rgb2gray``.
LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def target_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(height, width) shrunk so the longer side is at most ``max_side`` (never enlarged)."""
    longest = max(height, width)
    if max_side is None or longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_binary(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a binary mask to (height, width), as uint8 0/1."""
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if mask.shape == size:
        return mask
    return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def _to_8bit_scale(image: np.ndarray) -> np.ndarray:
    """Any integer, bool or [0, 1] float image as float32 on the 0–255 scale."""
    if image.dtype == bool:
        return image.astype(np.float32) * 255.0
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) * np.float32(255.0 / np.iinfo(image.dtype).max)
    return np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0


def select_channel(image: np.ndarray, channel: str) -> np.ndarray:
    """The channel(s) the network sees, float32 (H, W, C) on the 0–255 scale.

    Gray images are their own green channel and luminance; ``rgb`` repeats them three times so
    the model's input width does not depend on the file.
    """
    values = _to_8bit_scale(np.asarray(image))
    if values.ndim == 2:
        values = values[..., None]
        return np.repeat(values, 3, axis=2) if channel == "rgb" else values
    if channel == "green":
        return values[..., 1:2].copy()
    if channel == "luminance":
        return (values @ LUMINANCE_WEIGHTS)[..., None]
    return values


def standardize_in_fov(channels: np.ndarray, fov: np.ndarray,
                       clip_sigma: float | None = None) -> np.ndarray:
    """Per-channel z-score from the FOV's pixels, rescaled to 0–255 (see the module docstring)."""
    inside = np.asarray(fov) > 0
    if not inside.any():
        raise UnetopsError("fov: empty field of view (expect at least one pixel inside)")
    out = np.empty_like(channels, dtype=np.float32)
    for c in range(channels.shape[2]):
        values = channels[..., c]
        fov_values = values[inside]
        mean, sd = float(fov_values.mean()), float(fov_values.std())
        if sd == 0.0:
            out[..., c] = 0.0
            continue
        z = (values - mean) / sd
        if clip_sigma is None:
            low, high = (float(fov_values.min()) - mean) / sd, (float(fov_values.max()) - mean) / sd
        else:
            low, high = -clip_sigma, clip_sigma
        out[..., c] = (z - low) * (255.0 / (high - low))
    return np.clip(out, 0.0, 255.0, out=out)


def to_uint8(channels: np.ndarray) -> np.ndarray:
    """Round a 0–255 float image to uint8 (the precision CLAHE and the gamma table work at)."""
    return np.clip(np.rint(channels), 0, 255).astype(np.uint8)


def apply_clahe(image: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """OpenCV's CLAHE on every channel of a uint8 (H, W, C) image."""
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    return np.stack([clahe.apply(np.ascontiguousarray(image[..., c]))
                     for c in range(image.shape[2])], axis=2)


def gamma_table(gamma: float) -> np.ndarray:
    """The 256-entry lookup table ``255·(i/255)^(1/gamma)``, truncated to uint8 as orobix does."""
    return (((np.arange(256) / 255.0) ** (1.0 / gamma)) * 255.0).astype(np.uint8)


def apply_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma correction of a uint8 image through :func:`gamma_table` (``cv2.LUT``)."""
    table = gamma_table(gamma)
    return np.stack([cv2.LUT(np.ascontiguousarray(image[..., c]), table)
                     for c in range(image.shape[2])], axis=2)


def preprocess_image(image: np.ndarray, fov: np.ndarray | None,
                     cfg: PreprocessConfig) -> np.ndarray:
    """One image through the whole pipeline: float32 (H', W', C) in [0, 1].

    ``image`` is gray (H, W) or RGB (H, W, 3), any integer dtype or a [0, 1] float; ``fov`` is a
    binary (H, W) mask, or None for "the whole image". H', W' differ from H, W only when
    ``cfg.resize_max_side`` shrinks a large image; resize the mask with :func:`preprocess_case`.
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    if fov is None:
        fov = np.ones((height, width), np.uint8)
    fov = np.asarray(fov)
    if fov.shape != (height, width):
        raise UnetopsError(f"fov: shape {fov.shape} differs from the image's {(height, width)}")
    size = target_size(height, width, cfg.resize_max_side)
    if size != (height, width):
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        fov = resize_binary(fov, size)
    inside = fov > 0

    channels = select_channel(image, cfg.channel)
    if cfg.standardize:
        channels = standardize_in_fov(channels, inside, cfg.standardize_clip_sigma)
    pixels = to_uint8(channels)
    if cfg.clahe:
        pixels = apply_clahe(pixels, cfg.clahe_clip_limit, cfg.clahe_tile_grid)
    if cfg.gamma != 1.0:
        pixels = apply_gamma(pixels, cfg.gamma)
    result = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    if cfg.mask_outside_fov:
        result[~inside] = 0.0
    return result


def preprocess_case(image: np.ndarray, mask: np.ndarray, fov: np.ndarray | None,
                    cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, mask and FOV of one case at the same (possibly reduced) size.

    Returns the float32 (H', W', C) image of :func:`preprocess_image` and the mask and FOV as
    uint8 0/1 (H', W'), resized by nearest neighbour so they stay binary.
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    if fov is None:
        fov = np.ones((height, width), np.uint8)
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise UnetopsError(f"mask: shape {mask.shape} differs from the image's {(height, width)}")
    processed = preprocess_image(image, fov, cfg)
    size = processed.shape[:2]
    return processed, resize_binary(mask, size), resize_binary(fov, size)


# --- the manifest and the checks both image stages run ------------------------------------------

SPLIT_COLUMNS = ("case", "subset", "image", "mask", "fov")
#: Cases run in threads: OpenCV, zlib and most of numpy release the GIL, so the reads, CLAHE,
#: warps and compressed writes of different cases overlap.
WORKERS = min(4, os.cpu_count() or 1)


def map_in_threads(function: Callable[[T], R], items: list[T], description: str) -> list[R]:
    """``[function(item) for item in items]`` in a few threads, in order, with a progress bar.

    The first error is raised once the running calls finish; calls not yet started are dropped.
    """
    pool = ThreadPoolExecutor(WORKERS)
    try:
        return list(track(pool.map(function, items), description, total=len(items)))
    finally:
        pool.shutdown(cancel_futures=True)


def read_split(cfg: Config) -> pd.DataFrame:
    """``data/split.csv`` as strings (an empty ``fov`` cell means the whole image)."""
    path = cfg.paths.split_csv
    shown = cfg.paths.rel(path)
    if not path.is_file():
        raise UnetopsError(f"{shown}: file not found (run unetops split first)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as exc:
        raise UnetopsError(f"{shown}: not a readable CSV ({exc.__class__.__name__})") from None
    missing = [column for column in SPLIT_COLUMNS if column not in frame.columns]
    if missing:
        raise UnetopsError(f"{shown}: missing column(s) {','.join(missing)} "
                           f"(expect {','.join(SPLIT_COLUMNS)})")
    return frame


def is_binary(values: np.ndarray) -> bool:
    """At most one nonzero value (0/1, 0/255, all zero …), without sorting the array."""
    nonzero = values[values != 0]
    return nonzero.size == 0 or bool((nonzero == nonzero.flat[0]).all())


def describe_arrays(path: str, image: np.ndarray, mask: np.ndarray, fov: np.ndarray,
                    weight: np.ndarray | None = None) -> dict:
    """One row of the output table that :func:`array_rules` checks."""
    inside = fov > 0
    fov_pixels = int(np.count_nonzero(inside))
    row = {
        "path": path,
        "image_dtype": str(image.dtype),
        "image_min": float(image.min()),
        "image_max": float(image.max()),
        "image_finite": bool(np.isfinite(image).all()),
        "channels": int(image.shape[2]) if image.ndim == 3 else 0,
        "sizes_match": image.shape[:2] == mask.shape == fov.shape,
        "mask_binary": mask.dtype == np.uint8 and bool((mask <= 1).all()),
        "fov_binary": fov.dtype == np.uint8 and bool((fov <= 1).all()),
        "fov_pixels": fov_pixels,
        "foreground_fraction": (float(np.count_nonzero(mask[inside])) / fov_pixels
                                if fov_pixels and mask.shape == fov.shape else 0.0),
    }
    if weight is not None:
        row.update(weight_dtype=str(weight.dtype), weight_shape_matches=weight.shape == mask.shape,
                   weight_min=float(weight.min()), weight_finite=bool(np.isfinite(weight).all()))
    return row


def array_rules(channels: int, foreground_fraction: tuple[float, float] | None = None,
                weights: bool = False) -> list[Rule]:
    """What every preprocessed or augmented case must satisfy (the contract train relies on)."""
    rules = [
        Rule("image must be float32", "ExpectColumnValuesToBeInSet",
             {"column": "image_dtype", "value_set": ["float32"]}),
        Rule("image values must be finite", "ExpectColumnValuesToBeInSet",
             {"column": "image_finite", "value_set": [True]}),
        Rule("image values must lie in [0, 1]", "ExpectColumnValuesToBeBetween",
             {"column": "image_min", "min_value": 0.0}),
        Rule("image values must lie in [0, 1]", "ExpectColumnValuesToBeBetween",
             {"column": "image_max", "max_value": 1.0}),
        Rule(f"image must be (H, W, {channels})", "ExpectColumnValuesToBeInSet",
             {"column": "channels", "value_set": [channels]}),
        Rule("image, mask and FOV must have the same size", "ExpectColumnValuesToBeInSet",
             {"column": "sizes_match", "value_set": [True]}),
        Rule("mask must be binary (uint8 0/1)", "ExpectColumnValuesToBeInSet",
             {"column": "mask_binary", "value_set": [True]}),
        Rule("FOV must be binary (uint8 0/1)", "ExpectColumnValuesToBeInSet",
             {"column": "fov_binary", "value_set": [True]}),
        Rule("FOV must not be empty", "ExpectColumnValuesToBeBetween",
             {"column": "fov_pixels", "min_value": 1}),
    ]
    if foreground_fraction is not None:
        low, high = foreground_fraction
        rules.append(Rule(f"mask must cover {low:g}–{high:g} of the FOV "
                          "(preprocess.foreground_fraction)", "ExpectColumnValuesToBeBetween",
                          {"column": "foreground_fraction", "min_value": low, "max_value": high}))
    if weights:
        rules += [
            Rule("weight map must be float32 of the mask's size", "ExpectColumnValuesToBeInSet",
                 {"column": "weight_dtype", "value_set": ["float32"]}),
            Rule("weight map must be float32 of the mask's size", "ExpectColumnValuesToBeInSet",
                 {"column": "weight_shape_matches", "value_set": [True]}),
            Rule("weights must be finite", "ExpectColumnValuesToBeInSet",
                 {"column": "weight_finite", "value_set": [True]}),
            Rule("weights must be non-negative", "ExpectColumnValuesToBeBetween",
                 {"column": "weight_min", "min_value": 0.0}),
        ]
    return rules
