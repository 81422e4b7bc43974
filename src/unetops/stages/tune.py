"""Stage ``tune``: an Optuna study over ``params.yaml``'s search space, tracked in MLflow.

Each trial trains with ``unetops.stages.train.fit`` on the trial's params (every other key comes
from ``params.yaml``) and is scored by the validation metric ``train.monitor`` at the epoch it
keeps (``train.keep``: its best or its last); Optuna's Keras pruning callback stops unpromising
trials after an epoch (median pruner). The test subset is never used to choose: it is scored
only for a trial that is the study's best when it finishes, and the table shows it for the final
best trial alone.

Restarts and parallel workers share one study through ``tune.storage`` (SQLite under ``data/``
by default; PostgreSQL for workers on many hosts), named ``tune.study_name`` plus a fingerprint
of the params trials depend on (:func:`study_name`): a rerun with the same params continues the
study, changed params start a fresh one. ``tune.n_trials`` counts finished trials
(complete + pruned) over all of them: "count the trials, start one" runs under a lock held in
the storage itself (a PostgreSQL advisory lock, MySQL's ``GET_LOCK``, a file lock beside a
SQLite file), so workers stop at exactly ``n_trials``. A trial whose worker was killed stops
beating (``tune.heartbeat_seconds``); after twice that the next worker marks it failed and runs
a replacement.

MLflow: one parent run per study, its id kept in the study (so a rerun re-opens it), and one
nested run per trial (``fit``'s own run, tagged with the trial and its state). Every run ends by
rebuilding ``reports/hyperparameters.md``/``.csv``, the plots and ``reports/best_params.yaml``
(the best trial's params as dotted keys, which ``train`` applies with ``train.use_tuned``).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import keras
import mlflow
import numpy as np
import optuna
import sqlalchemy
import yaml
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, Trial, TrialState
from optuna_integration import KerasPruningCallback

from unetops import hyperparameters, tracking
from unetops.config import Config, SearchRange, SearchSpace
from unetops.console import log
from unetops.errors import UnetopsError
from unetops.io import check_writable, write_text

#: Study user attributes.
PARENT_RUN_ATTR = "mlflow_run_id"
WORKERS_ATTR = "workers"
PARAMS_ATTR = "params"
#: Params that do not change what a trial computes (prefixes of flat keys): a rerun with other
#: values continues the same study.
NOT_FINGERPRINTED = ("tune.n_trials", "tune.study_name", "tune.storage", "tune.heartbeat_seconds",
                     "train.use_tuned", "mlflow.", "evaluate.curve_points",
                     "evaluate.champion_metric")
#: Trial user attributes (besides ``hyperparameters.VAL_ATTRS`` / ``TEST_ATTRS``).
RUN_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"
BEST_EPOCH_ATTR = "best_epoch"
#: Trials that use up ``tune.n_trials`` (failed ones are replaced).
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
#: MLflow status of a trial's nested run, by the trial's final state.
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED",
              TrialState.FAIL: "FAILED"}
MINIMIZED = ("val_loss",)

FitFn = Callable[..., object]
TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def run(cfg: Config) -> None:
    """``unetops tune``: run trials until the study holds ``tune.n_trials``, then report."""
    tune(cfg)


# --- storage and the study lock ---------------------------------------------------------------

def storage_url(cfg: Config) -> sqlalchemy.URL:
    """``tune.storage`` as a SQLAlchemy URL (default: the SQLite file ``data/optuna.db``).

    A relative SQLite path is relative to the project root; ``postgresql://`` means psycopg2
    (SQLAlchemy 2.1 would pick psycopg 3, which is not installed).
    """
    raw = cfg.tune.storage or f"sqlite:///{cfg.paths.optuna_db}"
    try:
        url = sqlalchemy.make_url(raw)
    except sqlalchemy.exc.ArgumentError:
        raise UnetopsError(f"params.yaml: tune.storage: not a SQLAlchemy URL: {raw!r}") from None
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise UnetopsError("params.yaml: tune.storage: a SQLite storage must be a file")
        database = Path(url.database)
        if not database.is_absolute():
            database = cfg.paths.root / database
        database.parent.mkdir(parents=True, exist_ok=True)
        url = url.set(database=str(database))
    return url


def shown_url(url: sqlalchemy.URL) -> str:
    """The URL as logs and MLflow may show it: never the password."""
    return url.render_as_string(hide_password=True)


class StudyLock:
    """A lock shared by every worker of one study, held in (or beside) the storage.

    It makes "count the trials, then start one" atomic, so parallel workers together stop at
    exactly ``tune.n_trials``; it also serialises creating the study's MLflow parent run.
    """

    def __init__(self, url: sqlalchemy.URL, study_name: str):
        self.url = url
        self.backend = url.get_backend_name()
        digest = hashlib.sha256(f"unetops.tune:{study_name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self.name = f"unetops.tune.{digest.hex()[:40]}"
        self._engine = None
        if self.backend in ("postgresql", "mysql", "mariadb"):
            self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                                    isolation_level="AUTOCOMMIT")
        elif self.backend != "sqlite":
            log.warning("tune: no cross-worker lock for %s storage; parallel workers may run "
                        "a few trials beyond tune.n_trials", self.backend)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.backend == "sqlite":
            with open(f"{self.url.database}.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        elif self._engine is None:
            yield
        else:
            postgres = self.backend == "postgresql"
            take, release, argument = (
                ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", self.key)
                if postgres else
                ("SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", self.name))
            try:
                conn = self._engine.connect()
            except sqlalchemy.exc.OperationalError as exc:
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
                raise UnetopsError(f"params.yaml: tune.storage: cannot connect to "
                                   f"{shown_url(self.url)} ({reason})") from None
            with conn:
                conn.execute(sqlalchemy.text(take), {"k": argument})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text(release), {"k": argument})

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError)
"""What a storage raises when its database goes away (Optuna wraps most SQL errors)."""


def storage_reason(exc: BaseException) -> str:
    """The database's own first line (Optuna's wrapper message says nothing about the cause)."""
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    cause = getattr(cause, "orig", None) or cause or exc
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


class ResilientStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage with a heartbeat that outlives a database restart.

    Optuna's heartbeat thread dies at its first error, so after a restart during a trial the
    trial would beat no more: 2 × ``tune.heartbeat_seconds`` later another worker would fail a
    trial that is still running, and this worker could not tell its result. Here a beat that
    fails is logged and the next one tried on time. Pooled connections are checked before use
    (``pool_pre_ping``), so the trial's own calls after the restart reconnect.
    """

    _beating = True

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except STORAGE_ERRORS as exc:
            log.warning("tune: the running trial's heartbeat not recorded (%s); trying again "
                        "in %s s", storage_reason(exc), self.heartbeat_interval)
            self._beating = False
            return
        if not self._beating:
            self._beating = True
            log.info("tune: heartbeat recorded again")


