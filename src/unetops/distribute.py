"""Where ``train`` runs: one device, all local GPUs, or several workers (``train.strategy``).

- ``default``: no ``tf.distribute`` strategy at all; one device, exactly the single-process code
  path (same weights, bit for bit).
- ``mirrored``: :class:`tf.distribute.MirroredStrategy` over every local GPU (the CPU when there
  is none).
- ``multi_worker``: :class:`tf.distribute.MultiWorkerMirroredStrategy`; every host runs
  ``unetops train`` with the cluster in the ``TF_CONFIG`` environment variable. The chief
  (task type ``chief``, else worker 0) writes the outputs and the MLflow run; the others train in
  lockstep and write only to a temporary folder.

``train.batch_size`` is the global batch, split evenly over all replicas. A strategy is built
once per process and kept: ``MultiWorkerMirroredStrategy`` configures TensorFlow's collective
ops, which is possible only before the first TensorFlow op runs and only once.
"""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import tensorflow as tf

from unetops.console import log
from unetops.errors import UnetopsError

TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')


@dataclasses.dataclass(frozen=True)
class Placement:
    """The strategy (None: ``default``) and this process's part in it."""

    strategy: tf.distribute.Strategy | None = None
    replicas: int = 1
    workers: int = 1
    task: str = "worker:0"
    chief: bool = True

    def scope(self):
        """Variables created inside are the strategy's (mirrored); a no-op for ``default``."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()


def read_tf_config(environ=os.environ) -> dict:
    """The ``TF_CONFIG`` cluster spec, checked enough that a typo fails in one line, not a hang."""
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        raise UnetopsError("TF_CONFIG: not set; train.strategy multi_worker reads the cluster "
                           f"from it, e.g. {TF_CONFIG_EXAMPLE}")
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise UnetopsError(f"TF_CONFIG: not valid JSON ({exc})") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise UnetopsError("TF_CONFIG: cluster: expected a 'worker' list of host:port, "
                           f"e.g. {TF_CONFIG_EXAMPLE}")
    for job, addresses in cluster.items():
        if job not in ("chief", "worker"):
            raise UnetopsError(f"TF_CONFIG: cluster.{job}: unknown job (MultiWorkerMirrored"
                               "Strategy uses 'chief' and 'worker')")
        if (not isinstance(addresses, list)
                or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses)):
            raise UnetopsError(f"TF_CONFIG: cluster.{job}: expected a list of host:port")
    task = spec.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise UnetopsError(f"TF_CONFIG: task: expected {{\"type\": one of {sorted(cluster)}, "
                           "\"index\": n}")
    index = task.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or not (
            0 <= index < len(cluster[task["type"]])):
        raise UnetopsError(f"TF_CONFIG: task.index: {index!r} is not an index of "
                           f"cluster.{task['type']} ({len(cluster[task['type']])} addresses)")
    return spec


def is_chief(spec: dict) -> bool:
    """TensorFlow's rule: the ``chief`` task, else worker 0 when the cluster has no chief."""
    task = spec["task"]
    if "chief" in spec["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task.get("index", 0) == 0


def per_replica_batch(batch_size: int, replicas: int) -> int:
    """``train.batch_size`` is the global batch: every replica takes the same share of it."""
    if batch_size % replicas:
        raise UnetopsError(f"train.batch_size: {batch_size} is the global batch and must split "
                           f"evenly over the {replicas} replicas of train.strategy")
    return batch_size // replicas


@functools.cache
def _strategy(kind: str, tf_config: str) -> tf.distribute.Strategy:
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as exc:
        raise UnetopsError(f"train.strategy multi_worker: {str(exc).splitlines()[0]} (it must be "
                           "set up before any other TensorFlow work in the process)") from None
    _reduce_leaf_by_leaf(strategy)
    return strategy


def _reduce_leaf_by_leaf(strategy: tf.distribute.Strategy) -> None:
    """Make ``strategy.reduce`` take what Keras 3's ``fit`` gives it under multi-worker.

    ``MultiWorkerMirroredStrategy.reduce`` fails on the two calls ``fit`` makes
    (keras-team/keras#20585, open; TensorFlow's multi-worker Keras tutorial fails the same way):
    an ``(x, y)`` batch (a nest, averaged once to learn its shapes) and per-replica scalar metric
    values averaged "along axis 0". This reduces a nest leaf by leaf and scalars with
    ``axis=None``, the mean over replicas those calls mean.
    """
    reduce = strategy.reduce

    def rank(value) -> int | None:
        if isinstance(value, tf.distribute.DistributedValues):
            value = strategy.experimental_local_results(value)[0]
        return value.shape.rank

    def reduce_leaf_by_leaf(reduce_op, value, axis=None):
        return tf.nest.map_structure(
            lambda leaf: reduce(reduce_op, leaf, axis=None if rank(leaf) == 0 else axis), value)

    strategy.reduce = reduce_leaf_by_leaf


def placement(kind: str, batch_size: int, environ=os.environ) -> Placement:
    """Build (once per process) the strategy ``train.strategy`` names; check the global batch.

    Call it before any other TensorFlow op: ``MultiWorkerMirroredStrategy`` can only configure
    the collective ops of a fresh process.
    """
    if kind == "default":
        per_replica_batch(batch_size, 1)
        return Placement()
    if kind not in ("mirrored", "multi_worker"):
        raise UnetopsError(f"train.strategy: unknown strategy {kind!r}")
    spec = read_tf_config(environ) if kind == "multi_worker" else None
    strategy = _strategy(kind, json.dumps(spec, sort_keys=True))
    replicas = strategy.num_replicas_in_sync
    per_replica_batch(batch_size, replicas)
    if spec is None:
        return Placement(strategy, replicas)
    task = spec["task"]
    workers = sum(len(addresses) for addresses in spec["cluster"].values())
    return Placement(strategy, replicas, workers, f"{task['type']}:{task.get('index', 0)}",
                     is_chief(spec))


def same_on_every_worker(where: Placement, value: int) -> bool:
    """Whether every worker passed the same ``value`` (a collective: all of them must call it).

    The mean of ``value`` and of its square over the replicas: they agree exactly when the
    variance is 0, and every worker gets the same answer.
    """
    if where.workers == 1:
        return True
    pair = tf.constant([value, value * value], tf.float64)

    @tf.function
    def mean():
        return where.strategy.reduce("MEAN", where.strategy.run(lambda: tf.identity(pair)),
                                     axis=None)

    means = mean().numpy()
    return bool(means[1] == means[0] ** 2)


def data_sharded(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset``'s batches split over all replicas by element (``AutoShardPolicy.DATA``).

    Every worker builds the same batches (the training patches come from the same seeded
    stream) and tf.distribute cuts each global batch into one slice per replica, each worker
    keeping its replicas' slices: one step of all replicas is exactly the single-device batch,
    and the optimizer step is its mean gradient. The alternatives fail that: ``FILE`` (and
    ``AUTO``, which tries it first and then warns) needs files to share out, and the patches
    are drawn in memory; ``OFF`` would give every worker the same slices.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@contextlib.contextmanager
def epochs_end_with_the_data(where: Placement):
    """Silence Keras' "input ran out of data" warning under a strategy, where it is expected.

    Sharded over several workers, a dataset's length is unknown to Keras, so its first epoch
    reads to the end of the data (which holds exactly one epoch) and warns that it ran out.
    """
    with warnings.catch_warnings():
        if where.strategy is not None:
            warnings.filterwarnings("ignore", "Your input ran out of data", UserWarning)
        yield


def worker_checkpoints(chief_folder: Path, where: Placement) -> Path:
    """A non-chief worker's own checkpoint folder: a temporary copy of the chief's.

    TensorFlow's pattern for non-chief workers: they take part in every save (saving reads
    synchronised variables, a collective op) but write to a temporary folder, deleted after
    training. Copying the chief's folder first resumes them at the chief's epoch; on several hosts
    that needs ``models/checkpoints`` on a shared file system, else every worker starts afresh.
    """
    temporary = Path(tempfile.mkdtemp(prefix=f"unetops-{where.task.replace(':', '')}-"))
    folder = temporary / "checkpoints"
    if chief_folder.is_dir():
        try:
            shutil.copytree(chief_folder, folder)
        except (OSError, shutil.Error):  # the chief is discarding checkpoints of other params
            shutil.rmtree(folder, ignore_errors=True)
    return folder
