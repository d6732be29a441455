"""``mmtf distill``: a student trained on a teacher run's softened predictions (Hinton et al., 2015).

The teacher is any run directory: one model or a deep ensemble
(models.EnsembleModel), whose output is already its members' averaged
probabilities. The student is an ordinary experiment config trained by the
one recipe (recipe.compile_model, datasets_for, callbacks_for via
training.train) with a :class:`recipe.Objective` that fits

    alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(p_t^T || p_s^T)

(``distill: {temperature, alpha}`` of the config; :func:`distillation_loss`).

The teacher runs once: its probabilities on the train and val examples are
written to the student's run directory (``teacher_targets.npz``, keyed by
example id, with ``teacher.json`` saying which teacher and weights they came
from) and joined to the student's examples by id in ``tf.data``. A second
``mmtf distill`` into the same run directory reuses them when the teacher is
unchanged (or gone). Targets are computed on the full examples, as
evaluation sees them (no modality dropout: the teacher predicts with
``training=False``); the student's own modality dropout hides modalities of
its inputs while training, as in ``mmtf train``, so it learns to match the
teacher's full-information prediction from what is left.

Models output probabilities, not logits; ``log p`` are logits up to a
per-example constant, which the softmax at any temperature ignores, so
``softmax(log p / T)`` is the softened distribution of Hinton et al.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from multimodal_tf import recipe
from multimodal_tf import run_dir as run_files
from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data import features
from multimodal_tf.data.cache import default_tfrecord_dir, prepare_data
from multimodal_tf.data.metadata import DatasetMetadata

# The teacher's predictions are computed on these splits (never on test).
TEACHER_SPLITS = ("train", "val")


def distillation_loss(labels, teacher_probabilities, student_probabilities, temperature: float, alpha: float):
    """Per-example ``alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(p_t^T || p_s^T)``.

    Args:
        labels: int class ids [B].
        teacher_probabilities: float [B, K] (softmax outputs, rows sum to 1).
        student_probabilities: float [B, K].
        temperature: T > 0; ``p^T = softmax(log p / T)``.
        alpha: weight of the hard-label cross-entropy, in [0, 1].

    Returns:
        float32 [B]. The T^2 factor keeps the soft term's gradients the same
        size as T changes (Hinton et al., section 2), so ``alpha`` means the
        same at every temperature. Probabilities are clipped to
        ``[epsilon, 1]`` before the log, as Keras' cross-entropy clips them.
    """
    epsilon = keras.backend.epsilon()
    log_student = tf.math.log(tf.clip_by_value(tf.cast(student_probabilities, tf.float32), epsilon, 1.0))
    log_teacher = tf.math.log(tf.clip_by_value(tf.cast(teacher_probabilities, tf.float32), epsilon, 1.0))
    hard = -tf.gather(log_student, tf.cast(labels, tf.int32), axis=1, batch_dims=1)
    soft_teacher = tf.nn.softmax(log_teacher / temperature, axis=-1)
    log_soft_student = tf.nn.log_softmax(log_student / temperature, axis=-1)
    kl = tf.reduce_sum(tf.math.xlogy(soft_teacher, soft_teacher) - soft_teacher * log_soft_student, axis=-1)
    return alpha * hard + (1.0 - alpha) * temperature**2 * kl


def pack_targets(labels, teacher_probabilities):
    """[B] labels and [B, K] teacher probabilities -> the [B, 1 + K] target the loss unpacks."""
    labels = tf.cast(tf.reshape(labels, [-1, 1]), tf.float32)
    return tf.concat([labels, tf.cast(teacher_probabilities, tf.float32)], axis=1)


@keras.utils.register_keras_serializable(package="multimodal_tf")
class DistillationLoss(keras.losses.Loss):
    """:func:`distillation_loss` on targets packed by :func:`pack_targets` (label, then teacher row)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.1, name: str = "distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = temperature
        self.alpha = alpha

    def call(self, y_true, y_pred):
        return distillation_loss(y_true[:, 0], y_true[:, 1:], y_pred, self.temperature, self.alpha)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"temperature": self.temperature, "alpha": self.alpha})
        return config


