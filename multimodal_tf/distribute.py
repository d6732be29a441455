"""Distribution strategies chosen by ``train.strategy``.

All strategies share one training path (training.py); this module only knows
how to create them and what each one implies for the input pipeline.
"""

from __future__ import annotations

import json
import os

from multimodal_tf.compat import tf
from multimodal_tf.config import TrainConfig

STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server", "tpu")


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """Creates the configured strategy (reads ``TF_CONFIG`` for cluster ones)."""
    name = config.strategy
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        if not devices:  # CPU hosts: mirror over the logical CPU devices, if split
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "parameter_server":
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        return tf.distribute.experimental.ParameterServerStrategy(resolver)
    if name == "tpu":
        tpu = config.tpu or "local"
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown train.strategy {name!r}; known: {', '.join(STRATEGIES)}")


def task_info() -> tuple[str, int]:
    """``(task_type, task_id)`` from ``TF_CONFIG`` (``("chief", 0)`` when unset)."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task") or {}
    return task.get("type", "chief"), int(task.get("index", 0))


def is_chief() -> bool:
    """True on the task that writes checkpoints, logs and reports.

    That is the ``chief`` task, or worker 0 in a cluster without a chief.
    """
    task_type, task_id = task_info()
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    has_chief = "chief" in (tf_config.get("cluster") or {})
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)


def needs_repeated_input(strategy: tf.distribute.Strategy) -> bool:
    """Multi-worker and PS training need an infinite dataset + steps_per_epoch.

    With data-level sharding workers may hold different example counts; a
    fixed number of steps per epoch keeps their collectives in lock step.
    """
    return isinstance(
        strategy,
        (
            tf.distribute.MultiWorkerMirroredStrategy,
            tf.distribute.experimental.ParameterServerStrategy,
        ),
    )
