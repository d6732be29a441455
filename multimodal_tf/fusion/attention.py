"""Cross-modal attention fusion over one token per modality plus a CLS token."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ConfigFieldError, FusionConfig, option
from multimodal_tf.fusion.base import FusionLayer, build_sublayer, zero_absent
from multimodal_tf.registry import FUSIONS


@dataclasses.dataclass(frozen=True)
class AttentionFusionConfig(FusionConfig):
    """``attention``: the arguments of :class:`AttentionFusion`."""

    name: str = "attention"
    hidden_dim: int = option(64, minimum=1)
    num_heads: int = option(4, minimum=1)
    dropout_rate: float = option(0.1, minimum=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_dim % self.num_heads:
            raise ConfigFieldError(
                "num_heads", f"must divide hidden_dim {self.hidden_dim}, got {self.num_heads}"
            )


@FUSIONS.register("attention", config=AttentionFusionConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class AttentionFusion(FusionLayer):
    """One Transformer encoder block over modality tokens, read out at a CLS token.

    Each modality embedding is projected to a ``hidden_dim`` token and tagged
    with a learned modality-type embedding; a learned CLS token is prepended
    (as in BERT, Devlin et al., 2019, and ViLT, Kim et al., 2021). Multi-head
    attention (Vaswani et al., 2017) lets every token attend across modalities,
    in the spirit of the cross-modal attention of MulT (Tsai et al., 2019).
    Absent modalities are masked out as keys; the CLS token is always
    attendable, so an example with no modality present still has a defined
    output. The output is the CLS token after the block (post-norm residual
    attention and feed-forward sublayers).

    Call arguments:
        embeddings: dict modality -> float [B, D_m].
        presence: dict modality -> float 0/1 [B].

    Returns:
        [B, hidden_dim]: the CLS token.

    Args:
        modalities: modality names.
        hidden_dim: token size.
        num_heads: attention heads; each has ``hidden_dim // num_heads`` dims.
        dropout_rate: dropout on attention weights and sublayer outputs.
        **kwargs: standard layer arguments.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        hidden_dim: int = 64,
        num_heads: int = 4,
        dropout_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__(modalities, **kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"{self.name}: hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}"
            )
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.projections = {
            m: keras.layers.Dense(hidden_dim, name=f"{m}_projection") for m in self.modalities
        }
        self.attention = keras.layers.MultiHeadAttention(
            num_heads, hidden_dim // num_heads, dropout=dropout_rate, name="attention"
        )
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="attention_norm")
        self.feedforward_inner = keras.layers.Dense(
            2 * hidden_dim, activation="gelu", name="feedforward_inner"
        )
        self.feedforward_outer = keras.layers.Dense(hidden_dim, name="feedforward_outer")
        self.feedforward_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="feedforward_norm")
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def build(self, input_shape):
        self.cls_token, self.modality_embedding = self.add_token_weights(self.hidden_dim)
        # A MultiHeadAttention built lazily on first call is left at its
        # initial weights when a Keras SavedModel is revived: build it here.
        sequence_shape = tf.TensorShape([None, len(self.modalities) + 1, self.hidden_dim])
        with tf.name_scope(self.attention.name):
            self.attention._build_from_signature(query=sequence_shape, value=sequence_shape)
        for m in self.modalities:
            build_sublayer(self.projections[m], input_shape[m])
        build_sublayer(self.attention_norm, sequence_shape)
        build_sublayer(self.feedforward_inner, sequence_shape)
        build_sublayer(self.feedforward_outer, [None, len(self.modalities) + 1, 2 * self.hidden_dim])
        build_sublayer(self.feedforward_norm, sequence_shape)
        super().build(input_shape)

    def call(self, embeddings, presence, training=None):
        self._check_keys(embeddings, presence)
        tokens = tf.stack(
            [self.projections[m](zero_absent(embeddings[m], presence[m])) for m in self.modalities], axis=1
        )  # [B, M, hidden_dim]
        tokens = tokens + tf.cast(self.modality_embedding, tokens.dtype)[None]
        batch_size = tf.shape(tokens)[0]
        cls = tf.tile(tf.cast(self.cls_token, tokens.dtype), [batch_size, 1, 1])
        sequence = tf.concat([cls, tokens], axis=1)  # [B, 1 + M, hidden_dim]
        flags = self.stacked_presence(presence, tf.float32)
        key_mask = tf.concat([tf.ones_like(flags[:, :1]), flags], axis=1) > 0  # [B, 1 + M]
        # Every query may attend to the CLS token and the present modalities.
        attention_mask = tf.tile(key_mask[:, None, :], [1, len(self.modalities) + 1, 1])
        attended = self.attention(sequence, sequence, attention_mask=attention_mask, training=training)
        sequence = self.attention_norm(sequence + self.dropout(attended, training=training))
        feedforward = self.feedforward_outer(self.feedforward_inner(sequence))
        sequence = self.feedforward_norm(sequence + self.dropout(feedforward, training=training))
        return sequence[:, 0]

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {"hidden_dim": self.hidden_dim, "num_heads": self.num_heads, "dropout_rate": self.dropout_rate}
        )
        return config