def open_storage(cfg: Config, url: sqlalchemy.URL) -> optuna.storages.RDBStorage:
    engine_kwargs = ({"connect_args": {"timeout": 60}} if url.get_backend_name() == "sqlite"
                     else {"pool_pre_ping": True})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return ResilientStorage(
                url.render_as_string(hide_password=False),
                engine_kwargs=engine_kwargs,
                heartbeat_interval=cfg.tune.heartbeat_seconds,
                heartbeat_stale_trial_callback=_mark_stale_run_failed,
            )
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnetopsError(f"params.yaml: tune.storage: cannot open {shown_url(url)} "
                           f"({reason})") from None


# --- the search space -------------------------------------------------------------------------

def check_space(cfg: Config) -> None:
    """Every bound and choice of the search space gives a valid config (before any trial runs)."""
    names = {target: name for name, target in SearchSpace.TARGETS.items()}
    for key, spec in cfg.tune.search.dimensions().items():
        values = (spec.low, spec.high) if isinstance(spec, SearchRange) else spec
        for value in values:
            try:
                cfg.with_overrides({key: value})
            except UnetopsError as exc:
                raise UnetopsError(f"params.yaml: tune.search.{names[key]}: {value!r} gives an "
                                   f"invalid config ({exc})") from None


def suggest(trial: Trial, space: SearchSpace) -> dict:
    """The trial's values for every searched key (dotted keys, as ``with_overrides`` takes)."""
    params = {}
    for key, spec in space.dimensions().items():
        if isinstance(spec, SearchRange) and isinstance(spec.low, int):
            params[key] = trial.suggest_int(key, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, SearchRange):
            params[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
        else:
            params[key] = trial.suggest_categorical(key, list(spec))
    return params


def direction(cfg: Config) -> str:
    return "minimize" if cfg.train.monitor in MINIMIZED else "maximize"


def _is_better(value: float, than: float, cfg: Config) -> bool:
    return value <= than if direction(cfg) == "minimize" else value >= than


# --- MLflow -----------------------------------------------------------------------------------

def _run_in(client: mlflow.MlflowClient, run_id: str | None, experiment_id: str) -> bool:
    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.experiment_id == experiment_id
    except MlflowException:
        return False


def parent_run_id(study: optuna.Study, cfg: Config, url: sqlalchemy.URL) -> str:
    """The study's MLflow parent run: re-opened when the study has one, else created (and kept
    in the study). Call under the study lock, so parallel workers create one between them."""
    experiment_id = tracking.setup(cfg)
    client = mlflow.MlflowClient()
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if _run_in(client, run_id, experiment_id):
        return run_id
    if run_id:
        log.warning("tune: the study's MLflow run %s is not in experiment %r of this tracking "
                    "store; starting a new parent run", run_id, cfg.mlflow.experiment)
    run = client.create_run(experiment_id, run_name=f"tune-{study.study_name}",
                            tags={"unetops.stage": "tune", "optuna.study": study.study_name})
    # The study's settings when it was created (n_trials, which a rerun may raise, is a tag).
    settings = {key: value for key, value in tracking.flat_params(cfg).items()
                if (key.startswith("tune.") and key != "tune.n_trials")
                or key in ("train.monitor", "train.keep")}
    settings["tune.storage"] = shown_url(url)
    client.log_batch(run.info.run_id,
                     params=[Param(key, value) for key, value in sorted(settings.items())])
    study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    return run.info.run_id


def _mark_run(run_id: str | None, state: TrialState) -> None:
    """Tag a trial's nested run with the trial's state and give it the matching status."""
    if not run_id:
        return
    client = mlflow.MlflowClient()
    try:
        client.set_tag(run_id, "optuna.state", hyperparameters.STATE_NAMES[state])
        client.set_terminated(run_id, status=RUN_STATUS[state])
    except MlflowException as exc:
        log.warning("tune: cannot mark MLflow run %s %s (%s)", run_id, state.name.lower(),
                    str(exc).splitlines()[0])


def _mark_stale_run_failed(study: optuna.Study, trial: FrozenTrial) -> None:
    """A killed worker's trial, failed by the heartbeat: its MLflow run fails too."""
    log.warning("tune: trial %d stopped beating (its worker was killed); marked failed",
                trial.number)
    _mark_run(trial.user_attrs.get(RUN_ATTR), TrialState.FAIL)


def _end_runs_above(parent_id: str, status: str) -> None:
    """End any run a failed ``fit`` left active, so the next trial nests under the parent."""
    while (active := mlflow.active_run()) is not None and active.info.run_id != parent_id:
        mlflow.end_run(status=status)


# --- one trial --------------------------------------------------------------------------------

class TrialRecorder(keras.callbacks.Callback):
    """Links the trial to ``fit``'s MLflow run and keeps each epoch's validation metrics, so a
    pruned or failed trial still has numbers in the table. Runs before the pruning callback."""

    def __init__(self, trial: Trial):
        super().__init__()
        self.trial = trial
        self.run_id: str | None = None
        self.last: dict[str, float] = {}

    def on_train_begin(self, logs=None):
        active = mlflow.active_run()
        if active is None or self.run_id is not None:
            return
        self.run_id = active.info.run_id
        self.trial.set_user_attr(RUN_ATTR, self.run_id)
        mlflow.set_tags({"optuna.study": self.trial.study.study_name,
                         "optuna.trial": str(self.trial.number),
                         "mlflow.runName": f"trial-{self.trial.number}"})

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.last = {name: float(logs[name]) for name in hyperparameters.VAL_ATTRS
                     if name in logs}


def _set_attrs(trial: Trial, values: dict[str, float]) -> None:
    for name, value in values.items():
        trial.set_user_attr(name, float(value))


def score_test_subset(model, cfg: Config) -> dict[str, float]:
    """Test IoU and F1 (threshold 0.5) and the training loss of ``model``, on FOV pixels pooled
    over the test cases, predicted exactly as ``evaluate`` predicts (whole images, native size,
    the float32 model ``train`` would save even when the trial trained in mixed precision)."""
    from unetops.metrics import Counts, confusion_counts, counts_metrics
    from unetops.predict import Predictor
    from unetops.preprocessing import read_split
    from unetops.stages.evaluate import predict_case
    from unetops.stages.train import inference_model

    split = read_split(cfg)
    rows = split[split["subset"] == "test"].sort_values("case")
    if rows.empty:
        return {}
    predictor = Predictor.from_config(inference_model(model, cfg), cfg, name="tune: trial model")
    loss_fn = getattr(model, "loss", None)
    counts, loss_sum, loss_weight = Counts(0, 0, 0, 0), 0.0, 0.0
    for row in rows.itertuples():
        case = predict_case(row, predictor, cfg)
        counts = counts + confusion_counts(case.probability[case.fov] >= 0.5,
                                           case.truth[case.fov])
        if callable(loss_fn):
            weight = case.fov.astype(np.float32)
            losses = np.asarray(loss_fn((case.truth * weight)[None, ..., None],
                                        (case.probability * weight)[None, ..., None]))
            # Pixelwise losses: mean over FOV pixels; per-image ones (Dice): weighted by FOV size.
            loss_sum += float(np.sum(losses[0] * weight) if losses.ndim == 3
                              else np.sum(losses) * weight.sum())
            loss_weight += float(weight.sum())
    metrics = counts_metrics(counts)
    scores = {"test_iou": metrics["iou"], "test_f1": metrics["f1"]}
    if loss_weight:
        scores["test_loss"] = loss_sum / loss_weight
    return scores


def _objective(study: optuna.Study, trial: Trial, cfg: Config, fit: FitFn,
               recorder: TrialRecorder) -> float:
    params = suggest(trial, cfg.tune.search)
    trial_cfg = cfg.with_overrides({**params, "train.use_tuned": False})
    callbacks = [recorder]
    if cfg.tune.pruner.kind != "none":
        callbacks.append(KerasPruningCallback(trial, cfg.train.monitor))
    log.info("tune: trial %d: %s", trial.number,
             ", ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in params.items()))
    result = fit(trial_cfg, extra_callbacks=callbacks, nested=True, resume=False, save=False)
    value = float(result.best[cfg.train.monitor])
    _set_attrs(trial, {name: result.best[name] for name in hyperparameters.VAL_ATTRS
                       if name in result.best})
    trial.set_user_attr(BEST_EPOCH_ATTR, int(result.best_epoch))
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if all(_is_better(value, other.value, cfg) for other in completed):
        # Scored now, while the model is in memory; never read by the sampler or the pruner.
        _set_attrs(trial, score_test_subset(result.model, trial_cfg))
    return value


def run_trial(study: optuna.Study, trial: Trial, cfg: Config, fit: FitFn,
              parent_id: str) -> FrozenTrial:
    """Run one asked trial to its end and tell the study (complete, pruned or failed).

    An exception from ``fit`` fails the trial (it does not count towards ``n_trials``) and stops
    the worker, as ``study.optimize`` would.
    """
    from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize uses

    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    recorder = TrialRecorder(trial)
    state, value = TrialState.FAIL, None
    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                value = _objective(study, trial, cfg, fit, recorder)
                state = TrialState.COMPLETE
            except optuna.TrialPruned:
                state = TrialState.PRUNED
    finally:
        if state != TrialState.COMPLETE:
            _set_attrs(trial, recorder.last)
        _end_runs_above(parent_id, RUN_STATUS[state])
        frozen = study.tell(trial, value, state=state)
        _mark_run(recorder.run_id, state)
        shown = "" if value is None else f" {cfg.train.monitor}={value:.4f}"
        log.info("tune: trial %d %s%s", frozen.number, hyperparameters.STATE_NAMES[state], shown)
    return frozen


# --- the study --------------------------------------------------------------------------------

def _fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def trial_params(cfg: Config) -> dict[str, str]:
    """Every param a trial's result depends on, flat: all of ``params.yaml`` but the searched
    keys (a trial sets them) and :data:`NOT_FINGERPRINTED`."""
    searched = set(cfg.tune.search.dimensions())
    return {key: value for key, value in tracking.flat_params(cfg).items()
            if key not in searched and not key.startswith(NOT_FINGERPRINTED)}


def study_name(cfg: Config) -> str:
    """``tune.study_name`` plus a fingerprint of :func:`trial_params`.

    A rerun with the same params (raising ``n_trials``, or after a kill) continues the study;
    changing anything a trial depends on (``train.patch_size``, the data's params, the search
    space …) starts a fresh one, so ``dvc repro`` never reports trials of other params.
    """
    text = json.dumps(trial_params(cfg), sort_keys=True)
    return f"{cfg.tune.study_name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def open_study(cfg: Config, storage: optuna.storages.RDBStorage) -> tuple[optuna.Study, int]:
    """Create or load the study; returns it with this worker's index (0 for the first)."""
    study = optuna.create_study(study_name=study_name(cfg), storage=storage,
                                direction=direction(cfg), load_if_exists=True)
    if hyperparameters.OBJECTIVE_ATTR not in study.user_attrs:
        study.set_user_attr(hyperparameters.OBJECTIVE_ATTR, cfg.train.monitor)
        study.set_user_attr(PARAMS_ATTR, trial_params(cfg))
    worker = int(study.user_attrs.get(WORKERS_ATTR, 0))
    study.set_user_attr(WORKERS_ATTR, worker + 1)
    return study, worker


def _log_running(study: optuna.Study, cfg: Config) -> None:
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running and cfg.tune.heartbeat_seconds:
        log.info("tune: trial(s) %s still running: other workers', or a killed worker's (failed "
                 "%d s after its last heartbeat; run unetops tune again then to replace it)",
                 ", ".join(str(trial.number) for trial in running), 2 * cfg.tune.heartbeat_seconds)
    elif running:
        log.info("tune: trial(s) %s still running (tune.heartbeat_seconds is null: a killed "
                 "worker's trial stays running)", ", ".join(str(trial.number) for trial in running))


def _sampler_and_pruner(cfg: Config, worker: int):
    # Workers draw from different seeds, or their random start trials would coincide.
    sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed + worker,
                                         n_startup_trials=cfg.tune.sampler_startup_trials,
                                         constant_liar=True)
    if cfg.tune.pruner.kind == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.tune.pruner.startup_trials,
                                             n_warmup_steps=cfg.tune.pruner.warmup_epochs)
    else:
        pruner = optuna.pruners.NopPruner()
    return sampler, pruner


