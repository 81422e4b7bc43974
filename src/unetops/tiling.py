"""Whole-image prediction from tiles: the U-Net paper's overlap-tile, blended as nnU-Net does.

A fully convolutional network can see a whole image at once, but memory, the model's size
constraints (multiples of ``2**depth``) and ``valid`` padding (outputs smaller than inputs) make
tiles the general case. :func:`overlap_tile_predict` is pure: it takes any callable on a batch
``(N, th, tw, C) -> (N, th - 2m, tw - 2m, K)`` (like MONAI's ``sliding_window_inference``), so it
is tested with ``lambda t: t + 1`` and no model at all.

- Borders are mirror-padded (reflection), so border pixels get real-looking context instead of
  zeros, and the image is padded up to one tile when it is smaller than a tile.
- Tiles are laid out as nnU-Net does: ``ceil((L - T) / (T * (1 - overlap))) + 1`` tiles per axis,
  spread evenly from the first to the last pixel, so no tile hangs far over the border.
- Overlaps are blended with a Gaussian importance map (sigma = 1/8 of the tile, nnU-Net/MONAI),
  which down-weights tile borders where a ``same``-padded network sees zero padding; or uniformly.
- All tiles (and their flips, with test-time augmentation) go through the callable in as few,
  equally sized batches as possible, so a compiled callable is traced once per tile shape.
"""

import functools
import math
from collections.abc import Callable

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]

#: Gaussian sigma as a fraction of the tile side (nnU-Net v2 and MONAI's ``sigma_scale``).
GAUSSIAN_SIGMA_SCALE = 0.125


@functools.lru_cache(maxsize=32)
def gaussian_weight(shape: tuple[int, int],
                    sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """A (h, w) Gaussian importance map peaking at 1 in the tile centre; cached and read-only.

    Cached because every tile of every image of one shape uses the same map.
    """
    axes = []
    for size in shape:
        centre = (size - 1) / 2.0
        sigma = max(size * sigma_scale, 1e-6)
        axes.append(np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2))
    weight = np.outer(axes[0], axes[1])
    weight /= weight.max()
    # Far corners of large tiles underflow towards 0; keep every pixel's weight positive.
    weight = np.maximum(weight, weight[weight > 0].min(), out=weight)
    weight.setflags(write=False)
    return weight


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of ``tile``-sized tiles covering ``length``, sharing at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile * (1.0 - overlap)
    n_tiles = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n_tiles - 1)) for i in range(n_tiles)]


def fit_tile(length: int, tile: int, overlap: float, multiple: int = 1, offset: int = 0,
             margin: int = 0) -> int:
    """The smallest valid input tile that needs no more tiles along an axis than ``tile`` would.

    ``tile`` is the largest input tile wanted; valid sizes are ``offset + k * multiple``, k >= 0
    (a ``same`` U-Net of depth d: multiples of ``2**d``); ``margin`` is the pixels a ``valid``
    network loses per side. Shrinking the tile to what the tile count needs avoids computing on
    padding: a 565-pixel side with tile 512 and no overlap needs two tiles, and two of 288 do.
    """
    out_tile = tile - 2 * margin
    if out_tile < 1:
        raise ValueError(f"tile {tile} leaves no output for margin {margin}")
    n_tiles = len(tile_starts(length, out_tile, overlap))
    need = max(math.ceil(length / (n_tiles - (n_tiles - 1) * overlap)) + 2 * margin, offset)
    return need + (offset - need) % multiple


def _flips(batch: np.ndarray) -> np.ndarray:
    """The batch and its mirror images: none, left-right, up-down, both (stacked along axis 0)."""
    return np.concatenate([batch, batch[:, :, ::-1], batch[:, ::-1, :], batch[:, ::-1, ::-1]])


