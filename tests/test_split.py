import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from unetops.config import SplitConfig
from unetops.errors import UnetopsError
from unetops.io import read_image, read_mask
from unetops.stages import download, split
from unetops.stages.split import assign_subsets
from tests.conftest import SYNTHETIC
from tests.test_download import cli, folder_params, make_folder

# Written out again (not imported) so that a wrong constant in the code fails these tests.
STARE_SEED000_TRAIN = ("im0001", "im0002", "im0003", "im0004", "im0005",
                       "im0044", "im0077", "im0081", "im0082", "im0139")
STARE_CASES = sorted(STARE_SEED000_TRAIN + ("im0162", "im0163", "im0235", "im0236", "im0239",
                                             "im0240", "im0255", "im0291", "im0319", "im0324"))


def frame(cases, groups=None) -> pd.DataFrame:
    return pd.DataFrame({"case": list(cases), "group": list(groups or [""] * len(cases))})


def members(subsets: dict, which: str) -> set:
    return {case for case, subset in subsets.items() if subset == which}


# --- assignment rules (pure) ------------------------------------------------------------------

def test_stare_uses_seed_000_split_and_carves_val_from_its_train():
    subsets = assign_subsets(frame(STARE_CASES), "stare", SplitConfig())
    assert members(subsets, "test") == set(STARE_CASES) - set(STARE_SEED000_TRAIN)
    assert members(subsets, "train") | members(subsets, "val") == set(STARE_SEED000_TRAIN)
    assert len(members(subsets, "val")) == 2


def test_stare_split_refuses_other_cases():
    with pytest.raises(UnetopsError, match="^data/raw/cases.csv: not the STARE cases"):
        assign_subsets(frame(["a", "b", "c"]), "stare", SplitConfig())


def test_drive_uses_official_groups():
    cases = [f"{n:02d}_test" for n in range(1, 5)] + [f"{n}_training" for n in range(21, 26)]
    subsets = assign_subsets(frame(cases, ["test"] * 4 + ["train"] * 5), "drive", SplitConfig())
    assert members(subsets, "test") == set(cases[:4])
    assert len(members(subsets, "val")) == 1


def test_isbi_holds_out_the_last_slices():
    cases = [f"isbi_{i:02d}" for i in range(30)]
    subsets = assign_subsets(frame(cases), "isbi2012", SplitConfig(isbi_test_slices=4))
    assert members(subsets, "test") == set(cases[-4:])
    assert members(subsets, "val") == set(cases[21:26])  # 0.2 × 26 = 5.2, just before the test block


def test_ratio_split_is_seeded():
    cases = [f"c{i:02d}" for i in range(12)]
    first = assign_subsets(frame(cases), "synthetic", SplitConfig(seed=1))
    assert first == assign_subsets(frame(cases), "synthetic", SplitConfig(seed=1))
    assert first != assign_subsets(frame(cases), "synthetic", SplitConfig(seed=2))
    assert [len(members(first, s)) for s in ("train", "val", "test")] == [7, 2, 3]


def test_at_least_one_val_case():
    subsets = assign_subsets(frame(list("abcd")), "folder", SplitConfig(val_fraction=0.0))
    assert len(members(subsets, "val")) == 1 and len(members(subsets, "train")) >= 1


# --- the stage --------------------------------------------------------------------------------

def read_split(cfg) -> pd.DataFrame:
    return pd.read_csv(cfg.paths.split_csv, keep_default_na=False)


def test_synthetic_split_uses_exact_fovs(project):
    cfg = project(**SYNTHETIC)
    download.run(cfg)
    split.run(cfg)
    manifest = read_split(cfg)
    assert list(manifest.columns) == ["case", "subset", "image", "mask", "fov"]
    assert len(manifest) == 8 and set(manifest["subset"]) == {"train", "val", "test"}
    assert manifest["fov"].str.startswith("data/raw/fov/").all()
    listed = manifest[["image", "mask", "fov"]].to_numpy().ravel()
    assert all(cfg.paths.abs(path).is_file() for path in listed)


def test_folder_without_fov_gets_all_ones(project, tmp_path):
    cfg = project(**folder_params(make_folder(tmp_path / "user")))
    download.run(cfg)
    split.run(cfg)
    manifest = read_split(cfg)
    assert manifest["fov"].tolist() == [f"data/fov/{case}.png" for case in "abc"]
    assert all(read_mask(cfg.paths.abs(path)).all() for path in manifest["fov"])


def test_split_needs_download_first(project):
    cfg = project()
    with pytest.raises(UnetopsError, match="^data/raw/cases.csv: file not found"):
        split.run(cfg)


def assert_nothing_written(cfg):
    assert not cfg.paths.split_csv.exists() and not cfg.paths.fov.exists()
    assert [p.name for p in cfg.paths.data.iterdir() if p.name.startswith(".")] == []


