"""Audio encoders over log-mel spectrograms: a CNN, an LSTM and band statistics."""

from __future__ import annotations

import dataclasses

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import EncoderConfig, option
from multimodal_tf.encoders.image import conv_blocks
from multimodal_tf.encoders.text import recurrent_layers
from multimodal_tf.registry import ENCODERS


def spectrogram_norm() -> keras.layers.Layer:
    """Per-example normalisation over frames and mel bins (no parameters).

    Log-mel values sit around -13..5; standardising each clip (like cepstral
    mean and variance normalisation) puts them on the scale the layers after
    it expect, independent of the recording level. An all-zero (absent) clip
    stays all zero.
    """
    return keras.layers.LayerNormalization(
        axis=[1, 2], center=False, scale=False, epsilon=1e-3, name="input_norm"
    )


def band_statistics(spectrograms: tf.Tensor) -> tf.Tensor:
    """[B, frames, mel_bins] -> [B, 3 * mel_bins]: each band's mean, std and max over time."""
    mean, variance = tf.nn.moments(spectrograms, axes=[1])
    # sqrt has an infinite gradient at 0 (an absent, all-zero clip).
    return tf.concat([mean, tf.sqrt(variance + 1e-6), tf.reduce_max(spectrograms, axis=1)], axis=-1)


@dataclasses.dataclass(frozen=True)
class _AudioConfig(EncoderConfig):
    """The fields every audio encoder takes."""

    width: int = option(32, minimum=1)
    depth: int = option(2, minimum=1)
    output_dim: int = option(64, minimum=1)
    dropout_rate: float = option(0.1, minimum=0.0)


@dataclasses.dataclass(frozen=True)
class AudioCNNConfig(_AudioConfig):
    """``audio/cnn``: the arguments of :class:`AudioCNNEncoder`."""

    name: str = "audio/cnn"


@dataclasses.dataclass(frozen=True)
class AudioLSTMConfig(_AudioConfig):
    """``audio/lstm``: the arguments of :class:`AudioLSTMEncoder`."""

    name: str = "audio/lstm"
    bidirectional: bool = False


@dataclasses.dataclass(frozen=True)
class AudioStatsConfig(_AudioConfig):
    """``audio/stats``: the arguments of :class:`AudioStatsEncoder`."""

    name: str = "audio/stats"


class _AudioEncoder(keras.layers.Layer):
    """Shared arguments, input normalisation, projection and config of the audio encoders.

    ``sequence_output`` (the sequence protocol of docs/models.md; set by
    ``models.build_model``, not a config field) is accepted only by the
    encoders whose class sets ``supports_sequence_output``.
    """

    supports_sequence_output = False

    def __init__(
        self,
        width: int = 32,
        depth: int = 2,
        output_dim: int = 64,
        dropout_rate: float = 0.1,
        sequence_output: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if width < 1 or depth < 1 or output_dim < 1:
            raise ValueError(
                f"{self.name}: width, depth and output_dim must be >= 1, got {width}, {depth}, {output_dim}"
            )
        if sequence_output and not self.supports_sequence_output:
            raise ValueError(f"{self.name}: {type(self).__name__} has no sequence output")
        self.sequence_output = sequence_output
        self.width = width
        self.depth = depth
        self.output_dim = output_dim
        self.dropout_rate = dropout_rate
        self.input_norm = spectrogram_norm()
        self.projection = keras.layers.Dense(output_dim, activation="relu", name="projection")
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "width": self.width,
                "depth": self.depth,
                "output_dim": self.output_dim,
                "dropout_rate": self.dropout_rate,
                "sequence_output": self.sequence_output,
            }
        )
        return config


