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
``mmtf distill`` into the same run directory reuses them when the teacher and
the views are unchanged (or the teacher is gone). The teacher predicts with
``training=False``. ``distill.views`` says on what:

- ``full`` (default): on the full examples only; the student's own modality
  dropout hides modalities of its inputs, so it is asked for the teacher's
  full-information prediction from what is left.
- ``consistent``: on every missing-modality view of each example that the
  student's modality dropout can produce, and the student trains on a view
  drawn per example with its target on that same view
  (distillation_views.py; Beyer et al. 2022).

Models output probabilities, not logits; ``log p`` are logits up to a
per-example constant, which the softmax at any temperature ignores, so
``softmax(log p / T)`` is the softened distribution of Hinton et al.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from multimodal_tf import distillation_views as views_lib
from multimodal_tf import recipe
from multimodal_tf import run_dir as run_files
from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ExperimentConfig, ModalityDropoutConfig
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


def predict_teacher(teacher_run: str | Path, views: Sequence[Sequence[str]] = ((),)) -> dict:
    """The teacher's probabilities on its train and val examples under each view (``training=False``).

    Args:
        teacher_run: the teacher's run directory.
        views: hidden-modality tuples (distillation_views.views_of); ``()``
            is the full example.

    Returns:
        ``ids`` (bytes [N]), ``probabilities`` (float32 [N, V, K]), ``splits``
        (the teacher split of each row), ``views`` (their names) and the
        teacher's ``label_names``.
    """
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
            p, _, split_ids = views_lib.predict_views(model, config, metadata, split, views)
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
        "views": np.array([views_lib.view_name(v) for v in views], dtype=str),
        "label_names": list(metadata.label_names),
    }


def read_cache(cache: Path, info: dict) -> dict:
    """A ``teacher_targets.npz`` as :func:`predict_teacher` returns it.

    A cache written before views existed holds [N, K] probabilities of the
    full examples: it reads as the one view ``""``.
    """
    with np.load(cache) as stored:
        targets = {k: stored[k] for k in stored.files}
    if targets["probabilities"].ndim == 2:
        targets["probabilities"] = targets["probabilities"][:, None, :]
        targets["views"] = np.array([views_lib.ALL_PRESENT])
    return {**targets, "label_names": info["label_names"]}


def teacher_targets(
    teacher_run: str | Path,
    run_dir: str | Path,
    views: Sequence[Sequence[str]] = ((),),
    verbose: bool = True,
) -> dict:
    """The teacher's targets for a student run: read from ``run_dir``'s cache, else predicted and cached.

    The cache is used when it holds ``views`` and was made from the same
    teacher config and weights, or from any teacher when the teacher run no
    longer exists (nothing to compare against: the cache is then the
    teacher). Otherwise the teacher predicts and the cache is (re)written.
    """
    run_dir = Path(run_dir)
    cache, info_file = run_dir / run_files.TEACHER_TARGETS_FILE, run_dir / run_files.TEACHER_INFO_FILE
    teacher_exists = (Path(teacher_run) / run_files.CONFIG_FILE).exists()
    fingerprint = teacher_fingerprint(teacher_run) if teacher_exists else None
    names = [views_lib.view_name(v) for v in views]
    if cache.exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        stored = read_cache(cache, info)
        same_views = stored["views"].tolist() == names
        if same_views and (fingerprint is None or info["fingerprint"] == fingerprint):
            if verbose:
                print(f"teacher targets: {cache} (cached; teacher not run)")
            return stored
        if not teacher_exists:
            raise ValueError(
                f"{cache} holds the views {stored['views'].tolist()}, this student needs {names}, "
                f"and teacher {teacher_run} is not a run directory to predict them"
            )
    if not teacher_exists:
        raise FileNotFoundError(f"teacher {teacher_run} is not a run directory and {cache} holds no targets")
    targets = predict_teacher(teacher_run, views)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Fixed-width bytes and str arrays: np.load reads them without pickle.
    np.savez(
        cache,
        ids=np.asarray(targets["ids"].tolist(), dtype=bytes),
        probabilities=targets["probabilities"],
        splits=np.asarray(targets["splits"], dtype=str),
        views=targets["views"],
    )
    info = {
        "teacher": str(Path(teacher_run).resolve()),
        "fingerprint": fingerprint,
        "label_names": targets["label_names"],
        "examples": {s: int((targets["splits"] == s).sum()) for s in TEACHER_SPLITS},
        "views": names,
    }
    info_file.write_text(json.dumps(info, indent=1))
    if verbose:
        print(
            f"teacher targets: {cache} ({len(targets['ids'])} examples x {len(names)} views from {teacher_run})"
        )
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


