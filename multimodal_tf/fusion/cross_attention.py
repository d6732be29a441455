"""Token-level cross-modal attention: one Transformer over every modality's tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ConfigFieldError, FusionConfig, option
from multimodal_tf.fusion.base import FusionLayer, build_sublayer
from multimodal_tf.registry import FUSIONS

READOUTS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class CrossAttentionFusionConfig(FusionConfig):
    """``cross_attention``: the arguments of :class:`CrossAttentionFusion`."""

    name: str = "cross_attention"
    hidden_dim: int = option(64, minimum=1)  # token width inside the Transformer
    num_heads: int = option(4, minimum=1)
    num_layers: int = option(2, minimum=1)
    ff_dim: int = option(256, minimum=1)  # inner width of each feed-forward sublayer
    dropout_rate: float = option(0.1, minimum=0.0)
    readout: str = option("cls", choices=READOUTS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_dim % self.num_heads:
            raise ConfigFieldError(
                "num_heads", f"must divide hidden_dim {self.hidden_dim}, got {self.num_heads}"
            )


@keras.utils.register_keras_serializable(package="multimodal_tf")
class PreNormTransformerBlock(keras.layers.Layer):
    """One pre-LayerNorm Transformer encoder block (Xiong et al., 2020).

    ``x + Dropout(MHA(LN(x)))``, then ``x + Dropout(W2 GELU(W1 LN(x)))``.
    Pre-norm keeps the residual stream an identity path, which trains stably
    without a learning-rate warm-up (the recipe has none).

    Call arguments:
        tokens: float [B, S, hidden_dim].
        attention_mask: bool [B, 1, S] or [B, S, S]: which keys each query
            may attend to (True = may). Every query must have one.

    Returns:
        float [B, S, hidden_dim].

    Args:
        hidden_dim: token width.
        num_heads: attention heads, each ``hidden_dim // num_heads`` wide.
        ff_dim: inner width of the feed-forward sublayer.
        dropout_rate: dropout on attention weights and sublayer outputs.
        **kwargs: standard layer arguments.
    """

    def __init__(self, hidden_dim: int, num_heads: int, ff_dim: int, dropout_rate: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"{self.name}: hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}"
            )
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.ff_dim = ff_dim
        self.dropout_rate = dropout_rate
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="attention_norm")
        self.attention = keras.layers.MultiHeadAttention(
            num_heads, hidden_dim // num_heads, dropout=dropout_rate, name="attention"
        )
        self.feedforward_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="feedforward_norm")
        self.feedforward_inner = keras.layers.Dense(ff_dim, activation="gelu", name="feedforward_inner")
        self.feedforward_outer = keras.layers.Dense(hidden_dim, name="feedforward_outer")
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def build(self, input_shape):
        shape = tf.TensorShape([None, None, self.hidden_dim])
        # A MultiHeadAttention built lazily on first call is left at its
        # initial weights when a Keras SavedModel is revived: build it here.
        with tf.name_scope(self.attention.name):
            self.attention._build_from_signature(query=shape, value=shape)
        build_sublayer(self.attention_norm, shape)
        build_sublayer(self.feedforward_norm, shape)
        build_sublayer(self.feedforward_inner, shape)
        build_sublayer(self.feedforward_outer, [None, None, self.ff_dim])
        super().build(input_shape)

    def call(self, tokens, attention_mask, training=None):
        normed = self.attention_norm(tokens)
        attended = self.attention(normed, normed, attention_mask=attention_mask, training=training)
        tokens = tokens + self.dropout(attended, training=training)
        feedforward = self.feedforward_outer(self.feedforward_inner(self.feedforward_norm(tokens)))
        return tokens + self.dropout(feedforward, training=training)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "ff_dim": self.ff_dim,
                "dropout_rate": self.dropout_rate,
            }
        )
        return config


def as_sequence(embedding) -> tuple[tf.Tensor, tf.Tensor]:
    """An encoder output as (sequence [B, T, D], bool mask [B, T]).

    A pooled [B, D] embedding (an encoder without sequence output) is a
    sequence of one token, always real; the presence flag masks it.
    """
    if isinstance(embedding, tuple | list):
        sequence, mask = embedding
        return sequence, tf.cast(mask, tf.bool)
    return embedding[:, None, :], tf.ones_like(embedding[:, :1], tf.bool)


def _feature_dim(shape) -> int:
    """The last dimension of an encoder output's shape: [B, D] or ([B, T, D], [B, T])."""
    if isinstance(shape, tuple | list) and shape and isinstance(shape[0], tuple | list | tf.TensorShape):
        shape = shape[0]
    return tf.TensorShape(shape)[-1]


