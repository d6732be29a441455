"""Targets beyond the class label: multi-label and regression heads with missing labels.

``data.targets`` lists what a model predicts, each from a manifest column::

    data:
      targets:
        - {name: category, column: label, type: multiclass}
        - {name: tags, column: tags, type: multilabel, separator: "|", loss_weight: 0.5}
        - {name: score, column: rating, type: regression}

The first target is the *primary* one: a multiclass target on
``data.columns.label``, which keeps the existing label machinery (class
names, class weights, stratified validation, the Classify API). The others
are ``multilabel`` (a ``separator``-joined cell; the label vocabulary is
learnt from the train split) or ``regression`` (a number). An empty cell of
an extra target is a *missing* label: conversion stores a 0 presence flag and
the loss and metrics of that target skip the example (it is not a class).
An empty ``data.targets`` is today's single implicit target: the model, the
exports and the reports do not change.

This module owns what targets add: the names of their TFRecord features,
cell parsing and validation, the heads, the masked losses and metrics, and
the per-target report sections. Keras gets each extra target as one packed
float tensor ``[values..., present]`` so that a loss or metric sees the
presence flag next to the values it masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from multimodal_tf import distribute
from multimodal_tf.calibration import TemperatureScaling
from multimodal_tf.compat import keras, tf
from multimodal_tf.config import EXTRA_TARGET_TYPES as EXTRA_TYPES
from multimodal_tf.config import MULTICLASS, MULTILABEL, REGRESSION

# === Names ===


def value_feature(name: str) -> str:
    """TFRecord feature holding target ``name``'s value (multi-hot or number)."""
    return f"target_{name}"


def present_feature(name: str) -> str:
    """TFRecord feature holding target ``name``'s 0/1 presence flag."""
    return f"target_{name}_present"


def primary(data) -> object:
    """The primary target config of ``data`` (a DataConfig with targets), or None."""
    return data.targets[0] if data.targets else None


def extras(data) -> tuple:
    """The targets after the primary one."""
    return tuple(data.targets[1:])


# === Cells ===


