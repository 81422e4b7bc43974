"""Scaling out: the reduced DAG tracked on a real ``mlflow server`` backed by PostgreSQL, and its
DVC outputs pushed to a remote and pulled back (in place, and into a fresh clone).

One ``dvc repro`` (module fixture) serves both tests. The server's database role needs a password
(scram-sha-256); it reaches the server through ``PGPASSWORD`` only, and unetops never prints it.
"""

import json
import secrets
import shutil
from pathlib import Path

import psycopg2
import pytest
from mlflow import MlflowClient

from tests.reduced import reduced_project, sh
from tests.services import mlflow_server, role_with_password
from unetops import tracking
from unetops.config import load_config

EPOCHS = 2
OVERRIDES = {"model": {"depth": 2, "base_filters": 4}, "train": {"epochs": EPOCHS},
             "evaluate": {"jit_compile": False}, "mlflow": {"experiment": "scaling"}}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tracked_dag(tmp_path_factory, postgres_server_url):
    """(project folder, server URL, dvc repro's output, the password) after one ``dvc repro``."""
    folder = tmp_path_factory.mktemp("scaling")
    password = secrets.token_urlsafe(16)
    role = f"mlflow_{secrets.token_hex(4)}"
    backend = role_with_password(postgres_server_url, role, password)
    assert password not in backend
    host, port = postgres_server_url.rsplit("@", 1)[1].split(":")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=host, port=int(port), user=role, dbname=role, password="wrong")
    with mlflow_server(backend, folder / "server", env={"PGPASSWORD": password}) as server:
        project = reduced_project(folder / "project", OVERRIDES)
        output = sh("dvc", "repro", cwd=project, env={"MLFLOW_TRACKING_URI": server.url})
        yield project, server.url, output, password


@pytest.mark.slow
def test_dag_logs_one_complete_run_to_a_postgres_backed_server(tracked_dag, tmp_path):
    project, url, output, password = tracked_dag
    assert password not in output
    from unetops.stages.train import LOGGED_SECTIONS

    cfg = load_config(project / "params.yaml")
    client = MlflowClient(tracking_uri=url)
    run_id = json.loads((project / "models" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    experiment = client.get_experiment_by_name("scaling")
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc_stage"] == "train" and run.data.tags["dataset"] == "synthetic"

    expected = tracking.flat_params(cfg, LOGGED_SECTIONS)
    assert len(expected) > 50
    assert {key: run.data.params.get(key) for key in expected} == expected
    assert {"derived.steps_per_epoch", "derived.parameters"} <= set(run.data.params)

    for key in ("loss", "iou", "f1", "val_loss", "val_iou", "val_f1", "learning_rate"):
        history = client.get_metric_history(run_id, key)
        assert [point.step for point in history] == list(range(1, EPOCHS + 1)), key

    models = client.search_logged_models(experiment_ids=[experiment.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1
    files = {info.path for info in client.list_logged_model_artifacts(models[0].model_id)}
    assert {"MLmodel", "data"} <= files
    plots = {info.path for info in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/learning_curve.png", "plots/sample_overlay.png"}
    for path in plots:
        assert Path(client.download_artifacts(run_id, path, str(tmp_path))).read_bytes()[:8] == PNG

    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    for name in ("auc_roc", "auc_pr", "f1", "iou", "precision", "recall", "specificity",
                 "accuracy"):
        assert run.data.metrics[f"eval_test_{name}"] == pytest.approx(metrics[name]), name
    evaluated = {info.path for info in client.list_artifacts(run_id, "evaluate")}
    assert "evaluate/metrics.json" in evaluated
    assert client.get_registered_model("unetops").aliases["champion"]


@pytest.mark.slow
def test_outputs_pushed_to_a_dvc_remote_come_back_byte_identical(tracked_dag, tmp_path):
    project = tracked_dag[0]
    model = project / "models" / "model.keras"
    original = model.read_bytes()
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=project)
    sh("dvc", "push", cwd=project)
    assert "in sync" in sh("dvc", "status", "--cloud", cwd=project)

    # A wiped machine: no cache, no cached outputs. The uncached outputs (the run id, the
    # metrics) are git's to keep, so they stay.
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data")
    model.unlink()
    assert "changed outs" in sh("dvc", "status", cwd=project)
    sh("dvc", "pull", cwd=project)
    assert "up to date" in sh("dvc", "status", cwd=project)
    assert model.read_bytes() == original
    assert (project / "data" / "split.csv").is_file()

    # Another machine: a clone of the git repository (remote config included) pulls the data.
    git = ("git", "-c", "user.name=unetops tests", "-c", "user.email=tests@unetops.invalid")
    sh(*git, "add", "-A", cwd=project)
    sh(*git, "commit", "-q", "-m", "reduced DAG", cwd=project)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    assert not (clone / "models" / "model.keras").exists()
    sh("dvc", "pull", cwd=clone)
    assert "up to date" in sh("dvc", "status", cwd=clone)
    assert (clone / "models" / "model.keras").read_bytes() == original
