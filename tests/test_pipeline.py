"""End to end: the reduced DAG (synthetic data, tiny model) under `dvc repro`, twice."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

REDUCED = {
    "data": {"dataset": "synthetic", "synthetic": {"n_images": 8, "size": 96, "seed": 0}},
    "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    "augment": {"copies": 1},
    "model": {"depth": 3, "base_filters": 4},
    "train": {"epochs": 2, "batch_size": 16, "patch_size": 32, "patches_per_epoch": 128,
              "val_patches": 32},
}


def merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def sh(*args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_reduced_dag_runs_and_second_repro_does_nothing(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(merged(params, REDUCED), sort_keys=False))
    env_uri = f"sqlite:///{project / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = env_uri
    try:
        sh("git", "init", "-q", cwd=project)
        sh("dvc", "init", "-q", cwd=project)
        sh("dvc", "repro", cwd=project)
        second = sh("dvc", "repro", cwd=project)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]

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
