"""Distribution strategies chosen by ``train.strategy``.

All strategies share one training path (training.py); this module only knows
how to create them, which task of a cluster this process is, and what each
strategy implies for the input pipeline and the callbacks.

=================  ======================  =====================================
strategy           processes               input / fault tolerance
=================  ======================  =====================================
default            1                       finite datasets; BackupAndRestore
mirrored           1 (N GPUs / CPUs)       finite datasets; BackupAndRestore
multi_worker       N workers (TF_CONFIG)   repeated + steps_per_epoch;
                                           BackupAndRestore (all workers)
parameter_server   chief + N workers + M   DatasetCreator, repeated +
                   ps (TF_CONFIG)          steps_per_epoch; BackupAndRestore
                                           on the chief (the coordinator)
tpu                1 TPU host              static shapes (drop_remainder);
                                           BackupAndRestore
=================  ======================  =====================================

``mmtf launch`` (launch.py) starts the cluster ones on one machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import TrainConfig

STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server", "tpu")
CLUSTER_STRATEGIES = ("multi_worker", "parameter_server")


def _tf_config() -> dict:
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """Creates the configured strategy (reads ``TF_CONFIG`` for cluster ones).

    Must run before TensorFlow initialises its devices for ``multi_worker``
    (it starts the in-process gRPC server), so call it early in a process.
    """
    name = config.strategy
    if name not in STRATEGIES:
        raise ValueError(f"unknown train.strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        if devices:
            return tf.distribute.MirroredStrategy(devices)
        # CPU hosts: mirror over the logical CPU devices, if split. Reduce on
        # one device: CPU collectives of two strategies in one process can
        # share instance keys and abort with "Shape mismatch in the collective".
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "parameter_server":
        if task_info()[0] != "chief":
            raise ValueError(
                "train.strategy=parameter_server: only the chief creates the strategy; "
                f"this task is {task_info()} (ps/worker tasks run distribute.run_server)"
            )
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        return tf.distribute.experimental.ParameterServerStrategy(resolver)
    return _tpu_strategy(config.tpu or "local")


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    """TPUStrategy on a TPU VM (``"local"``) or a named TPU node / pod."""
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def task_info() -> tuple[str, int]:
    """``(task_type, task_id)`` from ``TF_CONFIG`` (``("chief", 0)`` when unset)."""
    task = _tf_config().get("task") or {}
    return task.get("type", "chief"), int(task.get("index", 0))


def is_chief() -> bool:
    """True on the task that writes checkpoints, logs and reports.

    That is the ``chief`` task, or worker 0 in a cluster without a chief.
    """
    task_type, task_id = task_info()
    has_chief = "chief" in (_tf_config().get("cluster") or {})
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)


def in_cluster() -> bool:
    """True when ``TF_CONFIG`` describes a cluster with more than one task."""
    cluster = _tf_config().get("cluster") or {}
    return sum(len(addresses) for addresses in cluster.values()) > 1


def is_server_task(config: TrainConfig) -> bool:
    """True on the ps and worker tasks of a parameter-server cluster.

    Those only run a ``tf.distribute.Server``; the chief (coordinator) sends
    them variables and functions. Running them in-process with the chief hung
    on this stack, so each is its own process (see ``mmtf launch``).
    """
    return config.strategy == "parameter_server" and task_info()[0] in ("ps", "worker")


def run_server() -> None:
    """Serves this ps/worker task until the process is stopped (never returns)."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    # Workers fail fast on a lost peer so the coordinator can reschedule.
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    server = tf.distribute.Server(
        resolver.cluster_spec(),
        job_name=resolver.task_type,
        task_index=resolver.task_id,
        protocol=resolver.rpc_layer or "grpc",
        start=True,
    )
    print(f"{resolver.task_type} {resolver.task_id}: serving at {server.target}", flush=True)
    server.join()


def needs_repeated_input(strategy: tf.distribute.Strategy) -> bool:
    """Multi-worker and PS training need an infinite dataset + steps_per_epoch.

    With file or data sharding workers may hold different example counts; a
    fixed number of steps per epoch keeps their collectives in lock step (and
    a PS worker never runs out of data in the middle of a scheduled step).
    """
    return isinstance(
        strategy,
        (
            tf.distribute.MultiWorkerMirroredStrategy,
            tf.distribute.experimental.ParameterServerStrategy,
        ),
    )


def _step_context():
    """The replica context of a synchronous multi-replica step, else None.

    None outside a strategy, in cross-replica code and with one replica in
    sync (the default strategy, a parameter-server worker), where a value is
    already global.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas_in_step() -> int:
    """Replicas whose losses Keras sums into one gradient (1 outside a synchronous step)."""
    context = _step_context()
    return 1 if context is None else context.num_replicas_in_sync


def gather_replicas(value: tf.Tensor) -> tf.Tensor:
    """``value`` of every replica concatenated on axis 0 (itself outside a synchronous step).

    ``ReplicaContext.all_gather`` is differentiable, and across workers
    (MultiWorkerMirroredStrategy) it orders the rows by
    ``replica_id_in_sync_group`` as within one worker.
    """
    context = _step_context()
    return value if context is None else context.all_gather(value, axis=0)


def sum_replicas(value: tf.Tensor) -> tf.Tensor:
    """``value`` summed over the replicas of a synchronous step (itself outside one).

    For global counts (labelled examples, valid pairs) that per-replica
    losses divide by; the sum is not differentiated through (stop_gradient),
    counts have no gradient.
    """
    context = _step_context()
    if context is None:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(value))


def weights_checksum(weights: list[np.ndarray]) -> str:
    """SHA-256 of a model's weight values (equal weights give equal sums)."""
    digest = hashlib.sha256()
    for value in weights:
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


class TaskSummary(keras.callbacks.Callback):
    """Writes ``<run_dir>/tasks/<type>-<index>.json`` at the end of training.

    Every task of a cluster writes its own file: the epochs it ran (the first
    one shows where BackupAndRestore resumed) and a checksum of its final
    weights, so synchronous workers can be checked to agree.

    Args:
        run_dir: the run directory.
    """

    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.epochs: list[int] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(int(epoch))

    def on_train_end(self, logs=None):
        task_type, task_id = task_info()
        weights = self.model.get_weights()
        summary = {
            "task": task_type,
            "index": task_id,
            "epochs": self.epochs,
            "weights_sha256": weights_checksum(weights),
            "weights_sum": float(sum(np.sum(w, dtype=np.float64) for w in weights)),
        }
        path = self.run_dir / "tasks" / f"{task_type}-{task_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1))
