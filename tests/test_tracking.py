"""MLflow set-up: the local store, MLFLOW_TRACKING_URI, an unreachable server, re-opening a run."""

import socket

import mlflow
import pytest
from mlflow import MlflowClient

from unetops import tracking
from unetops.errors import UnetopsError

from .conftest import REPO


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_without_a_uri_the_store_is_sqlite_beside_params(project, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cfg = project(mlflow={"experiment": "local"})
    experiment_id = tracking.setup(cfg)
    assert cfg.paths.mlflow_db.is_file()
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.name == "local"
    location = experiment.artifact_location.removeprefix("file://")
    assert location.startswith(str((cfg.paths.root / "mlruns").resolve()))


def test_mlflow_tracking_uri_is_respected(project, monkeypatch, tmp_path):
    other = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    cfg = project()
    tracking.setup(cfg)
    assert other.is_file()
    assert not cfg.paths.mlflow_db.exists()
    assert mlflow.get_tracking_uri() == f"sqlite:///{other}"


def test_unreachable_server_is_a_one_line_error(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{closed_port()}")
    cfg = project()
    with pytest.raises(UnetopsError, match="unreachable") as error:
        tracking.setup(cfg)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("MLFLOW_TRACKING_URI: ")
    assert "secret" not in message


def test_flat_params_are_dotted_keys():
    from unetops.config import Config

    params = tracking.flat_params(Config())
    assert params["train.learning_rate"] == "0.001"
    assert params["model.depth"] == "3"
    assert params["augment.flip.prob"] == str(Config().augment.flip.prob)
    assert all("." in key for key in params)


def test_resume_training_run_logs_into_the_stored_run(project):
    cfg = project()
    tracking.setup(cfg)
    with mlflow.start_run() as training:
        mlflow.log_param("train.epochs", 2)
    tracking.write_run_id(cfg, training.info.run_id)
    with tracking.resume_training_run(cfg) as resumed:
        mlflow.log_metric("auc_roc", 0.9)
    assert resumed.info.run_id == training.info.run_id
    run = MlflowClient().get_run(training.info.run_id)
    assert run.data.metrics["auc_roc"] == 0.9
    assert run.info.status == "FINISHED"


def test_resume_training_run_needs_the_run_id_file_and_a_known_run(project):
    cfg = project()
    with (pytest.raises(UnetopsError, match="mlflow_run.json: file not found"),
          tracking.resume_training_run(cfg)):
        pass
    tracking.write_run_id(cfg, "0" * 32)
    with pytest.raises(UnetopsError, match="not in"), tracking.resume_training_run(cfg):
        pass
    cfg.paths.mlflow_run.write_text("[]")
    with pytest.raises(UnetopsError, match="run_id"):
        tracking.read_run_id(cfg)


def test_git_commit_inside_and_outside_a_repository(tmp_path):
    assert tracking.git_commit(tmp_path) is None
    commit = tracking.git_commit(REPO)
    if commit is None:
        pytest.skip("git not available or the checkout is not a git repository")
    assert len(commit) == 40 and int(commit, 16) >= 0
