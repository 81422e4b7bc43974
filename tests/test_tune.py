"""The tune stage: study, storage, resume, parallel workers, MLflow runs and the rebuilt table.

Most tests inject :func:`fake_fit` (``train.fit``'s signature, no training: a score that depends
on the params, per-epoch logs through the callbacks, one MLflow run) so they take seconds; one
test runs the real ``fit`` on synthetic data. Kills and parallel workers are real processes.
"""

import functools
import math
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass

import keras
import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from tests.conftest import write_params
from tests.postgres import create_database
from unetops import losses
from unetops.config import load_config
from unetops.errors import UnetopsError
from unetops.hyperparameters import build_table
from unetops.io import save_arrays, write_png
from unetops.model import build_unet
from unetops.stages.train import inference_model
from unetops.stages.tune import (TrialRecorder, check_space, score_test_subset, storage_url,
                                 study_name, suggest, tune)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TUNE = {
    "n_trials": 4,
    "sampler_startup_trials": 2,
    "pruner": {"startup_trials": 1},
    "search": {"epochs": {"low": 1, "high": 3}, "batch_size": [16, 32],
               "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}},
}
SMALL = {"model": {"depth": 2, "base_filters": 4},
         "evaluate": {"tile": 32, "jit_compile": False}}


# --- a stand-in for train.fit -----------------------------------------------------------------

def identity_model():
    """A Keras model whose vessel probability is the image itself (the test images are built so)."""
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Activation("linear")(inputs))
    model.compile(loss=losses.bce)
    return model


@dataclass
class FakeFitResult:
    model: object
    history: dict
    best_epoch: int
    best: dict
    run_id: str
    seconds: float


def fake_fit(cfg, *, extra_callbacks=(), nested=False, resume=True, save=True,
             epoch_seconds=0.0, kill_in_trial=None):
    """``train.fit`` without training: val F1 peaks at learning rate 10^-2.5 and grows per epoch."""
    lr, batch = cfg.train.learning_rate, cfg.train.batch_size
    peak = 0.9 - 0.1 * (math.log10(lr) + 2.5) ** 2 - (0.03 if batch == 32 else 0.0)
    trial = next((cb.trial for cb in extra_callbacks if isinstance(cb, TrialRecorder)), None)
    history = {"loss": [], "val_loss": [], "val_iou": [], "val_f1": []}
    with mlflow.start_run(nested=nested) as run:
        mlflow.log_params({"train.learning_rate": lr, "train.batch_size": batch,
                           "train.epochs": cfg.train.epochs})
        for callback in extra_callbacks:
            callback.on_train_begin()
        for epoch in range(cfg.train.epochs):
            f1 = peak * (1.0 - 0.5 ** (epoch + 2))
            logs = {"loss": 1.1 - f1, "val_loss": 1.0 - f1, "val_iou": f1 / (2.0 - f1),
                    "val_f1": f1}
            mlflow.log_metrics(logs, step=epoch)
            for key, value in logs.items():
                history[key].append(value)
            time.sleep(epoch_seconds)
            if trial is not None and trial.number == kill_in_trial:
                os.kill(os.getpid(), signal.SIGKILL)
            for callback in extra_callbacks:
                callback.on_epoch_end(epoch, logs)
    best_epoch = int(np.argmax(history["val_f1"]))
    best = {key: values[best_epoch] for key, values in history.items() if key.startswith("val_")}
    return FakeFitResult(identity_model(), history, best_epoch, best, run.info.run_id, 0.0)


def fit_never(cfg, **kwargs):
    raise AssertionError("the study already holds n_trials; no trial should run")


def kill_after(finished: int):
    """A trial callback that kills its own process (SIGKILL, no cleanup) after ``finished``."""

    def callback(study, trial):
        if len(study.get_trials(deepcopy=False, states=FINISHED)) >= finished:
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def worker(params: str, kill_after_finished=None, kill_in_trial=None, barrier=None,
           epoch_seconds=0.0):
    """One ``unetops tune`` process (run with multiprocessing's spawn)."""
    cfg = load_config(params)
    fit = functools.partial(fake_fit, epoch_seconds=epoch_seconds, kill_in_trial=kill_in_trial)
    callbacks = [kill_after(kill_after_finished)] if kill_after_finished else []
    if barrier is not None:
        barrier.wait(timeout=120)
    tune(cfg, fit=fit, callbacks=callbacks)


