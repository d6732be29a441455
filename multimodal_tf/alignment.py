"""Contrastive alignment: a shared embedding space for the model's modalities.

``model.alignment`` adds, per aligned modality, a projection of its encoder
output (before fusion) to ``dim`` units and an L2 normalisation; the unit
vectors of each pair are pulled together by a symmetric InfoNCE loss (CLIP,
Radford et al., 2021) added to the model's losses. The projected embeddings
are what ``embed_<modality>`` signatures serve and what retrieval ranks.

Only examples where both modalities of a pair are present count: a missing
modality's encoder sees zeros, and its vector would be a meaningless
positive and a meaningless negative, so those rows are neither anchors nor
negatives. Presence here is the input's, not the modality-dropout output's:
modality dropout hides a modality from the fusion, not from its encoder.

Under a distribution strategy each replica gathers the other replicas'
embeddings (``distribute.gather_replicas``: ``ReplicaContext.all_gather``,
which is differentiable), so negatives are the whole global batch and the
loss equals the one-replica loss on the same batch; tested with 2 mirrored
replicas and with 2 MultiWorkerMirroredStrategy worker processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from multimodal_tf import distribute
from multimodal_tf.compat import keras, tf
from multimodal_tf.config import AlignmentConfig
from multimodal_tf.data.features import presence_name

LOSS_NAME = "alignment_loss"
# Logit of an excluded column: exp() of it is 0 in float32, and it stays
# finite (an -inf logit row with no valid column would give NaN).
_EXCLUDED = -1e9


def projection_name(modality: str) -> str:
    return f"{modality}_projection"


def embedding_name(modality: str) -> str:
    """The unit-vector layer of ``modality`` (what ``embed_<modality>`` returns)."""
    return f"{modality}_embedding"


def _replica_offset(local_size: tf.Tensor) -> tuple[tf.Tensor, int]:
    """(row of this replica's first example in the gathered batch, number of replicas)."""
    replicas = distribute.num_replicas_in_step()
    if replicas == 1:
        return tf.constant(0, tf.int32), 1
    sizes = distribute.gather_replicas(tf.reshape(local_size, [1]))  # [R]; the last batch can be uneven
    replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)
    return tf.reduce_sum(sizes[:replica]), replicas


def info_nce_pair(a: tf.Tensor, b: tf.Tensor, valid: tf.Tensor, temperature: float) -> tf.Tensor:
    """Symmetric InfoNCE of one pair, this replica's share of the global mean.

    Args:
        a: [B, D] unit vectors of the first modality (this replica's rows).
        b: [B, D] unit vectors of the second modality, row i pairs with a[i].
        valid: [B] float 0/1, 1 where both modalities are present.
        temperature: the similarities are divided by it.

    Returns:
        A float32 scalar. Outside a strategy: the mean over valid rows of
        (CE(a_i -> b) + CE(b_i -> a)) / 2, where each CE is over the valid
        rows of the batch; 0 with no valid row. Under R replicas each
        returns R x (its rows' sum) / (global valid count), so that the
        replicas' mean (what Keras reports, and 1/R of the summed
        gradients) is the one-replica value.
    """
    a, b, valid = tf.cast(a, tf.float32), tf.cast(b, tf.float32), tf.cast(valid, tf.float32)
    a_all, b_all, valid_all = (distribute.gather_replicas(t) for t in (a, b, valid))
    offset, replicas = _replica_offset(tf.shape(a)[0])
    positives = offset + tf.range(tf.shape(a)[0])
    excluded = (1.0 - valid_all)[None, :] * _EXCLUDED

    def cross_entropy(queries, keys):
        logits = tf.matmul(queries, keys, transpose_b=True) / temperature + excluded
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits)

    per_row = 0.5 * (cross_entropy(a, b_all) + cross_entropy(b, a_all)) * valid
    return replicas * tf.reduce_sum(per_row) / tf.maximum(tf.reduce_sum(valid_all), 1.0)


@keras.utils.register_keras_serializable(package="multimodal_tf")
class ContrastiveAlignment(keras.layers.Layer):
    """Weighted sum over pairs of the symmetric InfoNCE loss (:func:`info_nce_pair`).

    Call arguments:
        embeddings: dict modality -> float [B, D] unit vectors.
        presence: dict modality -> float 0/1 [B].

    Returns:
        A float32 scalar: ``weight`` x the mean over pairs of their losses.

    Args:
        pairs: modality pairs, e.g. ``[["image", "text"]]``.
        temperature: softmax temperature of the cosine similarities.
        weight: multiplies the loss.
        **kwargs: standard layer arguments.
    """

    def __init__(self, pairs: Sequence[Sequence[str]], temperature: float, weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not pairs or temperature <= 0:
            raise ValueError(f"{self.name}: need pairs and temperature > 0, got {pairs}, {temperature}")
        self.pairs = [list(pair) for pair in pairs]
        self.temperature = temperature
        self.weight = weight

    def call(self, embeddings: Mapping[str, tf.Tensor], presence: Mapping[str, tf.Tensor]) -> tf.Tensor:
        losses = []
        for first, second in self.pairs:
            valid = tf.cast(presence[first], tf.float32) * tf.cast(presence[second], tf.float32)
            losses.append(info_nce_pair(embeddings[first], embeddings[second], valid, self.temperature))
        return self.weight * tf.add_n(losses) / len(losses)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"pairs": self.pairs, "temperature": self.temperature, "weight": self.weight})
        return config


def add_alignment(model: keras.Model, alignment: AlignmentConfig, inputs: dict, encoded: dict) -> None:
    """Adds projections, unit normalisation and the alignment loss to a functional model.

    Args:
        model: the functional model built from ``inputs``.
        alignment: ``model.alignment`` (enabled).
        inputs: the model's named inputs (presence flags ``<modality>_present``).
        encoded: modality -> encoder output [B, D_m] (before fusion).
    """
    unit = {}
    for modality in alignment.modalities:
        if isinstance(encoded[modality], tuple | list):
            raise ValueError(
                f"model.alignment: the {modality} encoder returns a sequence (for a sequence fusion); "
                "alignment needs pooled [B, D] encoder outputs"
            )
        # float32: similarities / temperature overflow float16 logits.
        projected = keras.layers.Dense(alignment.dim, dtype="float32", name=projection_name(modality))(
            encoded[modality]
        )
        unit[modality] = keras.layers.UnitNormalization(
            axis=-1, dtype="float32", name=embedding_name(modality)
        )(projected)
    presence = {m: inputs[presence_name(m)] for m in alignment.modalities}
    loss = ContrastiveAlignment(
        alignment.pairs, alignment.temperature, alignment.weight, name="contrastive_alignment"
    )(unit, presence)
    model.add_loss(loss)
    model.add_metric(loss, name=LOSS_NAME)


def embedding_model(model: keras.Model, modality: str) -> keras.Model:
    """The model's ``modality`` input -> its unit embedding [B, dim] (encoder, projection, norm).

    Raises:
        ValueError: the model has no alignment for ``modality``.
    """
    try:
        unit = model.get_layer(embedding_name(modality))
    except ValueError:
        raise ValueError(
            f"the model has no {modality} embedding; set model.alignment.pairs with {modality!r}"
        ) from None
    encoder = model.get_layer(f"{modality}_encoder")
    projection = model.get_layer(projection_name(modality))
    inputs = model.get_layer(modality).output  # the keras.Input named after the modality
    return keras.Model(inputs, unit(projection(encoder(inputs))), name=f"embed_{modality}")
