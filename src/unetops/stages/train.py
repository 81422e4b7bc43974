"""Stage ``train``: a U-Net trained on random patches, resumable, tracked as one MLflow run.

Reads ``data/split.csv``, the augmented training copies ``data/augmented/<case>_<k>.npz`` and the
preprocessed validation cases ``data/preprocessed/<case>.npz``. Every epoch draws fresh patches
from a generator seeded by ``(train.seed, epoch, step)``, through a prefetching ``tf.data``
pipeline (the next batch is sampled while the current one trains); the validation metric
(``train.monitor``) is computed on one fixed, seeded set of validation patches, and the kept
epoch's weights (``train.keep``: the best by that metric, or the last) become
``models/model.keras`` (uncompiled, built-in layers only). Seeds, TensorFlow op determinism and
one op at a time (``unetops`` sets ``TF_NUM_INTEROP_THREADS=1``) make the same params give the
same weights on a CPU.

A killed run resumes: Keras ``BackupAndRestore`` keeps weights and optimizer in
``models/checkpoints/backup`` and this module keeps the history, the best weights and the MLflow
run id beside it, so the next ``unetops train`` with the same params and data continues at the
epoch that was interrupted, in the same MLflow run. Epochs are numbered from 1 in every output
(history CSV, summary JSON, MLflow steps).

``train.strategy`` runs the same training on several devices or hosts (:mod:`unetops.distribute`):
``train.batch_size`` stays the global batch, each replica trains on its slice of the batch one
device would draw, batch normalisation uses the global batch's statistics, and only the chief
worker logs to MLflow and writes the outputs.
"""

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
import yaml
from mlflow.exceptions import MlflowException

from unetops import distribute, tracking
from unetops.config import Config, TrainConfig
from unetops.console import log
from unetops.errors import UnetopsError
from unetops.preprocessing import read_split
from unetops.io import atomic_path, load_arrays, save_arrays, write_csv, write_json
from unetops.losses import F1Score, LastMap, make_loss, on_every_map
from unetops.model import build_unet, input_multiple, output_margin, valid_input_size
from unetops.overlays import error_overlay, grayscale
from unetops.patches import PatchSampler, random_dihedral

MAXIMISED = {"val_iou", "val_f1", "val_auc"}
LOGGED_SECTIONS = ("data", "split", "preprocess", "augment", "model", "train", "mlflow")
"""What shaped the model; ``evaluate`` and ``tune`` params are theirs to log."""
TRAIN_STREAM, VAL_STREAM = 1, 2
OVERLAY_PATCHES = 8
STEPS_PER_EXECUTION = 8
"""Training steps per ``tf.function`` call: fewer Python round trips, which on a busy 2-core CPU
kept throughput up (benchmarks/bench_train.py); every callback here works per epoch."""
PREFETCH_BATCHES = 2
"""Batches sampled ahead of the training step (sampling one takes well under 1 % of a step)."""


@dataclasses.dataclass
class FitResult:
    """What one training run produced.

    ``model``: compiled, with the kept epoch's weights; ``history``: per-epoch Keras logs (loss,
    iou, f1, val_loss, val_iou, val_f1, learning_rate, seconds, patches_per_second), epochs
    before an interruption included; ``best_epoch``, the epoch kept (``train.keep``: the best
    by ``train.monitor`` or the last), counts from 1 and ``best`` holds its ``val_*`` values;
    ``seconds``: summed epoch times (training + validation);
    ``patches_per_second``: steady-state training throughput (first epoch excluded);
    ``chief``: False on the other workers of ``multi_worker`` (no MLflow run, ``run_id`` empty,
    nothing for them to write).
    """

    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int
    best: dict[str, float]
    run_id: str
    seconds: float
    patches_per_second: float
    chief: bool = True


@dataclasses.dataclass
class TrainingData:
    sampler: PatchSampler
    val_x: np.ndarray
    val_y: np.ndarray
    data_hash: str
    train_files: int
    val_cases: int


# --- data ---------------------------------------------------------------------------------------