def _unflip_mean(out: np.ndarray, n: int) -> np.ndarray:
    """Undo :func:`_flips` on the outputs and average the four predictions of each tile."""
    parts = out[:n], out[n:2 * n, :, ::-1], out[2 * n:3 * n, ::-1, :], out[3 * n:, ::-1, ::-1]
    return (parts[0] + parts[1] + parts[2] + parts[3]) / 4.0


def _batches(n_items: int, batch_size: int) -> tuple[int, int]:
    """(number of calls, items per call): equal calls, so a compiled callable sees one shape."""
    n_calls = math.ceil(n_items / batch_size)
    return n_calls, math.ceil(n_items / n_calls)


def overlap_tile_predict(
    image: np.ndarray,
    predict_fn: PredictFn,
    tile: int | tuple[int, int],
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 8,
    flip_tta: bool = False,
    margin: int = 0,
) -> np.ndarray:
    """Predict an (H, W, C) image tile by tile; returns the blended (H, W, K) float32 map.

    ``tile`` is the input tile (int or (th, tw)); ``predict_fn`` maps a float32 batch
    (N, th, tw, C) to (N, th - 2*margin, tw - 2*margin, K) (``margin`` > 0 for ``valid``
    padding); ``overlap`` in [0, 1) is the fraction of an output tile shared with its neighbour;
    ``blend`` is ``gaussian`` or ``uniform``; ``batch_size`` caps the tiles per call (flip
    test-time augmentation counts four per tile); ``flip_tta`` averages the predictions of the
    tile and its three mirror images.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if blend not in ("gaussian", "uniform"):
        raise ValueError(f"blend must be 'gaussian' or 'uniform', got {blend!r}")
    if batch_size < 1 or margin < 0:
        raise ValueError("batch_size must be >= 1 and margin >= 0")
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    oh, ow = th - 2 * margin, tw - 2 * margin
    if oh < 1 or ow < 1:
        raise ValueError(f"tile {(th, tw)} leaves no output for margin {margin}")

    height, width = image.shape[:2]
    # The region the output tiles cover: the image, grown to one tile where it is smaller.
    region_h, region_w = max(height, oh), max(width, ow)
    top, left = (region_h - height) // 2, (region_w - width) // 2
    padded = np.pad(
        image,
        ((margin + top, margin + region_h - height - top),
         (margin + left, margin + region_w - width - left), (0, 0)),
        mode="reflect",
    )
    origins = [(y, x) for y in tile_starts(region_h, oh, overlap)
               for x in tile_starts(region_w, ow, overlap)]
    weight = (gaussian_weight((oh, ow)) if blend == "gaussian" else np.ones((oh, ow)))
    weight = weight.astype(np.float32)[..., None]

    accumulated = None
    weight_sum = np.zeros((region_h, region_w, 1), np.float32)
    views = 4 if flip_tta else 1
    n_calls, per_call = _batches(len(origins), max(1, batch_size // views))
    for call in range(n_calls):
        chunk = origins[call * per_call:(call + 1) * per_call]
        batch = np.zeros((per_call, th, tw, image.shape[2]), np.float32)
        for i, (y, x) in enumerate(chunk):
            batch[i] = padded[y:y + th, x:x + tw]
        out = np.asarray(predict_fn(_flips(batch) if flip_tta else batch), dtype=np.float32)
        if out.ndim != 4 or out.shape[:3] != (per_call * views, oh, ow):
            raise ValueError(f"predict_fn returned shape {out.shape} for a batch of "
                             f"{per_call * views} tiles {th}x{tw}; expected "
                             f"({per_call * views}, {oh}, {ow}, K) for margin {margin}")
        if flip_tta:
            out = _unflip_mean(out, per_call)
        if accumulated is None:
            accumulated = np.zeros((region_h, region_w, out.shape[3]), np.float32)
        for i, (y, x) in enumerate(chunk):
            accumulated[y:y + oh, x:x + ow] += weight * out[i]
            weight_sum[y:y + oh, x:x + ow] += weight
    accumulated /= weight_sum
    return np.ascontiguousarray(accumulated[top:top + height, left:left + width])
