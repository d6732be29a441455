"""Image encoder: a small CNN."""

from __future__ import annotations

import dataclasses

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ConfigFieldError, EncoderConfig, option
from multimodal_tf.registry import ENCODERS


def conv_blocks(width: int, depth: int) -> list[keras.layers.Layer]:
    """Layers of ``depth`` Conv2D-BatchNorm-ReLU-MaxPool blocks, filters ``width * 2**i``.

    Pooling uses ``"same"`` padding so that a small input never shrinks to
    zero size, whatever the depth.
    """
    layers = []
    for i in range(depth):
        layers += [
            keras.layers.Conv2D(width * 2**i, 3, padding="same", use_bias=False, name=f"conv_{i}"),
            # momentum 0.9: short trainings (a few hundred steps) otherwise end
            # with moving statistics far from the data, and eval-mode outputs
            # collapse while training accuracy looks fine.
            keras.layers.BatchNormalization(momentum=0.9, name=f"batch_norm_{i}"),
            keras.layers.ReLU(name=f"relu_{i}"),
            keras.layers.MaxPool2D(2, padding="same", name=f"pool_{i}"),
        ]
    return layers


def colour_histogram(images: tf.Tensor, bins: int) -> tf.Tensor:
    """[B, H, W, C] in [0, 1] -> [B, bins**C]: the square root of each joint colour bin's pixel share.

    Each channel is quantised to ``bins`` levels and every pixel counted in
    one of ``bins**C`` cells (Swain & Ballard, "Color indexing", 1991). The
    square root (Hellinger / RootSIFT normalisation) keeps a large uniform
    background from drowning the few bins that describe the object.
    """
    channels = images.shape[-1]
    levels = tf.clip_by_value(tf.cast(tf.floor(images * bins), tf.int32), 0, bins - 1)
    cell = tf.reduce_sum(levels * bins ** tf.range(channels), axis=-1)  # [B, H, W]
    share = tf.reduce_mean(tf.one_hot(cell, bins**channels), axis=[1, 2])
    return tf.sqrt(share)


def flatten_positions(feature_map: tf.Tensor) -> tf.Tensor:
    """[B, d_1, ..., d_k, C] -> [B, d_1 * ... * d_k, C]: one row per position.

    Static sizes are kept where they are known, so the fusion's projection
    (and a functional model's shapes) see the real sequence length.
    """
    inner = feature_map.shape[1:-1]
    length = inner.num_elements() if inner.is_fully_defined() else -1
    return tf.reshape(feature_map, [tf.shape(feature_map)[0], length, feature_map.shape[-1]])


@dataclasses.dataclass(frozen=True)
class ImageCNNConfig(EncoderConfig):
    """``image/cnn``: the arguments of :class:`ImageCNNEncoder`."""

    name: str = "image/cnn"
    width: int = option(32, minimum=1)  # filters of the first block (doubling per block)
    depth: int = option(2, minimum=1)  # conv blocks
    output_dim: int = option(64, minimum=1)
    dropout_rate: float = option(0.1, minimum=0.0)
    augment: bool = False  # random flips, shifts, zooms while training
    colour_bins: int = option(0, minimum=0)  # levels per channel of a colour histogram (0 = none)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.colour_bins == 1:
            raise ConfigFieldError("colour_bins", "must be 0 (off) or >= 2, got 1")