def check_patch_size(cfg: Config) -> None:
    """``train.patch_size`` must fit the network's poolings (a one-line error naming the fix)."""
    size, model = cfg.train.patch_size, cfg.model
    if model.padding == "same" and size % input_multiple(model):
        raise UnetopsError(f"train.patch_size: {size} is not a multiple of 2**model.depth = "
                           f"{input_multiple(model)} (padding same)")
    if model.padding == "valid" and valid_input_size(model, size) != size:
        raise UnetopsError(f"train.patch_size: {size} does not pool evenly with model.padding valid "
                           f"at depth {model.depth}; the next size that does is "
                           f"{valid_input_size(model, size)}")


def _load_case(path: Path, need_weight: bool, channels: int | None) -> dict[str, np.ndarray]:
    arrays = load_arrays(path)
    for key in ("image", "mask", "fov") + (("weight",) if need_weight else ()):
        if key not in arrays:
            hint = " (train.loss weight_map needs augment.weight_map: true)" if key == "weight" else ""
            raise UnetopsError(f"{path}: no {key!r} array{hint}")
    image = arrays["image"]
    if image.ndim not in (2, 3):
        raise UnetopsError(f"{path}: image must be (H, W) or (H, W, C), got {image.shape}")
    arrays["image"] = image = image.reshape(*image.shape[:2], -1)
    for key in ("mask", "fov") + (("weight",) if need_weight else ()):
        if arrays[key].shape != image.shape[:2]:
            raise UnetopsError(f"{path}: {key} is {arrays[key].shape}, image {image.shape[:2]}")
    if channels is not None and image.shape[2] != channels:
        raise UnetopsError(f"{path}: image has {image.shape[2]} channels, other cases {channels}")
    return arrays


def _case_files(folder: Path, case: str) -> list[Path]:
    pattern = re.compile(rf"{re.escape(case)}_\d{{3,}}\.npz")
    return sorted(p for p in folder.glob(f"{case}_*.npz") if pattern.fullmatch(p.name))


def load_training_data(cfg: Config) -> TrainingData:
    """The training patch sampler and the fixed validation patches, from the files on disk."""
    split = read_split(cfg)
    train_cases = sorted(split.loc[split["subset"] == "train", "case"])
    val_cases = sorted(split.loc[split["subset"] == "val", "case"])
    if not train_cases:
        raise UnetopsError(f"{cfg.paths.split_csv}: no train cases")
    if not val_cases:
        raise UnetopsError(f"{cfg.paths.split_csv}: no val cases (train scores its epochs on "
                           "them; set split.val_fraction above 0)")
    digest = hashlib.sha256(cfg.paths.split_csv.read_bytes())
    need_weight = cfg.train.loss == "weight_map"

    train_paths = []
    for case in train_cases:
        files = _case_files(cfg.paths.augmented, case)
        if not files:
            raise UnetopsError(f"{cfg.paths.augmented}: no {case}_NNN.npz for train case {case} "
                               "(run unetops augment)")
        train_paths += files
    val_paths = [cfg.paths.preprocessed / f"{case}.npz" for case in val_cases]
    for path in val_paths:
        if not path.is_file():
            raise UnetopsError(f"{path}: file not found (run unetops preprocess)")

    def load(paths: Sequence[Path], weight: bool) -> dict[str, list[np.ndarray]]:
        cases = {"image": [], "mask": [], "fov": [], "weight": []}
        channels = None
        for path in paths:
            arrays = _load_case(path, weight, channels)
            channels = arrays["image"].shape[2]
            for key, arrays_of_key in cases.items():
                if key in arrays:
                    arrays_of_key.append(arrays[key])
            digest.update(f"{path.parent.name}/{path.name}:{path.stat().st_size}\n".encode())
        return cases

    train = load(train_paths, need_weight)
    sampler = PatchSampler(train["image"], train["mask"], train["fov"], cfg.train.patch_size,
                           train["weight"] if need_weight else None)
    del train
    val = load(val_paths, False)
    if val["image"][0].shape[2] != sampler.channels:
        raise UnetopsError(f"{val_paths[0]}: {val['image'][0].shape[2]} channels, training "
                           f"copies {sampler.channels}")
    val_x, val_y = PatchSampler(val["image"], val["mask"], val["fov"], cfg.train.patch_size).sample(
        cfg.train.val_patches, np.random.default_rng([cfg.train.seed, VAL_STREAM]))
    margin = output_margin(cfg.model)
    return TrainingData(sampler, val_x, _crop(val_y, margin), digest.hexdigest(), len(train_paths),
                        len(val_paths))


