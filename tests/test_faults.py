"""Faults a long run meets: killed processes, a tracking server or database going away, a folder
that cannot be written. Each test checks the message, the exit code and that nothing already
finished was lost. Real processes (``unetops`` subprocesses, ``kill -9``), 127.0.0.1 only, every
wait bounded.

Exit codes: a killed ``train``/``tune`` resumes on the next run (exit 0); an unreachable MLflow
server before ``train`` is ``unetops: error: …`` and exit 1 before any work; a server lost
*during* ``train`` costs the record, not the model: outputs are written, exit 0, and one
``unetops: warning: MLflow …: run … incomplete, not logged: …`` line lists what is missing.
"""

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState
from typer.testing import CliRunner

from tests.postgres import create_database, free_port, postgres_server
from tests.services import mlflow_server, postgres_down, restart_postgres
from tests.test_train import tiny  # noqa: F401  (the fixture: tiny cases, tiny U-Net)
from tests.test_tune import SMALL, TUNE, fake_fit, load_study, tune_runs, write_test_cases
from unetops import tracking
from unetops.cli import app
from unetops.stages import train
from unetops.stages.tune import TrialRecorder, storage_url

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2"}
#: Long enough epochs (about 2 s each after the first on a 2-core CPU) to act inside one.
SLOW_EPOCHS = {"epochs": 3, "patches_per_epoch": 2048}
WAIT_S = 240
RUN_S = 400
#: ``unetops`` without the capability that lets root write into read-only folders.
UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


# --- helpers ----------------------------------------------------------------------------------

def start(*args: str, cwd: Path, log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """``unetops <args>`` in the background, stdout and stderr into ``log``."""
    with log.open("wb") as output:
        return subprocess.Popen([*prefix, "unetops", *args], cwd=cwd, stdout=output,
                                stderr=subprocess.STDOUT, env={**os.environ, **QUIET})


def finish(process: subprocess.Popen, timeout: float = RUN_S) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"unetops did not finish within {timeout:.0f} s")


