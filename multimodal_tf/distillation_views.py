"""Consistent teaching for ``mmtf distill``: the teacher's targets under each missing-modality view.

Training hides whole modalities (models.ModalityDropout clears presence
flags). With one cached teacher prediction per example, made on the full
example, a student whose audio was just hidden is asked to reproduce what
the teacher said after hearing it: a target that its input cannot support,
and one that carries little beyond the label when the teacher has learnt its
training set (docs/results.md, "Distillation"). Beyer et al. 2022
("Knowledge distillation: A good teacher is patient and consistent") find
that the teacher and the student must see the same view of each example.

A *view* is the set of modalities hidden from an example. The views cached
are every set :class:`models.ModalityDropout` can produce for the student's
modalities and rates: each subset of the modalities with a positive rate,
except all of the model's modalities (the layer always keeps one). The
teacher predicts each train and val example under each view once
(:func:`predict_views`), and while the student trains, the tf.data pipeline
draws a view per example with ModalityDropout's own rule
(models.hide_modalities) and pairs the student's input with the teacher's
prediction on that view (:func:`view_targets`). The student model itself
then has no modality dropout: the pipeline hides the modalities instead,
at the same rates, so that the target can follow.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from multimodal_tf.compat import tf
from multimodal_tf.data import features
from multimodal_tf.models import hide_modalities

FULL = "full"  # one target per example, the teacher on the full example (Hinton et al.)
CONSISTENT = "consistent"  # a target per missing-modality view (this module)
VIEW_MODES = (FULL, CONSISTENT)
ALL_PRESENT = ""  # the name of the view that hides nothing


def dropout_rates(model_config) -> dict[str, float]:
    """``model.modality_dropout``'s rate for each of the model's modalities."""
    return {m: float(getattr(model_config.modality_dropout, m)) for m in model_config.modalities}


def views_of(rates: Mapping[str, float]) -> list[tuple[str, ...]]:
    """The hidden-modality sets ModalityDropout can produce with ``rates`` (model modality -> rate).

    Returns:
        Sorted tuples of modality names, ``()`` (nothing hidden) first; never
        every modality of ``rates``.
    """
    modalities = sorted(rates)
    droppable = [m for m in modalities if rates[m] > 0]
    return [
        hidden
        for size in range(len(droppable) + 1)
        for hidden in itertools.combinations(droppable, size)
        if len(hidden) < len(modalities)
    ]


def view_name(hidden: Sequence[str]) -> str:
    """``()`` -> ``""``, ``("audio", "image")`` -> ``"audio+image"`` (how the cache names views)."""
    return "+".join(hidden)


def hide(x: Mapping, hidden: Sequence[str]) -> dict:
    """Features ``x`` with the modalities in ``hidden`` missing as training hides them.

    ModalityDropout clears presence flags and leaves the features as they
    are (the fusion masks a hidden modality's embedding); this does the
    same. Modalities ``x`` has no presence flag for are skipped (a teacher
    that does not read them).
    """
    x = dict(x)
    for modality in hidden:
        name = features.presence_name(modality)
        if name in x:
            x[name] = tf.zeros_like(x[name])
    return x


def predict_views(model, config, metadata, split: str, views: Sequence[Sequence[str]]):
    """``(probabilities [N, V, K], labels [N], ids [N])``: ``model`` on each view of each example."""
    from multimodal_tf.evaluation import predict_split_with  # noqa: PLC0415  (evaluation imports plotting)

    def predict(x):
        return np.stack([model(hide(x, hidden), training=False).numpy() for hidden in views], axis=1)

    return predict_split_with(predict, config, metadata, split)


def view_targets(
    probabilities: np.ndarray,
    views: Sequence[Sequence[str]],
    rates: Mapping[str, float],
    seed: int,
):
    """A tf.data map ``(x, rows [B]) -> (x with a view hidden, teacher row [B, K] for that view)``.

    Each example's view is drawn with ModalityDropout's rule
    (models.hide_modalities) at ``rates``, from a generator whose state
    carries across epochs (so each epoch draws new views).

    Args:
        probabilities: float [N, V, K], view ``v`` of row ``n`` in ``[n, v]``.
        views: the V hidden-modality tuples, as :func:`views_of` lists them.
        rates: model modality -> rate of hiding it.
        seed: the generator's seed.
    """
    modalities = sorted(rates)
    # Hidden set -> view index, the set coded as a bitmask over ``modalities``
    # (-1: a set ModalityDropout cannot produce).
    index = np.full(2 ** len(modalities), -1, np.int64)
    for v, hidden in enumerate(views):
        index[sum(2 ** modalities.index(m) for m in hidden)] = v
    index = tf.constant(index)
    bits = tf.constant([2**i for i in range(len(modalities))], tf.float32)
    rate_tensor = tf.constant([rates[m] for m in modalities], tf.float32)
    table = tf.constant(probabilities, tf.float32)
    generator = tf.random.Generator.from_seed(seed)

    def apply(x, rows):
        flags = tf.stack([tf.cast(x[features.presence_name(m)], tf.float32) for m in modalities], axis=1)
        shape = tf.shape(flags)
        visible = hide_modalities(flags, rate_tensor, generator.uniform(shape), generator.uniform(shape))
        code = tf.cast(tf.reduce_sum((flags - visible) * bits, axis=1), tf.int64)
        view = tf.gather(index, code)
        x = dict(x)
        for i, modality in enumerate(modalities):
            name = features.presence_name(modality)
            x[name] = tf.cast(visible[:, i], x[name].dtype)
        return x, tf.gather_nd(table, tf.stack([rows, view], axis=1))

    return apply