def _crop(array: np.ndarray, margin: int) -> np.ndarray:
    """The centred output window of a ``valid`` network (axes 1 and 2)."""
    return array[:, margin:array.shape[1] - margin, margin:array.shape[2] - margin] if margin else array


class EpochCounter(keras.callbacks.Callback):
    """Tells the patch pipeline which epoch it serves, so a resumed run draws the same patches."""

    value = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.value = epoch


def training_dataset(sampler: PatchSampler, train: TrainConfig, steps: int, margin: int,
                     epoch: EpochCounter) -> tf.data.Dataset:
    """One epoch of batches; batch ``step`` of epoch ``e`` is drawn from rng ``(seed, e, step)``.

    Keras re-iterates a finite dataset every epoch after ``on_epoch_begin``, so each epoch gets
    fresh patches. Sampling runs in tf.data's prefetch thread, in parallel with the training step
    it feeds. It is not spread over several threads: TensorFlow's op determinism runs a stateful
    (numpy) map serially anyway, and at >100,000 patches/s on one core it is a few hundred times
    faster than the training step (benchmarks/bench_train.py). The prefetch buffer is fixed and
    tf.data's autotuning is off: with ``AUTOTUNE`` the pipeline sat at exactly 200 patches/s on
    a 2-core CPU whose plain numpy ``fit`` ran at 225, and without it the two are level.

    The sampler is held weakly, so the caller must keep it alive while the dataset is used:
    TensorFlow keeps every ``numpy_function`` callable of a ``tf.data`` map for the life of the
    process (in the global graph), and a strong reference would keep the training data with it
    (``unetops tune`` grew by the data, about 0.35 GiB on STARE, every trial).
    """
    held = weakref.ref(sampler)

    def draw(step):
        rng = np.random.default_rng([train.seed, TRAIN_STREAM, epoch.value, int(step)])
        arrays = held().sample(train.batch_size, rng, train.vessel_fraction)
        if train.dihedral:
            arrays = random_dihedral(arrays, rng)
        return (arrays[0],) + tuple(_crop(a, margin) for a in arrays[1:])

    out = train.patch_size - 2 * margin
    shapes = [(train.batch_size, train.patch_size, train.patch_size, sampler.channels),
              (train.batch_size, out, out, 1), (train.batch_size, out, out)]
    shapes = shapes[:3 if sampler.has_weights else 2]

    def batch(step):
        arrays = tf.numpy_function(draw, [step], [tf.float32] * len(shapes), stateful=True)
        return tuple(tf.ensure_shape(a, s) for a, s in zip(arrays, shapes))

    options = tf.data.Options()
    options.autotune.enabled = False
    return (tf.data.Dataset.range(steps).map(batch).prefetch(PREFETCH_BATCHES)
            .with_options(options))


def _inputs(where: distribute.Placement, data: TrainingData, train: TrainConfig, steps: int,
            margin: int, epoch: EpochCounter):
    """The training and validation batches; under a strategy, to be split over its replicas.

    Every worker draws the same seeded global batches; ``unbatch().batch()`` gives tf.distribute
    a batch op to find the global batch size in, and :func:`unetops.distribute.data_sharded`
    gives each replica its slice of every batch, so the replicas of a step together train on
    the batch one device would.
    """
    dataset = training_dataset(data.sampler, train, steps, margin, epoch)
    validation = tf.data.Dataset.from_tensor_slices((data.val_x, data.val_y)).batch(train.batch_size)
    if where.strategy is None:
        return dataset, validation
    dataset = dataset.unbatch().batch(train.batch_size, drop_remainder=True)
    return distribute.data_sharded(dataset), distribute.data_sharded(validation)


# --- model ----------------------------------------------------------------------------------------

class CyclicLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Smith's cyclical learning rate (2017), ``triangular`` or ``exp_range`` as in seed 002."""

    def __init__(self, low: float, high: float, half_period: int, mode: str, gamma: float = 1.0):
        self.low, self.high, self.half_period, self.mode, self.gamma = (
            low, high, half_period, mode, gamma)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        cycle = keras.ops.floor(1.0 + step / (2.0 * self.half_period))
        ramp = keras.ops.maximum(0.0, 1.0 - keras.ops.abs(step / self.half_period - 2.0 * cycle + 1.0))
        scale = self.gamma ** step if self.mode == "exp_range" else 1.0
        return self.low + (self.high - self.low) * ramp * scale

    def get_config(self):
        return {"low": self.low, "high": self.high, "half_period": self.half_period,
                "mode": self.mode, "gamma": self.gamma}


