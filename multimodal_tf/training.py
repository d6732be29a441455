"""``mmtf train``: one run of the training recipe, with its run directory.

The model, datasets and the callbacks that decide what is learned come from
:mod:`multimodal_tf.recipe` (the same ones every tuning trial uses); this
module adds the distribution strategy, the run directory's files (see
:mod:`multimodal_tf.run_dir`) and the final metrics.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from multimodal_tf import config as config_lib
from multimodal_tf import distribute, recipe
from multimodal_tf import run_dir as run_files
from multimodal_tf import targets as targets_lib
from multimodal_tf.calibration import calibrate_model
from multimodal_tf.callbacks import Throughput
from multimodal_tf.compat import keras
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data.cache import default_tfrecord_dir, prepare_data
from multimodal_tf.data.pipeline import make_dataset
from multimodal_tf.models import loss_for


def run_callbacks(
    config: ExperimentConfig,
    run_dir: Path,
    batch_size: int,
    chief: bool,
    steps_per_epoch: int | None = None,
    extra: Sequence = (),
) -> list:
    """The recipe's callbacks with the run directory's checkpoints and logs (and ``extra``) between them."""
    train = config.train
    # Non-chief workers must still run the callbacks (they take part in the
    # collectives) but write into a throwaway folder.
    out = run_dir if chief else Path(run_dir) / f".worker_tmp_{distribute.task_info()[1]}"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    files = [
        Throughput(batch_size, verbose=train.verbose if chief else 0, steps_per_epoch=steps_per_epoch),
        # The latest weights are not also written every epoch: BackupAndRestore
        # already saves them (with the optimizer) and train() writes
        # LAST_WEIGHTS at the end; each .weights.h5 write of a 5-member
        # ensemble costs ~1.2 s.
        keras.callbacks.ModelCheckpoint(
            str(out / run_files.BEST_WEIGHTS),
            monitor=targets_lib.monitor(config),
            save_best_only=True,
            save_weights_only=True,
        ),
        keras.callbacks.CSVLogger(str(out / run_files.HISTORY_CSV)),
        keras.callbacks.TensorBoard(log_dir=str(out / run_files.LOGS_DIR), profile_batch=0),
        keras.callbacks.BackupAndRestore(train.backup_dir or str(run_dir / "backup")),
        *extra,
    ]
    callbacks = recipe.callbacks_for(config, between=files)
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


def _start_run(config: ExperimentConfig, run_dir: Path) -> None:
    """The chief writes the resolved config and the dataset metadata first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save(config, run_dir / run_files.CONFIG_FILE)
    shutil.copy(
        default_tfrecord_dir(config.data) / run_files.METADATA_FILE, run_dir / run_files.METADATA_FILE
    )


def train(
    config: ExperimentConfig,
    progress: bool = True,
    callbacks: Sequence = (),
    objective: recipe.Objective | None = None,
) -> Path:
    """Trains one experiment; returns its run directory.

    ``callbacks``: more Keras callbacks for ``fit`` (e.g. a time budget's
    stop, budget.keras_callbacks), after the checkpoints and logs.
    ``objective``: fit this instead of the head's labels (``mmtf distill``);
    the final metrics are still those of the labels.
    """
    run_dir = Path(config.train.output_dir)
    if distribute.is_server_task(config.train):
        distribute.run_server()  # ps/worker of a PS cluster: serve until stopped
    # Cluster strategies start their gRPC server; do it before other TF work.
    strategy = distribute.make_strategy(config.train)
    chief = distribute.is_chief()
    metadata = prepare_data(config.data, progress=progress and chief)
    if "val" not in metadata.shards:
        raise ValueError("the dataset has no val split: set data.validation_fraction > 0")
    recipe.set_seed(config.train.seed, deterministic=not config.train.jit_compile)
    if chief:
        _start_run(config, run_dir)
    batch_size, replicas = config.data.batch_size, strategy.num_replicas_in_sync
    if config.train.verbose:
        print(
            f"strategy {config.train.strategy}: {replicas} replicas, global batch "
            f"{batch_size} ({batch_size // max(1, replicas)} per replica)"
        )
    with strategy.scope():
        model = recipe.compile_model(config, metadata, replicas, objective)
    verbose = config.train.verbose if chief else 0
    if verbose == 1 and not sys.stdout.isatty():
        verbose = 2  # one line per epoch in logs instead of a redrawn bar
    train_ds, val_ds, fit_steps = recipe.datasets_for(config, metadata, strategy, objective)
    _plan_finish(config, metadata, callbacks)
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.train.epochs,
        callbacks=run_callbacks(
            config, run_dir, batch_size, chief, fit_steps.get("steps_per_epoch"), callbacks
        ),
        verbose=verbose,
        **fit_steps,
    )
    if distribute.needs_repeated_input(strategy):
        model = _local_copy(model, config, metadata)
    elif objective is not None:  # the final metrics score the labels, as every run's do
        with strategy.scope():
            model.compile(
                loss=loss_for(config),
                loss_weights=recipe.loss_weights_for(config),
                metrics=recipe.metrics_for(config),
            )
    if chief:
        _finish_run(config, model, metadata, history, run_dir)
    return run_dir


