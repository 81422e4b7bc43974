"""The augment stage on a tiny hand-made project (preprocess runs first, as in the DAG)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.test_preprocessing import CASES, write_tiny_project
from unetops.cli import app
from unetops.errors import UnetopsError
from unetops.io import load_arrays, save_arrays
from unetops.stages import augment, preprocess

EVERYTHING = {
    "flip": {"prob": 1.0}, "rotate": {"prob": 1.0, "max": 180.0},
    "zoom": {"prob": 1.0, "max": 0.2}, "shear": {"prob": 1.0, "max": 10.0},
    "elastic": {"prob": 1.0, "alpha": 60.0, "sigma": 4.0},
    "brightness": {"prob": 1.0, "max": 0.1}, "contrast": {"prob": 1.0, "max": 0.2},
    "gamma": {"prob": 1.0, "max": 0.2}, "noise": {"prob": 1.0, "max": 0.05},
}


@pytest.fixture
def preprocessed(project, tmp_path):
    """A factory: the tiny project, preprocessed, with the given augment params."""
    def make(**augment_params):
        cfg = project(augment={**EVERYTHING, **augment_params})
        write_tiny_project(tmp_path, CASES)
        preprocess.run(cfg)
        return cfg
    return make


def read_all(folder) -> dict[str, dict[str, bytes]]:
    return {path.name: {key: value.tobytes() for key, value in load_arrays(path).items()}
            for path in sorted(folder.iterdir())}


def test_train_cases_only_with_the_original_first(preprocessed):
    cfg = preprocessed(copies=2)
    augment.run(cfg)
    names = sorted(path.name for path in cfg.paths.augmented.iterdir())
    assert names == ["c1_000.npz", "c1_001.npz", "c1_002.npz",
                     "c2_000.npz", "c2_001.npz", "c2_002.npz"]
    original = load_arrays(cfg.paths.preprocessed / "c1.npz")
    first = load_arrays(cfg.paths.augmented / "c1_000.npz")
    copy = load_arrays(cfg.paths.augmented / "c1_001.npz")
    assert sorted(first) == sorted(copy) == ["fov", "image", "mask"]
    for key in original:
        np.testing.assert_array_equal(first[key], original[key])
    assert copy["image"].dtype == np.float32 and copy["image"].shape == original["image"].shape
    assert not np.array_equal(copy["image"], original["image"])
    assert set(np.unique(copy["mask"])) <= {0, 1} and copy["mask"].dtype == np.uint8


def test_copies_zero_passes_through(preprocessed):
    cfg = preprocessed(copies=0)
    augment.run(cfg)
    assert sorted(path.name for path in cfg.paths.augmented.iterdir()) == ["c1_000.npz",
                                                                           "c2_000.npz"]
    for case in ("c1", "c2"):
        assert read_all(cfg.paths.augmented)[f"{case}_000.npz"] == \
            {key: value.tobytes()
             for key, value in load_arrays(cfg.paths.preprocessed / f"{case}.npz").items()}


def test_same_seed_same_bytes_other_seed_other_bytes(preprocessed):
    cfg = preprocessed(copies=2, seed=5)
    augment.run(cfg)
    first = read_all(cfg.paths.augmented)
    augment.run(cfg)
    assert read_all(cfg.paths.augmented) == first
    augment.run(cfg.with_overrides({"augment.seed": 6}))
    other = read_all(cfg.paths.augmented)
    assert other["c1_000.npz"] == first["c1_000.npz"]
    assert other["c1_001.npz"]["image"] != first["c1_001.npz"]["image"]


def test_more_copies_keep_the_existing_ones(preprocessed):
    cfg = preprocessed(copies=1)
    augment.run(cfg)
    first = read_all(cfg.paths.augmented)
    augment.run(cfg.with_overrides({"augment.copies": 3}))
    more = read_all(cfg.paths.augmented)
    assert len(more) == 8 and more["c2_001.npz"] == first["c2_001.npz"]


def test_weight_map_is_stored_with_each_copy(preprocessed):
    cfg = preprocessed(copies=1, weight_map=True)
    augment.run(cfg)
    arrays = load_arrays(cfg.paths.augmented / "c1_001.npz")
    assert arrays["weight"].dtype == np.float32 and arrays["weight"].shape == arrays["mask"].shape
    assert (arrays["weight"][arrays["fov"] == 0] == 0).all()
    assert arrays["weight"][arrays["fov"] == 1].min() > 0


def test_missing_preprocessed_case_names_the_file(preprocessed):
    cfg = preprocessed(copies=1)
    (cfg.paths.preprocessed / "c2.npz").unlink()
    with pytest.raises(UnetopsError, match=r"^data/preprocessed/c2.npz: file not found"):
        augment.run(cfg)
    assert not cfg.paths.augmented.exists()


def test_bad_preprocessed_case_stops_the_stage_writing_nothing(preprocessed):
    cfg = preprocessed(copies=1)
    augment.run(cfg)
    before = read_all(cfg.paths.augmented)
    arrays = load_arrays(cfg.paths.preprocessed / "c2.npz")
    save_arrays(cfg.paths.preprocessed / "c2.npz", image=arrays["image"], mask=arrays["mask"],
                fov=np.zeros_like(arrays["fov"]))
    with pytest.raises(UnetopsError) as err:
        augment.run(cfg)
    assert str(err.value) == ("data/augmented/c2_000.npz: FOV must not be empty "
                              "(expect_column_values_to_be_between)")
    assert read_all(cfg.paths.augmented) == before


def test_cli_prints_one_line_and_exits_1(preprocessed, tmp_path):
    preprocessed(copies=1)
    (tmp_path / "data" / "split.csv").write_text("case,subset,image,mask,fov\n"
                                                 "c3,val,a.png,b.png,c.png\n")
    result = CliRunner().invoke(app, ["augment", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1
    assert result.output.strip() == ("unetops: error: data/split.csv: no training cases "
                                     "(expect at least one row with subset train)")