def learning_rate(train: TrainConfig, steps_per_epoch: int):
    """Adam's learning rate: a constant, cosine decay to ``lr_min``, or a cyclic schedule."""
    if train.lr_schedule == "constant":
        return train.learning_rate
    if train.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            train.learning_rate, decay_steps=train.epochs * steps_per_epoch,
            alpha=train.lr_min / train.learning_rate)
    return CyclicLearningRate(train.lr_min, train.learning_rate, train.cycle_steps,
                              train.lr_schedule, train.cycle_gamma)


def compile_model(cfg: Config, channels: int, steps_per_epoch: int, pos_weight: float,
                  replicas: int = 1) -> keras.Model:
    """The U-Net with Adam, the loss and the metrics; ``replicas``: of the current strategy.

    With several replicas, batch normalisation uses the statistics of the global batch
    (all-reduced, as one device would compute them; :func:`fit` exports the weights into plain
    layers), and every step is its own ``tf.function`` call: Keras 3 loops of several steps fail
    on distributed iterators (keras-team/keras#19246).
    """
    refined = cfg.model.refine_passes > 0
    model = build_unet(channels, cfg.model, dtype_policy(cfg.train.precision), every_map=refined)
    if replicas > 1:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True
    metrics = [keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5, name="iou"),
               F1Score(name="f1")]
    if cfg.train.monitor == "val_auc":
        metrics.append(keras.metrics.AUC(name="auc"))
    loss = make_loss(cfg.train.loss, pos_weight, cfg.train.tversky_beta, cfg.train.batch_dice)
    if refined:  # every pass's map is trained; the metrics judge the last, the saved model's
        loss, metrics = on_every_map(loss), [LastMap(metric) for metric in metrics]
    ema = cfg.train.ema_momentum
    optimizer = keras.optimizers.Adam(learning_rate(cfg.train, steps_per_epoch),
                                      use_ema=ema is not None, ema_momentum=ema or 0.99)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                  steps_per_execution=1 if replicas > 1 else min(STEPS_PER_EXECUTION,
                                                                  steps_per_epoch))
    return model


def dtype_policy(precision: str) -> str:
    """Keras' dtype policy for ``train.precision`` (``auto``: half precision only on a GPU)."""
    if precision == "auto":
        return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    return precision


def inference_model(model: keras.Model, cfg: Config) -> keras.Model:
    """The same weights in an uncompiled float32 U-Net: loads anywhere without custom objects.

    A mixed-precision model is rebuilt in float32 (its variables already are), so a model trained
    in bfloat16 on one machine predicts at full precision, and at full speed, on any other; a
    refined one is rebuilt to output its last map only.
    """
    if model.dtype_policy.name == "float32" and not cfg.model.refine_passes:
        return keras.Model(model.inputs, model.outputs, name=model.name)
    plain = build_unet(model.input_shape[-1], cfg.model)
    plain.set_weights(model.get_weights())
    return plain


# --- resumable state ------------------------------------------------------------------------------

