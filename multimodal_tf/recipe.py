"""The training recipe: how a config becomes a compiled model, datasets and callbacks.

``mmtf train`` (training.py), every Keras Tuner trial (tuning/) and any later
way of training (distillation, multi-task) call these functions, so a model
is trained and scored the same way wherever it is trained:

* :func:`compile_model`: ``build_model`` + optimizer (schedule, weight
  averaging, per-encoder learning-rate multipliers), loss and metrics.
* :func:`datasets_for`: the train and val datasets of the real pipeline, with
  head targets and class weights, shaped for the distribution strategy.
* :class:`Objective`: what to fit instead of the head's labels (a loss,
  metrics and per-example targets), e.g. distillation.py's teacher targets.
* :func:`callbacks_for`: the callbacks that change what a run learns or
  which weights it keeps (weight-average swap, early stopping with the best
  weights restored, plateau schedule), around the caller's own callbacks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from multimodal_tf import distribute, fine_tuning
from multimodal_tf import targets as targets_lib
from multimodal_tf.callbacks import FineTuningSchedule, SwapEMAWeights
from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.data.pipeline import make_dataset, split_texts
from multimodal_tf.data.text import vocabulary_size
from multimodal_tf.encoders.tfidf import TextTFIDFEncoder
from multimodal_tf.models import build_model, labels_for_head, loss_for


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seeds Python, NumPy and TF; ``deterministic`` makes TF ops deterministic (else undoes it).

    ``train.jit_compile`` runs need ``deterministic=False``: XLA has no
    deterministic MaxPool gradient ("GPU MaxPool gradient ops do not yet have
    a deterministic XLA implementation", on CPU too), so every CNN model
    failed its first XLA step. Determinism is process-wide, hence undone for
    an XLA run after a deterministic one (tests, tuning trials).
    """
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        # No public switch back (TF 2.17): the function behind the public enable.
        from tensorflow.python.framework import config as tf_config  # noqa: PLC0415

        tf_config.disable_op_determinism()


def num_classes_of(config: ExperimentConfig, metadata: DatasetMetadata) -> int:
    """``model.num_classes``, or the dataset's class count when it is 0."""
    return config.model.num_classes or metadata.num_classes


def steps_per_epoch(config: ExperimentConfig, metadata: DatasetMetadata) -> int:
    """Training batches in one pass over the train split."""
    return math.ceil(metadata.counts["train"]["examples"] / config.data.batch_size)


def class_weights(metadata: DatasetMetadata, mode: str) -> np.ndarray | None:
    """Per-class weights ("balanced": N / (K * n_c)), or None."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise ValueError(f"train.class_weights must be none or balanced, got {mode!r}")
    counts = np.array([metadata.counts["train"]["labels"][n] for n in metadata.label_names], np.float64)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return weights.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a run fits when it is not the head's labels alone (distillation.py).

    Attributes:
        loss: the compiled loss, called on ``targets``' target and the
            model's output.
        metrics: the compiled metrics (same targets); named as
            :func:`metrics_for` names its own so ``train.monitor`` still works.
        targets: split -> a ``tf.data`` map function ``(features, label,
            id) -> (features, target)`` over batches
            of ``make_dataset(..., with_ids=True)``.
    """

    loss: Any
    metrics: list
    targets: Callable[[str], Callable]


def supervised_dataset(dataset, config, num_classes, weights=None):
    """(features, int label) -> (features, head target[, sample weight]).

    With ``data.targets`` the label is the dict of ``targets.packed_labels``
    (the dataset made ``with_targets``): it is the Keras target as it is,
    and class weights weigh the primary target's loss only.
    """

    def to_targets(x, y):
        if isinstance(y, dict):
            if weights is None:
                return x, y
            primary = targets_lib.primary(config.data).name
            return x, y, {primary: tf.gather(tf.constant(weights), y[primary])}
        target = labels_for_head(y, config, num_classes)
        if weights is None:
            return x, target
        return x, target, tf.gather(tf.constant(weights), y)

    return dataset.map(to_targets, num_parallel_calls=tf.data.AUTOTUNE)