def tune(cfg: Config, fit: FitFn | None = None,
         callbacks: Iterable[TrialCallback] = ()) -> optuna.Study:
    """Run trials until the study holds ``tune.n_trials`` finished or running ones, then report.

    A database that goes away for longer than a call stops the worker with one line (every
    finished trial is in the study; a rerun continues it, failing the interrupted trial once its
    heartbeat is stale); a restart between calls goes unnoticed but for a logged heartbeat.
    ``fit`` has ``unetops.stages.train.fit``'s signature (the default; tests pass a fast
    stand-in); ``callbacks`` are called as ``callback(study, trial)`` after each trial this
    worker finishes, like ``study.optimize``'s.
    """
    if fit is None:
        from unetops.stages.train import fit
    check_space(cfg)
    check_writable(*{path.parent for path in report_paths(cfg)})  # not after hours of trials
    url = storage_url(cfg)
    lock = StudyLock(url, study_name(cfg))
    try:
        with lock():  # also serialises creating the storage's and MLflow's tables
            study, worker = open_study(cfg, open_storage(cfg, url))
            parent_id = parent_run_id(study, cfg, url)
        study.sampler, study.pruner = _sampler_and_pruner(cfg, worker)
        log.info("tune: study %r in %s, worker %d, %d trials in total", study.study_name,
                 shown_url(url), worker, cfg.tune.n_trials)
        with tracking.TolerantRun(mlflow.start_run(run_id=parent_id)):
            mlflow.set_tag("tune.n_trials", cfg.tune.n_trials)
            while True:
                with lock():
                    _fail_stale_trials(study)
                    if len(study.get_trials(deepcopy=False, states=COUNTED_STATES)) \
                            >= cfg.tune.n_trials:
                        break
                    with warnings.catch_warnings():  # run_trial beats, as optimize would
                        warnings.filterwarnings("ignore", "Heartbeat of storage")
                        trial = study.ask()
                frozen = run_trial(study, trial, cfg, fit, parent_id)
                for callback in callbacks:
                    callback(study, frozen)
            _log_running(study, cfg)
            report(study, cfg)
    except STORAGE_ERRORS as exc:
        raise UnetopsError(f"params.yaml: tune.storage: {shown_url(url)}: {storage_reason(exc)}; "
                           "finished trials are kept: run unetops tune again to continue the "
                           "study") from None
    finally:
        lock.close()
    return study


