"""End to end: the reduced DAG (synthetic data, tiny model) under `dvc repro`, twice."""

import json

import pandas as pd
import pytest
import yaml

from tests.reduced import reduced_project, sh


@pytest.mark.slow
def test_reduced_dag_runs_and_second_repro_does_nothing(tmp_path):
    project = reduced_project(tmp_path / "project")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    sh("dvc", "repro", cwd=project, env=env)
    second = sh("dvc", "repro", cwd=project, env=env)

    split = pd.read_csv(project / "data" / "split.csv")
    assert len(split) == 8 and set(split.subset) == {"train", "val", "test"}
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        assert f"Running stage '{stage}'" not in second, second
    assert "up to date" in second or "didn't change" in second

    if "evaluate" in stages:
        metrics = json.loads((project / "reports" / "metrics.json").read_text())
        for key in ("auc_roc", "auc_pr", "f1", "iou", "precision", "recall", "specificity",
                    "accuracy", "threshold"):
            assert 0.0 <= metrics[key] <= 1.0, key
        test_cases = split.case[split.subset == "test"]
        assert all((project / "data" / "predictions" / f"{c}.png").is_file() for c in test_cases)
        assert (project / "models" / "model.keras").is_file()
    if "tune" in stages:
        table = pd.read_csv(project / "reports" / "hyperparameters.csv")
        assert len(table) == 2
        assert (project / "reports" / "best_params.yaml").is_file()
