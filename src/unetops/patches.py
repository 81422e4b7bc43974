"""Random square patches from whole images, vectorised: one gather per array, whatever ``n``.

Patch centres are drawn uniformly from field-of-view pixels (all images pooled, so a big image
gives more patches), a share ``vessel_fraction`` of them from vessel pixels inside the FOV
(orobix retina-unet samples FOV centres; vessel-centred ones fight class imbalance). A patch lies
inside its image; along a side shorter than the patch the image is reflect-padded to the patch
size and the patch covers it whole (ISBI 2012 slices with ``patch_size`` 512 become full-image
tiles). The same generator state gives the same patches. :func:`random_dihedral` turns each
drawn patch into one of the 8 symmetries of the square (flips and 90° rotations), as the plain
retina-unet scripts do online, on top of the offline copies of ``unetops augment``.
"""

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _padded(array: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad the spatial axes shorter than ``size`` up to ``size``, centred."""
    pads = [(0, 0)] * array.ndim
    for axis in (0, 1):
        short = max(0, size - array.shape[axis])
        pads[axis] = (short // 2, short - short // 2)
    return np.pad(array, pads, mode="reflect") if any(map(any, pads)) else array


class PatchSampler:
    """Draws patches from a fixed set of images; the set-up (padding, flattening) is done once.

    ``images`` (H, W) or (H, W, C), ``masks`` and ``fovs`` (H, W) 0/1, optional per-pixel
    ``weights`` (H, W); sizes may differ between images but not within one case.
    """

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 fovs: Sequence[np.ndarray], size: int,
                 weights: Sequence[np.ndarray] | None = None):
        if not len(images) or not len(images) == len(masks) == len(fovs):
            raise ValueError("need one mask and one FOV per image, and at least one image")
        if weights is not None and len(weights) != len(images):
            raise ValueError("need one weight map per image")
        self.size = size
        self.channels = np.asarray(images[0]).reshape(*np.shape(images[0])[:2], -1).shape[2]
        half = size // 2
        xs, ys, ws, widths, offsets, fov_centres, vessel_centres = [], [], [], [], [], [], []
        offset = 0
        for i, image in enumerate(images):
            image = np.asarray(image, np.float32).reshape(*np.shape(image)[:2], -1)
            if image.shape[2] != self.channels:
                raise ValueError(f"image {i} has {image.shape[2]} channels, image 0 {self.channels}")
            for name, other in (("mask", masks[i]), ("FOV", fovs[i])) + (
                    (("weight map", weights[i]),) if weights is not None else ()):
                if np.shape(other)[:2] != image.shape[:2]:
                    raise ValueError(f"image {i} is {image.shape[:2]} but its {name} "
                                     f"{np.shape(other)[:2]}")
            image = _padded(image, size)
            height, width = image.shape[:2]
            mask = _padded(np.asarray(masks[i]) > 0, size)
            fov = _padded(np.asarray(fovs[i]) > 0, size)
            allowed = np.zeros_like(fov)
            allowed[half:height - size + half + 1, half:width - size + half + 1] = True
            centres = allowed & fov if (allowed & fov).any() else allowed
            fov_centres.append(offset + np.flatnonzero(centres))
            vessel_centres.append(offset + np.flatnonzero(centres & mask))
            xs.append(image.reshape(-1, self.channels))
            ys.append(mask.reshape(-1).astype(np.float32))
            if weights is not None:
                ws.append(_padded(np.asarray(weights[i], np.float32), size).reshape(-1))
            widths.append(width)
            offsets.append(offset)
            offset += height * width
        self._x = np.concatenate(xs).T.copy()  # (C, pixels): each plane gathered by rows
        self._y = np.concatenate(ys)
        self._w = np.concatenate(ws) if weights is not None else None
        self._widths = np.asarray(widths, np.int64)
        self._offsets = np.asarray(offsets, np.int64)
        self._fov_centres = np.concatenate(fov_centres)
        self._vessel_centres = np.concatenate(vessel_centres)

    @property
    def has_weights(self) -> bool:
        return self._w is not None

    def foreground_fraction(self) -> float:
        """Share of vessel pixels among possible patch centres (for class-weighted losses)."""
        return len(self._vessel_centres) / max(1, len(self._fov_centres))

    def sample(self, n: int, rng: np.random.Generator, vessel_fraction: float = 0.0):
        """``(x, y)`` or ``(x, y, w)``: float32 (n, size, size, C), (n, size, size, 1), (n, size, size)."""
        n_vessel = round(n * vessel_fraction) if len(self._vessel_centres) else 0
        centres = np.concatenate([
            self._vessel_centres[rng.integers(0, len(self._vessel_centres), n_vessel)],
            self._fov_centres[rng.integers(0, len(self._fov_centres), n - n_vessel)],
        ])
        if n_vessel:
            centres = centres[rng.permutation(n)]
        image_ids = np.searchsorted(self._offsets, centres, side="right") - 1
        widths = self._widths[image_ids]
        half = self.size // 2
        corners = centres - half * widths - half
        row_starts = corners[:, None] + np.arange(self.size) * widths[:, None]
        x = np.empty((n, self.size, self.size, self.channels), np.float32)
        for channel, plane in enumerate(self._x):
            x[..., channel] = sliding_window_view(plane, self.size)[row_starts]
        y = sliding_window_view(self._y, self.size)[row_starts][..., None]
        if self._w is None:
            return x, y
        return x, y, sliding_window_view(self._w, self.size)[row_starts]


def random_dihedral(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Each patch of a batch mapped by a random symmetry of the square, the same in every array.

    ``arrays`` share the batch axis and two square spatial axes (1, 2): images, masks, weights.
    The symmetry is drawn uniformly from the 8 (identity, 3 rotations, 4 mirrorings) as three
    coin flips: transpose, then mirror rows, then mirror columns. Vessels have no preferred
    orientation at patch scale, so this multiplies what a patch can show at no I/O cost.
    """
    n = len(arrays[0])
    transpose, flip_rows, flip_cols = rng.integers(0, 2, (3, n)).astype(bool)
    out = []
    for array in arrays:
        array = array.copy()
        array[transpose] = array[transpose].swapaxes(1, 2)
        array[flip_rows] = array[flip_rows, ::-1]
        array[flip_cols] = array[flip_cols, :, ::-1]
        out.append(array)
    return tuple(out)


def sample_patches(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   fovs: Sequence[np.ndarray], n: int, size: int, rng: np.random.Generator,
                   vessel_fraction: float = 0.0, weights: Sequence[np.ndarray] | None = None):
    """``n`` random ``size``×``size`` patches: ``(x, y)``, or ``(x, y, w)`` when ``weights`` are given.

    For repeated draws from the same images build one :class:`PatchSampler` and call ``sample``.
    """
    return PatchSampler(images, masks, fovs, size, weights).sample(n, rng, vessel_fraction)