def _fingerprint(cfg: Config, data_hash: str) -> str:
    """Identifies what a checkpoint was trained on; a different one is never resumed."""
    blob = json.dumps({"model": cfg.model.model_dump(mode="json"),
                       "train": cfg.train.model_dump(mode="json"), "data": data_hash},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass
class _State:
    fingerprint: str
    run_id: str | None = None
    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    best_epoch: int | None = None  # 1-based
    best_value: float | None = None


class EpochTracker(keras.callbacks.Callback):
    """History across resumes, the kept epoch and its weights, per-epoch timing.

    ``keep``: ``best`` keeps the best epoch by ``monitor``; ``last`` the latest epoch whose
    ``monitor`` is finite (the final one unless training diverged).

    Adds ``learning_rate``, ``seconds`` and ``patches_per_second`` (training phase only) to the
    epoch logs before the callbacks after it (MLflow, early stopping, pruning) see them. With a
    ``folder`` it persists its state there after every epoch, before ``BackupAndRestore`` does.
    """

    def __init__(self, state: _State, monitor: str, patches_per_epoch: int, total_epochs: int,
                 folder: Path | None = None, best_weights: list[np.ndarray] | None = None,
                 keep: str = "best"):
        super().__init__()
        self.state, self.monitor, self.keep, self.folder = state, monitor, keep, folder
        self.patches_per_epoch, self.total_epochs = patches_per_epoch, total_epochs
        self.best_weights = best_weights
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first:  # a resumed fit begins at the epoch after the last backup
            self._first = False
            self.state.history = {k: v[:epoch] for k, v in self.state.history.items()}
            if self.state.best_epoch is not None and self.state.best_epoch > epoch:
                self.state.best_epoch, self.state.best_value, self.best_weights = None, None, None
        self._started = self._validating = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._validating = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["seconds"] = now - self._started
        trained = (self._validating if self._validating > self._started else now) - self._started
        logs["patches_per_second"] = self.patches_per_epoch / max(trained, 1e-9)
        for key in sorted(logs, key=_column_order):
            self.state.history.setdefault(key, []).append(float(logs[key]))
        value = logs.get(self.monitor, float("nan"))
        best = self.state.best_value
        improved = bool(np.isfinite(value)) and (
            best is None or self.keep == "last"
            or (value > best if self.monitor in MAXIMISED else value < best))
        if improved:
            self.state.best_epoch, self.state.best_value = epoch + 1, float(value)
            self.best_weights = averaged_weights(self.model)
            if self.folder is not None:
                save_arrays(self.folder / "best.npz",
                            **{f"w{i:04d}": w for i, w in enumerate(self.best_weights)})
        if self.folder is not None:
            write_json(self.folder / "state.json", dataclasses.asdict(self.state))
        shown = " ".join(f"{k} {logs[k]:.4g}" for k in sorted(logs, key=_column_order)
                         if k != "seconds")
        log.info(f"epoch {epoch + 1}/{self.total_epochs}: {shown} ({logs['seconds']:.1f} s)"
                 + (" kept" if improved else ""))


def averaged_weights(model: keras.Model) -> list[np.ndarray]:
    """``model.get_weights()``, each trainable variable replaced by its moving average when the
    optimizer keeps one (``train.ema_momentum``); batch-norm statistics stay as trained.

    Keras' ``SwapEMAWeights`` swaps the averages in only while validating, so that the backup
    ``BackupAndRestore`` writes at the epoch's end holds the raw weights and resumes exactly.
    """
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if not getattr(optimizer, "use_ema", False):
        return model.get_weights()
    average = {id(variable): moving for variable, moving in
               zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)}
    return [keras.ops.convert_to_numpy(average.get(id(w), w)) for w in model.weights]


COLUMNS = ("loss", "iou", "f1", "auc", "val_loss", "val_iou", "val_f1", "val_auc",
           "learning_rate", "seconds", "patches_per_second")


def _column_order(key: str) -> tuple[int, str]:
    return (COLUMNS.index(key) if key in COLUMNS else len(COLUMNS), key)


