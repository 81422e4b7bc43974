"""The reduced DVC project: the repository's ``dvc.yaml`` and sources in a throw-away git + DVC
folder, with ``params.yaml`` shrunk to synthetic data and a tiny U-Net (seconds per stage)."""

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import REPO

REDUCED = {
    "data": {"dataset": "synthetic", "synthetic": {"n_images": 8, "size": 96, "seed": 0}},
    "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    "augment": {"copies": 1},
    "model": {"depth": 3, "base_filters": 4},
    "train": {"epochs": 2, "batch_size": 16, "patch_size": 32, "patches_per_epoch": 128,
              "val_patches": 32},
    "tune": {"n_trials": 2, "search": {"epochs": {"low": 1, "high": 2}, "batch_size": [16, 32],
                                       "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}},
}


def merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run a command (``DVC_NO_ANALYTICS=1`` plus ``env`` over ours); its stdout + stderr."""
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})})
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def reduced_project(folder: Path, overrides: dict | None = None) -> Path:
    """``folder`` as a git + DVC project: ``src/``, ``dvc.yaml`` and the repository's
    ``params.yaml`` merged with :data:`REDUCED` and ``overrides``; nothing run yet."""
    shutil.copytree(REPO / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", folder / "dvc.yaml")
    params = merged(yaml.safe_load((REPO / "params.yaml").read_text()), REDUCED)
    params = merged(params, overrides or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=folder)
    sh("dvc", "init", "-q", cwd=folder)
    return folder