@ENCODERS.register("audio/cnn", config=AudioCNNConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class AudioCNNEncoder(_AudioEncoder):
    """CNN over the log-mel map treated as a one-channel image.

    Per-clip normalisation, then the image encoder's Conv2D-BatchNorm-ReLU-
    MaxPool blocks, max pooling over time only (a word may start anywhere in
    the clip, but which mel bands are active is the information), flatten
    over bands x channels, Dense and dropout.

    Call arguments:
        spectrograms: float32 [B, frames, mel_bins] log-mel (zeros if absent).

    Returns:
        [B, output_dim] embeddings (ReLU). With ``sequence_output``, the tuple
        (frames, mask): the feature map's time steps as float
        [B, ceil(frames / 2**depth), bands * C] (bands and channels of a step
        folded into its features), after dropout, and an all-True bool mask.

    Args:
        width: filters of the first block (doubling per block).
        depth: number of conv blocks.
        output_dim: embedding size.
        dropout_rate: dropout on the embedding.
        sequence_output: return the frames and their mask instead of the
            embedding (the projection is then unused, and not built).
        **kwargs: standard layer arguments.
    """

    supports_sequence_output = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks = conv_blocks(self.width, self.depth)
        self.flatten = keras.layers.Flatten(name="flatten")

    def call(self, spectrograms: tf.Tensor, training=None) -> tf.Tensor:
        x = self.input_norm(spectrograms)[..., None]  # [B, frames, mel_bins, 1]
        for layer in self.blocks:
            x = layer(x, training=training)
        if self.sequence_output:
            # [B, frames', bands, C] -> [B, frames', bands * C]
            frames = tf.reshape(x, [tf.shape(x)[0], x.shape[1] or -1, x.shape[2] * x.shape[3]])
            frames = self.dropout(frames, training=training)
            return frames, tf.ones(tf.shape(frames)[:2], tf.bool)
        x = tf.reduce_max(x, axis=1)  # [B, bands, channels]: pooled over time
        x = self.projection(self.flatten(x))
        return self.dropout(x, training=training)


@ENCODERS.register("audio/lstm", config=AudioLSTMConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class AudioLSTMEncoder(_AudioEncoder):
    """LSTM over mel frames: per-clip normalisation, LSTM stack, Dense, dropout.

    Call arguments:
        spectrograms: float32 [B, frames, mel_bins] log-mel (zeros if absent).

    Returns:
        [B, output_dim] embeddings (ReLU). With ``sequence_output``, the tuple
        (frames, mask): the last LSTM layer's per-frame outputs, float
        [B, frames, width] (``2 * width`` when bidirectional) after dropout,
        and an all-True bool [B, frames] mask.

    Args:
        width: LSTM units (per direction).
        depth: number of LSTM layers.
        output_dim: embedding size.
        dropout_rate: dropout on the embedding.
        bidirectional: wrap each LSTM in ``Bidirectional``.
        sequence_output: return the frames and their mask instead of the
            embedding (the projection is then unused, and not built).
        **kwargs: standard layer arguments.
    """

    supports_sequence_output = True

    def __init__(self, *args, bidirectional: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.bidirectional = bidirectional
        self.recurrent = recurrent_layers(self.width, self.depth, bidirectional, self.sequence_output)

    def call(self, spectrograms: tf.Tensor, training=None) -> tf.Tensor:
        x = self.input_norm(spectrograms)
        for layer in self.recurrent:
            x = layer(x, training=training)
        if self.sequence_output:
            # Every frame is real: a short clip is padded with silence, which
            # the log-mel map cannot tell from a quiet recording.
            frames = self.dropout(x, training=training)
            return frames, tf.ones(tf.shape(frames)[:2], tf.bool)
        x = self.projection(x)
        return self.dropout(x, training=training)

    def get_config(self) -> dict:
        config = super().get_config()
        config["bidirectional"] = self.bidirectional
        return config


@ENCODERS.register("audio/stats", config=AudioStatsConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class AudioStatsEncoder(_AudioEncoder):
    """Summary statistics of each mel band over time, then an MLP.

    Mean, standard deviation and maximum of every band across the clip's
    frames (the clip-level features of classic audio classification, and
    what a logistic-regression baseline on log-mel statistics uses),
    standardised by BatchNorm, then ``depth`` Dense layers. The frame order
    is discarded, so what is spoken cannot be recovered, but the voice's
    timbre and how long the clip is speaking (silent padding pulls the mean
    down) remain. It costs a few per-cent of ``audio/cnn``'s compute, for
    data whose audio carries little that a small convnet could learn.

    Call arguments:
        spectrograms: float32 [B, frames, mel_bins] log-mel (zeros if absent).

    Returns:
        [B, output_dim] embeddings (ReLU).

    Args:
        width: units of each hidden Dense layer.
        depth: number of hidden Dense layers.
        output_dim: embedding size.
        dropout_rate: dropout on the embedding.
        **kwargs: standard layer arguments.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats_norm = keras.layers.BatchNormalization(momentum=0.9, name="stats_norm")
        self.hidden = [
            keras.layers.Dense(self.width, activation="relu", name=f"dense_{i}") for i in range(self.depth)
        ]

    def call(self, spectrograms: tf.Tensor, training=None) -> tf.Tensor:
        x = self.stats_norm(band_statistics(spectrograms), training=training)  # [B, 3 * mel_bins]
        for layer in self.hidden:
            x = layer(x)
        x = self.projection(x)
        return self.dropout(x, training=training)