def _backup_epoch(folder: Path) -> int:
    """The epoch ``BackupAndRestore`` will resume at (0: none backed up)."""
    try:
        return int(json.loads((folder / "backup" / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _load_state(folder: Path, fingerprint: str) -> tuple[_State, list[np.ndarray] | None]:
    """The state of an interrupted run on the same params and data, else a fresh one."""
    path = folder / "state.json"
    if path.is_file():
        try:
            state = _State(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            state = None
        if state is not None and state.fingerprint == fingerprint:
            backup = folder / "backup"
            if backup.is_dir() and not any((backup / f"training_metadata.json{suffix}").is_file()
                                           for suffix in ("", ".bkp")):
                shutil.rmtree(backup)  # killed while writing the first backup: nothing to load
            weights = None
            if (folder / "best.npz").is_file():
                arrays = load_arrays(folder / "best.npz")
                weights = [arrays[k] for k in sorted(arrays)]
            log.info(f"resuming the interrupted training run {state.run_id} from {folder}")
            return state, weights
        log.warning(f"{folder}: checkpoints of other params or data; starting afresh")
    shutil.rmtree(folder, ignore_errors=True)
    return _State(fingerprint), None


class MlflowEpochLogger(keras.callbacks.Callback):
    """One metric point per epoch (step = epoch number from 1), synchronous so none is lost."""

    def on_epoch_end(self, epoch, logs=None):
        tracking.tolerant(f"epoch {epoch + 1} metrics", mlflow.log_metrics,
                          {k: float(v) for k, v in (logs or {}).items()}, step=epoch + 1)


# --- MLflow artifacts ----------------------------------------------------------------------------

def learning_curve_figure(history: dict[str, list[float]]):
    """Loss (left) and validation metrics (right) per epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for key in ("loss", "val_loss"):
        if key in history:
            left.plot(epochs, history[key], marker=".", label=key)
    for key in ("iou", "f1", "auc", "val_iou", "val_f1", "val_auc"):
        if key in history:
            right.plot(epochs, history[key], marker=".", label=key,
                       linestyle="-" if key.startswith("val_") else ":")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.set(xlabel="epoch", ylabel="metric", title="IoU / F1 (threshold 0.5)", ylim=(0, 1))
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend()
    return figure


def overlay_grid(images: np.ndarray, truths: np.ndarray, probabilities: np.ndarray,
                 scale: int = 4) -> np.ndarray:
    """RGB uint8: patches on top, their error overlays below (:mod:`unetops.overlays`' colours)."""
    images = _crop(images, (images.shape[1] - truths.shape[1]) // 2)
    columns = []
    for image, truth, probability in zip(images, truths, probabilities):
        patch = np.repeat((grayscale(image) * 255.0).round().astype(np.uint8)[..., None], 3, axis=2)
        errors = error_overlay(image, probability[..., 0] >= 0.5, truth[..., 0] > 0.5)
        columns.append(np.pad(np.concatenate([patch, errors]), ((0, 0), (1, 1), (0, 0)),
                              constant_values=255))
    grid = np.concatenate(columns, axis=1)
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = [f"keras=={keras.__version__}"]
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            pins.append(f"{dist}=={version(dist)}")
            break
        except PackageNotFoundError:
            continue
    return pins


def _log_artifacts(cfg: Config, model: keras.Model, history: dict, data: TrainingData) -> None:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    channels = data.sampler.channels
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, channels), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 1), "mask")]))
    tracking.tolerant("model", mlflow.keras.log_model, inference_model(model, cfg), name="model",
                      signature=signature, pip_requirements=_pip_requirements(),
                      registered_model_name=cfg.mlflow.register_model)
    tracking.tolerant("learning curve", mlflow.log_figure, learning_curve_figure(history),
                      "plots/learning_curve.png")
    sample_x = data.val_x[:OVERLAY_PATCHES]
    probabilities = keras.ops.convert_to_numpy(model(sample_x, training=False))[..., -1:]
    tracking.tolerant("sample overlay", mlflow.log_image,
                      overlay_grid(sample_x, data.val_y[:OVERLAY_PATCHES], probabilities),
                      artifact_file="plots/sample_overlay.png")


# --- the stage ------------------------------------------------------------------------------------

def _open_run(state: _State, nested: bool) -> tuple[tracking.TolerantRun, bool]:
    """Re-open the interrupted run when there is one (True: it is new). Ending the run (on
    leaving ``with``) tolerates a lost tracking store, as the logging during training does."""
    if state.run_id:
        try:
            return tracking.TolerantRun(mlflow.start_run(run_id=state.run_id, nested=nested)), False
        except MlflowException as exc:
            log.warning(f"cannot re-open MLflow run {state.run_id} ({tracking.error_line(exc)}); "
                        "logging to a new run")
    return tracking.TolerantRun(mlflow.start_run(nested=nested)), True


def _pos_weight(train: TrainConfig, sampler: PatchSampler) -> float:
    """``train.pos_weight``, or the background/vessel ratio of the training FOVs."""
    if train.pos_weight is not None:
        return train.pos_weight
    vessel = max(sampler.foreground_fraction(), 1e-6)
    return (1.0 - vessel) / vessel


