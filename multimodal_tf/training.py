"""``mmtf train``: strategies, compile, fit, callbacks and run-directory outputs.

A run directory holds everything needed to evaluate, export or resume:
``config.yaml`` (resolved), ``metadata.json`` (label names, vocabulary),
``checkpoints/{best,last}.weights.h5``, ``history.{json,csv}``,
``learning_curves.png``, ``logs/`` (TensorBoard) and ``metrics.json``.
"""

from __future__ import annotations

import fcntl
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from multimodal_tf import config as config_lib
from multimodal_tf import distribute
from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data import convert as convert_lib
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.data.pipeline import make_dataset
from multimodal_tf.data.text import vocabulary_size
from multimodal_tf.models import build_model, labels_for_head, loss_for

CONFIG_FILE, METADATA_FILE = "config.yaml", "metadata.json"
BEST_WEIGHTS, LAST_WEIGHTS = "checkpoints/best.weights.h5", "checkpoints/last.weights.h5"


def prepare_data(config: ExperimentConfig, progress: bool = True) -> DatasetMetadata:
    """Converts the manifest to TFRecords unless an up-to-date conversion exists."""
    directory = convert_lib.default_tfrecord_dir(config.data)
    if not config.data.manifest:
        return DatasetMetadata.load(directory)
    # Tasks of a local cluster (mmtf launch) convert the same manifest at the
    # same time: one converts, the others wait and then find it up to date.
    lock_path = Path(f"{directory}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return convert_lib.convert(
            config.data.manifest, directory, config.data, on_error="skip", progress=progress
        )


def set_seed(seed: int) -> None:
    """Seeds Python, NumPy and TF and makes TF ops deterministic."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def class_weights(metadata: DatasetMetadata, mode: str) -> np.ndarray | None:
    """Per-class weights ("balanced": N / (K * n_c)), or None."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise ValueError(f"train.class_weights must be none or balanced, got {mode!r}")
    counts = np.array([metadata.counts["train"]["labels"][n] for n in metadata.label_names], np.float64)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return weights.astype(np.float32)


def supervised_dataset(dataset, config, num_classes, weights=None):
    """(features, int label) -> (features, head target[, sample weight])."""

    def to_targets(x, y):
        target = labels_for_head(y, config, num_classes)
        if weights is None:
            return x, target
        return x, target, tf.gather(tf.constant(weights), y)

    return dataset.map(to_targets, num_parallel_calls=tf.data.AUTOTUNE)


def make_optimizer(config: ExperimentConfig, steps_per_epoch: int, num_replicas: int = 1):
    train = config.train
    learning_rate = train.learning_rate * (num_replicas if train.scale_learning_rate else 1)
    if train.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=max(1, train.epochs * steps_per_epoch), alpha=0.05
        )
    elif train.lr_schedule not in ("constant", "plateau"):
        raise ValueError(f"train.lr_schedule must be cosine, constant or plateau; got {train.lr_schedule!r}")
    if not 0.0 <= train.ema_momentum < 1.0:
        raise ValueError(f"train.ema_momentum must be in [0, 1); got {train.ema_momentum}")
    ema = {"use_ema": train.ema_momentum > 0, "ema_momentum": train.ema_momentum}
    if train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate, **ema)
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=train.weight_decay, **ema)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, **ema)
    raise ValueError(f"train.optimizer must be adam, adamw or sgd; got {train.optimizer!r}")


