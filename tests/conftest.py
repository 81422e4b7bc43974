"""Shared fixtures: a throw-away project folder with its own params.yaml, and the dataset mirror."""

import os
from pathlib import Path

import pytest
import yaml

from unetops.config import Config, load_config

pytest_plugins = ["tests.postgres"]

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("UNETOPS_MIRROR", REPO.parent / "shared" / "datasets")).resolve()


@pytest.fixture
def mirror(monkeypatch) -> Path:
    """The offline mirror of the official archives; tests that need it skip cleanly without it."""
    if not (MIRROR / "SHA256SUMS").is_file():
        pytest.skip(f"dataset mirror not found at {MIRROR} (set UNETOPS_MIRROR)")
    monkeypatch.setenv("UNETOPS_MIRROR", str(MIRROR))
    return MIRROR


def write_params(root: Path, sections: dict) -> Config:
    """Write ``sections`` as ``root/params.yaml`` (defaults fill the rest) and load it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))
    return load_config(root / "params.yaml")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A factory for a project folder with the given params; the cwd moves there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def make(**sections) -> Config:
        return write_params(tmp_path, sections)

    return make


SYNTHETIC = {"data": {"dataset": "synthetic", "synthetic": {"n_images": 8, "size": 96, "seed": 0}}}
