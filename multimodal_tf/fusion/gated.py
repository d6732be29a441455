"""Gated fusion: Gated Multimodal Units extended to any number of modalities."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import FusionConfig, option
from multimodal_tf.fusion.base import FusionLayer, build_sublayer, zero_absent
from multimodal_tf.registry import FUSIONS


@dataclasses.dataclass(frozen=True)
class GatedFusionConfig(FusionConfig):
    """``gated``: the arguments of :class:`GatedFusion`."""

    name: str = "gated"
    hidden_dim: int = option(64, minimum=1)
    dropout_rate: float = option(0.1, minimum=0.0)


@FUSIONS.register("gated", config=GatedFusionConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class GatedFusion(FusionLayer):
    """Gated Multimodal Unit (Arevalo et al., 2017, "Gated Multimodal Units
    for Information Fusion"), generalised from two to M modalities.

    Each modality gives a candidate ``h_m = tanh(W_m x_m)``. Gates
    ``z_m = sigmoid(W_z [x_1, ..., x_M, presence])`` see all (masked)
    modalities, so one modality can decide how much to trust another. Gates
    are multiplied by presence and normalised over the modalities of each
    example: ``output = sum_m z_m p_m h_m / sum_m z_m p_m``. With two
    modalities this is the GMU's ``z h_1 + (1 - z) h_2`` up to the gate
    parameterisation.

    Call arguments:
        embeddings: dict modality -> float [B, D_m].
        presence: dict modality -> float 0/1 [B].

    Returns:
        [B, hidden_dim]; zeros for an example with no modality present.

    Args:
        modalities: modality names.
        hidden_dim: size of the candidates and the output.
        dropout_rate: dropout on the fused vector.
        **kwargs: standard layer arguments.
    """

    def __init__(self, modalities: Sequence[str], hidden_dim: int = 64, dropout_rate: float = 0.0, **kwargs):
        super().__init__(modalities, **kwargs)
        self.hidden_dim = hidden_dim
        self.dropout_rate = dropout_rate
        self.candidates = {
            m: keras.layers.Dense(hidden_dim, activation="tanh", name=f"{m}_candidate")
            for m in self.modalities
        }
        self.gate = keras.layers.Dense(len(self.modalities) * hidden_dim, activation="sigmoid", name="gate")
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def build(self, input_shape):
        for m in self.modalities:
            build_sublayer(self.candidates[m], input_shape[m])
        gate_inputs = sum(int(input_shape[m][-1]) for m in self.modalities) + len(self.modalities)
        build_sublayer(self.gate, [None, gate_inputs])
        super().build(input_shape)

    def call(self, embeddings, presence, training=None):
        self._check_keys(embeddings, presence)
        masked = [zero_absent(embeddings[m], presence[m]) for m in self.modalities]
        flags = self.stacked_presence(presence)  # [B, M]
        gates = self.gate(tf.concat(masked + [flags], axis=-1))
        gates = tf.reshape(gates, [-1, len(self.modalities), self.hidden_dim])  # [B, M, hidden_dim]
        gates = gates * flags[:, :, None]
        candidates = tf.stack(
            [
                zero_absent(self.candidates[m](x), presence[m])
                for m, x in zip(self.modalities, masked, strict=True)
            ],
            axis=1,
        )  # [B, M, hidden_dim]
        fused = tf.math.divide_no_nan(tf.reduce_sum(gates * candidates, axis=1), tf.reduce_sum(gates, axis=1))
        return self.dropout(fused, training=training)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "dropout_rate": self.dropout_rate})
        return config