def metrics_for(config: ExperimentConfig):
    if config.model.head.type == "multiclass":
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    return [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")]


class Throughput(keras.callbacks.Callback):
    """Adds ``examples_per_second`` to the epoch logs and prints it."""

    def __init__(self, batch_size: int, verbose: int = 1, steps_per_epoch: int | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.verbose = verbose
        self.steps_per_epoch = steps_per_epoch

    def _implements_train_batch_hooks(self):
        # A known step count needs no batch hook, and ParameterServerStrategy
        # rejects callbacks that have one.
        return self.steps_per_epoch is None

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        steps = self.steps_per_epoch or self._steps
        rate = steps * self.batch_size / max(time.perf_counter() - self._start, 1e-9)
        if logs is not None:
            logs["examples_per_second"] = rate
        if self.verbose:
            print(f"epoch {epoch + 1}: {rate:,.0f} examples/s")


class SwapEMAWeights(keras.callbacks.Callback):
    """Puts the optimizer's moving-average weights in the model between epochs.

    The optimizer keeps the average (``use_ema``) but Keras 2 only copies it
    into the model when ``fit`` ends, so validation, best-checkpoint choice
    and early stopping would judge the raw weights. This callback swaps the
    average in before validation and keeps it there through ``on_epoch_end``
    (it must come before the checkpoint and early-stopping callbacks), then
    puts the raw weights back before the next epoch trains. A run resumed by
    ``BackupAndRestore`` restarts from the averaged weights.
    """

    def __init__(self):
        super().__init__()
        self._raw = None

    def _swap_in(self):
        if self._raw is None:
            variables = self.model.trainable_variables
            self._raw = [tf.identity(v) for v in variables]
            self.model.optimizer.finalize_variable_values(variables)  # public API: assigns the average

    def on_test_begin(self, logs=None):
        self._swap_in()

    def on_epoch_end(self, epoch, logs=None):
        self._swap_in()  # also without validation data

    def on_epoch_begin(self, epoch, logs=None):
        if self._raw is not None:
            for variable, value in zip(self.model.trainable_variables, self._raw, strict=True):
                variable.assign(value)
            self._raw = None

    def on_train_end(self, logs=None):
        self._raw = None  # fit already left the average (or the restored best) in place


def make_callbacks(
    config: ExperimentConfig, run_dir: Path, batch_size: int, chief: bool, steps_per_epoch: int | None = None
):
    train = config.train
    # Non-chief workers must still run the callbacks (they take part in the
    # collectives) but write into a throwaway folder.
    out = run_dir if chief else Path(run_dir) / f".worker_tmp_{distribute.task_info()[1]}"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    callbacks = [SwapEMAWeights()] if train.ema_momentum > 0 else []
    callbacks += [
        Throughput(batch_size, verbose=train.verbose if chief else 0, steps_per_epoch=steps_per_epoch),
        # The latest weights are not also written every epoch: BackupAndRestore
        # already saves them (with the optimizer) and train() writes
        # LAST_WEIGHTS at the end; each .weights.h5 write of a 5-member
        # ensemble costs ~1.2 s.
        keras.callbacks.ModelCheckpoint(
            str(out / BEST_WEIGHTS), monitor=train.monitor, save_best_only=True, save_weights_only=True
        ),
        keras.callbacks.CSVLogger(str(out / "history.csv")),
        keras.callbacks.TensorBoard(log_dir=str(out / "logs"), profile_batch=0),
        keras.callbacks.BackupAndRestore(train.backup_dir or str(run_dir / "backup")),
    ]
    if train.early_stopping_patience > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=train.monitor, patience=train.early_stopping_patience, restore_best_weights=True
            )
        )
    if train.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=train.monitor, factor=0.5, patience=2))
    if distribute.in_cluster():  # per-task epochs and final weights (after EarlyStopping restores)
        callbacks.append(distribute.TaskSummary(run_dir))
    return callbacks


def plot_history(history: dict, path: Path) -> None:
    """Learning curves (loss and accuracy, train vs val) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "accuracy") if k in history]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=False):
        epochs = range(1, len(history[key]) + 1)
        axis.plot(epochs, history[key], label=f"train {key}")
        if f"val_{key}" in history:
            axis.plot(epochs, history[f"val_{key}"], label=f"val {key}")
        axis.set_xlabel("epoch")
        axis.set_title(key)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_run(run_dir: str | Path) -> tuple[ExperimentConfig, DatasetMetadata]:
    """Resolved config and dataset metadata saved with a run."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    # strict=False: runs saved before per-family configs hold every family's fields.
    config = config_lib.load([run_dir / CONFIG_FILE], strict=False)
    return config, DatasetMetadata.load(run_dir)


def load_trained_model(run_dir: str | Path, weights: str = BEST_WEIGHTS):
    """Rebuilds a run's model with build_model and loads its weights."""
    config, metadata = load_run(run_dir)
    model = build_model(
        config,
        config.model.num_classes or metadata.num_classes,
        vocabulary_size(config.data.text, metadata.vocabulary),
    )
    path = Path(run_dir) / weights
    if not path.exists():
        path = Path(run_dir) / LAST_WEIGHTS
    model.load_weights(str(path))
    return config, metadata, model


def _datasets(config, strategy, metadata, num_classes, weights):
    repeat = distribute.needs_repeated_input(strategy)
    drop = config.train.strategy == "tpu"  # TPUs need static shapes

    def train_fn(context=None):
        ds = make_dataset(config, "train", context, metadata=metadata, drop_remainder=drop)
        ds = supervised_dataset(ds, config, num_classes, weights)
        return ds.repeat() if repeat else ds

    def val_fn(context=None):
        ds = make_dataset(config, "val", context, training=False, metadata=metadata, drop_remainder=drop)
        ds = supervised_dataset(ds, config, num_classes)
        return ds.repeat() if repeat else ds

    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        creator = keras.utils.experimental.DatasetCreator
        return creator(train_fn), creator(val_fn), repeat
    if repeat:  # each worker reads its share (InputContext) in per-replica batches
        return (
            strategy.distribute_datasets_from_function(train_fn),
            strategy.distribute_datasets_from_function(val_fn),
            repeat,
        )
    # One worker (default, mirrored, TPU): finite datasets, and Keras splits
    # each global batch over the local replicas.
    return train_fn(), val_fn(), repeat