def objective(
    config: ExperimentConfig, targets: dict, rates: Mapping[str, float] | None = None
) -> recipe.Objective:
    """The recipe objective: DistillationLoss on (label, teacher row looked up by example id).

    Args:
        config: the student config (``distill`` settings, ``train.seed``).
        targets: :func:`teacher_targets`' dict; view 0 is the full example.
        rates: with ``distill.views: consistent``, the modality dropout rates
            the train split's views are drawn with
            (distillation_views.view_targets); val always gets view 0.
    """
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(targets["ids"]), tf.range(len(targets["ids"]), dtype=tf.int64)
        ),
        default_value=-1,  # check_targets ruled it out before training
    )
    full = tf.constant(targets["probabilities"][:, 0], tf.float32)

    def to_target(x, y, ids):
        return x, pack_targets(y, tf.gather(full, table.lookup(ids)))

    def targets_for(split):
        if rates is None or split != "train":
            return to_target
        views = [tuple(name.split("+")) if name else () for name in targets["views"].tolist()]
        apply_view = views_lib.view_targets(targets["probabilities"], views, rates, config.train.seed)

        def to_view_target(x, y, ids):
            x, teacher = apply_view(x, table.lookup(ids))
            return x, pack_targets(y, teacher)

        return to_view_target

    settings = config.distill
    return recipe.Objective(
        loss=DistillationLoss(settings.temperature, settings.alpha),
        metrics=[HardLabelAccuracy()],
        targets=targets_for,
    )


def distill(
    teacher_run: str | Path, config: ExperimentConfig, progress: bool = True, callbacks: Sequence = ()
) -> Path:
    """Trains ``config`` (the student) on ``teacher_run``'s cached targets; returns its run directory.

    The run directory is an ordinary run (``mmtf evaluate`` / ``mmtf
    export`` read it) plus ``teacher_targets.npz`` and ``teacher.json``.
    With ``distill.views: consistent`` the student model is built without
    modality dropout (its resolved config says 0): the input pipeline hides
    modalities at the configured rates instead (teacher.json keeps them).
    """
    from multimodal_tf.training import train  # noqa: PLC0415  (training imports plotting)

    if config.data.targets:
        raise ValueError("distillation trains one output: the student config must not set data.targets")
    if config.model.head.type != "multiclass":
        raise ValueError(f"distillation needs a multiclass student head, got {config.model.head.type!r}")
    metadata = prepare_data(config.data, progress=progress)
    run_dir = Path(config.train.output_dir)
    rates, views = None, [()]
    if config.distill.views == views_lib.CONSISTENT:
        rates = views_lib.dropout_rates(config.model)
        views = views_lib.views_of(rates)
        model = dataclasses.replace(config.model, modality_dropout=ModalityDropoutConfig())
        config = dataclasses.replace(config, model=model)
    targets = teacher_targets(teacher_run, run_dir, views, verbose=bool(config.train.verbose))
    check_targets(targets, config, metadata, run_dir / run_files.TEACHER_TARGETS_FILE)
    if rates is not None:
        info_file = run_dir / run_files.TEACHER_INFO_FILE
        info = json.loads(info_file.read_text())
        info_file.write_text(json.dumps({**info, "view_rates": rates}, indent=1))
    return train(config, progress=False, callbacks=callbacks, objective=objective(config, targets, rates))
