"""Stage ``train`` on tiny synthetic cases: resume after a kill, MLflow contents, outputs, errors."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
import zipfile
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from unetops.cli import app
from unetops.errors import UnetopsError
from unetops.io import save_arrays
from unetops.model import output_margin, valid_input_size
from unetops.overlays import OVERLAY_COLOURS
from unetops.stages import train

TINY = {
    "model": {"depth": 2, "base_filters": 4},
    "train": {"epochs": 2, "batch_size": 8, "patch_size": 32, "patches_per_epoch": 32,
              "val_patches": 16},
    "mlflow": {"register_model": None},
}


def write_cases(root, size=48, copies=2, weight=False, subsets=("train", "train", "val", "test")):
    """Vessel-like lines on a noisy background: preprocessed cases, augmented copies, split.csv."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    fov = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.48 * size) ** 2).astype(np.uint8)
    rows = []
    for i, subset in enumerate(subsets):
        case = f"case{i}"
        mask = np.zeros((size, size), np.uint8)
        for _ in range(5):
            x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
            cv2.line(mask, (x0, y0), (x1, y1), 1, int(rng.integers(1, 3)))
        image = (0.6 - 0.4 * mask + rng.normal(0, 0.05, mask.shape)).clip(0, 1)[..., None]
        image = image.astype(np.float32)
        save_arrays(root / "data/preprocessed" / f"{case}.npz", image=image, mask=mask, fov=fov)
        if subset == "train":
            for k in range(copies):
                arrays = {"image": np.rot90(image, k).copy(), "mask": np.rot90(mask, k).copy(),
                          "fov": fov}
                if weight:
                    arrays["weight"] = 1.0 + 4.0 * arrays["mask"].astype(np.float32)
                save_arrays(root / "data/augmented" / f"{case}_{k:03d}.npz", **arrays)
        rows.append({"case": case, "subset": subset, "image": f"raw/{case}.png",
                     "mask": f"raw/{case}_mask.png", "fov": f"raw/{case}_fov.png"})
    pd.DataFrame(rows).to_csv(root / "data/split.csv", index=False)


@pytest.fixture
def tiny(project):
    def make(weight=False, subsets=("train", "train", "val", "test"), **sections):
        merged = {key: {**TINY.get(key, {}), **sections.get(key, {})} for key in {*TINY, *sections}}
        cfg = project(**merged)
        write_cases(cfg.paths.root, weight=weight, subsets=subsets)
        return cfg

    return make


class Killed(Exception):
    pass


class KillAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Killed(f"killed before epoch {epoch + 1}")


class RecordEpochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def steps_of(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_killed_run_resumes_at_the_next_epoch_and_matches_an_uninterrupted_run(tiny):
    cfg = tiny()
    uninterrupted = train.fit(cfg, resume=False, save=False)

    with pytest.raises(Killed):
        train.fit(cfg, extra_callbacks=[KillAtEpoch(1)], save=False)
    state = json.loads((cfg.paths.checkpoints / "state.json").read_text())
    assert len(state["history"]["loss"]) == 1
    assert (cfg.paths.checkpoints / "backup").is_dir()

    recorder = RecordEpochs()
    resumed = train.fit(cfg, extra_callbacks=[recorder], save=False)
    assert recorder.epochs == [1]
    assert resumed.run_id == state["run_id"]
    assert len(resumed.history["loss"]) == len(uninterrupted.history["loss"]) == 2
    for key in ("loss", "val_loss", "val_iou", "val_f1"):
        np.testing.assert_allclose(resumed.history[key], uninterrupted.history[key], rtol=1e-6)
    for ours, theirs in zip(resumed.model.get_weights(), uninterrupted.model.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not cfg.paths.checkpoints.exists()

    client = MlflowClient()
    assert steps_of(client, resumed.run_id, "loss") == [1, 2]
    assert steps_of(client, resumed.run_id, "val_f1") == [1, 2]
    assert client.get_run(resumed.run_id).info.status == "FINISHED"


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on a free local port (sqlite + artifact folder in tmp)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with (folder / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT,
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            wait_for_health(url, server, folder / "server.log")
            yield url
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_for_health(url: str, server: subprocess.Popen, log: Path) -> None:
    for _ in range(240):
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail("mlflow server did not answer within 120 s")


@pytest.mark.slow
def test_run_logs_params_metrics_model_and_plots_to_a_real_server(tiny, mlflow_server,
                                                                  monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = tiny()
    train.run(cfg)

    run_id = json.loads(cfg.paths.mlflow_run.read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.data.params["train.learning_rate"] == "0.001"
    assert run.data.params["model.depth"] == "2"
    assert run.data.params["data.dataset"] == "stare"
    assert len(run.data.params) > 50
    assert run.data.tags["dataset"] == "stare"
    assert len(run.data.tags["data_hash"]) == 64
    for key in ("loss", "val_loss", "val_iou", "val_f1", "learning_rate"):
        assert steps_of(client, run_id, key) == [1, 2], key

    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/learning_curve.png", "plots/sample_overlay.png"}
    for path in plots:
        local = client.download_artifacts(run_id, path, str(tmp_path))
        assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in logged] == [run_id]
    import mlflow.keras
    assert mlflow.keras.load_model(f"models:/{logged[0].model_id}").output_shape == (
        None, None, None, 1)

    with zipfile.ZipFile(cfg.paths.model) as archive:
        assert not json.loads(archive.read("config.json")).get("compile_config")
    model = keras.saving.load_model(cfg.paths.model, compile=False)
    assert model.output_shape == (None, None, None, 1)

    summary = json.loads(cfg.paths.train_summary.read_text())
    assert summary["epochs"] == 2 and 1 <= summary["best_epoch"] <= 2
    assert {"val_loss", "val_iou", "val_f1", "seconds", "patches_per_second"} <= set(summary)
    history = pd.read_csv(cfg.paths.train_history)
    assert list(history["epoch"]) == [1, 2]
    assert summary["val_f1"] == pytest.approx(history["val_f1"][summary["best_epoch"] - 1])


def test_unreachable_mlflow_fails_in_one_line_before_training(tiny, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    cfg = tiny()
    result = CliRunner().invoke(app, ["train", "--params", str(cfg.paths.root / "params.yaml")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unetops: error: MLFLOW_TRACKING_URI:")
    assert "unreachable" in lines[0]
    assert not cfg.paths.models.exists()


@pytest.mark.slow
def test_weight_map_loss_trains_on_the_augment_weights(tiny):
    cfg = tiny(weight=True, train={"loss": "weight_map", "epochs": 1})
    result = train.fit(cfg, resume=False, save=False)
    assert np.isfinite(result.history["loss"]).all()
    assert result.best_epoch == 1
    assert set(result.best) >= {"val_loss", "val_iou", "val_f1"}


@pytest.mark.slow
def test_mixed_precision_trains_and_saves_a_float32_model(tiny):
    cfg = tiny(train={"precision": "mixed_bfloat16", "epochs": 1})
    train.run(cfg)
    model = keras.saving.load_model(cfg.paths.model, compile=False)
    assert model.dtype_policy.name == "float32"
    assert {layer.compute_dtype for layer in model.layers[1:]} == {"float32"}
    assert json.loads(cfg.paths.train_summary.read_text())["epochs"] == 1


@pytest.mark.slow
def test_refined_model_trains_every_map_and_saves_the_last(tiny):
    cfg = tiny(model={"refine_passes": 1, "refine_depth": 1, "refine_filters": 2},
               train={"epochs": 1})
    result = train.fit(cfg, resume=False, save=False)
    assert result.model.output_shape[-1] == 2 and set(result.best) >= {"val_f1", "val_iou"}
    saved = train.inference_model(result.model, cfg)
    x = np.random.default_rng(0).random((1, 32, 32, 1), dtype=np.float32)
    assert saved.output_shape[-1] == 1
    np.testing.assert_allclose(saved.predict(x, verbose=0),
                               result.model.predict(x, verbose=0)[..., -1:], atol=1e-6)


def test_averaged_weights_are_the_averages_keras_finalizes():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.9), loss="mse")
    x, y = np.random.default_rng(0).normal(size=(64, 4)), np.ones((64, 1))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[keras.callbacks.SwapEMAWeights()],
              validation_data=(x, y))  # fit ends by copying the averages into the model
    for step in range(4):
        model.train_on_batch(x[step * 8:(step + 1) * 8], y[:8])
    raw, averaged = model.get_weights(), train.averaged_weights(model)
    trainable = {id(v) for v in model.trainable_variables}
    for variable, ours, theirs in zip(model.weights, raw, averaged):
        if id(variable) in trainable:
            assert not np.allclose(ours, theirs)
        else:  # batch-norm statistics are not averaged
            np.testing.assert_array_equal(ours, theirs)
    model.optimizer.finalize_variable_values(model.trainable_variables)
    for ours, theirs in zip(model.get_weights(), averaged):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    plain.compile(optimizer="adam", loss="mse")
    for ours, theirs in zip(train.averaged_weights(plain), plain.get_weights()):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(("monitor", "keep", "kept"), [
    ("val_f1", "best", 2), ("val_loss", "best", 3), ("val_f1", "last", 3), ("val_loss", "last", 3)])
def test_tracker_keeps_the_best_or_the_last_finite_epoch(monitor, keep, kept):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    tracker = train.EpochTracker(train._State("x"), monitor, 8, 4, keep=keep)
    tracker.set_model(model)
    values = {"val_f1": [0.5, 0.8, 0.7, float("nan")], "val_loss": [0.5, 0.4, 0.3, float("nan")]}
    weights = []
    for epoch in range(4):
        model.set_weights([np.full((1, 1), epoch, np.float32), np.zeros(1, np.float32)])
        weights.append(model.get_weights())
        tracker.on_epoch_begin(epoch)
        tracker.on_epoch_end(epoch, {key: v[epoch] for key, v in values.items()})
    assert tracker.state.best_epoch == kept
    assert tracker.state.best_value == values[monitor][kept - 1]
    np.testing.assert_array_equal(tracker.best_weights[0], weights[kept - 1][0])


@pytest.mark.slow
def test_weight_averaging_validates_the_averages_and_resumes_exactly(tiny):
    cfg = tiny(train={"ema_momentum": 0.9})
    uninterrupted = train.fit(cfg, resume=False, save=False)
    with pytest.raises(Killed):
        train.fit(cfg, extra_callbacks=[KillAtEpoch(1)], save=False)
    resumed = train.fit(cfg, save=False)
    for key in ("loss", "val_loss", "val_f1"):
        np.testing.assert_allclose(resumed.history[key], uninterrupted.history[key], rtol=1e-6)
    for ours, theirs in zip(resumed.model.get_weights(), uninterrupted.model.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    plain = train.fit(tiny(), resume=False, save=False)
    assert not np.allclose(plain.history["val_loss"], uninterrupted.history["val_loss"])
    assert np.allclose(plain.history["loss"][0], uninterrupted.history["loss"][0], rtol=1e-6)


GRADIENTS_TWICE = """
import numpy as np, tensorflow as tf, unetops, keras
from unetops.config import ModelConfig
from unetops.model import build_unet
keras.utils.set_random_seed(0)
tf.config.experimental.enable_op_determinism()
model = build_unet(1, ModelConfig(depth=4, base_filters=16))
x = np.random.default_rng(0).random((16, 96, 96, 1), np.float32)
y = (np.random.default_rng(1).random((16, 96, 96, 1)) > 0.8).astype(np.float32)

@tf.function
def gradients():
    with tf.GradientTape() as tape:
        loss = keras.losses.binary_crossentropy(y, model(x, training=True))
    return tape.gradient(loss, model.trainable_variables)

first = [g.numpy() for g in gradients()]
print(max(float(np.abs(g.numpy() - f).max()) for _ in range(4) for g, f in zip(gradients(), first)))
"""


def test_graph_mode_gradients_repeat_bit_for_bit():
    """Importing unetops pins TensorFlow to one op at a time (``TF_NUM_INTEROP_THREADS``).

    On the 2-core AVX-512 EPYC these gradients (a depth-4 U-Net on 16 patches of 96 px) differed
    in the last bits from one call to the next with TensorFlow's default of several ops in
    flight, op determinism notwithstanding; a fresh process, since the setting is read once.
    """
    env = {k: v for k, v in os.environ.items() if k != "TF_NUM_INTEROP_THREADS"}
    result = subprocess.run([sys.executable, "-c", GRADIENTS_TWICE], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) == 0.0


def test_auto_precision_is_half_only_on_a_gpu(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert train.dtype_policy("auto") == "float32"
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    assert train.dtype_policy("auto") == "mixed_float16"
    assert train.dtype_policy("mixed_bfloat16") == "mixed_bfloat16"


def test_weight_map_loss_without_weights_names_the_file(tiny):
    cfg = tiny(train={"loss": "weight_map"})
    with pytest.raises(UnetopsError, match=r"case0_000\.npz: no 'weight' array"):
        train.load_training_data(cfg)


def test_training_needs_validation_cases(tiny):
    cfg = tiny(subsets=("train", "train", "test"))
    with pytest.raises(UnetopsError, match="split.csv: no val cases"):
        train.load_training_data(cfg)


def test_patch_size_must_fit_the_network(project):
    with pytest.raises(UnetopsError, match="multiple of 2\\*\\*model.depth = 8"):
        train.check_patch_size(project(train={"patch_size": 44}, model={"depth": 3}))
    with pytest.raises(UnetopsError, match="next size that does is"):
        train.check_patch_size(project(train={"patch_size": 48}, model={"padding": "valid"}))


def test_a_dropped_training_dataset_frees_the_training_data(tiny):
    # TensorFlow keeps a tf.data map's numpy_function callable for the life of the process;
    # the sampler (all the training data) must not stay alive with it (tune: every trial).
    cfg = tiny()
    data = train.load_training_data(cfg)
    dataset = train.training_dataset(data.sampler, cfg.train, 2, 0, train.EpochCounter())
    next(iter(dataset))
    sampler = weakref.ref(data.sampler)
    del data, dataset
    gc.collect()
    assert sampler() is None


def test_batches_are_seeded_per_epoch_and_cropped_for_valid_padding(tiny):
    model = {"depth": 1, "base_filters": 2, "padding": "valid"}
    cfg = tiny(model=model)
    cfg = cfg.with_overrides({"train.patch_size": valid_input_size(cfg.model, 24)})
    data = train.load_training_data(cfg)
    epoch = train.EpochCounter()
    dataset = train.training_dataset(data.sampler, cfg.train, 2, output_margin(cfg.model), epoch)
    x, y = next(iter(dataset))
    out = cfg.train.patch_size - 2 * output_margin(cfg.model)
    assert x.shape == (8, cfg.train.patch_size, cfg.train.patch_size, 1)
    assert y.shape == (8, out, out, 1) and data.val_y.shape[1:] == (out, out, 1)
    again, _ = next(iter(dataset))
    epoch.value = 1
    other, _ = next(iter(dataset))
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(x, other)


def test_dihedral_batches_are_the_plain_batches_flipped_and_turned(tiny):
    cfg = tiny()
    data = train.load_training_data(cfg)
    batches = {}
    for dihedral in (False, True):
        settings = cfg.train.model_copy(update={"dihedral": dihedral})
        dataset = train.training_dataset(data.sampler, settings, 1, 0, train.EpochCounter())
        batches[dihedral] = [t.numpy() for t in next(iter(dataset))]
    (x, y), (tx, ty) = batches[False], batches[True]
    moved = 0
    for patch, labels, turned, turned_labels in zip(x, y, tx, ty):
        views = [np.rot90(patch, k) for k in range(4)]
        views += [np.flip(view, 0) for view in views]
        k = next(k for k, view in enumerate(views) if np.array_equal(view, turned))
        label_views = [np.rot90(labels, k) for k in range(4)]
        label_views += [np.flip(view, 0) for view in label_views]
        np.testing.assert_array_equal(label_views[k], turned_labels)
        moved += k != 0
    assert moved > 0


def test_cyclic_learning_rate_triangular_and_exp_range():
    triangular = train.CyclicLearningRate(1e-5, 1e-4, half_period=10, mode="triangular")
    rates = [float(triangular(step)) for step in (0, 5, 10, 20, 30)]
    np.testing.assert_allclose(rates, [1e-5, 5.5e-5, 1e-4, 1e-5, 1e-4], rtol=1e-5)
    exp_range = train.CyclicLearningRate(1e-5, 1e-4, half_period=10, mode="exp_range", gamma=0.9)
    assert float(exp_range(10)) == pytest.approx(1e-5 + 9e-5 * 0.9**10, rel=1e-5)
    assert float(exp_range(30)) < float(exp_range(10))


def test_schedules_and_their_config_rules(project):
    cfg = project(train={"lr_schedule": "cosine", "learning_rate": 0.01, "lr_min": 0.001,
                         "epochs": 2})
    cosine = train.learning_rate(cfg.train, steps_per_epoch=5)
    assert float(cosine(0)) == pytest.approx(0.01)
    assert float(cosine(10)) == pytest.approx(0.001)
    assert train.learning_rate(cfg.with_overrides({"train.lr_schedule": "constant"}).train, 5) == 0.01
    with pytest.raises(UnetopsError, match="reduce_lr_patience needs lr_schedule constant"):
        cfg.with_overrides({"train.reduce_lr_patience": 2})
    with pytest.raises(UnetopsError, match="lr_min must be below learning_rate"):
        cfg.with_overrides({"train.lr_min": 0.1})


def test_use_tuned_applies_best_params(project):
    cfg = project(train={"use_tuned": True})
    with pytest.raises(UnetopsError, match="best_params.yaml: file not found"):
        train.apply_tuned(cfg)
    cfg.paths.best_params.parent.mkdir(parents=True, exist_ok=True)
    cfg.paths.best_params.write_text(yaml.safe_dump({"train.learning_rate": 0.003,
                                                     "model.depth": 2}))
    tuned = train.apply_tuned(cfg)
    assert tuned.train.learning_rate == 0.003 and tuned.model.depth == 2
    cfg.paths.best_params.write_text(yaml.safe_dump({"train.nonsense": 1}))
    with pytest.raises(UnetopsError, match="train.nonsense: unknown key"):
        train.apply_tuned(cfg)


def test_overlay_marks_hits_misses_and_false_alarms():
    images = np.full((2, 8, 8, 1), 0.5, np.float32)
    truth = np.zeros((2, 4, 4, 1), np.float32)  # a valid-padding output window
    truth[:, 0, 0] = truth[:, 0, 1] = 1
    probabilities = np.zeros_like(truth)
    probabilities[:, 0, 0] = probabilities[:, 1, 1] = 1
    grid = train.overlay_grid(images, truth, probabilities, scale=1)
    assert grid.shape == (8, 2 * 6, 3) and grid.dtype == np.uint8
    assert tuple(grid[0, 1]) == (128, 128, 128)  # the patch itself on top
    overlay = grid[4:, 1:5]
    assert tuple(overlay[0, 0]) == OVERLAY_COLOURS["tp"]
    assert tuple(overlay[0, 1]) == OVERLAY_COLOURS["fn"]
    assert tuple(overlay[1, 1]) == OVERLAY_COLOURS["fp"]
    assert tuple(overlay[2, 2]) == (57, 57, 57)  # 0.45 x the patch: the same dimming as evaluate's


def test_steady_throughput_skips_the_tracing_epoch():
    assert train.steady_throughput([10.0, 200.0, 200.0]) == pytest.approx(200.0)
    assert train.steady_throughput([50.0]) == pytest.approx(50.0)
    assert train.steady_throughput([]) == 0.0
