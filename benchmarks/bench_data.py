"""Data-pipeline throughput on DRIVE: preprocess, augment and patch sampling against their targets.

    python benchmarks/bench_data.py            # exit status 1 when a target is missed

Reads DRIVE's 40 images straight out of ``DRIVE.zip`` in the dataset mirror (``$UNETOPS_MIRROR``,
else ``../shared/datasets``) with zipfile, as PNGs into a temporary project; skips cleanly
(exit 0) without it.
Targets (issue 4, on 2 cores): the ``preprocess`` stage on the 40 images ≤ 10 s, timed cold
(reading the PNGs, checks, compressed writes, and Great Expectations' 2–5 s import, which every
``unetops preprocess`` pays); ``augment_case`` at DRIVE size with every transform on, in one
thread, ≥ 20 images/s; ``sample_patches`` 48×48 ≥ 50,000 patches/s. Rows without a target are
for information. The numbers move with the machine's load: run it on an idle machine.
"""

import argparse
import importlib
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from unetops.config import AugmentConfig, load_config
from unetops.io import load_arrays, write_png
from unetops.transforms import augment_case, case_rng

REPO = Path(__file__).resolve().parents[1]
DRIVE_FILE = re.compile(r"DRIVE/(training|test)/(images|mask|1st_manual)/(\d+)_[^/]+\.(tif|gif)$")
ALL_TRANSFORMS = AugmentConfig(
    flip={"prob": 1.0}, rotate={"prob": 1.0, "max": 180.0}, zoom={"prob": 1.0, "max": 0.15},
    shear={"prob": 1.0, "max": 10.0}, elastic={"prob": 1.0, "alpha": 400.0, "sigma": 16.0},
    brightness={"prob": 1.0, "max": 0.1}, contrast={"prob": 1.0, "max": 0.2},
    gamma={"prob": 1.0, "max": 0.2}, noise={"prob": 1.0, "max": 0.02})


def drive_zip() -> Path | None:
    mirror = Path(os.environ.get("UNETOPS_MIRROR", REPO.parent / "shared" / "datasets"))
    path = mirror / "drive" / "DRIVE.zip"
    return path if path.is_file() else None


def decode(data: bytes) -> np.ndarray:
    """DRIVE's LZW TIFFs and GIFs through OpenCV (tifffile would need imagecodecs): RGB or gray."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image


def binary(image: np.ndarray) -> np.ndarray:
    """A GIF label decoded as (H, W, 3) by OpenCV, as a one-channel bool mask."""
    return (image[..., 0] if image.ndim == 3 else image) > 0


def build_project(archive: Path, root: Path) -> None:
    """DRIVE's 40 cases as PNGs under ``root/data/raw`` plus ``data/split.csv`` and params.yaml."""
    files: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            match = DRIVE_FILE.search(name)
            if match:
                group, kind, number, _ = match.groups()
                files.setdefault((group, number), {})[kind] = decode(zf.read(name))
    rows = []
    for (group, number), kinds in sorted(files.items()):
        case = f"{number}_{group}"
        paths = {"image": f"data/raw/images/{case}.png", "mask": f"data/raw/masks/{case}.png",
                 "fov": f"data/raw/fov/{case}.png"}
        write_png(root / paths["image"], kinds["images"])
        write_png(root / paths["mask"], binary(kinds["1st_manual"]))
        write_png(root / paths["fov"], binary(kinds["mask"]))
        rows.append({"case": case, "subset": "train" if group == "training" else "test", **paths})
    pd.DataFrame(rows).to_csv(root / "data" / "split.csv", index=False)
    (root / "params.yaml").write_text("data:\n  dataset: drive\n")


def timed(function, repeats: int = 1) -> float:
    """Best wall-clock seconds of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=40, help="augmented copies to time")
    parser.add_argument("--patches", type=int, default=20000, help="patches per sampling call")
    args = parser.parse_args()
    archive = drive_zip()
    if archive is None:
        print("bench_data: skipped, DRIVE.zip not found (set UNETOPS_MIRROR to the dataset mirror)")
        return 0

    from unetops.patches import sample_patches
    from unetops.stages import augment, preprocess

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data.") as tmp:
        root = Path(tmp)
        build_project(archive, root)
        cfg = load_config(root / "params.yaml")
        n_cases = len(pd.read_csv(cfg.paths.split_csv))

        ge_import = timed(lambda: importlib.import_module("great_expectations"))
        stage = timed(lambda: preprocess.run(cfg))
        total = ge_import + stage
        rows.append((f"preprocess stage, {n_cases} DRIVE images, cold (s)", total, "<= 10",
                     total <= 10))
        rows.append(("  of which Great Expectations' import (s)", ge_import, "", None))
        rows.append(("  of which read, preprocess, check, write (s)", stage, "", None))

        train = sorted(cfg.paths.preprocessed.glob("*_training.npz"))
        cases = [load_arrays(path) for path in train]
        image, mask, fov = (cases[0][key] for key in ("image", "mask", "fov"))

        def augment_copies():
            for copy in range(1, args.copies + 1):
                augment_case(image, mask, fov, ALL_TRANSFORMS, case_rng(0, "bench", copy))

        rate = args.copies / timed(augment_copies, repeats=2)
        rows.append((f"augment_case {image.shape[1]}x{image.shape[0]}, every transform, "
                     "1 thread (images/s)", rate, ">= 20", rate >= 20))

        stage_cfg = cfg.with_overrides({"augment.copies": 2})
        seconds = timed(lambda: augment.run(stage_cfg))
        files = len(train) * 3
        rows.append((f"augment stage, {len(train)} cases × 3 files incl. npz writes (files/s)",
                     files / seconds, "", None))

        images = [case["image"] for case in cases]
        masks = [case["mask"] for case in cases]
        fovs = [case["fov"] for case in cases]
        rng = np.random.default_rng(0)
        seconds = timed(lambda: sample_patches(images, masks, fovs, args.patches, 48, rng),
                        repeats=3)
        rate = args.patches / seconds
        rows.append((f"sample_patches 48x48, {len(images)} images (patches/s)", rate, ">= 50000",
                     rate >= 50000))

    width = max(len(row[0]) for row in rows)
    print(f"{'figure':<{width}}  {'measured':>12}  {'target':>9}  result")
    for figure, value, target, passed in rows:
        result = "" if passed is None else ("pass" if passed else "FAIL")
        print(f"{figure:<{width}}  {value:>12,.2f}  {target:>9}  {result}")
    print(f"({os.cpu_count()} CPU cores visible)")
    return 0 if all(row[3] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
