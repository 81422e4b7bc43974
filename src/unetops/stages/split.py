"""Stage ``split``: assign every case to train/val/test, fill in FOVs, validate, write the manifest.

Where a dataset has a fixed split it wins: STARE uses seed 000's split exactly, DRIVE its
official training/test sets, ISBI 2012 holds out its last ``split.isbi_test_slices`` slices;
``folder`` and ``synthetic`` get a seeded ratio split (``split.test_fraction``). In every case a
validation subset is carved out of train with ``split.seed`` (``split.val_fraction``, rounded,
at least one case), so no choice is ever made on test.

FOVs: the dataset's own FOV from ``data/raw/fov`` where it has one (DRIVE, synthetic, a folder
with ``data.folder.fov``); STARE's are estimated from the photo (:func:`unetops.fov.estimate_fov`);
everything else gets an all-ones FOV, because FOV estimation only makes sense for fundus photos.
Computed FOVs go to ``data/fov/<case>.png``.

The manifest and every file it names are checked with Great Expectations before anything is
written: a failure names the file and the rule, and leaves ``data/split.csv`` and ``data/fov``
as they were.
"""

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from unetops.config import Config, SplitConfig
from unetops.console import log, track
from unetops.errors import UnetopsError
from unetops.fov import estimate_fov
from unetops.io import atomic_dir, read_image, write_csv, write_png
from unetops.validation import Rule, check_frame

SUBSETS = ("train", "val", "test")
#: Seed 000's STARE training images (sohiniroych/U-net_using_TF2); the other 10 are its test set.
STARE_SEED000_TRAIN = ("im0001", "im0002", "im0003", "im0004", "im0005",
                       "im0044", "im0077", "im0081", "im0082", "im0139")

MANIFEST_RULES = [
    Rule("subset must be train, val or test", "ExpectColumnValuesToBeInSet",
         {"column": "subset", "value_set": list(SUBSETS)}),
    Rule("a case may be in one subset only", "ExpectColumnValuesToBeUnique", {"column": "case"}),
    Rule("an image may belong to one case only", "ExpectColumnValuesToBeUnique",
         {"column": "path"}),
    Rule("train, val and test must each have at least one case",
         "ExpectColumnDistinctValuesToContainSet",
         {"column": "subset", "value_set": list(SUBSETS)}),
]

FILE_RULES = [
    Rule("must be a readable image", "ExpectColumnValuesToBeInSet",
         {"column": "readable", "value_set": [True]}),
    Rule("must have the image's size", "ExpectColumnPairValuesToBeEqual",
         {"column_A": "size", "column_B": "image_size"}),
    Rule("mask must be binary (at most two distinct values)", "ExpectColumnValuesToBeBetween",
         {"column": "n_values", "max_value": 2}),
    Rule("mask must be binary (one of its values 0)", "ExpectColumnValuesToBeInSet",
         {"column": "min_value", "value_set": [0]}),
]


# --- subset assignment (pure) -----------------------------------------------------------------

def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _stare_test(cases: pd.DataFrame, split: SplitConfig, rng: np.random.Generator) -> set[str]:
    missing = sorted(set(STARE_SEED000_TRAIN) - set(cases["case"]))
    if missing:
        raise UnetopsError("data/raw/cases.csv: not the STARE cases (missing "
                           f"{', '.join(missing)}); rerun unetops download")
    return set(cases["case"]) - set(STARE_SEED000_TRAIN)


def _drive_test(cases: pd.DataFrame, split: SplitConfig, rng: np.random.Generator) -> set[str]:
    if not set(cases["group"]) <= {"train", "test"}:
        raise UnetopsError("data/raw/cases.csv: not the DRIVE cases (group must be train or test); "
                           "rerun unetops download")
    return set(cases.loc[cases["group"] == "test", "case"])


def _isbi_test(cases: pd.DataFrame, split: SplitConfig, rng: np.random.Generator) -> set[str]:
    ordered = sorted(cases["case"])
    if split.isbi_test_slices >= len(ordered) - 1:
        raise UnetopsError(f"split.isbi_test_slices: {split.isbi_test_slices} leaves fewer than 2 "
                           f"of {len(ordered)} slices for train and val")
    return set(ordered[-split.isbi_test_slices:])


def _ratio_test(cases: pd.DataFrame, split: SplitConfig, rng: np.random.Generator) -> set[str]:
    ordered = sorted(cases["case"])
    n_test = max(1, _round_half_up(split.test_fraction * len(ordered)))
    n_test = min(n_test, max(len(ordered) - 2, 0))
    return set(rng.permutation(ordered)[:n_test].tolist())


