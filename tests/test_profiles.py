"""Dataset profiles: applied into params.yaml with comments kept, validated before writing."""

import shutil

import pytest
import yaml

from tests.conftest import REPO
from unetops.config import load_config
from unetops.errors import UnetopsError
from unetops.profiles import apply_profile, available, flat_items, read_profile, set_param_args


@pytest.fixture
def project(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    return tmp_path


def test_every_dataset_has_a_profile_that_loads():
    assert {"drive", "stare", "isbi2012"} <= set(available(REPO))


def test_every_profile_sets_the_same_keys():
    # a key only one profile sets would survive switching to another (`unetops profile stare`
    # would not restore the defaults)
    keys = {name: {key for key, _ in flat_items(read_profile(REPO, name))}
            for name in available(REPO)}
    assert all(found == keys["stare"] for found in keys.values()), keys


@pytest.mark.parametrize("name", ["drive", "isbi2012"])
def test_profile_changes_only_its_keys_keeps_comments_and_stare_restores_the_defaults(project,
                                                                                      name):
    params = project / "params.yaml"
    original = params.read_text()
    changed = dict(apply_profile(params, name))
    cfg = load_config(params)
    assert cfg.data.dataset == name and changed["data.dataset"] == name
    assert cfg.train.epochs == yaml.safe_load((project / "profiles" / f"{name}.yaml")
                                              .read_text())["train"]["epochs"]
    text = params.read_text()
    assert "# stare | drive | isbi2012 | folder | synthetic" in text
    assert "storage: null" in text
    apply_profile(params, "stare")
    assert params.read_text() == original


def test_a_profile_the_schema_rejects_leaves_params_yaml_as_it_was(project):
    (project / "profiles" / "bad.yaml").write_text("train: {epochs: -3}\n")
    before = (project / "params.yaml").read_text()
    with pytest.raises(UnetopsError, match="train.epochs"):
        apply_profile(project / "params.yaml", "bad")
    assert (project / "params.yaml").read_text() == before
    with pytest.raises(UnetopsError, match="no such profile.*drive"):
        apply_profile(project / "params.yaml", "nope")


def test_set_param_args_are_dvc_exp_run_flags(project):
    args = set_param_args(project, "drive")
    pairs = dict(arg.split("=", 1) for arg in args[1::2])
    assert set(args[::2]) == {"-S"}
    assert pairs["data.dataset"] == "drive"
    assert pairs["augment.weight_map"] == "false"
