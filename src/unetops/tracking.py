"""MLflow plumbing shared by ``train``, ``evaluate`` and ``tune``.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a SQLite store beside ``params.yaml``
(``cfg.paths.mlflow_db``, artifacts in ``mlruns/`` next to it, whatever the working folder).
:func:`setup` fails in one line *before* any work when a tracking server does not answer, so an
unreachable server never costs a training run. The training run's id travels to ``evaluate``
through the small DVC output ``cfg.paths.mlflow_run``.

A store that fails *during* training must not cost the model either: training logs through
:func:`tolerant` (and ends its run with :class:`TolerantRun`), which records what the store did
not take instead of raising. The stage then finishes and writes its outputs (exit code 0), and
the CLI prints one ``unetops: warning: MLflow …: run … incomplete, not logged: …`` line from
:func:`take_unlogged`. Messages never show a password from a URI.
"""

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import mlflow
import requests.exceptions
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

from unetops.config import Config
from unetops.console import log
from unetops.errors import UnetopsError
from unetops.io import write_json

HEALTH_TIMEOUT_S = 5.0
#: What a tracking store raises when it cannot take a call: MLflow's REST client (after its
#: retries), a SQL store, an artifact upload or copy.
STORE_ERRORS = (MlflowException, sqlalchemy.exc.SQLAlchemyError,
                requests.exceptions.RequestException, OSError)
REASON_CHARS = 200
T = TypeVar("T")


def tracking_uri(cfg: Config) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cfg.paths.mlflow_db}"


def shown_tracking_uri(cfg: Config) -> str:
    """:func:`tracking_uri` as messages may show it: never the password."""
    return _shown(tracking_uri(cfg))


def _shown(uri: str) -> str:
    """The URI without a password, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _redacted(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it masked."""
    return re.sub(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s]*):[^@\s]*@", r"\1:***@", text)


def _check_server(uri: str) -> None:
    """Any HTTP answer from ``/health`` counts as reachable; auth problems surface later, in one line.

    ``/health`` needs no credentials, so a ``user:password@`` in the URI stays out of the request
    (urllib would take it for part of the host name).
    """
    parts = urllib.parse.urlsplit(uri.rstrip("/"))
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{parts.port}" if parts.port else host
    health = urllib.parse.urlunsplit(parts._replace(netloc=netloc or "",
                                                    path=f"{parts.path}/health"))
    try:
        with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT_S):
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
        _unlogged.down = False  # the store answers: tolerant() tries again
        if experiment is None:
            location = None
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                location = (cfg.paths.mlflow_db.parent / "mlruns").resolve().as_uri()
            experiment_id = mlflow.create_experiment(cfg.mlflow.experiment, location)
        else:
            experiment_id = experiment.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
    except (MlflowException, sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        raise UnetopsError(f"MLflow {_shown(uri)}: {error_line(exc)}") from None
    return experiment_id


def error_line(exc: BaseException) -> str:
    """The first line of an MLflow (or SQL) error, any password in it masked."""
    text = str(getattr(exc, "message", exc)).strip()
    return _redacted(text.splitlines()[0]) if text else exc.__class__.__name__


# --- logging that outlives the tracking store -------------------------------------------------

@dataclasses.dataclass
class _Unlogged:
    """What the store did not take since the last :func:`take_unlogged`, and why (first failure)."""

    items: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""
    uri: str = ""
    run_id: str | None = None
    down: bool = False


_unlogged = _Unlogged()


def _reason(exc: BaseException) -> str:
    """The short cause of a store failure: the OS error at the bottom of MLflow's long message
    (``[Errno 111] Connection refused``) when there is one, else its first line, cut short."""
    text = " ".join(str(getattr(exc, "message", exc)).split()) or exc.__class__.__name__
    errors = re.findall(r"\[Errno -?\d+\] [^'\"()\[\]]+", text)
    return _redacted(errors[-1].strip() if errors else text[:REASON_CHARS])


def tolerant(what: str, call: Callable[..., T], /, *args, **kwargs) -> T | None:
    """``call(*args, **kwargs)``, or None with ``what`` recorded as not logged when the store fails.

    For logging that must not stop training. After the first failure every later call is
    skipped at once, because MLflow's client retries a dead server for minutes per call
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``); the next
    :func:`setup` that finds the store answering turns logging back on.
    """
    if not _unlogged.down:
        try:
            return call(*args, **kwargs)
        except STORE_ERRORS as exc:
            active = mlflow.active_run()
            _unlogged.down = True
            _unlogged.reason = _unlogged.reason or _reason(exc)
            _unlogged.uri = _shown(mlflow.get_tracking_uri())
            _unlogged.run_id = _unlogged.run_id or (active.info.run_id if active else None)
            log.warning(f"MLflow {_unlogged.uri}: {what} not logged ({_reason(exc)}); carrying "
                        "on without MLflow logging")
    _unlogged.items.append(what)
    return None


class TolerantRun:
    """A started run for ``with``: on exit it ends the run (FINISHED, or FAILED on an exception)
    through :func:`tolerant`, so a store that cannot take the final status fails nothing."""

    def __init__(self, run: mlflow.ActiveRun):
        self.run = run
        self.info = run.info

    def __enter__(self) -> mlflow.ActiveRun:
        return self.run

    def __exit__(self, exc_type, exc, traceback) -> bool:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.info.run_id:
            tolerant("run status", mlflow.end_run, "FAILED" if exc_type else "FINISHED")
        return False


def _ranges(numbers: list[int]) -> str:
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _summary(items: list[str]) -> str:
    """``epoch 2 metrics, epoch 3 metrics, model`` → ``epoch 2-3 metrics, model``."""
    groups: dict[tuple[str, str], list[int] | None] = {}
    for item in items:
        match = re.fullmatch(r"(.*?)(\d+)(\D*)", item)
        key = (match[1], match[3]) if match else (item, "")
        numbers = groups.setdefault(key, [] if match else None)
        if match and int(match[2]) not in numbers:
            numbers.append(int(match[2]))
    return ", ".join(f"{head}{_ranges(numbers)}{tail}" if numbers is not None else head
                     for (head, tail), numbers in groups.items())


def take_unlogged() -> str | None:
    """One line saying what the store did not take since the last call (None: nothing); resets."""
    global _unlogged
    unlogged, _unlogged = _unlogged, _Unlogged()
    if not unlogged.items:
        return None
    run = f"run {unlogged.run_id} " if unlogged.run_id else ""
    return (f"MLflow {unlogged.uri}: {run}incomplete, not logged: {_summary(unlogged.items)} "
            f"({unlogged.reason})")


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
            f"({error_line(exc)})") from None
    with TolerantRun(run):
        yield run