@keras.utils.register_keras_serializable(package="multimodal_tf")
class HardLabelAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """Accuracy on the label column of packed targets; named ``accuracy`` like recipe.metrics_for's."""

    def __init__(self, name: str = "accuracy", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true[:, :1], y_pred, sample_weight)


def teacher_fingerprint(teacher_run: str | Path) -> str:
    """Hash of the teacher's resolved config and of the weights file its model loads."""
    teacher_run = Path(teacher_run)
    weights = teacher_run / run_files.BEST_WEIGHTS
    if not weights.exists():  # as run_dir.load_trained_model falls back
        weights = teacher_run / run_files.LAST_WEIGHTS
    digest = hashlib.sha256((teacher_run / run_files.CONFIG_FILE).read_bytes())
    digest.update(weights.read_bytes())
    return digest.hexdigest()[:16]


def predict_teacher(teacher_run: str | Path) -> dict:
    """The teacher's probabilities on its train and val examples (full inputs, ``training=False``).

    Returns:
        ``ids`` (bytes [N]), ``probabilities`` (float32 [N, K]), ``splits``
        (the teacher split of each row) and the teacher's ``label_names``.
    """
    from multimodal_tf.evaluation import predict_split  # noqa: PLC0415  (evaluation imports plotting)

    config, metadata, model = run_files.load_trained_model(teacher_run)
    if config.data.targets:
        raise ValueError(
            f"teacher {teacher_run}: distillation needs a one-output teacher (it has data.targets)"
        )
    if config.model.head.type != "multiclass":
        raise ValueError(
            f"teacher {teacher_run}: distillation needs a multiclass head, got {config.model.head.type!r}"
        )
    ids, probabilities, splits = [], [], []
    for split in TEACHER_SPLITS:
        if split in metadata.shards:
            p, _, split_ids = predict_split(model, config, metadata, split)
            probabilities.append(p.astype(np.float32))
            ids.append(split_ids)
            splits += [split] * len(split_ids)
    ids = np.concatenate(ids)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"teacher {teacher_run}: example id {unique[counts > 1][0]!r} is not unique")
    return {
        "ids": ids,
        "probabilities": np.concatenate(probabilities),
        "splits": np.array(splits),
        "label_names": list(metadata.label_names),
    }


def teacher_targets(teacher_run: str | Path, run_dir: str | Path, verbose: bool = True) -> dict:
    """The teacher's targets for a student run: read from ``run_dir``'s cache, else predicted and cached.

    The cache is used when it was made from the same teacher config and
    weights, or when the teacher run no longer exists (nothing to compare
    against: the cache is then the teacher). Otherwise the teacher predicts
    and the cache is (re)written.
    """
    run_dir = Path(run_dir)
    cache, info_file = run_dir / run_files.TEACHER_TARGETS_FILE, run_dir / run_files.TEACHER_INFO_FILE
    teacher_exists = (Path(teacher_run) / run_files.CONFIG_FILE).exists()
    fingerprint = teacher_fingerprint(teacher_run) if teacher_exists else None
    if cache.exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        if fingerprint is None or info["fingerprint"] == fingerprint:
            if verbose:
                print(f"teacher targets: {cache} (cached; teacher not run)")
            with np.load(cache) as stored:
                return {**{k: stored[k] for k in stored.files}, "label_names": info["label_names"]}
    if not teacher_exists:
        raise FileNotFoundError(f"teacher {teacher_run} is not a run directory and {cache} holds no targets")
    targets = predict_teacher(teacher_run)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Fixed-width bytes and str arrays: np.load reads them without pickle.
    np.savez(
        cache,
        ids=np.asarray(targets["ids"].tolist(), dtype=bytes),
        probabilities=targets["probabilities"],
        splits=np.asarray(targets["splits"], dtype=str),
    )
    info = {
        "teacher": str(Path(teacher_run).resolve()),
        "fingerprint": fingerprint,
        "label_names": targets["label_names"],
        "examples": {s: int((targets["splits"] == s).sum()) for s in TEACHER_SPLITS},
    }
    info_file.write_text(json.dumps(info, indent=1))
    if verbose:
        print(f"teacher targets: {cache} ({len(targets['ids'])} examples from {teacher_run})")
    return targets


