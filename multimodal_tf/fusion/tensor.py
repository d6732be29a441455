"""Low-rank multimodal tensor fusion."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import FusionConfig, option
from multimodal_tf.fusion.base import FusionLayer, zero_absent
from multimodal_tf.registry import FUSIONS


@dataclasses.dataclass(frozen=True)
class TensorFusionConfig(FusionConfig):
    """``tensor``: the arguments of :class:`TensorFusion`."""

    name: str = "tensor"
    hidden_dim: int = option(64, minimum=1)
    rank: int = option(4, minimum=1)
    dropout_rate: float = option(0.1, minimum=0.0)


@FUSIONS.register("tensor", config=TensorFusionConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class TensorFusion(FusionLayer):
    """Low-rank Multimodal Fusion (Liu et al., 2018, "Efficient Low-rank
    Multimodal Fusion with Modality-Specific Factors").

    Tensor Fusion (Zadeh et al., 2017, "Tensor Fusion Network") appends a
    constant 1 to each modality vector, ``z_m = [1, x_m]``, and maps their
    outer product ``z_1 ⊗ ... ⊗ z_M`` linearly to the output, which models
    unimodal, bimodal and trimodal interactions at once. LMF computes the same
    map with rank-r modality-specific factors and never forms the tensor:
    ``output = sum_r lambda_r * prod_m (W_m^(r) z_m) + b``.

    An absent modality's vector is replaced by the constant ``[1, 0, ..., 0]``:
    its factor becomes a learned constant, and only the other modalities'
    terms vary with the input (in TFN terms, only the interactions among the
    present modalities remain).

    Call arguments:
        embeddings: dict modality -> float [B, D_m].
        presence: dict modality -> float 0/1 [B].

    Returns:
        [B, hidden_dim].

    Args:
        modalities: modality names.
        hidden_dim: output size.
        rank: rank r of the factorisation.
        dropout_rate: dropout on the fused vector.
        **kwargs: standard layer arguments.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        hidden_dim: int = 64,
        rank: int = 4,
        dropout_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__(modalities, **kwargs)
        if rank < 1:
            raise ValueError(f"{self.name}: rank must be >= 1, got {rank}")
        self.hidden_dim = hidden_dim
        self.rank = rank
        self.dropout_rate = dropout_rate
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def build(self, input_shape):
        self.factors = {}
        for m in self.modalities:
            size = int(input_shape[m][-1]) + 1  # +1 for the appended constant
            self.factors[m] = self.add_weight(
                name=f"{m}_factor",
                shape=(self.rank, size, self.hidden_dim),
                initializer=keras.initializers.GlorotNormal(),
            )
        self.fusion_weights = self.add_weight(
            name="fusion_weights", shape=(self.rank,), initializer=keras.initializers.GlorotNormal()
        )
        self.fusion_bias = self.add_weight(name="fusion_bias", shape=(self.hidden_dim,), initializer="zeros")
        super().build(input_shape)

    def call(self, embeddings, presence, training=None):
        self._check_keys(embeddings, presence)
        product = None
        for m in self.modalities:
            x = zero_absent(embeddings[m], presence[m])
            z = tf.concat([tf.ones_like(x[:, :1]), x], axis=-1)  # [B, D_m + 1]
            factor = tf.einsum("bd,rdh->brh", z, tf.cast(self.factors[m], z.dtype))  # [B, rank, hidden_dim]
            product = factor if product is None else product * factor
        fused = tf.einsum("brh,r->bh", product, tf.cast(self.fusion_weights, product.dtype))
        fused = fused + tf.cast(self.fusion_bias, fused.dtype)
        return self.dropout(fused, training=training)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "rank": self.rank,
                "dropout_rate": self.dropout_rate,
            }
        )
        return config