# Seconds allowed for what _finish_run does besides passes over the data
# (history plot, weight files, metrics, tracing predict for calibration): an
# allowance, not measured per run; the passes themselves are timed.
FINISH_FILE_SECONDS = 3.0


def _plan_finish(config: ExperimentConfig, metadata, callbacks: Sequence) -> None:
    """Tells a time budget's stop (budget.StopAtDeadline) what :func:`_finish_run` will still do.

    In passes over the validation data: the final val metrics, calibration's
    pass when on, and the test split scaled by its size relative to val.
    """
    counts = metadata.counts
    passes = 1.0 + (config.train.calibration == "temperature")
    if "test" in metadata.shards:
        passes += counts["test"]["examples"] / max(1, counts["val"]["examples"])
    for callback in callbacks:
        if hasattr(callback, "plan_finish"):
            callback.plan_finish(passes, FINISH_FILE_SECONDS)


def _finish_run(config, model, metadata, history, run_dir: Path) -> None:
    values = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    (run_dir / run_files.HISTORY_JSON).write_text(json.dumps(values, indent=1))
    plot_history(values, run_dir / run_files.CURVES_FILE)
    model.save_weights(str(run_dir / run_files.LAST_WEIGHTS))
    if not (run_dir / run_files.BEST_WEIGHTS).exists():
        model.save_weights(str(run_dir / run_files.BEST_WEIGHTS))
    calibration = None
    if config.train.calibration == "temperature":
        # The temperature belongs to the weights that are evaluated and
        # exported: the best ones, which are then written back with it.
        model.load_weights(str(run_dir / run_files.BEST_WEIGHTS))
        calibration = calibrate_model(model, config, metadata)
        model.save_weights(str(run_dir / run_files.BEST_WEIGHTS))
        (run_dir / run_files.CALIBRATION_FILE).write_text(json.dumps(calibration, indent=1))
        if config.train.verbose:
            print(
                f"temperature {calibration['temperature']:.4f} (val ECE {calibration['before']['ece']:.4f}"
                f" -> {calibration['after']['ece']:.4f})"
            )
    _write_final_metrics(config, model, metadata, run_dir, calibration)


def _local_copy(model, config: ExperimentConfig, metadata):
    """The trained model outside the cluster strategy, for chief-only saving and evaluation.

    Every task must call this: reading sync-on-read variables (BatchNorm
    statistics) of a multi-worker model is a collective, so a chief that read
    them alone would wait for workers that have already exited.
    """
    weights = model.get_weights()
    if not distribute.is_chief():
        return model
    local = recipe.build_for(config, metadata)
    local.set_weights(weights)
    local.compile(
        loss=loss_for(config),
        loss_weights=recipe.loss_weights_for(config),
        metrics=recipe.metrics_for(config),
    )
    return local


def _write_final_metrics(config, model, metadata, run_dir: Path, calibration: dict | None = None) -> None:
    """Loss/accuracy of the restored (best) weights on val and test (and the calibration)."""
    num_classes = recipe.num_classes_of(config, metadata)
    results = {}
    for split in ("val", "test"):
        if split in metadata.shards:
            ds = recipe.supervised_dataset(
                make_dataset(
                    config, split, training=False, metadata=metadata, with_targets=bool(config.data.targets)
                ),
                config,
                num_classes,
            )
            values = model.evaluate(ds, verbose=0, return_dict=True)
            results[split] = {k: float(v) for k, v in values.items()}
    if calibration:
        results["calibration"] = calibration
    (run_dir / run_files.METRICS_FILE).write_text(json.dumps(results, indent=1))
    if config.train.verbose:
        for split, values in results.items():
            print(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