def train(config: ExperimentConfig, progress: bool = True) -> Path:
    """Trains one experiment; returns its run directory."""
    run_dir = Path(config.train.output_dir)
    if distribute.is_server_task(config.train):
        distribute.run_server()  # ps/worker of a PS cluster: serve until stopped
    # Cluster strategies start their gRPC server; do it before other TF work.
    strategy = distribute.make_strategy(config.train)
    chief = distribute.is_chief()
    metadata = prepare_data(config, progress=progress and chief)
    if "val" not in metadata.shards:
        raise ValueError("the dataset has no val split: set data.validation_fraction > 0")
    set_seed(config.train.seed)
    if config.train.mixed_precision:
        keras.mixed_precision.set_global_policy(config.train.mixed_precision)
    num_classes = config.model.num_classes or metadata.num_classes
    vocab_size = vocabulary_size(config.data.text, metadata.vocabulary)
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.save(config, run_dir / CONFIG_FILE)
        shutil.copy(
            Path(convert_lib.default_tfrecord_dir(config.data)) / METADATA_FILE, run_dir / METADATA_FILE
        )
    batch_size = config.data.batch_size
    steps_per_epoch = math.ceil(metadata.counts["train"]["examples"] / batch_size)
    if config.train.verbose:
        print(
            f"strategy {config.train.strategy}: {strategy.num_replicas_in_sync} replicas, global batch "
            f"{batch_size} ({batch_size // max(1, strategy.num_replicas_in_sync)} per replica)"
        )
    with strategy.scope():
        model = build_model(config, num_classes, vocab_size)
        model.compile(
            optimizer=make_optimizer(config, steps_per_epoch, strategy.num_replicas_in_sync),
            loss=loss_for(config),
            metrics=metrics_for(config),
            jit_compile=config.train.jit_compile,
            steps_per_execution=config.train.steps_per_execution,
        )
    weights = class_weights(metadata, config.train.class_weights)
    verbose = config.train.verbose if chief else 0
    if verbose == 1 and not sys.stdout.isatty():
        verbose = 2  # one line per epoch in logs instead of a redrawn bar
    train_ds, val_ds, repeated = _datasets(config, strategy, metadata, num_classes, weights)
    fit_steps = {}
    if repeated:
        fit_steps = {
            "steps_per_epoch": max(1, metadata.counts["train"]["examples"] // batch_size),
            "validation_steps": max(1, metadata.counts["val"]["examples"] // batch_size),
        }
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.train.epochs,
        callbacks=make_callbacks(config, run_dir, batch_size, chief, fit_steps.get("steps_per_epoch")),
        verbose=verbose,
        **fit_steps,
    )
    if distribute.needs_repeated_input(strategy):
        model = _local_copy(model, config, num_classes, vocab_size)
    if chief:
        values = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        (run_dir / "history.json").write_text(json.dumps(values, indent=1))
        plot_history(values, run_dir / "learning_curves.png")
        model.save_weights(str(run_dir / LAST_WEIGHTS))
        if not (run_dir / BEST_WEIGHTS).exists():
            model.save_weights(str(run_dir / BEST_WEIGHTS))
        _write_final_metrics(config, model, metadata, num_classes, run_dir)
    return run_dir


def _local_copy(model, config: ExperimentConfig, num_classes: int, vocab_size: int):
    """The trained model outside the cluster strategy, for chief-only saving and evaluation.

    Every task must call this: reading sync-on-read variables (BatchNorm
    statistics) of a multi-worker model is a collective, so a chief that read
    them alone would wait for workers that have already exited.
    """
    weights = model.get_weights()
    if not distribute.is_chief():
        return model
    local = build_model(config, num_classes, vocab_size)
    local.set_weights(weights)
    local.compile(loss=loss_for(config), metrics=metrics_for(config))
    return local


def _write_final_metrics(config, model, metadata, num_classes, run_dir: Path) -> None:
    """Loss/accuracy of the restored (best) weights on val and test."""
    results = {}
    for split in ("val", "test"):
        if split in metadata.shards:
            ds = supervised_dataset(
                make_dataset(config, split, training=False, metadata=metadata), config, num_classes
            )
            values = model.evaluate(ds, verbose=0, return_dict=True)
            results[split] = {k: float(v) for k, v in values.items()}
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    if config.train.verbose:
        for split, values in results.items():
            print(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
