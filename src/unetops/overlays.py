"""Error overlays: one colour code for train's sample grid and evaluate's per-case pictures.

White: vessel found (true positive); magenta: vessel missed; green: false alarm — a pair that
colour-blind readers tell apart, on the dimmed image so the errors stand out.
"""

import numpy as np

#: RGB of true positives, misses (false negatives) and false alarms (false positives).
OVERLAY_COLOURS = {"tp": (255, 255, 255), "fn": (255, 0, 255), "fp": (0, 200, 0)}
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
DIM_INSIDE, DIM_OUTSIDE = 0.45, 0.15


def grayscale(image: np.ndarray) -> np.ndarray:
    """2-D float32 in [0, 1] from a gray or RGB image, integer (full range) or float ([0, 1])."""
    gray = np.asarray(image, np.float32)
    if gray.ndim == 3:
        gray = gray @ LUMA if gray.shape[-1] == 3 else gray.mean(axis=-1)
    if np.issubdtype(np.asarray(image).dtype, np.integer):
        gray = gray / np.iinfo(np.asarray(image).dtype).max
    return np.clip(gray, 0.0, 1.0)


def error_overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray,
                  fov: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8: ``image`` dimmed (more outside ``fov``) with hits, misses and false alarms
    inside the FOV in :data:`OVERLAY_COLOURS`."""
    fov = np.ones(truth.shape, bool) if fov is None else fov
    base = np.where(fov, DIM_INSIDE, DIM_OUTSIDE) * grayscale(image) * 255.0
    out = np.repeat(base[..., None], 3, axis=2).round().astype(np.uint8)
    for name, where in (("tp", predicted & truth), ("fn", ~predicted & truth),
                        ("fp", predicted & ~truth)):
        out[where & fov] = OVERLAY_COLOURS[name]
    return out