def parse_cell(target, cell: str) -> list[str] | float | None:
    """A manifest cell of an extra target -> labels / number, or None when missing.

    Raises:
        ValueError: a malformed cell (an empty label between separators, a
            value that is not a finite number); the caller names row and column.
    """
    cell = cell.strip()
    if not cell:
        return None
    if target.type == MULTILABEL:
        labels = [part.strip() for part in cell.split(target.separator)]
        if any(not label for label in labels):
            raise ValueError(
                f"malformed multilabel cell {cell!r}: an empty label between {target.separator!r}"
            )
        return sorted(set(labels))
    try:
        value = float(cell)
    except ValueError:
        raise ValueError(f"regression value {cell!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"regression value {cell!r} is not finite")
    return value


def cell_problems(record, data) -> list[tuple[str, str]]:
    """(column, reason) for every malformed extra-target cell of a manifest record."""
    found = []
    for target in extras(data):
        try:
            parse_cell(target, record.targets.get(target.column, ""))
        except ValueError as e:
            found.append((target.column, str(e)))
    return found


def label_vocabularies(records, data) -> dict[str, list[str]]:
    """Multilabel target -> its sorted labels, as seen in ``records`` (the train split)."""
    vocabularies = {}
    for target in extras(data):
        if target.type == MULTILABEL:
            seen = set()
            for record in records:
                seen.update(parse_cell(target, record.targets.get(target.column, "")) or ())
            vocabularies[target.name] = sorted(seen)
    return vocabularies


def example_features(record, data, vocabularies: Mapping[str, list[str]]) -> dict:
    """``tf.train.Feature`` per extra-target feature of one (validated) record.

    A multilabel label outside the train vocabulary is dropped (it cannot be
    predicted); a cell with no known label left is still *present* (all 0).
    """
    out = {}
    for target in extras(data):
        value = parse_cell(target, record.targets.get(target.column, ""))
        present = value is not None
        if target.type == MULTILABEL:
            names = vocabularies[target.name]
            hot = [0.0] * len(names)
            for label in value or ():
                if label in names:
                    hot[names.index(label)] = 1.0
        else:
            hot = [float(value) if present else 0.0]
        out[value_feature(target.name)] = tf.train.Feature(float_list=tf.train.FloatList(value=hot))
        out[present_feature(target.name)] = tf.train.Feature(
            int64_list=tf.train.Int64List(value=[int(present)])
        )
    return out


def metadata_entry(data, vocabularies, splits: Mapping[str, list]) -> dict:
    """``metadata.targets``: per extra target its type, column, labels and counts per split."""
    entry = {}
    for target in extras(data):
        counts = {}
        for split, records in splits.items():
            values = [parse_cell(target, r.targets.get(target.column, "")) for r in records]
            present = [v for v in values if v is not None]
            counts[split] = {"present": len(present), "missing": len(values) - len(present)}
            if target.type == MULTILABEL:
                names = vocabularies[target.name]
                counts[split]["labels"] = {n: sum(n in v for v in present) for n in names}
        entry[target.name] = {
            "type": target.type,
            "column": target.column,
            "label_names": list(vocabularies.get(target.name, [])),
            "counts": counts,
        }
        if target.type == REGRESSION:  # the baseline of the report
            train = [parse_cell(target, r.targets.get(target.column, "")) for r in splits.get("train", [])]
            train = [v for v in train if v is not None]
            entry[target.name]["train_mean"] = float(np.mean(train)) if train else 0.0
    return entry


def sizes(data, metadata) -> dict[str, int]:
    """Output units per extra target (labels of a multilabel target, 1 for regression)."""
    out = {}
    for target in extras(data):
        if target.name not in (metadata.targets or {}):
            raise ValueError(
                f"target {target.name!r} is not in the converted dataset's metadata: convert the manifest "
                "again with data.targets set"
            )
        labels = metadata.targets[target.name]["label_names"]
        if target.type == MULTILABEL and not labels:
            raise ValueError(f"multilabel target {target.name!r}: no label in the train split")
        out[target.name] = len(labels) if target.type == MULTILABEL else 1
    return out


# === Pipeline ===


def feature_spec(data, target_sizes: Mapping[str, int]) -> dict:
    """``tf.Example`` parsing spec of the extra targets (missing: absent, all 0)."""
    spec = {}
    for target in extras(data):
        size = target_sizes[target.name]
        spec[value_feature(target.name)] = tf.io.FixedLenFeature(
            [size], tf.float32, default_value=[0.0] * size
        )
        spec[present_feature(target.name)] = tf.io.FixedLenFeature([], tf.int64, default_value=0)
    return spec


def packed_labels(data, parsed: Mapping[str, tf.Tensor], label: tf.Tensor) -> dict[str, tf.Tensor]:
    """Keras targets: primary -> int label; extra -> float32 [B, size + 1] (values, present)."""
    out = {primary(data).name: label}
    for target in extras(data):
        present = tf.cast(parsed[present_feature(target.name)], tf.float32)[:, None]
        out[target.name] = tf.concat([parsed[value_feature(target.name)], present], axis=1)
    return out


# === Heads, losses and metrics ===


ACTIVATIONS = {MULTICLASS: "softmax", MULTILABEL: "sigmoid", REGRESSION: None}


def uncalibrated_name(name: str) -> str:
    """The layer before target ``name``'s TemperatureScaling output (train.calibration)."""
    return f"{name}_uncalibrated"


def average_name(name: str) -> str:
    """An ensemble's layer averaging its members' target ``name`` outputs (models.build_model)."""
    return f"{name}_average"


def calibrated(target) -> bool:
    """Whether ``train.calibration: temperature`` scales this target (not a regression value)."""
    return ACTIVATIONS[target.type] is not None


def build_heads(
    data, x: tf.Tensor, num_classes: int, target_sizes: Mapping[str, int], temperature: bool = False
) -> dict[str, tf.Tensor]:
    """One float32 output per target on the shared representation ``x``.

    Multiclass: softmax [B, K]; multilabel: sigmoid [B, L]; regression:
    linear [B, 1]. Each output (and its Dense layer) is named after its target.
    ``temperature`` (train.calibration): a multiclass or multilabel head is
    a Dense of logits named ``<target>_uncalibrated`` followed by its own
    TemperatureScaling layer named after the target.
    """
    outputs = {}
    for target in data.targets:
        units = num_classes if target.type == MULTICLASS else target_sizes[target.name]
        activation = ACTIVATIONS[target.type]
        if temperature and calibrated(target):
            logits = keras.layers.Dense(units, dtype="float32", name=uncalibrated_name(target.name))(x)
            outputs[target.name] = TemperatureScaling(activation, name=target.name)(logits)
        else:
            layer = keras.layers.Dense(units, activation=activation, dtype="float32", name=target.name)
            outputs[target.name] = layer(x)
    return outputs


def extra_outputs(data, target_sizes: Mapping[str, int]) -> dict[str, list]:
    """``LateFusion``'s ``extra_outputs``: [units, activation] per extra target."""
    return {t.name: [target_sizes[t.name], ACTIVATIONS[t.type] or "linear"] for t in extras(data)}


def output_layers(data, combined: Mapping[str, tf.Tensor], temperature: bool = False) -> dict[str, tf.Tensor]:
    """Named outputs on per-target probabilities (values) already combined: by a fusion or an ensemble.

    ``temperature``: a multiclass or multilabel target's output is a
    TemperatureScaling layer on the logits of those probabilities.
    """
    outputs = {}
    for target in data.targets:
        if temperature and calibrated(target):
            scores = keras.layers.Activation("linear", dtype="float32", name=uncalibrated_name(target.name))(
                combined[target.name]
            )
            outputs[target.name] = TemperatureScaling(
                ACTIVATIONS[target.type], from_logits=False, name=target.name
            )(scores)
        else:
            layer = keras.layers.Activation("linear", dtype="float32", name=target.name)
            outputs[target.name] = layer(combined[target.name])
    return outputs


def _split(y_true: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Packed [B, size + 1] -> (values [B, size], present [B])."""
    y_true = tf.cast(y_true, tf.float32)
    return y_true[:, :-1], y_true[:, -1]


def masked_mean(per_example: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """Per-example values rescaled so that Keras's reduction gives the mean over present examples.

    Keras averages a loss over the replica's batch ``B`` and, under ``R``
    synchronous replicas, divides it by ``R`` before the gradients are
    summed. Multiplying by ``present * B * R / N``, with ``N`` the present
    examples of the *global* batch (summed over the replicas), makes the
    summed gradient that of the global batch's masked mean: with one device
    that is the batch's masked mean, and replicas holding different numbers
    of labels still weigh each labelled example equally (a per-replica
    ``N`` would weigh a replica's few labels as much as another's many).
    0 when no example of the global batch is present.
    """
    batch = tf.cast(tf.shape(present)[0], tf.float32)
    count = distribute.sum_replicas(tf.reduce_sum(present))
    scale = batch * float(distribute.num_replicas_in_step())
    return per_example * present * tf.math.divide_no_nan(scale, count)


@keras.utils.register_keras_serializable(package="multimodal_tf")
class MaskedLoss(keras.losses.Loss):
    """Loss of one extra target on packed labels, missing labels left out.

    Multilabel: binary cross-entropy averaged over labels; regression: the
    squared error. Each averaged over the examples whose label is present.

    Args:
        kind: ``multilabel`` or ``regression``.
        **kwargs: standard loss arguments.
    """

    def __init__(self, kind: str, **kwargs):
        super().__init__(**kwargs)
        if kind not in EXTRA_TYPES:
            raise ValueError(f"MaskedLoss kind must be one of {EXTRA_TYPES}, got {kind!r}")
        self.kind = kind

    def call(self, y_true, y_pred):
        values, present = _split(y_true)
        y_pred = tf.cast(y_pred, tf.float32)
        if self.kind == MULTILABEL:
            per_example = keras.losses.binary_crossentropy(values, y_pred)
        else:
            per_example = tf.reduce_mean(tf.square(values - y_pred), axis=-1)
        return masked_mean(per_example, present)

    def get_config(self) -> dict:
        return {**super().get_config(), "kind": self.kind}


@keras.utils.register_keras_serializable(package="multimodal_tf")
class MaskedMeanAbsoluteError(keras.metrics.Mean):
    """MAE of a regression target over examples with a label (packed labels)."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        values, present = _split(y_true)
        errors = tf.reduce_mean(tf.abs(values - tf.cast(y_pred, tf.float32)), axis=-1)
        return super().update_state(errors, sample_weight=present)


@keras.utils.register_keras_serializable(package="multimodal_tf")
class MaskedRootMeanSquaredError(keras.metrics.RootMeanSquaredError):
    """RMSE of a regression target over examples with a label (packed labels)."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        values, present = _split(y_true)
        return super().update_state(values, tf.cast(y_pred, tf.float32), sample_weight=present)


@keras.utils.register_keras_serializable(package="multimodal_tf")
class MaskedAUC(keras.metrics.AUC):
    """Micro-averaged ROC-AUC of a multilabel target over examples with labels (packed labels)."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        values, present = _split(y_true)
        weights = tf.broadcast_to(present[:, None], tf.shape(values))
        return super().update_state(values, tf.cast(y_pred, tf.float32), sample_weight=weights)


def losses(data, primary_loss) -> dict:
    """Loss per output name: ``primary_loss`` for the primary target, MaskedLoss for the others."""
    out = {primary(data).name: primary_loss}
    out.update({t.name: MaskedLoss(t.type, name=f"{t.name}_loss") for t in extras(data)})
    return out


def loss_weights(data) -> dict[str, float]:
    return {t.name: t.loss_weight for t in data.targets}


def metrics(data) -> dict:
    """Training metrics per output: accuracy; masked micro AUC; masked MAE and RMSE."""
    out = {primary(data).name: [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]}
    for target in extras(data):
        if target.type == MULTILABEL:
            out[target.name] = [MaskedAUC(name="auc")]
        else:
            out[target.name] = [MaskedMeanAbsoluteError(name="mae"), MaskedRootMeanSquaredError(name="rmse")]
    return out


def monitor(config) -> str:
    """``train.monitor`` as Keras names it: a multi-output model prefixes the primary's metrics.

    ``val_accuracy`` (the default) becomes ``val_<primary>_accuracy``; a
    monitor that already names an output (``val_score_mae``) or the total
    loss stays as it is.
    """
    name = config.train.monitor
    if not config.data.targets or name in ("loss", "val_loss"):
        return name
    prefix = "val_" if name.startswith("val_") else ""
    rest = name[len(prefix) :]
    if any(rest.startswith(f"{t.name}_") for t in config.data.targets):
        return name
    return f"{prefix}{primary(config.data).name}_{rest}"