def split_ids(config: ExperimentConfig, split: str, metadata: DatasetMetadata) -> np.ndarray:
    """Every example id of ``split`` of the converted dataset (reads only the id feature)."""
    directory = Path(default_tfrecord_dir(config.data))
    spec = {features.ID: tf.io.FixedLenFeature([], tf.string)}
    dataset = (
        tf.data.TFRecordDataset([str(directory / f) for f in metadata.shards[split]])
        .batch(1024)
        .map(lambda s: tf.io.parse_example(s, spec)[features.ID])
    )
    return np.concatenate([batch.numpy() for batch in dataset] or [np.array([], object)])


def check_targets(targets: dict, config: ExperimentConfig, metadata: DatasetMetadata, cache: Path) -> None:
    """Raises ValueError unless the targets' classes are the student's and cover its train/val ids."""
    if list(targets["label_names"]) != list(metadata.label_names):
        raise ValueError(
            f"{cache}: teacher classes {list(targets['label_names'])} differ from the student's "
            f"{list(metadata.label_names)} (same manifest labels needed)"
        )
    known = set(targets["ids"].tolist())
    for split in TEACHER_SPLITS:
        if split in metadata.shards:
            missing = [i for i in split_ids(config, split, metadata).tolist() if i not in known]
            if missing:
                raise ValueError(
                    f"{cache}: no teacher prediction for {len(missing)} {split} example(s) of the student, "
                    f"e.g. id {missing[0].decode(errors='replace')!r} (teacher trained on another manifest?)"
                )


def objective(config: ExperimentConfig, targets: dict) -> recipe.Objective:
    """The recipe objective: DistillationLoss on (label, teacher row looked up by example id)."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(targets["ids"]), tf.range(len(targets["ids"]), dtype=tf.int64)
        ),
        default_value=-1,  # check_targets ruled it out before training
    )
    probabilities = tf.constant(targets["probabilities"], tf.float32)

    def to_target(x, y, ids):
        return x, pack_targets(y, tf.gather(probabilities, table.lookup(ids)))

    settings = config.distill
    return recipe.Objective(
        loss=DistillationLoss(settings.temperature, settings.alpha),
        metrics=[HardLabelAccuracy()],
        targets=lambda split: to_target,
    )


def distill(
    teacher_run: str | Path, config: ExperimentConfig, progress: bool = True, callbacks: Sequence = ()
) -> Path:
    """Trains ``config`` (the student) on ``teacher_run``'s cached targets; returns its run directory.

    The run directory is an ordinary run (``mmtf evaluate`` / ``mmtf
    export`` read it) plus ``teacher_targets.npz`` and ``teacher.json``.
    """
    from multimodal_tf.training import train  # noqa: PLC0415  (training imports plotting)

    if config.data.targets:
        raise ValueError("distillation trains one output: the student config must not set data.targets")
    if config.model.head.type != "multiclass":
        raise ValueError(f"distillation needs a multiclass student head, got {config.model.head.type!r}")
    metadata = prepare_data(config.data, progress=progress)
    run_dir = Path(config.train.output_dir)
    targets = teacher_targets(teacher_run, run_dir, verbose=bool(config.train.verbose))
    check_targets(targets, config, metadata, run_dir / run_files.TEACHER_TARGETS_FILE)
    return train(config, progress=False, callbacks=callbacks, objective=objective(config, targets))
