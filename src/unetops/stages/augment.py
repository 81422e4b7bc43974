"""Stage ``augment``: seeded augmented copies of the training cases, into ``data/augmented/``.

For every ``train`` case of ``data/split.csv`` it writes ``<case>_000.npz`` (the preprocessed
case unchanged) and ``<case>_001.npz`` … ``<case>_<copies>.npz`` (random copies from
:func:`unetops.transforms.augment_case`); validation and test cases are never augmented, and
``augment.copies: 0`` passes the training cases through. Copy ``k`` of a case draws from a
generator seeded with (``augment.seed``, CRC-32 of the case name, ``k``), so each copy is
reproducible on its own: adding cases or copies leaves the existing ones unchanged. With
``augment.weight_map`` each file also holds ``weight``, the U-Net weight map of its own mask
(:func:`unetops.transforms.unet_weight_map`), computed here once rather than every epoch.
Cases run in a few threads (each copy has its own generator, so threads change nothing). The
outputs are checked like preprocess's; a failure leaves ``data/augmented`` as it was.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from unetops.config import Config
from unetops.console import log
from unetops.errors import UnetopsError
from unetops.io import atomic_dir, load_arrays, save_arrays
from unetops.preprocessing import array_rules, describe_arrays, map_in_threads, read_split
from unetops.transforms import augment_case, case_rng, unet_weight_map
from unetops.validation import check_frame

ARRAY_KEYS = ("image", "mask", "fov")


def _load_case(cfg: Config, case: str) -> dict[str, np.ndarray]:
    path = cfg.paths.preprocessed / f"{case}.npz"
    shown = cfg.paths.rel(path)
    if not path.is_file():
        raise UnetopsError(f"{shown}: file not found (run unetops preprocess first)")
    arrays = load_arrays(path)
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise UnetopsError(f"{shown}: missing array(s) {','.join(missing)} "
                           "(rerun unetops preprocess)")
    return arrays


def _augment_one(case: str, cfg: Config, staging: Path) -> list[dict]:
    """Write the original and the copies of one case into ``staging``; their output-table rows."""
    aug = cfg.augment
    arrays = _load_case(cfg, case)
    rows = []
    for copy in range(aug.copies + 1):
        if copy == 0:
            image, mask, fov = (arrays[key] for key in ARRAY_KEYS)
        else:
            image, mask, fov = augment_case(arrays["image"], arrays["mask"], arrays["fov"], aug,
                                            case_rng(aug.seed, case, copy))
        out = {"image": image, "mask": mask, "fov": fov}
        if aug.weight_map:
            out["weight"] = unet_weight_map(mask, fov, aug.weight_w0, aug.weight_sigma)
        name = f"{case}_{copy:03d}.npz"
        save_arrays(staging / name, **out)
        rows.append(describe_arrays(cfg.paths.rel(cfg.paths.augmented / name), image, mask, fov,
                                    out.get("weight")))
    return rows


def run(cfg: Config) -> None:
    split = read_split(cfg)
    train = split.loc[split["subset"] == "train", "case"].tolist()
    if not train:
        raise UnetopsError(f"{cfg.paths.rel(cfg.paths.split_csv)}: no training cases "
                           "(expect at least one row with subset train)")
    target = cfg.paths.augmented
    with atomic_dir(target) as staging:
        per_case = map_in_threads(lambda case: _augment_one(case, cfg, staging), train,
                                  "augmenting")
        frame = pd.DataFrame([row for rows in per_case for row in rows])
        check_frame(frame, array_rules(int(frame["channels"].iloc[0]),
                                       weights=cfg.augment.weight_map), cfg.paths.rel(target))
    log.info("augment: %d training cases × %d files → %s", len(train), cfg.augment.copies + 1,
             cfg.paths.rel(target))