def run_workers(*kwargs_list, timeout=240) -> list[int]:
    """Start one spawned worker per kwargs, all at once; their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=worker, kwargs=kwargs) for kwargs in kwargs_list]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]


# --- fixtures ---------------------------------------------------------------------------------

def write_test_cases(cfg, n_cases=2, size=40) -> None:
    """Tiny preprocessed test cases whose image is a noisy copy of the mask (FOV: everything)."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(n_cases):
        mask = np.zeros((size, size), np.uint8)
        mask[:, 10 + 5 * index:13 + 5 * index] = 1
        mask[20:22, :] = 1
        image = (0.7 * mask + 0.3 * rng.random((size, size))).astype(np.float32)[..., None]
        case = f"case{index}"
        save_arrays(cfg.paths.preprocessed / f"{case}.npz", image=image, mask=mask,
                    fov=np.ones_like(mask))
        write_png(cfg.paths.raw / f"{case}_mask.png", mask * 255)
        rows.append({"case": case, "subset": "test", "image": "",
                     "mask": cfg.paths.rel(cfg.paths.raw / f"{case}_mask.png"), "fov": ""})
    pd.DataFrame(rows).to_csv(cfg.paths.split_csv, index=False)


@pytest.fixture
def tune_project(project):
    """A project whose params tune 4 trials; ``make(**tune_overrides)`` returns its config."""

    def make(**tune_overrides):
        cfg = project(tune={**TUNE, **tune_overrides}, **SMALL)
        write_test_cases(cfg)
        return cfg

    return make


def load_study(cfg) -> optuna.Study:
    return optuna.load_study(study_name=study_name(cfg),
                             storage=storage_url(cfg).render_as_string(hide_password=False))