@ENCODERS.register("image/cnn", config=ImageCNNConfig)
@keras.utils.register_keras_serializable(package="multimodal_tf")
class ImageCNNEncoder(keras.layers.Layer):
    """CNN image encoder: conv blocks, flatten, Dense, dropout.

    The feature map is flattened rather than globally pooled: on small images
    (digits, icons) *where* a stroke is matters, and global pooling threw
    that away (AV-MNIST image-only accuracy stalled near chance).

    Call arguments:
        images: float32 [B, H, W, C] in [0, 1] (zeros for an absent image).

    Returns:
        [B, output_dim] embeddings (ReLU); with ``sequence_output``, the
        tuple (regions, mask): the last feature map's positions as float
        [B, h * w, C] regions (``C = width * 2**(depth - 1)``, plus the
        ``bins**channels`` colour histogram appended to every region when
        ``colour_bins``), after dropout, and an all-True bool [B, h * w] mask.

    Args:
        width: filters of the first block (doubling per block).
        depth: number of Conv2D-BatchNorm-ReLU-MaxPool blocks.
        output_dim: embedding size.
        dropout_rate: dropout on the embedding.
        augment: random horizontal flips, shifts and zooms of up to 10% while
            training (identity at inference, so serving is unchanged); for
            small image sets where the CNN otherwise memorises the pictures.
        colour_bins: when > 0, a joint colour histogram with ``colour_bins``
            levels per channel (:func:`colour_histogram`, batch-normalised)
            joins the flattened feature map before the projection. Small
            convolutional stacks see local patterns, not the global palette
            that tells apart, say, icons of food from flags.
        sequence_output: return the regions of the feature map and their
            mask instead of the embedding (for fusions that consume
            sequences; set by ``models.build_model``, not a config field).
            The projection is then unused, and not built.
        **kwargs: standard layer arguments.
    """

    # The sequence protocol of docs/models.md: ``sequence_output=True`` gives
    # (sequence [B, T, D], bool mask [B, T]).
    supports_sequence_output = True

    def __init__(
        self,
        width: int = 32,
        depth: int = 2,
        output_dim: int = 64,
        dropout_rate: float = 0.1,
        augment: bool = False,
        colour_bins: int = 0,
        sequence_output: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if width < 1 or depth < 1 or output_dim < 1:
            raise ValueError(
                f"{self.name}: width, depth and output_dim must be >= 1, got {width}, {depth}, {output_dim}"
            )
        if colour_bins < 0 or colour_bins == 1:
            raise ValueError(f"{self.name}: colour_bins must be 0 (off) or >= 2, got {colour_bins}")
        self.width = width
        self.depth = depth
        self.output_dim = output_dim
        self.dropout_rate = dropout_rate
        self.augment = augment
        self.colour_bins = colour_bins
        self.sequence_output = sequence_output
        self.augmentation = (
            [
                keras.layers.RandomFlip("horizontal", name="random_flip"),
                keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant", name="random_shift"),
                keras.layers.RandomZoom(0.1, fill_mode="constant", name="random_zoom"),
            ]
            if augment
            else []
        )
        self.blocks = conv_blocks(width, depth)
        self.flatten = keras.layers.Flatten(name="flatten")
        self.colour_norm = (
            keras.layers.BatchNormalization(momentum=0.9, name="colour_norm") if colour_bins else None
        )
        self.projection = keras.layers.Dense(output_dim, activation="relu", name="projection")
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def call(self, images: tf.Tensor, training=None) -> tf.Tensor:
        x = images
        for layer in self.augmentation:
            x = layer(x, training=training)
        colours = colour_histogram(x, self.colour_bins) if self.colour_bins else None
        for layer in self.blocks:
            x = layer(x, training=training)
        if self.sequence_output:
            return self._regions(x, colours, training)
        x = self.flatten(x)
        if colours is not None:
            x = tf.concat([x, self.colour_norm(colours, training=training)], axis=-1)
        x = self.projection(x)
        return self.dropout(x, training=training)

    def _regions(self, feature_map: tf.Tensor, colours: tf.Tensor | None, training) -> tuple:
        """[B, h, w, C] feature map -> ([B, h * w, C'] regions, all-True [B, h * w] mask)."""
        regions = flatten_positions(feature_map)
        if colours is not None:
            # The palette is global: every region carries it, as the
            # flattened map does in the pooled path.
            colours = self.colour_norm(colours, training=training)
            colours = tf.tile(colours[:, None, :], [1, tf.shape(regions)[1], 1])
            regions = tf.concat([regions, tf.cast(colours, regions.dtype)], axis=-1)
        regions = self.dropout(regions, training=training)
        return regions, tf.ones(tf.shape(regions)[:2], tf.bool)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "width": self.width,
                "depth": self.depth,
                "output_dim": self.output_dim,
                "dropout_rate": self.dropout_rate,
                "augment": self.augment,
                "colour_bins": self.colour_bins,
                "sequence_output": self.sequence_output,
            }
        )
        return config
