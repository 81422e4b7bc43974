"""Fundus-like images drawn from a seed, with exact vessel masks: no network, no licence.

Used by tests, CI and the quick start to exercise the whole pipeline; never used to claim
accuracy. Each image has a circular field of view, one or two branching vessel trees whose
width and contrast shrink with every branching, an optic-disc glow, a smooth illumination
gradient and sensor noise, so preprocessing (CLAHE, FOV-aware standardisation) has real work to do.
"""

from collections.abc import Iterator

import cv2
import numpy as np


def _grow_tree(canvas: np.ndarray, mask: np.ndarray, start, angle: float, length: float,
               width: float, contrast: float, rng: np.random.Generator, depth: int) -> None:
    """Draw a wiggly vessel segment, then recurse into two thinner, fainter branches."""
    if depth == 0 or width < 1.0 or length < 4:
        return
    points = [np.asarray(start, float)]
    for _ in range(6):
        angle += rng.normal(0.0, 0.25)
        points.append(points[-1] + length / 6 * np.array([np.cos(angle), np.sin(angle)]))
    polyline = np.round(np.stack(points)).astype(np.int32)
    thickness = max(1, int(round(width)))
    cv2.polylines(mask, [polyline], False, 1, thickness=thickness, lineType=cv2.LINE_8)
    cv2.polylines(canvas, [polyline], False, float(contrast), thickness=thickness,
                  lineType=cv2.LINE_8)
    for side in (-1, 1):
        _grow_tree(canvas, mask, points[-1], angle + side * rng.uniform(0.3, 0.8),
                   length * rng.uniform(0.6, 0.85), width * rng.uniform(0.6, 0.8),
                   contrast * rng.uniform(0.75, 0.95), rng, depth - 1)


def synthetic_case(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One fundus-like RGB uint8 image with its bool vessel mask and bool circular FOV."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 - 0.5
    radius = size * rng.uniform(0.44, 0.48)
    fov = (yy - centre) ** 2 + (xx - centre) ** 2 <= radius ** 2

    vessels = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), np.uint8)
    disc = np.array([centre + rng.uniform(-0.2, 0.2) * size, centre + rng.uniform(-0.1, 0.1) * size])
    for _ in range(rng.integers(2, 4)):
        _grow_tree(vessels, mask, disc, rng.uniform(0, 2 * np.pi), size * rng.uniform(0.18, 0.28),
                   size * rng.uniform(0.025, 0.04), rng.uniform(0.35, 0.55), rng, depth=5)

    gradient = 0.75 + 0.35 * ((xx * np.cos(a := rng.uniform(0, 2 * np.pi))
                               + yy * np.sin(a)) / size)
    glow = np.exp(-((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2) / (2 * (0.06 * size) ** 2))
    background = np.clip(gradient + 0.5 * glow, 0, 1.6)
    smooth_vessels = cv2.GaussianBlur(vessels, (0, 0), 0.6)
    base_rgb = np.array([0.85, 0.45, 0.22], np.float32)
    image = background[..., None] * base_rgb * (1 - smooth_vessels[..., None] * [0.5, 1.0, 0.8])
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    image = np.where(fov[..., None], image, 0.0)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    return image, (mask > 0) & fov, fov


def synthetic_dataset(n_images: int, size: int, seed: int
                      ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(case, image, mask, fov)`` for ``n_images`` cases; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    for index in range(n_images):
        yield (f"syn{index:03d}", *synthetic_case(size, rng))
