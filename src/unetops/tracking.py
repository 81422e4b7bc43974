"""MLflow plumbing shared by ``train``, ``evaluate`` and ``tune``.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a SQLite store beside ``params.yaml``
(``cfg.paths.mlflow_db``, artifacts in ``mlruns/`` next to it, whatever the working folder).
:func:`setup` fails in one line *before* any work when a tracking server does not answer, so an
unreachable server never costs a training run. The training run's id travels to ``evaluate``
through the small DVC output ``cfg.paths.mlflow_run``.
"""

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence

import mlflow
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

from unetops.config import Config
from unetops.errors import UnetopsError
from unetops.io import write_json

HEALTH_TIMEOUT_S = 5.0


def tracking_uri(cfg: Config) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cfg.paths.mlflow_db}"


def _shown(uri: str) -> str:
    """The URI without a password, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _check_server(uri: str) -> None:
    """Any HTTP answer from ``/health`` counts as reachable; auth problems surface later, in one line."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UnetopsError(
            f"MLFLOW_TRACKING_URI: MLflow server {_shown(uri)} unreachable ({reason}); "
            "start it, or unset MLFLOW_TRACKING_URI to use the local store") from None


def setup(cfg: Config) -> str:
    """Point MLflow at the tracking store and ``mlflow.experiment``; return the experiment id."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is None:
            location = None
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                location = (cfg.paths.mlflow_db.parent / "mlruns").resolve().as_uri()
            experiment_id = mlflow.create_experiment(cfg.mlflow.experiment, location)
        else:
            experiment_id = experiment.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
    except (MlflowException, sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        raise UnetopsError(f"MLflow {_shown(uri)}: {_first_line(exc)}") from None
    return experiment_id


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", exc)).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def flat_params(cfg: Config, sections: Sequence[str] | None = None) -> dict[str, str]:
    """Every param (of ``sections``, default all) as ``section.key`` → its value as text."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    dump = cfg.model_dump(mode="json")
    walk("", {k: v for k, v in dump.items() if sections is None or k in sections})
    return flat


def log_params(params: dict[str, str]) -> None:
    """``mlflow.log_params`` in batches the tracking server accepts."""
    items = sorted(params.items())
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[start:start + MAX_PARAMS_TAGS_PER_BATCH]))


def git_commit(root) -> str | None:
    """The commit checked out at ``root``, or None outside a git repository (or without git)."""
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return commit or None


def write_run_id(cfg: Config, run_id: str) -> None:
    write_json(cfg.paths.mlflow_run, {"run_id": run_id})


def read_run_id(cfg: Config) -> str:
    path = cfg.paths.mlflow_run
    if not path.is_file():
        raise UnetopsError(f"{path}: file not found (run unetops train first)")
    try:
        run_id = json.loads(path.read_text())["run_id"]
    except (ValueError, KeyError, TypeError):
        raise UnetopsError(f'{path}: expected JSON {{"run_id": "..."}}') from None
    if not isinstance(run_id, str) or not run_id:
        raise UnetopsError(f"{path}: run_id must be a non-empty string")
    return run_id


@contextlib.contextmanager
def resume_training_run(cfg: Config) -> Iterator[mlflow.ActiveRun]:
    """Re-open the training run named in ``cfg.paths.mlflow_run``, so metrics land beside training's."""
    run_id = read_run_id(cfg)
    setup(cfg)
    try:
        run = mlflow.start_run(run_id=run_id)
    except MlflowException as exc:
        raise UnetopsError(
            f"{cfg.paths.mlflow_run}: run {run_id} not in {_shown(tracking_uri(cfg))} "
            f"({_first_line(exc)})") from None
    with run:
        yield run