def _optional_callbacks(train: TrainConfig, folder: Path | None) -> list[keras.callbacks.Callback]:
    mode = "max" if train.monitor in MAXIMISED else "min"
    callbacks = []
    if train.ema_momentum is not None:  # validate the averaged weights
        callbacks.append(keras.callbacks.SwapEMAWeights())
    if train.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(train.monitor, mode=mode,
                                                       patience=train.early_stopping_patience))
    if train.reduce_lr_patience:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            train.monitor, mode=mode, factor=train.reduce_lr_factor,
            patience=train.reduce_lr_patience, min_lr=train.lr_min))
    if folder is not None:
        callbacks.append(keras.callbacks.BackupAndRestore(str(folder / "backup"),
                                                          double_checkpoint=True))
    return callbacks


def _log_run_start(cfg: Config, data: TrainingData, state: _State, derived: dict) -> None:
    tags = {"dataset": cfg.data.dataset, "data_hash": data.data_hash, "dvc_stage": "train"}
    if commit := tracking.git_commit(cfg.paths.root):
        tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
    tracking.tolerant("tags", mlflow.set_tags, tags)
    tracking.tolerant("params", tracking.log_params, tracking.flat_params(cfg, LOGGED_SECTIONS)
                      | {f"derived.{k}": str(v) for k, v in derived.items()})
    for step, row in enumerate(zip(*state.history.values()), start=1):  # a run re-created
        tracking.tolerant(f"epoch {step} metrics", mlflow.log_metrics,
                          dict(zip(state.history, row)), step=step)