@FUSIONS.register("cross_attention", config=CrossAttentionFusionConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class CrossAttentionFusion(FusionLayer):
    """Single-stream co-attention over the tokens, regions and frames of all modalities.

    What it follows: the single-stream design of ViLT (Kim et al., 2021) and
    VisualBERT / UNITER: each modality's sequence is projected to
    ``hidden_dim`` and tagged with a learned modality-type embedding, a
    learned [CLS] token (BERT, Devlin et al., 2019) is prepended, and
    ``num_layers`` pre-LayerNorm Transformer blocks attend over the
    concatenation, so text tokens attend to image regions and audio frames
    and back in every layer. MulT (Tsai et al., 2019) instead runs one
    directional cross-attention stream per ordered pair of modalities (six
    for three): more parameters and no within-modality attention after the
    encoders; the single stream covers all pairs with one set of weights,
    which suits the small data sets this project trains on. Ludwig's
    ``cross_attention`` combiner is the same single-stream idea.

    Masking: a token is a key only if it is real (its encoder's mask) *and*
    its modality is present; masked tokens are also zeroed before the
    projection, so neither an absent modality nor padding can change the
    output, whatever values it holds. The [CLS] token is always a key, so an
    example with no modality present still has a defined output. There are
    no positional embeddings: the encoders (LSTMs, convolutions) already
    encode order and position in their features.

    Call arguments:
        embeddings: dict modality -> the encoder's output: a tuple (float
            [B, T_m, D_m] sequence, bool [B, T_m] mask) or a pooled float
            [B, D_m] embedding (taken as one token).
        presence: dict modality -> float 0/1 [B].

    Returns:
        [B, hidden_dim]: the final-LayerNormed [CLS] token (``readout="cls"``)
        or the mean of the [CLS] token and every unmasked token (``"mean"``).

    Args:
        modalities: modality names.
        hidden_dim: token width.
        num_heads: attention heads; each has ``hidden_dim // num_heads`` dims.
        num_layers: Transformer blocks.
        ff_dim: inner width of each block's feed-forward sublayer.
        dropout_rate: dropout on attention weights and sublayer outputs.
        readout: ``"cls"`` or ``"mean"``.
        **kwargs: standard layer arguments.
    """

    consumes_sequences = True

    def __init__(
        self,
        modalities: Sequence[str],
        hidden_dim: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        ff_dim: int = 256,
        dropout_rate: float = 0.1,
        readout: str = "cls",
        **kwargs,
    ):
        super().__init__(modalities, **kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"{self.name}: hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}"
            )
        if num_layers < 1 or ff_dim < 1:
            raise ValueError(f"{self.name}: num_layers and ff_dim must be >= 1, got {num_layers}, {ff_dim}")
        if readout not in READOUTS:
            raise ValueError(f"{self.name}: readout must be one of {READOUTS}, got {readout!r}")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.ff_dim = ff_dim
        self.dropout_rate = dropout_rate
        self.readout = readout
        self.projections = {
            m: keras.layers.Dense(hidden_dim, name=f"{m}_projection") for m in self.modalities
        }
        self.blocks = [
            PreNormTransformerBlock(hidden_dim, num_heads, ff_dim, dropout_rate, name=f"block_{i}")
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")

    def build(self, input_shape):
        self.cls_token, self.modality_embedding = self.add_token_weights(self.hidden_dim)
        for m in self.modalities:
            build_sublayer(self.projections[m], [None, None, _feature_dim(input_shape[m])])
        tokens = [None, None, self.hidden_dim]
        for block in self.blocks:
            build_sublayer(block, tokens)
        build_sublayer(self.final_norm, tokens)
        super().build(input_shape)

    def call(self, embeddings, presence, training=None):
        self._check_keys(embeddings, presence)
        flags = self.stacked_presence(presence, tf.float32)  # [B, M]
        batch_size = tf.shape(flags)[0]
        tokens = [tf.tile(tf.cast(self.cls_token, self.compute_dtype), [batch_size, 1, 1])]
        keys = [tf.ones([batch_size, 1], tf.bool)]  # the CLS token is always a key
        for i, m in enumerate(self.modalities):
            sequence, mask = as_sequence(embeddings[m])
            mask = tf.logical_and(mask, flags[:, i : i + 1] > 0)  # [B, T_m]
            # tf.where, not a product: a non-finite value cannot leak either.
            sequence = tf.where(mask[..., None], sequence, tf.zeros_like(sequence))
            projected = self.projections[m](sequence)  # [B, T_m, hidden_dim]
            tokens.append(projected + tf.cast(self.modality_embedding[i], projected.dtype))
            keys.append(mask)
        x = tf.concat(tokens, axis=1)  # [B, S, hidden_dim], S = 1 + sum(T_m)
        key_mask = tf.concat(keys, axis=1)  # [B, S]
        attention_mask = key_mask[:, None, :]  # the same keys for every query
        for block in self.blocks:
            x = block(x, attention_mask, training=training)
        x = self.final_norm(x)
        if self.readout == "cls":
            return x[:, 0]
        # The mean in float32: under mixed precision a sum over hundreds of
        # tokens loses float16 precision.
        x = tf.where(key_mask[..., None], tf.cast(x, tf.float32), 0.0)
        count = tf.reduce_sum(tf.cast(key_mask, tf.float32), axis=1, keepdims=True)
        return tf.cast(tf.reduce_sum(x, axis=1) / count, self.compute_dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "num_layers": self.num_layers,
                "ff_dim": self.ff_dim,
                "dropout_rate": self.dropout_rate,
                "readout": self.readout,
            }
        )
        return config
