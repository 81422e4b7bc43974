"""Seeded augmentations of one case, and the U-Net paper's weight map. Pure numpy/OpenCV.

Geometric transforms (flips, rotation, zoom, shear and the elastic field) are composed into one
affine matrix plus one displacement field and applied in a single ``cv2.remap`` to a stack of
image, mask and FOV, so the three can never disagree (seed 004 warped image and label with
different random fields) and the case is interpolated once, not once per transform. Borders are
reflected. Mask and FOV are interpolated bilinearly with the image and binarised again at 0.5.
Photometric transforms (brightness, contrast, gamma, Gaussian noise) change the image alone,
inside the FOV only, and keep it in [0, 1].
"""

import math
import zlib

import cv2
import numpy as np

from unetops.config import AugmentConfig

#: The distance term of the weight map is dropped where it is below this (in weight units).
WEIGHT_TERM_FLOOR = 1e-3


def case_rng(seed: int, case: str, copy: int) -> np.random.Generator:
    """The generator of one copy of one case, independent of case order and of the other copies."""
    return np.random.default_rng([seed, zlib.crc32(case.encode()), copy])


def affine_matrix(shape: tuple[int, ...], angle: float = 0.0, scale: float = 1.0,
                  shear: float = 0.0, flip_lr: bool = False, flip_ud: bool = False) -> np.ndarray:
    """The 3×3 matrix mapping input to output pixel coordinates (x, y), about the image centre.

    Applied in the order flip, zoom (``scale``), shear (degrees, horizontal), rotation (degrees,
    counter-clockwise as seen on screen).
    """
    height, width = shape[:2]
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    back = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]], np.float64)
    flip = np.diag([-1.0 if flip_lr else 1.0, -1.0 if flip_ud else 1.0, 1.0])
    zoom = np.diag([scale, scale, 1.0])
    shear_m = np.array([[1, math.tan(math.radians(shear)), 0], [0, 1, 0], [0, 0, 1]], np.float64)
    theta = math.radians(angle)
    rotation = np.array([[math.cos(theta), math.sin(theta), 0],
                         [-math.sin(theta), math.cos(theta), 0], [0, 0, 1]], np.float64)
    return back @ rotation @ shear_m @ zoom @ flip @ to_origin


