"""``train.strategy``: the strategy helper, the replicas' slices of a batch, two workers vs one."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from mlflow import MlflowClient

from unetops import distribute
from unetops.errors import UnetopsError
from unetops.model import output_margin
from unetops.stages import train
from tests.test_train import TINY, KillAtEpoch, Killed, write_cases

TWO_WORKERS_TOLERANCE = {"loss": 1e-4, "val_loss": 1e-4, "val_iou": 1e-3, "val_f1": 1e-3}
"""Largest |difference| between a 2-worker and a 1-device run's per-epoch values (see the test);
the IoU and F1 are of maps thresholded at 0.5, where a few flipped pixels show."""
WORKER_TIMEOUT_S = 120


def tf_config(addresses: list[str], index: int, job: str = "worker") -> dict:
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": addresses},
                                     "task": {"type": job, "index": index}})}


def test_default_is_no_strategy_and_one_replica():
    where = distribute.placement("default", 7)
    assert where.strategy is None
    assert (where.replicas, where.workers, where.chief) == (1, 1, True)
    with where.scope():
        assert not tf.distribute.has_strategy()


@pytest.mark.parametrize(("environ", "message"), [
    ({}, "TF_CONFIG: not set; train.strategy multi_worker reads the cluster from it"),
    ({"TF_CONFIG": "{cluster:"}, "TF_CONFIG: not valid JSON"),
    ({"TF_CONFIG": '{"task": {"type": "worker", "index": 0}}'},
     "TF_CONFIG: cluster: expected a 'worker' list of host:port"),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker"}}'},
     "TF_CONFIG: cluster.worker: expected a list of host:port"),
    ({"TF_CONFIG": '{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker"}}'},
     "TF_CONFIG: cluster.ps: unknown job"),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'}, "TF_CONFIG: task: expected"),
    (tf_config(["a:1", "b:2"], 2), "TF_CONFIG: task.index: 2 is not an index of cluster.worker"),
])
def test_multi_worker_needs_a_valid_tf_config(environ, message):
    with pytest.raises(UnetopsError) as error:
        distribute.placement("multi_worker", 8, environ=environ)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_chief_is_worker_0_unless_the_cluster_names_one():
    workers = {"worker": ["a:1", "b:2"]}
    assert distribute.is_chief({"cluster": workers, "task": {"type": "worker", "index": 0}})
    assert not distribute.is_chief({"cluster": workers, "task": {"type": "worker", "index": 1}})
    with_chief = {"chief": ["c:3"], **workers}
    assert distribute.is_chief({"cluster": with_chief, "task": {"type": "chief", "index": 0}})
    assert not distribute.is_chief({"cluster": with_chief, "task": {"type": "worker", "index": 0}})


def test_global_batch_must_split_evenly_over_the_replicas():
    assert distribute.per_replica_batch(32, 4) == 8
    with pytest.raises(UnetopsError, match=r"^train\.batch_size: 10 is the global batch and must "
                                           r"split evenly over the 4 replicas"):
        distribute.per_replica_batch(10, 4)


@pytest.fixture
def tiny(project):
    def make(**train_params):
        cfg = project(**{**TINY, "train": {**TINY["train"], **train_params}})
        write_cases(cfg.paths.root)
        return cfg

    return make


def test_under_a_strategy_the_inputs_are_the_single_device_batches_sharded_by_data(tiny):
    cfg = tiny()
    data = train.load_training_data(cfg)
    epoch = train.EpochCounter()
    margin, steps = output_margin(cfg.model), 3
    plain = distribute.Placement()
    distributed = distribute.Placement(tf.distribute.OneDeviceStrategy("/cpu:0"))
    one_device, one_device_val = train._inputs(plain, data, cfg.train, steps, margin, epoch)
    sharded, sharded_val = train._inputs(distributed, data, cfg.train, steps, margin, epoch)
    data_policy = tf.data.experimental.AutoShardPolicy.DATA
    assert sharded.options().experimental_distribute.auto_shard_policy == data_policy
    assert sharded_val.options().experimental_distribute.auto_shard_policy == data_policy
    assert one_device.options().experimental_distribute.auto_shard_policy != data_policy
    batches = list(sharded)
    assert len(batches) == steps
    for (x, y), (x_sharded, y_sharded) in zip(one_device, batches):
        np.testing.assert_array_equal(x, x_sharded)
        np.testing.assert_array_equal(y, y_sharded)
    for (x, y), (x_sharded, y_sharded) in zip(one_device_val, sharded_val):
        np.testing.assert_array_equal(x, x_sharded)
        np.testing.assert_array_equal(y, y_sharded)


def test_a_worker_resumes_from_a_temporary_copy_of_the_chiefs_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    worker = distribute.Placement(task="worker:1", chief=False)
    chief_folder = tmp_path / "models" / "checkpoints"
    fresh = distribute.worker_checkpoints(chief_folder, worker)
    assert not fresh.exists() and fresh.parent.parent == tmp_path / "tmp"
    (chief_folder / "backup").mkdir(parents=True)
    (chief_folder / "state.json").write_text('{"fingerprint": "x"}')
    (chief_folder / "backup" / "training_metadata.json").write_text('{"epoch": 3}')
    copy = distribute.worker_checkpoints(chief_folder, worker)
    assert copy != fresh and copy.parent.name.startswith("unetops-worker1-")
    assert (copy / "state.json").read_text() == '{"fingerprint": "x"}'
    assert train._backup_epoch(copy) == 3 and train._backup_epoch(fresh) == 0


def test_a_backup_killed_while_written_first_is_dropped_not_fatal(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "backup").mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"fingerprint": "f", "run_id": "r"}))
    (folder / "backup" / "latest.weights.h5").write_bytes(b"half an HDF5 file")
    state, _ = train._load_state(folder, "f")
    assert state.run_id == "r"
    assert not (folder / "backup").exists()
    (folder / "backup").mkdir()
    (folder / "backup" / "latest.weights.h5").write_bytes(b"half an HDF5 file")
    (folder / "backup" / "training_metadata.json.bkp").write_text('{"epoch": 1}')
    train._load_state(folder, "f")
    assert (folder / "backup" / "latest.weights.h5").exists()  # Keras falls back to the .bkp


def test_tune_trials_refuse_multi_worker(tiny, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    cfg = tiny(strategy="multi_worker")
    with pytest.raises(UnetopsError, match="^train.strategy: multi_worker .* tune cannot use it"):
        train.fit(cfg, nested=True, resume=False, save=False)
    with pytest.raises(UnetopsError, match="^TF_CONFIG: not set"):
        train.fit(cfg, resume=False, save=False)
    assert not cfg.paths.models.exists()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.slow
def test_two_workers_train_like_one_device_and_only_the_chief_writes(tiny, tmp_path):
    """Two ``multi_worker`` processes on 127.0.0.1 against one ``default`` run of the same params.

    Both workers draw the same seeded global batches and train on their halves, with batch
    norm synchronised: the single-device training up to float summation order. Measured on a
    2-core CPU (oneDNN on), 2 epochs, largest |difference| per epoch: loss 7e-6, val_loss 4e-5,
    val_iou 1.2e-4, val_f1 2e-4 (the tolerances: 1e-4, 1e-4, 1e-3, 1e-3). Broken variants
    differ by more: both workers on the same half (``AutoShardPolicy.OFF``) 6e-3, 7e-4, 2e-3,
    3.5e-3; per-replica batch norm 7e-4, 4e-4, 8e-4, 1.3e-3. Only the chief writes the model,
    the reports and an MLflow run; the other worker's temporary folder is gone afterwards.
    """
    cfg = tiny(strategy="multi_worker")
    root = cfg.paths.root
    scratch = tmp_path / "worker-tmp"
    scratch.mkdir()
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(scratch)}
    logs = [root / f"worker{i}.log" for i in range(2)]
    workers = []
    try:
        for index, log in enumerate(logs):
            with log.open("wb") as out:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "unetops", "train", "--params", "params.yaml"],
                    cwd=root, env=env | tf_config(addresses, index), stdout=out,
                    stderr=subprocess.STDOUT))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for worker in workers:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"workers still running after {WORKER_TIMEOUT_S} s:\n"
                    + "\n".join(log.read_text()[-3000:] for log in logs))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log.read_text()[-3000:]
    assert "the chief logs to MLflow" in logs[1].read_text()

    model = keras.saving.load_model(cfg.paths.model, compile=False)
    assert model.output_shape == (None, None, None, 1)
    distributed = pd.read_csv(cfg.paths.train_history)
    assert list(distributed["epoch"]) == [1, 2]
    assert not cfg.paths.checkpoints.exists()
    assert not any(scratch.iterdir())

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [json.loads(cfg.paths.mlflow_run.read_text())["run_id"]]
    assert runs[0].data.params["train.strategy"] == "multi_worker"
    assert runs[0].data.params["derived.replicas"] == "2"

    single = train.fit(cfg.with_overrides({"train.strategy": "default"}), resume=False,
                       save=False)
    for key, tolerance in TWO_WORKERS_TOLERANCE.items():
        np.testing.assert_allclose(distributed[key], single.history[key], rtol=0, atol=tolerance,
                                   err_msg=key)


@pytest.mark.slow
def test_a_killed_mirrored_run_resumes_and_ends_like_the_default_run(tiny):
    """``mirrored`` on this CPU (one replica): strategy-scoped variables, sharded inputs and the
    backup restored into them; the resumed run ends where an uninterrupted ``default`` run does."""
    cfg = tiny(strategy="mirrored")
    with pytest.raises(Killed):
        train.fit(cfg, extra_callbacks=[KillAtEpoch(1)], save=False)
    assert train._backup_epoch(cfg.paths.checkpoints) == 1
    resumed = train.fit(cfg, save=False)
    assert not cfg.paths.checkpoints.exists()
    single = train.fit(cfg.with_overrides({"train.strategy": "default"}), resume=False,
                       save=False)
    for key in ("loss", "val_loss", "val_iou", "val_f1"):
        np.testing.assert_allclose(resumed.history[key], single.history[key], rtol=1e-6,
                                   err_msg=key)
    for ours, theirs in zip(resumed.model.get_weights(), single.model.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not isinstance(resumed.model.weights[0].value, tf.distribute.DistributedValues)