def test_cli_mask_of_the_wrong_size(project, tmp_path):
    user = make_folder(tmp_path / "user")
    cv2.imwrite(str(user / "masks" / "b.png"), np.zeros((20, 16), np.uint8))
    cfg = project(**folder_params(user))
    download.run(cfg)
    code, errors = cli("split")
    assert code == 1
    assert errors == ["unetops: error: data/raw/masks/b.png: must have the image's size "
                      "(expect_column_pair_values_to_be_equal)"]
    assert_nothing_written(cfg)


def test_cli_mask_with_three_values(project, tmp_path):
    user = make_folder(tmp_path / "user")
    tifffile.imwrite(user / "masks" / "c.tif", np.arange(256, dtype=np.uint8).reshape(16, 16) % 3)
    cfg = project(**folder_params(user))
    download.run(cfg)
    code, errors = cli("split")
    assert code == 1
    assert errors == ["unetops: error: data/raw/masks/c.png: mask must be binary (at most two "
                      "distinct values) (expect_column_values_to_be_between)"]
    assert_nothing_written(cfg)


def test_mask_without_background_is_refused(project, tmp_path):
    user = make_folder(tmp_path / "user")
    cv2.imwrite(str(user / "masks" / "a.png"), np.full((16, 16), 255, np.uint8))
    cfg = project(**folder_params(user))
    download.run(cfg)
    with pytest.raises(UnetopsError, match=r"^data/raw/masks/a.png: mask must be binary \(one of"):
        split.run(cfg)


def test_unreadable_raw_file_is_named(project, tmp_path):
    cfg = project(**folder_params(make_folder(tmp_path / "user")))
    download.run(cfg)
    (cfg.paths.raw / "images" / "b.png").write_bytes(b"garbage")
    with pytest.raises(UnetopsError, match=r"^data/raw/images/b.png: must be a readable image"):
        split.run(cfg)
    assert_nothing_written(cfg)


def test_too_few_cases_for_three_subsets(project, tmp_path):
    user = make_folder(tmp_path / "user")
    for sub, name in (("images", "c.tif"), ("masks", "c.tif")):
        (user / sub / name).unlink()
    cfg = project(**folder_params(user))
    download.run(cfg)
    with pytest.raises(UnetopsError) as err:
        split.run(cfg)
    assert str(err.value) == ("data/split.csv: train, val and test must each have at least one "
                              "case (expect_column_distinct_values_to_contain_set)")


# --- the real datasets, from the mirror -------------------------------------------------------

@pytest.mark.mirror
def test_stare_download_and_split(project, mirror):
    cfg = project(data={"dataset": "stare"})
    download.run(cfg)
    split.run(cfg)
    manifest = read_split(cfg)
    assert manifest["case"].tolist() == STARE_CASES
    train_val = set(manifest.loc[manifest["subset"] != "test", "case"])
    assert train_val == set(STARE_SEED000_TRAIN)
    assert (manifest["subset"] == "val").sum() == 2
    assert manifest["fov"].tolist() == [f"data/fov/{case}.png" for case in STARE_CASES]
    fov = read_mask(cfg.paths.abs(manifest["fov"][0]))
    assert fov.shape == (605, 700) and 0.5 < fov.mean() < 0.9
    assert set(np.unique(read_image(cfg.paths.abs(manifest["mask"][0])))) == {0, 255}


@pytest.mark.mirror
def test_drive_download_and_split(project, mirror):
    cfg = project(data={"dataset": "drive"})
    download.run(cfg)
    split.run(cfg)
    manifest = read_split(cfg)
    assert len(manifest) == 40
    assert set(manifest.loc[manifest["subset"] == "test", "case"]) == {f"{n:02d}_test"
                                                                       for n in range(1, 21)}
    assert (manifest["subset"] == "val").sum() == 4
    assert manifest["fov"].str.startswith("data/raw/fov/").all()
    assert read_image(cfg.paths.abs(manifest["image"][0])).shape == (584, 565, 3)


@pytest.mark.mirror
def test_isbi2012_download_and_split(project, mirror):
    cfg = project(data={"dataset": "isbi2012"})
    download.run(cfg)
    split.run(cfg)
    manifest = read_split(cfg)
    assert len(manifest) == 30
    assert set(manifest.loc[manifest["subset"] == "test", "case"]) == {f"isbi_{i}"
                                                                       for i in range(24, 30)}
    labels = tifffile.imread(mirror / "isbi2012" / "train-labels.tif")
    mask = read_image(cfg.paths.raw / "masks" / "isbi_03.png")
    assert np.array_equal(mask == 255, labels[3] == 0), "the membrane (label 0) is the foreground"
    assert read_mask(cfg.paths.fov / "isbi_03.png").all()