def fit(cfg: Config, *, extra_callbacks: Sequence[keras.callbacks.Callback] = (),
        nested: bool = False, resume: bool = True, save: bool = True) -> FitResult:
    """Train as ``cfg`` says, inside its own MLflow run (nested under an active one if ``nested``).

    ``resume``: keep and reuse ``cfg.paths.checkpoints`` (a killed run continues); ``save``: log
    the model, learning curve and sample overlay to the run. Tuning trials pass
    ``nested=True, resume=False, save=False`` and a pruning callback in ``extra_callbacks``
    (they run after the MLflow logger, so a pruned trial keeps its last epoch's metrics).
    """
    check_patch_size(cfg)
    train = cfg.train
    if nested and train.strategy == "multi_worker":
        raise UnetopsError("train.strategy: multi_worker trains one model on several hosts; "
                           "tune cannot use it (run tune workers on several hosts instead)")
    where = distribute.placement(train.strategy, train.batch_size)
    if where.chief:
        tracking.setup(cfg)
    data = load_training_data(cfg)
    steps = max(1, train.patches_per_epoch // train.batch_size)
    pos_weight = _pos_weight(train, data.sampler)

    keras.utils.set_random_seed(train.seed)
    tf.config.experimental.enable_op_determinism()
    with where.scope():
        model = compile_model(cfg, data.sampler.channels, steps, pos_weight, where.replicas)

    folder = cfg.paths.checkpoints if resume else None
    if folder is not None and not where.chief:
        folder = distribute.worker_checkpoints(folder, where)
    fingerprint = _fingerprint(cfg, data.data_hash)
    state, best_weights = _load_state(folder, fingerprint) if resume else (_State(fingerprint), None)
    epoch = EpochCounter()
    tracker = EpochTracker(state, train.monitor, steps * train.batch_size, train.epochs, folder,
                           best_weights, train.keep)
    callbacks = [epoch, tracker, *([MlflowEpochLogger()] if where.chief else []),
                 *_optional_callbacks(train, folder), *extra_callbacks]
    margin = output_margin(cfg.model)
    dataset, validation = _inputs(where, data, train, steps, margin, epoch)
    derived = {"steps_per_epoch": steps, "output_margin": margin, "pos_weight": f"{pos_weight:.6g}",
               "train_files": data.train_files, "val_cases": data.val_cases,
               "parameters": model.count_params()}
    if where.strategy is not None:
        derived |= {"replicas": where.replicas, "workers": where.workers}
    if folder is not None and not distribute.same_on_every_worker(where, _backup_epoch(folder)):
        raise UnetopsError(f"{cfg.paths.checkpoints}: the workers would resume at different "
                           "epochs; resuming multi_worker needs the chief's folder on a shared "
                           "file system (or delete it on every host to start afresh)")
    try:
        run, is_new = _open_run(state, nested) if where.chief else (contextlib.nullcontext(), False)
        with run:
            if where.chief:
                state.run_id = run.info.run_id
            if is_new:
                _log_run_start(cfg, data, state, derived)
            log.info(f"training {model.count_params():,} parameters on {data.train_files} files, "
                     f"{steps} × {train.batch_size} patches per epoch"
                     + (f" over {where.replicas} replicas" if where.strategy is not None else "")
                     + (f", MLflow run {state.run_id}" if where.chief else
                        f" as {where.task} (the chief logs to MLflow and writes the outputs)"))
            with distribute.epochs_end_with_the_data(where):
                model.fit(dataset, epochs=train.epochs, validation_data=validation,
                          callbacks=callbacks, shuffle=False, verbose=0)
            if tracker.best_weights is None:
                raise UnetopsError(f"{train.monitor}: not finite in any epoch (diverged? lower "
                                   "train.learning_rate)")
            if where.strategy is not None:  # plain variables: saving needs no other worker
                model = compile_model(cfg, data.sampler.channels, steps, pos_weight)
            model.set_weights(tracker.best_weights)
            history = state.history
            best = {k: v[state.best_epoch - 1] for k, v in history.items() if k.startswith("val_")}
            seconds = float(sum(history["seconds"]))
            throughput = steady_throughput(history["patches_per_second"])
            if where.chief:
                tracking.tolerant("final metrics", mlflow.log_metrics,
                                  {"best_epoch": state.best_epoch, "train_seconds": seconds,
                                   "train_patches_per_second": throughput}
                                  | {f"best_{k}": v for k, v in best.items()})
            if save and where.chief:
                _log_artifacts(cfg, model, history, data)
    except MlflowException as exc:
        kept = f"; training state kept in {folder}, rerun to resume" if resume else ""
        raise UnetopsError(f"MLflow {tracking.shown_tracking_uri(cfg)}: "
                           f"{tracking.error_line(exc)}{kept}") from None
    finally:
        if folder is not None and not where.chief:
            shutil.rmtree(folder.parent, ignore_errors=True)
    if resume and where.chief:
        shutil.rmtree(folder, ignore_errors=True)
    return FitResult(model, history, state.best_epoch, best, state.run_id if where.chief else "",
                     seconds, throughput, where.chief)


def steady_throughput(per_epoch: Sequence[float]) -> float:
    """Training patches/s over all epochs but the first (which traces the graph), harmonic mean."""
    rates = [r for r in (per_epoch[1:] if len(per_epoch) > 1 else per_epoch) if r > 0]
    return len(rates) / sum(1.0 / r for r in rates) if rates else 0.0


def apply_tuned(cfg: Config) -> Config:
    """``cfg`` with the flat ``dotted.key: value`` mapping of ``cfg.paths.best_params`` applied."""
    path = cfg.paths.best_params
    if not path.is_file():
        raise UnetopsError(f"{path}: file not found (train.use_tuned needs unetops tune first)")
    try:
        overrides = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UnetopsError(f"{path}: not valid YAML") from None
    if not isinstance(overrides, dict) or not overrides:
        raise UnetopsError(f"{path}: expected a mapping of dotted keys to values")
    known = tracking.flat_params(cfg)
    for key in overrides:
        if key not in known:
            raise UnetopsError(f"{path}: {key}: unknown key")
    log.info(f"train.use_tuned: applying {', '.join(f'{k}={v}' for k, v in overrides.items())}")
    return cfg.with_overrides(overrides)


def run(cfg: Config) -> None:
    """``unetops train``: fit, then write the model, the MLflow run id, summary and history."""
    if cfg.train.use_tuned:
        cfg = apply_tuned(cfg)
    result = fit(cfg)
    if not result.chief:
        log.info("training done; the chief worker writes the model, reports and MLflow run")
        return
    with atomic_path(cfg.paths.model) as tmp:
        inference_model(result.model, cfg).save(tmp)
    tracking.write_run_id(cfg, result.run_id)
    write_json(cfg.paths.train_summary, {
        "best_epoch": result.best_epoch, "epochs": len(result.history.get("loss", [])),
        "seconds": round(result.seconds, 3),
        "patches_per_second": round(result.patches_per_second, 1)} | result.best)
    frame = pd.DataFrame(result.history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    write_csv(cfg.paths.train_history, frame)
    log.info(f"kept epoch {result.best_epoch} ({cfg.train.keep}): "
             + ", ".join(f"{k} {v:.4f}" for k, v in result.best.items())
             + f"; model written to {cfg.paths.rel(cfg.paths.model)}")