# --- the report -------------------------------------------------------------------------------

def report_paths(cfg: Config) -> tuple[Path, ...]:
    """Every file :func:`report` writes."""
    paths = cfg.paths
    return (paths.hyperparameters_md, paths.hyperparameters_csv, paths.hyperparameters_history,
            paths.hyperparameters_importance, paths.best_params)


def report(study: optuna.Study, cfg: Config) -> None:
    """Rebuild the table, the plots and ``best_params.yaml`` from the study; put the best trial
    on the active (parent) MLflow run."""
    paths = cfg.paths
    history_png = paths.hyperparameters_history
    importance_png = paths.hyperparameters_importance
    frame = hyperparameters.save_table(study, paths.hyperparameters_md, paths.hyperparameters_csv)
    hyperparameters.save_plots(study, history_png, importance_png, seed=cfg.tune.seed)
    best = hyperparameters.best_trial(study)
    write_text(paths.best_params, yaml.safe_dump(best.params if best else {}, sort_keys=True))
    finished = len(study.get_trials(deepcopy=False,
                                    states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if best is not None:
        mlflow.set_tags({f"best.{key}": value for key, value in best.params.items()}
                        | {"best.trial": best.number})
        metrics = {"best.objective": best.value}
        metrics.update({f"best.{name}": best.user_attrs[name]
                        for name in (*hyperparameters.VAL_ATTRS, *hyperparameters.TEST_ATTRS)
                        if name in best.user_attrs})
        mlflow.log_metrics(metrics, step=finished)
    for path in report_paths(cfg):
        mlflow.log_artifact(str(path))
    log.info("tune: %d trials in %s; best %s", len(frame), paths.rel(paths.hyperparameters_md),
             "none yet" if best is None else
             f"trial {best.number} ({hyperparameters.objective_name(study)}={best.value:.4f})")
    unfinished = study.get_trials(deepcopy=False,
                                  states=(TrialState.RUNNING, TrialState.WAITING))
    if best is None and not unfinished:
        raise UnetopsError(f"{paths.rel(paths.hyperparameters_md)}: no trial of study "
                           f"{study.study_name!r} completed (all pruned or failed)")
