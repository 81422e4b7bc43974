"""Stage ``preprocess``: every case of ``data/split.csv`` into ``data/preprocessed/<case>.npz``.

Each case (train, val and test alike) goes through :func:`unetops.preprocessing.preprocess_case`
and is stored losslessly as ``image`` float32 (H, W, C) in [0, 1], ``mask`` and ``fov`` uint8
0/1, at native size unless ``preprocess.resize_max_side`` shrinks it. Each file is read once;
the inputs are checked (sizes, binary masks, FOV not empty), then the outputs (dtype, range,
sizes, binary, foreground fraction); a failure names the file and the rule, and
``data/preprocessed`` is left as it was: the folder is written under a temporary name and
swapped in only when every check has passed. Cases are independent, so they run in a few
threads; the result does not depend on the order.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from unetops.config import Config
from unetops.console import log
from unetops.io import atomic_dir, read_image, save_arrays
from unetops.preprocessing import (array_rules, describe_arrays, is_binary, map_in_threads,
                                   preprocess_case, read_split)
from unetops.validation import Rule, check_frame

CASE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

IMAGE_RULES = [
    Rule("case name must be a plain file name (letters, digits, . _ -)",
         "ExpectColumnValuesToMatchRegex", {"column": "case", "regex": CASE_NAME}),
    Rule("image must be 8- or 16-bit", "ExpectColumnValuesToBeInSet",
         {"column": "dtype", "value_set": ["uint8", "uint16"]}),
    Rule("image must be gray or RGB", "ExpectColumnValuesToBeInSet",
         {"column": "channels", "value_set": [1, 3]}),
]
MASK_RULES = [
    Rule("must have the image's size", "ExpectColumnValuesToBeInSet",
         {"column": "sizes_match", "value_set": [True]}),
    Rule("must be binary (at most one nonzero value)", "ExpectColumnValuesToBeInSet",
         {"column": "binary", "value_set": [True]}),
]
FOV_RULES = MASK_RULES + [
    Rule("FOV must not be empty", "ExpectColumnValuesToBeBetween",
         {"column": "fov_pixels", "min_value": 1}),
]


def _describe_inputs(row, image: np.ndarray, mask: np.ndarray,
                     fov: np.ndarray | None) -> dict[str, dict]:
    """What the input rules check about one case's files, keyed by file kind."""
    size = image.shape[:2]
    described = {
        "image": {"path": row.image, "case": row.case, "dtype": str(image.dtype),
                  "channels": image.shape[2] if image.ndim == 3 else 1},
        "mask": {"path": row.mask, "sizes_match": mask.shape[:2] == size,
                 "binary": is_binary(mask)},
    }
    if fov is not None:
        described["fov"] = {"path": row.fov, "sizes_match": fov.shape[:2] == size,
                            "binary": is_binary(fov),
                            "fov_pixels": int(np.count_nonzero(_first_channel(fov)))}
    return described


def _first_channel(array: np.ndarray) -> np.ndarray:
    return array[..., 0] if array.ndim == 3 else array


def _preprocess_one(row, cfg: Config, staging: Path) -> tuple[dict[str, dict], dict | None]:
    """Read one case once, describe its inputs and, unless they cannot be processed, preprocess it
    into ``staging``; returns the input description and the output-table row (or None)."""
    image = read_image(cfg.paths.abs(row.image))
    mask = read_image(cfg.paths.abs(row.mask))
    fov = read_image(cfg.paths.abs(row.fov)) if row.fov else None
    inputs = _describe_inputs(row, image, mask, fov)
    if not inputs["mask"]["sizes_match"] or ("fov" in inputs and not (
            inputs["fov"]["sizes_match"] and inputs["fov"]["fov_pixels"])):
        return inputs, None  # the input checks name the file and rule
    image, mask, fov = preprocess_case(image, _first_channel(mask) > 0,
                                       None if fov is None else _first_channel(fov) > 0,
                                       cfg.preprocess)
    save_arrays(staging / f"{row.case}.npz", image=image, mask=mask, fov=fov)
    return inputs, describe_arrays(cfg.paths.rel(cfg.paths.preprocessed / f"{row.case}.npz"),
                                   image, mask, fov)


def _check_inputs(described: list[dict[str, dict]], what: str) -> None:
    for kind, rules in (("image", IMAGE_RULES), ("mask", MASK_RULES), ("fov", FOV_RULES)):
        frame = pd.DataFrame([case[kind] for case in described if kind in case])
        if kind != "fov" or not frame.empty:
            check_frame(frame, rules, what)


def run(cfg: Config) -> None:
    split = read_split(cfg)
    target = cfg.paths.preprocessed
    with atomic_dir(target) as staging:
        results = map_in_threads(lambda row: _preprocess_one(row, cfg, staging),
                                 list(split.itertuples(index=False)), "preprocessing")
        _check_inputs([inputs for inputs, _ in results], cfg.paths.rel(cfg.paths.split_csv))
        channels = 3 if cfg.preprocess.channel == "rgb" else 1
        rules = array_rules(channels, cfg.preprocess.foreground_fraction)
        check_frame(pd.DataFrame([output for _, output in results]), rules, cfg.paths.rel(target))
    log.info("preprocess: %d cases → %s", len(results), cfg.paths.rel(target))