def tune_runs(cfg) -> tuple[list, list]:
    """(parent runs, nested runs) of the study in the tracking store."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    runs = mlflow.MlflowClient().search_runs([experiment.experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("unetops.stage") == "tune"]
    parent_ids = {run.info.run_id for run in parents}
    nested = [run for run in runs if run.data.tags.get("mlflow.parentRunId") in parent_ids]
    return parents, nested


# --- units ------------------------------------------------------------------------------------

def test_storage_url_defaults_to_sqlite_under_data(project):
    cfg = project()
    assert storage_url(cfg).database == str(cfg.paths.optuna_db)
    cfg = project(tune={"storage": "sqlite:///studies/x.db"})
    assert storage_url(cfg).database == str(cfg.paths.root / "studies" / "x.db")
    cfg = project(tune={"storage": "postgresql://u:secret@db.example/optuna"})
    assert storage_url(cfg).drivername == "postgresql+psycopg2"
    cfg = project(tune={"storage": "not a url"})
    with pytest.raises(UnetopsError, match=r"^params\.yaml: tune\.storage: not a SQLAlchemy URL"):
        storage_url(cfg)


def test_search_space_bounds_must_give_valid_configs(project):
    cfg = project(train={"lr_schedule": "cosine", "lr_min": 5e-4},
                  tune={"search": {"learning_rate": {"low": 1e-4, "high": 1e-2}}})
    with pytest.raises(UnetopsError, match=r"^params\.yaml: tune\.search\.learning_rate: 0\.0001"):
        check_space(cfg)


def test_suggest_gives_dotted_keys_of_the_right_types(project):
    cfg = project(tune={"search": {"depth": [2, 3], "loss": ["bce", "dice"]}})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    params = suggest(trial, cfg.tune.search)
    assert set(params) == {"train.epochs", "train.batch_size", "train.learning_rate",
                           "model.depth", "train.loss"}
    assert isinstance(params["train.epochs"], int) and 1 <= params["train.epochs"] <= 3
    assert 1e-4 <= params["train.learning_rate"] <= 1e-2 and params["model.depth"] in (2, 3)
    cfg.with_overrides(params)  # every suggestion is a valid config


# --- the study --------------------------------------------------------------------------------

def test_table_rows_are_read_from_the_study(tune_project):
    cfg = tune_project()
    study = tune(cfg, fit=fake_fit)
    table = pd.read_csv(cfg.paths.hyperparameters_csv)
    assert sorted(table["trial"]) == [0, 1, 2, 3] and len(study.trials) == 4
    assert table.loc[0, "best"] and table.loc[0, "trial"] == study.best_trial.number
    assert table.loc[0, "objective"] == pytest.approx(study.best_value)
    assert not table.loc[1:, ["test_iou", "test_f1", "test_loss"]].notna().any().any()
    assert 0.0 < table.loc[0, "test_f1"] <= 1.0 and table.loc[0, "test_loss"] > 0.0
    assert yaml.safe_load(cfg.paths.best_params.read_text()) == study.best_params
    for name in ("hyperparameters_history.png", "hyperparameters_importance.png"):
        assert (cfg.paths.reports / name).read_bytes()[:4] == b"\x89PNG"

    # Change the worst completed trial's value in the storage: the table follows the storage.
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    worst = min(completed, key=lambda trial: trial.value)
    engine = sqlalchemy.create_engine(storage_url(cfg))
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(
            "UPDATE trial_values SET value = 5.0 WHERE trial_id = (SELECT trial_id FROM trials"
            " WHERE number = :n AND study_id = (SELECT study_id FROM studies"
            " WHERE study_name = :s))"), {"n": worst.number, "s": study_name(cfg)})
    engine.dispose()
    frame = build_table(load_study(cfg))
    assert frame.loc[0, "trial"] == worst.number and frame.loc[0, "objective"] == 5.0

    tune(cfg, fit=fit_never)  # n_trials reached: only the report is rebuilt
    table = pd.read_csv(cfg.paths.hyperparameters_csv)
    assert table.loc[0, "trial"] == worst.number and table.loc[0, "best"]
    assert "| **5.0000** |" in cfg.paths.hyperparameters_md.read_text()
    assert yaml.safe_load(cfg.paths.best_params.read_text()) == worst.params


def test_a_mixed_precision_trial_is_scored_as_the_float32_model_train_saves(tune_project):
    cfg = tune_project()
    keras.utils.set_random_seed(0)
    half = build_unet(1, cfg.model, "mixed_bfloat16")
    half.compile(loss=losses.bce)
    scores = score_test_subset(half, cfg)
    assert scores == pytest.approx(score_test_subset(inference_model(half, cfg), cfg) | {
        "test_loss": scores["test_loss"]}, rel=1e-6)
    assert 0.0 < scores["test_f1"] < 1.0 and scores["test_loss"] > 0.0


def test_killed_tune_resumes_to_n_trials(tune_project):
    cfg = tune_project()
    params = str(cfg.paths.root / "params.yaml")
    assert run_workers({"params": params, "kill_after_finished": 2}) == [-signal.SIGKILL]
    assert len(load_study(cfg).trials) == 2

    tune(cfg, fit=fake_fit)
    trials = load_study(cfg).trials
    assert [trial.number for trial in trials] == [0, 1, 2, 3]
    assert all(trial.state in FINISHED for trial in trials)
    parents, nested = tune_runs(cfg)
    assert len(parents) == 1 and len(nested) == 4
    assert len(pd.read_csv(cfg.paths.hyperparameters_csv)) == 4


def test_trial_of_a_killed_worker_is_failed_and_replaced(tune_project):
    cfg = tune_project(heartbeat_seconds=1)
    params = str(cfg.paths.root / "params.yaml")
    assert run_workers({"params": params, "kill_in_trial": 2}) == [-signal.SIGKILL]
    # Let the killed trial's heartbeat age past its grace period (2 s; SQLite's clock has 1 s
    # resolution, so wait 3.5 s).
    time.sleep(3.5)

    tune(cfg, fit=fake_fit)
    trials = load_study(cfg).trials
    assert trials[2].state == TrialState.FAIL
    assert sum(trial.state in FINISHED for trial in trials) == 4 and len(trials) == 5
    parents, nested = tune_runs(cfg)
    assert len(parents) == 1 and len(nested) == 5
    killed = [run for run in nested if run.data.tags.get("optuna.trial") == "2"]
    assert [run.info.status for run in killed] == ["FAILED"]
    assert killed[0].data.tags["optuna.state"] == "failed"


def test_pruned_trials_are_marked_in_mlflow(tune_project):
    cfg = tune_project(n_trials=6, pruner={"startup_trials": 1},
                       search={"epochs": {"low": 3, "high": 3}, "batch_size": [16],
                               "learning_rate": {"low": 1e-4, "high": 1e-2}})
    study = tune(cfg, fit=fake_fit)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "the median pruner should stop some of six trials of a peaked objective"
    _, nested = tune_runs(cfg)
    states = {run.data.tags["optuna.trial"]: (run.info.status, run.data.tags["optuna.state"])
              for run in nested}
    assert all(states[str(trial.number)] == ("KILLED", "pruned") for trial in pruned)
    assert all(pd.notna(trial.user_attrs.get("val_f1")) for trial in pruned)


def test_params_a_trial_depends_on_start_a_new_study(tune_project):
    cfg = tune_project(n_trials=1)
    tune(cfg, fit=fake_fit)
    root = cfg.paths.root

    more = write_params(root, {"tune": {**TUNE, "n_trials": 2}, **SMALL})
    searched_base = write_params(root, {"tune": TUNE, "train": {"learning_rate": 0.05}, **SMALL})
    assert study_name(more) == study_name(searched_base) == study_name(cfg)
    assert len(tune(more, fit=fake_fit).trials) == 2  # continued: one more trial

    other = write_params(root, {"tune": {**TUNE, "n_trials": 2}, "train": {"patch_size": 32},
                                **SMALL})
    assert study_name(other) != study_name(cfg)
    study = tune(other, fit=fake_fit)
    assert len(study.trials) == 2 and study.study_name == study_name(other)
    assert study.user_attrs["params"]["train.patch_size"] == "32"
    assert len(load_study(cfg).trials) == 2


def test_two_workers_share_a_postgres_study(tune_project, postgres_server_url,
                                            monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", create_database(postgres_server_url))
    cfg = tune_project(n_trials=6, storage=create_database(postgres_server_url))
    params = str(cfg.paths.root / "params.yaml")
    barrier = multiprocessing.get_context("spawn").Barrier(2)
    kwargs = {"params": params, "barrier": barrier, "epoch_seconds": 0.3}
    assert run_workers(kwargs, kwargs) == [0, 0]

    trials = load_study(cfg).trials
    assert sorted(trial.number for trial in trials) == list(range(6))
    assert all(trial.state in FINISHED for trial in trials)
    assert len({trial.user_attrs["worker"] for trial in trials}) == 2
    parents, nested = tune_runs(cfg)
    assert len(parents) == 1 and len(nested) == 6


@pytest.mark.slow
def test_reduced_tune_with_the_real_fit(project):
    """Four real trials of a tiny U-Net on synthetic data, down the real pipeline's outputs."""
    from unetops.stages import augment, download, preprocess, split

    cfg = project(
        data={"dataset": "synthetic", "synthetic": {"n_images": 8, "size": 64, "seed": 0}},
        split={"val_fraction": 0.25, "test_fraction": 0.25},
        augment={"copies": 1},
        model={"depth": 2, "base_filters": 4},
        train={"patch_size": 32, "patches_per_epoch": 64, "val_patches": 32},
        evaluate={"tile": 64, "jit_compile": False},
        tune={**TUNE, "search": {"epochs": {"low": 1, "high": 2}, "batch_size": [8, 16],
                                 "learning_rate": {"low": 1e-3, "high": 1e-2}}},
    )
    for stage in (download, split, preprocess, augment):
        stage.run(cfg)

    study = tune(cfg)
    trials = study.trials
    assert len(trials) == 4 and all(trial.state in FINISHED for trial in trials)
    table = pd.read_csv(cfg.paths.hyperparameters_csv)
    assert table["trial"].tolist()[0] == study.best_trial.number and table.loc[0, "best"]
    for name in ("test_iou", "test_f1", "val_iou", "val_f1"):
        assert 0.0 <= table.loc[0, name] <= 1.0, name
    assert table.loc[0, "test_loss"] > 0.0
    assert yaml.safe_load(cfg.paths.best_params.read_text()) == study.best_params

    parents, nested = tune_runs(cfg)
    assert len(parents) == 1 and len(nested) == 4
    client = mlflow.MlflowClient()
    for trial in trials:
        run = next(run for run in nested if run.data.tags["optuna.trial"] == str(trial.number))
        assert float(run.data.params["train.learning_rate"]) == pytest.approx(
            trial.params["train.learning_rate"])
        assert len(client.get_metric_history(run.info.run_id, "val_f1")) >= 1
    assert parents[0].data.tags["best.trial"] == str(study.best_trial.number)
