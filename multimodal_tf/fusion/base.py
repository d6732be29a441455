"""Shared pieces of the fusion layers: the base class and presence masking.

Every fusion layer is called as ``fusion(embeddings, presence)`` with two
dicts keyed by modality: ``embeddings[m]`` is float [B, D_m] (D_m may differ
between modalities; a fusion that ``consumes_sequences`` may also get a
(sequence [B, T_m, D_m], bool mask [B, T_m]) tuple) and ``presence[m]`` is a
float 0/1 flag [B]. A modality
whose flag is 0 must not change the output, whatever its embedding holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import MODALITIES

# Added to the logits of absent modalities before a softmax. Weights are
# computed in float32 (see masked_softmax), where exp(-1e9) is exactly 0.
_LARGE_NEGATIVE = -1e9


class FusionLayer(keras.layers.Layer):
    """Base class: holds the ordered modality names and validates inputs.

    Subclasses implement ``call(embeddings, presence, training=None)`` and
    take their family config's fields (``FusionConfig`` subclasses registered
    with them) as constructor arguments. They build their sublayers in
    ``build``, so that a revived Keras SavedModel has them before any call.

    Args:
        modalities: modality names in the order the layer stacks them.
        **kwargs: standard layer arguments (``name``, ``dtype``, ...).
    """

    # Decision-level fusion outputs class probabilities, so the model adds no
    # classifier head after it; its constructor also takes ``num_outputs``
    # and ``output_activation``.
    produces_probabilities = False
    # A fusion over token sequences: models.build_model then builds the
    # encoders that can with ``sequence_output=True`` and passes their
    # (sequence [B, T, D], bool mask [B, T]) tuples as ``embeddings[m]``;
    # an encoder without sequence output still passes its [B, D] embedding.
    consumes_sequences = False

    def __init__(self, modalities: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        modalities = tuple(modalities)
        unknown = [m for m in modalities if m not in MODALITIES]
        if not modalities or unknown or len(set(modalities)) != len(modalities):
            raise ValueError(
                f"{type(self).__name__}: modalities must be distinct names from {MODALITIES}, got {modalities}"
            )
        self.modalities = modalities

    def _check_keys(self, embeddings: dict, presence: dict) -> None:
        for what, value in (("embeddings", embeddings), ("presence", presence)):
            if not isinstance(value, dict) or set(value) != set(self.modalities):
                keys = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise ValueError(f"{self.name}: {what} must be a dict keyed by {self.modalities}, got {keys}")

    def stacked_presence(self, presence: dict, dtype=None) -> tf.Tensor:
        """Presence flags as one [B, M] tensor in ``self.modalities`` order."""
        dtype = dtype or self.compute_dtype
        return tf.stack([tf.cast(presence[m], dtype) for m in self.modalities], axis=1)

    def add_token_weights(self, width: int):
        """The readout token [1, 1, width] and one type embedding per modality [M, width].

        Shared by the attention fusions (BERT-style init, stddev 0.02); the
        names are part of their checkpoints.
        """
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        cls_token = self.add_weight(name="cls_token", shape=(1, 1, width), initializer=init)
        modality_embedding = self.add_weight(
            name="modality_embedding", shape=(len(self.modalities), width), initializer=init
        )
        return cls_token, modality_embedding

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"modalities": list(self.modalities)})
        return config


def build_sublayer(layer: keras.layers.Layer, input_shape) -> None:
    """Builds ``layer`` from a parent's ``build``, under the layer's own name.

    Without the name scope its weights would be called plain ``kernel:0``,
    and an HDF5 weights file cannot hold two weights of one name.
    """
    with tf.name_scope(layer.name):
        layer.build(tf.TensorShape(input_shape))


def masked_softmax(logits: tf.Tensor, presence: tf.Tensor) -> tf.Tensor:
    """Softmax over the present modalities only, in float32.

    Args:
        logits: [M] or [B, M] logits.
        presence: [B, M] 0/1 flags.

    Returns:
        float32 [B, M] weights: 0 for absent modalities, summing to 1 over the
        present ones (all 0 for an example with no modality present).
    """
    logits = tf.cast(logits, tf.float32)
    presence = tf.cast(presence, tf.float32)
    logits = tf.broadcast_to(logits, tf.shape(presence))
    masked = tf.where(presence > 0, logits, _LARGE_NEGATIVE)
    # Multiplying by presence zeroes the uniform weights of an all-absent row.
    return tf.nn.softmax(masked, axis=-1) * presence


def zero_absent(embedding: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """[B, D] embedding with the rows of absent examples set to exactly 0.

    ``tf.where`` (not a product) so that even a non-finite embedding of an
    absent modality cannot leak into the output.
    """
    present = tf.cast(present, tf.float32) > 0
    return tf.where(present[:, None], embedding, tf.zeros_like(embedding))
