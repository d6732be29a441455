"""Weighted-sum fusion with learned, presence-aware modality weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import FusionConfig, option
from multimodal_tf.fusion.base import FusionLayer, build_sublayer, masked_softmax, zero_absent
from multimodal_tf.registry import FUSIONS


@dataclasses.dataclass(frozen=True)
class WeightedSumFusionConfig(FusionConfig):
    """``weighted_sum``: the arguments of :class:`WeightedSumFusion`."""

    name: str = "weighted_sum"
    hidden_dim: int = option(64, minimum=1)
    dropout_rate: float = option(0.1, minimum=0.0)


@FUSIONS.register("weighted_sum", config=WeightedSumFusionConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class WeightedSumFusion(FusionLayer):
    """Projects each modality to ``hidden_dim`` and averages with learned weights.

    The modality weights are a softmax of one learned logit per modality,
    taken over the modalities present in each example (a learned, masked
    version of the weighted averaging of modality representations used e.g.
    by Vielzeuf et al., 2018, "CentralNet"). An absent modality gets weight 0
    and the remaining weights renormalise to 1.

    Call arguments:
        embeddings: dict modality -> float [B, D_m].
        presence: dict modality -> float 0/1 [B].

    Returns:
        [B, hidden_dim]; all zeros for an example with no modality present.

    Args:
        modalities: modality names.
        hidden_dim: size of the common projection.
        dropout_rate: dropout on the fused vector.
        **kwargs: standard layer arguments.
    """

    def __init__(self, modalities: Sequence[str], hidden_dim: int = 64, dropout_rate: float = 0.0, **kwargs):
        super().__init__(modalities, **kwargs)
        self.hidden_dim = hidden_dim
        self.dropout_rate = dropout_rate
        self.projections = {
            m: keras.layers.Dense(hidden_dim, activation="relu", name=f"{m}_projection")
            for m in self.modalities
        }
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def build(self, input_shape):
        self.modality_logits = self.add_weight(
            name="modality_logits", shape=(len(self.modalities),), initializer="zeros", trainable=True
        )
        for m in self.modalities:
            build_sublayer(self.projections[m], input_shape[m])
        super().build(input_shape)

    def call(self, embeddings, presence, training=None):
        self._check_keys(embeddings, presence)
        weights = masked_softmax(self.modality_logits, self.stacked_presence(presence, tf.float32))
        weights = tf.cast(weights, self.compute_dtype)  # [B, M]
        projected = tf.stack(
            [zero_absent(self.projections[m](embeddings[m]), presence[m]) for m in self.modalities], axis=1
        )  # [B, M, hidden_dim]
        fused = tf.reduce_sum(projected * weights[:, :, None], axis=1)
        return self.dropout(fused, training=training)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "dropout_rate": self.dropout_rate})
        return config
