"""Text encoder: token embeddings and a (bidirectional) LSTM stack."""

from __future__ import annotations

import dataclasses

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import EncoderConfig, option
from multimodal_tf.registry import ENCODERS


def recurrent_layers(
    width: int, depth: int, bidirectional: bool, sequence_output: bool = False
) -> list[keras.layers.Layer]:
    """``depth`` LSTM layers of ``width`` units; all but the last return sequences.

    With ``sequence_output`` the last one returns its sequence too (the same
    weights: only what the layer returns differs).
    """
    layers = []
    for i in range(depth):
        returns_sequence = sequence_output or i < depth - 1
        lstm = keras.layers.LSTM(width, return_sequences=returns_sequence, name=f"lstm_{i}")
        if bidirectional:
            lstm = keras.layers.Bidirectional(lstm, name=f"bidirectional_{i}")
        layers.append(lstm)
    return layers


def masked_sequence(sequence: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(sequence [B, T, D] with masked positions set to 0, mask [B, T]).

    Masked LSTM steps repeat the last real output; zeroing them makes padding
    carry nothing even for a consumer that ignored the mask.
    """
    return tf.where(mask[..., None], sequence, tf.zeros_like(sequence)), mask


@dataclasses.dataclass(frozen=True)
class TextLSTMConfig(EncoderConfig):
    """``text/lstm``: the arguments of :class:`TextLSTMEncoder` (``vocab_size`` comes from the data)."""

    name: str = "text/lstm"
    embedding_dim: int = option(32, minimum=1)
    width: int = option(32, minimum=1)  # LSTM units per direction
    depth: int = option(2, minimum=1)  # LSTM layers
    bidirectional: bool = False
    output_dim: int = option(64, minimum=1)
    dropout_rate: float = option(0.1, minimum=0.0)


@ENCODERS.register("text/lstm", config=TextLSTMConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class TextLSTMEncoder(keras.layers.Layer):
    """LSTM text encoder: Embedding (0 = padding, masked), LSTM stack, Dense, dropout.

    A row of only padding (absent text) yields an all-zero embedding. Such a
    row is given one unmasked step before the LSTMs, because the cuDNN kernel
    rejects zero-length sequences; its output is then zeroed.

    Call arguments:
        tokens: int [B, T] token ids, right-padded with 0.

    Returns:
        [B, output_dim] embeddings (ReLU); zeros where a row has no token.
        With ``sequence_output``, the tuple (tokens, mask): the last LSTM
        layer's per-token outputs, float [B, T, width] (``2 * width`` when
        bidirectional) after dropout, zero at padding, and the bool [B, T]
        mask ``tokens != 0``.

    Args:
        vocab_size: number of token ids (ids are < vocab_size).
        embedding_dim: token embedding size.
        width: LSTM units (per direction).
        depth: number of LSTM layers.
        bidirectional: wrap each LSTM in ``Bidirectional``.
        output_dim: embedding size.
        dropout_rate: dropout on the embedding.
        sequence_output: return the per-token outputs and their mask (for
            fusions that consume sequences; set by ``models.build_model``,
            not a config field). The projection is then unused, and not built.
        **kwargs: standard layer arguments.
    """

    supports_sequence_output = True  # the sequence protocol of docs/models.md

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 32,
        width: int = 32,
        depth: int = 1,
        bidirectional: bool = False,
        output_dim: int = 64,
        dropout_rate: float = 0.1,
        sequence_output: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if vocab_size < 2:
            raise ValueError(f"{self.name}: vocab_size must be >= 2 (id 0 is padding), got {vocab_size}")
        if width < 1 or depth < 1 or output_dim < 1:
            raise ValueError(
                f"{self.name}: width, depth and output_dim must be >= 1, got {width}, {depth}, {output_dim}"
            )
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.width = width
        self.depth = depth
        self.bidirectional = bidirectional
        self.output_dim = output_dim
        self.dropout_rate = dropout_rate
        self.sequence_output = sequence_output
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True, name="embedding")
        self.recurrent = recurrent_layers(width, depth, bidirectional, sequence_output)
        self.projection = keras.layers.Dense(output_dim, activation="relu", name="projection")
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def call(self, tokens: tf.Tensor, training=None) -> tf.Tensor:
        x = self.embedding(tokens)
        real = tf.not_equal(tokens, 0)  # [B, T]
        has_tokens = tf.reduce_any(real, axis=1)  # [B]
        first_step = tf.range(tf.shape(tokens)[1]) == 0  # [T]
        mask = tf.logical_or(real, tf.logical_and(~has_tokens[:, None], first_step[None, :]))
        for layer in self.recurrent:
            x = layer(x, mask=mask, training=training)
        if self.sequence_output:
            return masked_sequence(self.dropout(x, training=training), real)
        x = self.dropout(self.projection(x), training=training)
        return tf.where(has_tokens[:, None], x, tf.zeros_like(x))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "vocab_size": self.vocab_size,
                "embedding_dim": self.embedding_dim,
                "width": self.width,
                "depth": self.depth,
                "bidirectional": self.bidirectional,
                "output_dim": self.output_dim,
                "dropout_rate": self.dropout_rate,
                "sequence_output": self.sequence_output,
            }
        )
        return config


def masked_max(x: tf.Tensor, mask: tf.Tensor, mean: tf.Tensor) -> tf.Tensor:
    """Max over the unmasked tokens of ``x`` [B, T, D]; 0 for a row with none.

    Padding is replaced by the row's masked ``mean`` [B, D], which never
    exceeds the max of the tokens it averages, so the result is the exact
    masked max. The usual ``x - (1 - mask) * 1e4`` gives the same floats
    but puts -1e4 in the tensor: int8 quantization then spreads 256 levels
    over [-1e4, 1] and every real value rounds to 0 (docs/optimization.md).

    Args:
        x: float [B, T, D] token embeddings.
        mask: float [B, T, 1], 1 for tokens, 0 for padding.
        mean: float [B, D] masked mean of ``x`` (0 for an empty row).
    """
    return tf.reduce_max(tf.where(mask > 0, x, mean[:, None, :]), axis=1)


@dataclasses.dataclass(frozen=True)
class TextBagOfEmbeddingsConfig(EncoderConfig):
    """``text/bow``: the arguments of :class:`TextBagOfEmbeddingsEncoder`."""

    name: str = "text/bow"
    embedding_dim: int = option(32, minimum=1)
    output_dim: int = option(64, minimum=1)  # ignored when linear: the output is embedding_dim wide
    dropout_rate: float = option(0.1, minimum=0.0)
    linear: bool = False  # fastText's mean embedding, no max pool or projection


@ENCODERS.register("text/bow", config=TextBagOfEmbeddingsConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class TextBagOfEmbeddingsEncoder(keras.layers.Layer):
    """Bag-of-embeddings text encoder (fastText-style, Joulin et al. 2017).

    Embedding, then masked mean and max pooling over the tokens, Dense and
    dropout. Order-insensitive, so it learns from a few hundred short texts
    (labels, names, captions) where an LSTM underfits.

    With ``linear=True`` it is fastText's text representation exactly: the
    masked mean of the token embeddings (then dropout), with no max pooling
    and no projection, so a classifier on top is a low-rank linear model over
    the bag of tokens. On emoji3's hashed character n-grams that generalises
    better than the nonlinear encoder (text-only test accuracy 0.60-0.62 vs
    0.55-0.58, 3 seeds), though inside the fused emoji3 model it did not
    help (docs/experiments.md); ``output_dim`` is then ``embedding_dim``.

    Call arguments:
        tokens: int [B, T] WordPiece ids, 0 = padding (all zero = absent).

    Returns:
        [B, output_dim] embeddings (ReLU); zeros-in gives a constant output.
        With ``sequence_output``, the tuple (tokens, mask): the token
        embeddings, float [B, T, embedding_dim] after dropout, zero at
        padding, and the bool [B, T] mask ``tokens != 0``.

    Args:
        vocab_size: vocabulary size (ids < vocab_size).
        embedding_dim: token embedding size.
        output_dim: embedding size (ignored when ``linear``: ``embedding_dim``).
        dropout_rate: dropout on the output.
        linear: mean embedding only (fastText), no max pooling or projection.
        sequence_output: return the token embeddings and their mask (for
            fusions that consume sequences; set by ``models.build_model``,
            not a config field). The projection is then unused, and not built.
        **kwargs: standard layer arguments.
    """

    supports_sequence_output = True  # the sequence protocol of docs/models.md

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 32,
        output_dim: int = 64,
        dropout_rate: float = 0.1,
        linear: bool = False,
        sequence_output: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.linear = linear
        self.sequence_output = sequence_output
        self.output_dim = embedding_dim if linear else output_dim
        self.dropout_rate = dropout_rate
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")
        self.projection = (
            None if linear else keras.layers.Dense(output_dim, activation="relu", name="projection")
        )
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def call(self, tokens: tf.Tensor, training=None) -> tf.Tensor:
        x = self.embedding(tokens)
        if self.sequence_output:
            return masked_sequence(self.dropout(x, training=training), tf.not_equal(tokens, 0))
        mask = tf.cast(tf.not_equal(tokens, 0), x.dtype)[..., None]  # [B, T, 1]; float16 under mixed_float16
        count = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        x = x * mask  # padding rows 0: they would widen the int8 range of what follows
        mean = tf.reduce_sum(x, axis=1) / count
        if self.linear:
            return self.dropout(mean, training=training)
        maximum = masked_max(x, mask, mean)
        x = self.projection(tf.concat([mean, maximum], axis=-1))
        return self.dropout(x, training=training)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "vocab_size": self.vocab_size,
                "embedding_dim": self.embedding_dim,
                "output_dim": self.output_dim,
                "dropout_rate": self.dropout_rate,
                "linear": self.linear,
                "sequence_output": self.sequence_output,
            }
        )
        return config
