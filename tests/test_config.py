import pytest
from typer.testing import CliRunner

from unetops.cli import app
from unetops.config import load_config
from unetops.errors import UnetopsError
from tests.conftest import REPO, write_params


def test_repo_params_load_with_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.data.dataset == "stare"
    assert cfg.paths.split_csv == REPO / "data" / "split.csv"
    assert cfg.paths.rel(REPO / "data" / "raw" / "x.png") == "data/raw/x.png"


@pytest.mark.parametrize(("sections", "message"), [
    ({"train": {"learnig_rate": 0.1}}, "params.yaml: train.learnig_rate: unknown key"),
    ({"train": {"epochs": "many"}}, "params.yaml: train.epochs: Input should be a valid integer"),
    ({"train": {"learning_rate": -1}}, "params.yaml: train.learning_rate: Input should be greater than 0"),
    ({"data": {"dataset": "mnist"}}, "params.yaml: data.dataset: Input should be"),
    ({"bogus": 1}, "params.yaml: bogus: unknown key"),
])
def test_bad_params_name_the_key(tmp_path, sections, message):
    with pytest.raises(UnetopsError, match="^" + message.replace(".", r"\.")):
        write_params(tmp_path, sections)


def test_cli_reports_unknown_key_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("split:\n  sead: 1\n")
    result = CliRunner().invoke(app, ["split", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1
    assert result.output.strip() == "unetops: error: params.yaml: split.sead: unknown key"


def test_overrides_are_validated(tmp_path):
    cfg = write_params(tmp_path, {})
    assert cfg.with_overrides({"train.epochs": 3}).train.epochs == 3
    assert cfg.with_overrides({"train.epochs": 3}).paths.root == cfg.paths.root
    with pytest.raises(UnetopsError, match="train.epochs"):
        cfg.with_overrides({"train.epochs": 0})


def test_not_yaml_and_missing_file(tmp_path):
    (tmp_path / "params.yaml").write_text("data: [unclosed\n")
    with pytest.raises(UnetopsError, match="params.yaml: not valid YAML"):
        load_config(tmp_path / "params.yaml")
    with pytest.raises(UnetopsError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