def make_optimizer(
    config: ExperimentConfig, steps_per_epoch: int, num_replicas: int = 1, multipliers: bool = False
):
    """The configured optimizer, learning-rate schedule and weight averaging.

    ``multipliers``: an optimizer that takes per-variable learning-rate
    multipliers (fine_tuning.LearningRateMultipliers; set them on it).
    """
    train = config.train
    learning_rate = train.learning_rate * (num_replicas if train.scale_learning_rate else 1)
    if train.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=max(1, train.epochs * steps_per_epoch), alpha=0.05
        )
    elif train.lr_schedule not in ("constant", "plateau"):  # plateau: a callback (callbacks_for)
        raise ValueError(f"train.lr_schedule must be cosine, constant or plateau; got {train.lr_schedule!r}")
    if not 0.0 <= train.ema_momentum < 1.0:
        raise ValueError(f"train.ema_momentum must be in [0, 1); got {train.ema_momentum}")
    ema = {"use_ema": train.ema_momentum > 0, "ema_momentum": train.ema_momentum}
    classes = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}
    if train.optimizer not in classes:
        raise ValueError(f"train.optimizer must be adam, adamw or sgd; got {train.optimizer!r}")
    optimizer_class = classes[train.optimizer]
    if multipliers:
        optimizer_class = fine_tuning.with_learning_rate_multipliers(optimizer_class)
    if train.optimizer == "adamw":
        return optimizer_class(learning_rate, weight_decay=train.weight_decay, **ema)
    if train.optimizer == "sgd":
        return optimizer_class(learning_rate, momentum=0.9, **ema)
    return optimizer_class(learning_rate, **ema)