def run(*args: str, cwd: Path, log: Path, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """``unetops <args>`` to its end: (exit code, stdout + stderr)."""
    code = finish(start(*args, cwd=cwd, log=log, prefix=prefix))
    return code, log.read_text()


def kill(process: subprocess.Popen) -> None:
    """``kill -9`` by PID."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path,
             timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"unetops exited ({process.returncode}) early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill(process)
            pytest.fail(f"condition not met within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def own_lines(output: str) -> list[str]:
    """The CLI's own ``unetops: error|warning: …`` lines."""
    return [line for line in output.splitlines() if line.startswith("unetops:")]


def flat(output: str) -> str:
    """Log output with Rich's line wrapping undone."""
    return " ".join(output.split())


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def temp_files(root: Path) -> list[Path]:
    return [path for path in root.rglob(".*") if ".tmp" in path.name]


def steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return [point.step for point in client.get_metric_history(run_id, key)]


# --- killed processes -------------------------------------------------------------------------

@pytest.mark.slow
def test_train_killed_mid_epoch_resumes_and_finishes_every_epoch(tiny, tmp_path):
    cfg = tiny(train=SLOW_EPOCHS)
    root, state_file = cfg.paths.root, cfg.paths.checkpoints / "state.json"
    backup = cfg.paths.checkpoints / "backup" / "training_metadata.json"

    first = start("train", cwd=root, log=tmp_path / "first.log")
    wait_for(lambda: len((read_json(state_file) or {}).get("history", {}).get("loss", [])) >= 1
             and read_json(backup) is not None, first, tmp_path / "first.log")
    time.sleep(0.5)  # into the next epoch
    kill(first)
    assert first.returncode == -signal.SIGKILL
    state = read_json(state_file)
    done = len(state["history"]["loss"])
    assert 1 <= done < 3 and not cfg.paths.model.exists()

    code, output = run("train", cwd=root, log=tmp_path / "second.log")
    assert code == 0, output
    text = flat(output)
    assert f"resuming the interrupted training run {state['run_id']}" in text
    assert f"epoch {done}/3:" not in text and "epoch 3/3:" in text
    assert not own_lines(output)

    history = pd.read_csv(cfg.paths.train_history)
    assert list(history["epoch"]) == [1, 2, 3]
    assert list(history["loss"][:done]) == pytest.approx(state["history"]["loss"])
    assert read_json(cfg.paths.train_summary)["epochs"] == 3
    assert cfg.paths.model.is_file() and not cfg.paths.checkpoints.exists()
    assert read_json(cfg.paths.mlflow_run)["run_id"] == state["run_id"]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert set(steps(client, state["run_id"])) == {1, 2, 3}
    assert client.get_run(state["run_id"]).info.status == "FINISHED"
    assert not temp_files(root)


def trial_progress(database: Path) -> dict[int, tuple[str, int]]:
    """Trial number → (state, reported epochs), read straight from the study's SQLite file."""
    if not database.is_file():
        return {}
    try:
        with sqlite3.connect(database, timeout=10) as conn:
            rows = conn.execute(
                "SELECT t.number, t.state, (SELECT COUNT(*) FROM trial_intermediate_values v"
                " WHERE v.trial_id = t.trial_id) FROM trials t").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    return {number: (state, reported) for number, state, reported in rows}


@pytest.mark.slow
def test_tune_worker_killed_mid_trial_is_failed_by_heartbeat_and_replaced(tiny, tmp_path):
    cfg = tiny(subsets=("train", "train", "val"), train={"patches_per_epoch": 1024},
               tune={"n_trials": 2, "heartbeat_seconds": 1, "sampler_startup_trials": 2,
                     "pruner": {"startup_trials": 5},
                     "search": {"epochs": {"low": 3, "high": 3}, "batch_size": [8],
                                "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}})
    root, database = cfg.paths.root, cfg.paths.optuna_db

    def mid_second_trial() -> bool:
        progress = trial_progress(database)
        return (progress.get(0, ("",))[0] == "COMPLETE" and progress.get(1, ("", 0))[0] == "RUNNING"
                and progress[1][1] >= 1)

    worker = start("tune", cwd=root, log=tmp_path / "worker.log")
    wait_for(mid_second_trial, worker, tmp_path / "worker.log")
    kill(worker)
    assert worker.returncode == -signal.SIGKILL
    finished_before = load_study(cfg).trials[0]
    time.sleep(3.5)  # past the heartbeat's grace (2 × 1 s; SQLite's clock counts whole seconds)

    code, output = run("tune", cwd=root, log=tmp_path / "rerun.log")
    assert code == 0, output
    assert "tune: trial 1 stopped beating (its worker was killed); marked failed" in flat(output)
    assert not own_lines(output)
    trials = load_study(cfg).trials
    assert [trial.state for trial in trials[:2]] == [TrialState.COMPLETE, TrialState.FAIL]
    assert sum(trial.state in FINISHED for trial in trials) == 2 and len(trials) == 3
    assert trials[0].value == finished_before.value
    assert trials[0].datetime_complete == finished_before.datetime_complete
    table = pd.read_csv(cfg.paths.hyperparameters_csv)
    assert {0, 2} <= set(table["trial"])
    _, nested = tune_runs(cfg)
    killed = [run for run in nested if run.data.tags.get("optuna.trial") == "1"]
    assert [run.info.status for run in killed] == ["FAILED"]


# --- the tracking server goes away ------------------------------------------------------------

@pytest.mark.slow
def test_train_against_a_stopped_mlflow_server_fails_before_any_work(tiny, tmp_path, monkeypatch):
    cfg = tiny()
    with mlflow_server(f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
                       tmp_path / "server") as server:
        pass  # it answered; now it is stopped
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    code, output = run("train", cwd=cfg.paths.root, log=tmp_path / "train.log")
    assert code == 1
    assert own_lines(output) == [
        f"unetops: error: MLFLOW_TRACKING_URI: MLflow server {server.url} unreachable "
        "([Errno 111] Connection refused); start it, or unset MLFLOW_TRACKING_URI to use the "
        "local store"]
    assert "Traceback" not in output and "training" not in output
    assert not cfg.paths.models.exists() and not cfg.paths.train_summary.exists()


@pytest.mark.slow
def test_mlflow_server_stopped_mid_train_costs_the_record_not_the_model(tiny, tmp_path,
                                                                         monkeypatch):
    cfg = tiny(train=SLOW_EPOCHS)
    secret = secrets.token_urlsafe(12)
    store = tmp_path / "server" / "mlflow.db"
    log = tmp_path / "train.log"
    with mlflow_server(f"sqlite:///{store}", tmp_path / "server") as server:
        # Credentials in the URI (basic auth; this server ignores them) must never be shown.
        shown = server.url.replace("http://", "http://unetops:***@")
        monkeypatch.setenv("MLFLOW_TRACKING_URI",
                           server.url.replace("http://", f"http://unetops:{secret}@"))
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast once it is gone
        client = MlflowClient(server.url)

        def first_epoch_logged() -> bool:
            experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            return bool(runs) and 1 in steps(client, runs[0].info.run_id)

        process = start("train", cwd=cfg.paths.root, log=log)
        wait_for(first_epoch_logged, process, log)
        server.stop()
        code = finish(process)
    output = log.read_text()
    assert code == 0, output
    assert secret not in output and "Traceback" not in output

    run_id = read_json(cfg.paths.mlflow_run)["run_id"]
    [line] = own_lines(output)
    assert line.startswith(f"unetops: warning: MLflow {shown}: run {run_id} incomplete, not "
                           "logged: ")
    missing = (r"not logged: epoch (2-)?3 metrics, final metrics, model, learning curve, sample "
               r"overlay, run status \(\[Errno 111\] Connection refused\)$")
    assert re.search(missing, line), line

    assert cfg.paths.model.is_file()
    assert read_json(cfg.paths.train_summary)["epochs"] == 3
    assert list(pd.read_csv(cfg.paths.train_history)["epoch"]) == [1, 2, 3]
    assert not cfg.paths.checkpoints.exists() and not temp_files(cfg.paths.root)
    stored = MlflowClient(f"sqlite:///{store}")  # what the server took before it went is kept
    assert steps(stored, run_id)[0] == 1
    assert stored.get_run(run_id).info.status == "RUNNING"


def test_store_failures_are_skipped_after_the_first_and_reported_without_the_password(
        project, monkeypatch):
    secret, port = secrets.token_urlsafe(12), free_port()
    uri = f"http://unetops:{secret}@127.0.0.1:{port}"
    monkeypatch.setattr(tracking.mlflow, "get_tracking_uri", lambda: uri)
    calls = []

    def refused(*args, **kwargs):
        calls.append(args)
        raise MlflowException(f"API request to {uri}/api/2.0/mlflow/runs/log-batch failed with "
                              "exception HTTPConnectionPool(...): Max retries exceeded (Caused by "
                              "NewConnectionError(\"...: [Errno 111] Connection refused\"))")

    assert tracking.tolerant("epoch 2 metrics", refused, 1) is None
    assert tracking.tolerant("epoch 3 metrics", refused, 2) is None
    assert tracking.tolerant("model", refused, 3) is None
    assert calls == [(1,)]  # a dead server is not asked again (each call retries for minutes)
    assert tracking.take_unlogged() == (
        f"MLflow http://unetops:***@127.0.0.1:{port}: incomplete, not logged: epoch 2-3 metrics, "
        "model ([Errno 111] Connection refused)")
    assert tracking.take_unlogged() is None
    assert tracking.tolerant("epoch 4 metrics", lambda: "logged") == "logged"


# --- the database restarts --------------------------------------------------------------------

def trial_of(kwargs) -> optuna.Trial:
    return next(callback.trial for callback in kwargs["extra_callbacks"]
                if isinstance(callback, TrialRecorder))


def tune_cli(cfg, fit, monkeypatch) -> tuple[int, list[str]]:
    """``unetops tune`` in this process with ``fit`` for ``train.fit``: (exit code, own lines)."""
    monkeypatch.setattr(train, "fit", fit)
    result = CliRunner().invoke(app, ["tune", "--params", str(cfg.paths.root / "params.yaml")])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, own_lines(result.stderr)


def fail_stale_trials_as_another_worker(cfg, study_name: str) -> None:
    """What every other worker does before it asks for a trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            storage_url(cfg).render_as_string(hide_password=False), heartbeat_interval=1)
        optuna.storages.fail_stale_trials(optuna.load_study(study_name=study_name,
                                                            storage=storage))
        storage.engine.dispose()


def test_tune_on_postgres_carries_on_through_a_database_restart(project, caplog, monkeypatch):
    with postgres_server() as server:
        cfg = project(tune={**TUNE, "n_trials": 3, "heartbeat_seconds": 1,
                            "storage": create_database(server)}, **SMALL)
        write_test_cases(cfg)
        before: dict[int, float] = {}

        def fit(trial_cfg, **kwargs):
            trial = trial_of(kwargs)
            if trial.number == 1:
                before.update({t.number: t.value for t in load_study(cfg).trials if t.value})
                restart_postgres(server, down_seconds=2.5)  # the heartbeat fails meanwhile
                time.sleep(2.5)  # longer than its grace (2 × 1 s): a dead heartbeat is stale
                fail_stale_trials_as_another_worker(cfg, trial.study.study_name)
            return fake_fit(trial_cfg, **kwargs)

        with caplog.at_level(logging.INFO, logger="unetops"):
            code, lines = tune_cli(cfg, fit, monkeypatch)
        trials = load_study(cfg).trials

    assert (code, lines) == (0, [])
    assert before and before[0] == trials[0].value
    assert [trial.number for trial in trials] == [0, 1, 2]
    assert all(trial.state in FINISHED for trial in trials), [t.state for t in trials]
    assert "tune: the running trial's heartbeat not recorded (connection to server" in caplog.text
    assert "tune: heartbeat recorded again" in caplog.text
    assert len(pd.read_csv(cfg.paths.hyperparameters_csv)) == 3


def test_tune_stops_in_one_line_while_postgres_is_down_and_a_rerun_continues(project,
                                                                              monkeypatch):
    with postgres_server() as server:
        storage = create_database(server)
        cfg = project(tune={**TUNE, "n_trials": 3, "heartbeat_seconds": 1, "storage": storage},
                      **SMALL)
        write_test_cases(cfg)
        outage = contextlib.ExitStack()

        def fit(trial_cfg, **kwargs):
            if trial_of(kwargs).number == 1:
                outage.enter_context(postgres_down(server))
            return fake_fit(trial_cfg, **kwargs)

        with outage:
            code, lines = tune_cli(cfg, fit, monkeypatch)
        assert code == 1
        assert len(lines) == 1 and lines[0].startswith(
            f"unetops: error: params.yaml: tune.storage: {storage}: connection to server at")
        assert lines[0].endswith("finished trials are kept: run unetops tune again to continue "
                                 "the study")
        first = load_study(cfg).trials
        assert [trial.state for trial in first] == [TrialState.COMPLETE, TrialState.RUNNING]

        time.sleep(2.5)  # the interrupted trial's heartbeat goes stale (grace 2 × 1 s)
        code, lines = tune_cli(cfg, fake_fit, monkeypatch)
        trials = load_study(cfg).trials

    assert (code, lines) == (0, [])
    assert [trial.state for trial in trials[:2]] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[0].value == first[0].value
    assert sum(trial.state in FINISHED for trial in trials) == 3 and len(trials) == 4


# --- a folder that cannot be written ------------------------------------------------------------

def unprivileged() -> tuple[str, ...]:
    """A command prefix under which read-only folders cannot be written, even by root."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
    return tuple(UNPRIVILEGED)


def run_in_read_only(folder: Path, *args: str, cwd: Path, log: Path,
                     prefix: tuple[str, ...]) -> tuple[int, str]:
    """``unetops <args>`` to its end while ``folder`` is read-only (restored afterwards)."""
    folder.chmod(0o555)
    try:
        return run(*args, cwd=cwd, log=log, prefix=prefix)
    finally:
        folder.chmod(0o755)


@pytest.mark.slow
def test_read_only_models_folder_is_a_one_line_error_and_keeps_the_old_model(tiny, tmp_path):
    prefix = unprivileged()
    cfg = tiny(train={"epochs": 1})
    models, summary = cfg.paths.models, cfg.paths.train_summary
    models.mkdir()
    cfg.paths.model.write_bytes(b"the model of an earlier run")
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text('{"epochs": 7}\n')
    code, output = run_in_read_only(models, "train", cwd=cfg.paths.root,
                                    log=tmp_path / "train.log", prefix=prefix)
    assert code == 1, output
    [line] = own_lines(output)
    assert re.fullmatch(rf"unetops: error: {re.escape(str(models))}/\S+: cannot write "
                        r"\(Permission denied\)", line), line
    assert "Traceback" not in output
    assert cfg.paths.model.read_bytes() == b"the model of an earlier run"
    assert sorted(path.name for path in models.iterdir()) == ["model.keras"]
    assert summary.read_text() == '{"epochs": 7}\n'
    assert not temp_files(cfg.paths.root)


@pytest.mark.slow
def test_read_only_reports_folder_stops_tune_before_any_trial(tiny, tmp_path):
    prefix = unprivileged()
    cfg = tiny(subsets=("train", "train", "val"), tune={"n_trials": 1})
    reports, table = cfg.paths.reports, cfg.paths.hyperparameters_md
    reports.mkdir()
    table.write_text("| the table of an earlier study |\n")
    code, output = run_in_read_only(reports, "tune", cwd=cfg.paths.root,
                                    log=tmp_path / "tune.log", prefix=prefix)
    assert code == 1, output
    assert own_lines(output) == [f"unetops: error: {reports}: cannot write (Permission denied)"]
    assert "Traceback" not in output and "trial 0" not in output
    assert not cfg.paths.optuna_db.exists()
    assert table.read_text() == "| the table of an earlier study |\n"
    assert list(reports.iterdir()) == [table]
    assert not temp_files(cfg.paths.root)