TEST_RULES: dict[str, Callable[[pd.DataFrame, SplitConfig, np.random.Generator], set[str]]] = {
    "stare": _stare_test,
    "drive": _drive_test,
    "isbi2012": _isbi_test,
    "folder": _ratio_test,
    "synthetic": _ratio_test,
}


def assign_subsets(cases: pd.DataFrame, dataset: str, split: SplitConfig) -> dict[str, str]:
    """Case → ``train``/``val``/``test``: the dataset's test rule, then a seeded val carve-out.

    Deterministic for a given ``split.seed`` (numpy's PCG64 on the sorted case names). With too
    few cases a subset stays empty and the validation names it. ISBI 2012 is a stack of serial
    sections whose neighbours look alike, so its validation slices are the contiguous block just
    before the held-out test block, not a random pick that would sit between training slices.
    """
    rng = np.random.default_rng(split.seed)
    test = TEST_RULES[dataset](cases, split, rng)
    train = sorted(set(cases["case"]) - test)
    n_val = max(1, _round_half_up(split.val_fraction * len(train)))
    n_val = min(n_val, max(len(train) - 1, 0))
    if dataset == "isbi2012":
        val = set(train[len(train) - n_val:])
    else:
        val = set(rng.permutation(train)[:n_val].tolist())
    return {case: "test" if case in test else "val" if case in val else "train"
            for case in sorted(cases["case"])}


# --- files ------------------------------------------------------------------------------------

def read_cases(cfg: Config) -> pd.DataFrame:
    path = cfg.paths.raw_cases
    shown = cfg.paths.rel(path)
    if not path.is_file():
        raise UnetopsError(f"{shown}: file not found (run unetops download first)")
    try:
        cases = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as exc:
        raise UnetopsError(f"{shown}: not a readable CSV ({exc.__class__.__name__})") from None
    if list(cases.columns) != ["case", "group"]:
        raise UnetopsError(f"{shown}: expected the columns case,group")
    return cases


def _describe(kind: str, rel: str, source: Path, image_size: str | None
              ) -> tuple[dict, np.ndarray | None]:
    """One row of the file table (readable, size, a mask's distinct values) and the array read."""
    row = {"path": rel, "kind": kind, "readable": False, "size": None, "image_size": image_size,
           "n_values": None, "min_value": None}
    try:
        array = read_image(source)
    except UnetopsError:
        return row, None
    row.update(readable=True, size=f"{array.shape[0]}x{array.shape[1]}")
    if kind == "image":
        row["image_size"] = row["size"]
    if kind == "mask":
        values = np.unique(array)
        row.update(n_values=len(values), min_value=float(values[0]))
    return row, array


def computed_fov(image: np.ndarray, dataset: str) -> np.ndarray:
    """The FOV of a case that has none: estimated for fundus photos (STARE), else all ones."""
    return estimate_fov(image) if dataset == "stare" else np.ones(image.shape[:2], bool)


def run(cfg: Config) -> None:
    """Write ``data/split.csv`` (``case,subset,image,mask,fov``) and the computed ``data/fov``."""
    paths = cfg.paths
    cases = read_cases(cfg)
    subsets = assign_subsets(cases, cfg.data.dataset, cfg.split)
    rows, files = [], []
    with atomic_dir(paths.fov) as staged_fov:
        for case, subset in track(subsets.items(), "split", total=len(subsets)):
            image_path = paths.raw / "images" / f"{case}.png"
            mask_path = paths.raw / "masks" / f"{case}.png"
            raw_fov = paths.raw / "fov" / f"{case}.png"
            image_row, image = _describe("image", paths.rel(image_path), image_path, None)
            if raw_fov.is_file():
                fov_rel, fov_read = paths.rel(raw_fov), raw_fov
            else:
                fov_rel, fov_read = paths.rel(paths.fov / f"{case}.png"), staged_fov / f"{case}.png"
                if image is not None:
                    write_png(fov_read, computed_fov(image, cfg.data.dataset))
            files.append(image_row)
            files.append(_describe("mask", paths.rel(mask_path), mask_path, image_row["size"])[0])
            files.append(_describe("fov", fov_rel, fov_read, image_row["size"])[0])
            rows.append({"case": case, "subset": subset, "image": paths.rel(image_path),
                         "mask": paths.rel(mask_path), "fov": fov_rel})
        manifest = pd.DataFrame(rows, columns=["case", "subset", "image", "mask", "fov"])
        shown = paths.rel(paths.split_csv)
        check_frame(manifest.assign(path=manifest["image"]), MANIFEST_RULES, shown)
        check_frame(pd.DataFrame(files), FILE_RULES, shown)
    write_csv(paths.split_csv, manifest)
    counts = manifest["subset"].value_counts()
    log.info("split: %s", ", ".join(f"{counts.get(s, 0)} {s}" for s in SUBSETS))