def metrics_for(config: ExperimentConfig):
    """Accuracy (multiclass), or accuracy and AUC (binary / multilabel heads); per output with targets."""
    if config.data.targets:
        return targets_lib.metrics(config.data)
    if config.model.head.type == "multiclass":
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    return [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")]


def build_for(config: ExperimentConfig, metadata: DatasetMetadata):
    """``build_model`` with the class count, vocabulary size and target sizes of ``metadata``."""
    sizes = targets_lib.sizes(config.data, metadata) if config.data.targets else None
    vocab = vocabulary_size(config.data.text, metadata.vocabulary)
    return build_model(config, num_classes_of(config, metadata), vocab, target_sizes=sizes)


def loss_weights_for(config: ExperimentConfig):
    """Keras ``loss_weights``: per target (data.targets), times the alignment's classification weight.

    ``model.alignment`` adds its loss to ``model.losses``; its
    ``classification_weight`` weighs the head's loss (every target's, with
    ``data.targets``). None: every output weighs 1.
    """
    scale = config.model.alignment.classification_weight if config.model.alignment.enabled else 1.0
    if config.data.targets:
        return {name: weight * scale for name, weight in targets_lib.loss_weights(config.data).items()}
    return [scale] if config.model.alignment.enabled else None


def compile_model(
    config: ExperimentConfig,
    metadata: DatasetMetadata,
    num_replicas: int = 1,
    objective: Objective | None = None,
):
    """``build_model`` compiled with the config's optimizer, loss and metrics (or ``objective``'s).

    Call it inside the distribution strategy's scope (Keras Tuner's
    ``distribution_strategy`` does that for trials).

    ``train.mixed_precision`` applies to this model only: layers and the
    model take their dtype policy when they are built (and ``compile`` adds
    loss scaling for ``mixed_float16``), so the global policy is restored
    afterwards. Left set, it leaked into every later model of the process:
    the next tuning trial, a float32 run after a mixed one, the export.
    """
    previous = keras.mixed_precision.global_policy()
    if config.train.mixed_precision:
        keras.mixed_precision.set_global_policy(config.train.mixed_precision)
    try:
        model = build_for(config, metadata)
        adapt_encoders(model, config, metadata)
        groups = fine_tuning.learning_rate_groups(config.model, model)
        optimizer = make_optimizer(config, steps_per_epoch(config, metadata), num_replicas, bool(groups))
        if groups:
            optimizer.set_learning_rate_multipliers(groups)
        schedule = fine_tuning.unfreeze_schedule(config.model)
        if schedule:  # slots for the variables of later phases too (see FineTuningSchedule)
            optimizer.build(fine_tuning.variables_ever_trained(model, schedule))
        model.compile(
            optimizer=optimizer,
            loss=objective.loss if objective else loss_for(config),
            loss_weights=loss_weights_for(config),
            metrics=objective.metrics if objective else metrics_for(config),
            jit_compile=config.train.jit_compile,
            steps_per_execution=config.train.steps_per_execution,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return model


def fine_tune(
    model, config: ExperimentConfig, metadata: DatasetMetadata, epochs: int, callbacks: Sequence = ()
) -> dict[str, list[float]]:
    """Compiles and fits an already trained ``model`` (e.g. a pruning or QAT
    wrapper of one) for ``epochs`` on the train split; returns its history.

    The config's learning rate is held constant and EMA is off: a decay
    schedule or an average would start over as if training from scratch,
    while this continues from trained weights.
    """
    settings = dataclasses.replace(
        config, train=dataclasses.replace(config.train, lr_schedule="constant", ema_momentum=0.0)
    )
    model.compile(
        optimizer=make_optimizer(settings, steps_per_epoch(config, metadata)),
        loss=loss_for(config),
        metrics=metrics_for(config),
    )
    train, _, _ = datasets_for(config, metadata)
    history = model.fit(train, epochs=epochs, callbacks=list(callbacks), verbose=0)
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def adapt_encoders(model, config: ExperimentConfig, metadata: DatasetMetadata) -> None:
    """Gives encoders that learn from the data before training (``text/tfidf``) the train split.

    Their learned state (vocabulary, IDF) is in their weights, so a model
    rebuilt from a checkpoint needs no second pass.
    """
    encoders = [layer for layer in model.submodules if isinstance(layer, TextTFIDFEncoder)]
    if encoders:
        texts = split_texts(config, "train", metadata)
        for encoder in encoders:
            encoder.adapt(texts)


def datasets_for(
    config: ExperimentConfig, metadata: DatasetMetadata, strategy=None, objective: Objective | None = None
):
    """``(train, val, fit_steps)``: what ``model.fit`` gets for ``strategy``.

    Targets are the head's (:func:`supervised_dataset`), or ``objective``'s,
    computed from each example's label and id (class weights, when set,
    still weight each example by its label).

    ``fit_steps`` holds ``steps_per_epoch``/``validation_steps`` when the
    strategy needs repeated input (multi-worker, parameter server), else it
    is empty. ``strategy=None`` is the default (one-device) strategy.
    """
    strategy = strategy or tf.distribute.get_strategy()
    num_classes = num_classes_of(config, metadata)
    weights = class_weights(metadata, config.train.class_weights)
    repeat = distribute.needs_repeated_input(strategy)
    drop = config.train.strategy == "tpu"  # TPUs need static shapes
    with_targets = bool(config.data.targets)

    def split_fn(split, weights):
        def fn(context=None):
            ds = make_dataset(
                config,
                split,
                context,
                metadata=metadata,
                drop_remainder=drop,
                with_ids=objective is not None,
                with_targets=with_targets,
            )
            if objective is None:
                ds = supervised_dataset(ds, config, num_classes, weights)
            else:
                to_target = objective.targets(split)
                if weights is None:
                    ds = ds.map(to_target, num_parallel_calls=tf.data.AUTOTUNE)
                else:
                    ds = ds.map(
                        lambda x, y, i: (*to_target(x, y, i), tf.gather(tf.constant(weights), y)),
                        num_parallel_calls=tf.data.AUTOTUNE,
                    )
            return ds.repeat() if repeat else ds

        return fn

    train_fn, val_fn = split_fn("train", weights), split_fn("val", None)

    fit_steps = {}
    if repeat:
        batch_size = config.data.batch_size
        fit_steps = {
            "steps_per_epoch": max(1, metadata.counts["train"]["examples"] // batch_size),
            "validation_steps": max(1, metadata.counts["val"]["examples"] // batch_size),
        }
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        creator = keras.utils.experimental.DatasetCreator
        return creator(train_fn), creator(val_fn), fit_steps
    if repeat:  # each worker reads its share (InputContext) in per-replica batches
        return (
            strategy.distribute_datasets_from_function(train_fn),
            strategy.distribute_datasets_from_function(val_fn),
            fit_steps,
        )
    # One worker (default, mirrored, TPU): finite datasets, and Keras splits
    # each global batch over the local replicas.
    return train_fn(), val_fn(), fit_steps


def callbacks_for(config: ExperimentConfig, between: Sequence = ()) -> list:
    """The recipe's callbacks around the caller's (``between``: checkpoints, logs, a tuner's).

    The weight-average swap comes first so that everything after it (the
    caller's checkpoints, Keras Tuner's best-epoch tracking, early stopping)
    sees the averaged weights; encoders with ``unfreeze_at_epoch`` are
    frozen and unfrozen by FineTuningSchedule; early stopping restores the
    best epoch's weights; ``lr_schedule: plateau`` halves the rate after 2
    flat epochs.
    """
    train = config.train
    callbacks = [SwapEMAWeights()] if train.ema_momentum > 0 else []
    schedule = fine_tuning.unfreeze_schedule(config.model)
    if schedule:  # after the average swap (see FineTuningSchedule), before checkpoints
        callbacks.append(FineTuningSchedule(schedule))
    callbacks += list(between)
    if train.early_stopping_patience > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=targets_lib.monitor(config),
                patience=train.early_stopping_patience,
                restore_best_weights=True,
            )
        )
    if train.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(monitor=targets_lib.monitor(config), factor=0.5, patience=2)
        )
    return callbacks