def random_affine(shape: tuple[int, ...], cfg: AugmentConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """Draw flips, rotation, zoom and shear, each with its own probability, as one 3×3 matrix."""
    def strength(prob: float, maximum: float) -> float:
        return float(rng.uniform(-maximum, maximum)) if rng.random() < prob else 0.0

    flip_lr = bool(rng.random() < cfg.flip.prob)
    flip_ud = bool(rng.random() < cfg.flip.prob)
    angle = strength(cfg.rotate.prob, cfg.rotate.max)
    scale = 1.0 + strength(cfg.zoom.prob, cfg.zoom.max)
    shear = strength(cfg.shear.prob, cfg.shear.max)
    return affine_matrix(shape, angle, scale, shear, flip_lr, flip_ud)


def elastic_displacement(shape: tuple[int, ...], alpha: float, sigma: float,
                         rng: np.random.Generator) -> np.ndarray:
    """Simard et al. (2003): per axis uniform(-1, 1) noise, Gaussian-smoothed (sigma px), × alpha.

    Returns float32 (2, H, W) displacements (dx, dy) in pixels; RMS ≈ 0.16·alpha/sigma per axis.
    For sigma ≥ 8 the noise is drawn on a grid ``sigma // 4`` times coarser, smoothed there and
    interpolated back (the amplitude rescaled to match): the same smooth field statistically,
    at a small fraction of the cost of a 100-tap blur at full resolution.
    """
    height, width = shape[:2]
    step = max(1, int(sigma // 4))
    coarse = (-(-height // step), -(-width // step))
    fields = []
    for _ in range(2):
        noise = rng.random(coarse, dtype=np.float32) * 2.0 - 1.0
        smooth = cv2.GaussianBlur(noise, (0, 0), sigma / step, borderType=cv2.BORDER_REFLECT_101)
        if step > 1:
            smooth = cv2.resize(smooth, (coarse[1] * step, coarse[0] * step),
                                interpolation=cv2.INTER_LINEAR)[:height, :width]
        fields.append(smooth * np.float32(alpha / step))
    return np.stack(fields)


def warp(stack: np.ndarray, matrix: np.ndarray,
         displacement: np.ndarray | None = None) -> np.ndarray:
    """Resample a float32 (H, W, K) stack once: output(p) = input(matrix⁻¹·(p + displacement(p))).

    Bilinear interpolation, reflected borders; no displacement means a plain ``warpAffine``.
    """
    height, width = stack.shape[:2]
    stack = np.ascontiguousarray(stack, dtype=np.float32)
    border = cv2.BORDER_REFLECT_101
    if displacement is None:
        if np.allclose(matrix, np.eye(3)):
            return stack.copy()
        out = cv2.warpAffine(stack, matrix[:2], (width, height), flags=cv2.INTER_LINEAR,
                             borderMode=border)
    else:
        inverse = np.linalg.inv(matrix).astype(np.float32)
        xs = np.arange(width, dtype=np.float32)[None, :] + displacement[0]
        ys = np.arange(height, dtype=np.float32)[:, None] + displacement[1]
        map_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
        map_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        out = cv2.remap(stack, map_x, map_y, cv2.INTER_LINEAR, borderMode=border)
    return out.reshape(stack.shape)


def warp_case(image: np.ndarray, mask: np.ndarray, fov: np.ndarray, matrix: np.ndarray,
              displacement: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move image, mask and FOV with one geometric transform; mask and FOV come back uint8 0/1."""
    image = np.asarray(image, np.float32)
    channels = image.shape[2] if image.ndim == 3 else 1
    stack = np.concatenate([image.reshape(*image.shape[:2], channels),
                            (np.asarray(mask) > 0)[..., None].astype(np.float32),
                            (np.asarray(fov) > 0)[..., None].astype(np.float32)], axis=2)
    out = warp(stack, matrix, displacement)
    warped = out[..., :channels].reshape(image.shape)
    np.clip(warped, 0.0, 1.0, out=warped)
    return (warped, (out[..., channels] >= 0.5).astype(np.uint8),
            (out[..., channels + 1] >= 0.5).astype(np.uint8))


def elastic_deform(image: np.ndarray, mask: np.ndarray, fov: np.ndarray, alpha: float,
                   sigma: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elastic deformation alone: one random field moves image, mask and FOV alike."""
    displacement = elastic_displacement(np.shape(image), alpha, sigma, rng)
    return warp_case(image, mask, fov, np.eye(3), displacement)


def photometric_jitter(image: np.ndarray, fov: np.ndarray, cfg: AugmentConfig,
                       rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, gamma and Gaussian noise on the [0, 1] image, inside the FOV only."""
    inside = np.asarray(fov) > 0
    out = np.array(image, np.float32)
    if rng.random() < cfg.brightness.prob:
        out += np.float32(rng.uniform(-cfg.brightness.max, cfg.brightness.max))
    if rng.random() < cfg.contrast.prob:
        factor = np.float32(1.0 + rng.uniform(-cfg.contrast.max, cfg.contrast.max))
        mean = out[inside].mean(axis=0) if inside.any() else out.mean(axis=(0, 1))
        out = (out - mean) * factor + mean
    if rng.random() < cfg.gamma.prob:
        exponent = np.float32(1.0 + rng.uniform(-cfg.gamma.max, cfg.gamma.max))
        out = np.power(np.clip(out, 0.0, 1.0), exponent)
    if rng.random() < cfg.noise.prob:
        sd = np.float32(rng.uniform(0.0, cfg.noise.max))
        out += rng.standard_normal(out.shape, dtype=np.float32) * sd
    np.clip(out, 0.0, 1.0, out=out)
    if out.ndim == 3:
        inside = inside[..., None]
    return np.where(inside, out, np.asarray(image, np.float32))


def augment_case(image: np.ndarray, mask: np.ndarray, fov: np.ndarray, cfg: AugmentConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random augmented copy: a geometric transform of all three, then photometric on the image.

    ``image`` float32 (H, W[, C]) in [0, 1]; mask and FOV binary (H, W), returned uint8 0/1.
    The draws depend only on ``rng``, so a seeded generator gives the same bytes every time.
    """
    matrix = random_affine(np.shape(image), cfg, rng)
    displacement = None
    if rng.random() < cfg.elastic.prob and cfg.elastic.alpha > 0:
        displacement = elastic_displacement(np.shape(image), cfg.elastic.alpha,
                                            cfg.elastic.sigma, rng)
    image, mask, fov = warp_case(image, mask, fov, matrix, displacement)
    return photometric_jitter(image, fov, cfg, rng), mask, fov


def unet_weight_map(mask: np.ndarray, fov: np.ndarray | None = None, w0: float = 10.0,
                    sigma: float = 5.0) -> np.ndarray:
    """The U-Net paper's weight map: w(x) = w_c(x) + w0·exp(−(d1(x) + d2(x))² / (2σ²)).

    Ronneberger et al. (2015) weight the thin borders between touching cells so the network
    learns to separate them. Here the mask's foreground is the membrane (ISBI 2012), the cells
    are the 4-connected components of the background, and d1/d2 are the distances to the nearest
    and second-nearest cell (exact Euclidean distance transforms). The distance term applies to
    membrane pixels; w_c balances the two classes inside the FOV (mean of w_c over the FOV is 1).
    Pixels outside the FOV weigh 0. Each cell's distances are computed only within the margin
    beyond which the term is below ``WEIGHT_TERM_FLOOR``, which keeps hundreds of cells fast.
    """
    membrane = np.asarray(mask) > 0
    inside = np.ones_like(membrane) if fov is None else np.asarray(fov) > 0
    n_membrane = int(np.count_nonzero(membrane & inside))
    n_cell = int(np.count_nonzero(~membrane & inside))
    weights = np.ones(membrane.shape, np.float32)
    if n_membrane and n_cell:
        total = n_membrane + n_cell
        weights[membrane] = total / (2.0 * n_membrane)
        weights[~membrane] = total / (2.0 * n_cell)

    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        (~membrane).astype(np.uint8), connectivity=4)
    if w0 > 0 and count > 2:
        margin = math.ceil(sigma * math.sqrt(2.0 * math.log(max(w0 / WEIGHT_TERM_FLOOR, 1.0))))
        height, width = membrane.shape
        d1 = np.full(membrane.shape, np.inf, np.float32)
        d2 = np.full(membrane.shape, np.inf, np.float32)
        for label in range(1, count):
            x, y, w, h = stats[label, :4]
            y0, y1 = max(0, y - margin), min(height, y + h + margin)
            x0, x1 = max(0, x - margin), min(width, x + w + margin)
            outside_cell = (labels[y0:y1, x0:x1] != label).astype(np.uint8)
            dist = cv2.distanceTransform(outside_cell, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            dist[dist > margin] = np.inf
            near, second = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]
            np.minimum(second, np.maximum(near, dist), out=second)
            np.minimum(near, dist, out=near)
        term = np.zeros(membrane.shape, np.float32)
        finite = membrane & np.isfinite(d2)
        total_distance = d1[finite] + d2[finite]
        term[finite] = w0 * np.exp(-(total_distance ** 2) / (2.0 * sigma ** 2))
        weights += term
    weights[~inside] = 0.0
    return weights
