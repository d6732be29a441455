"""What the pretrained CNN image encoders share: resize, preprocess, backbone, pool, project.

``BackboneEncoder`` is the base of ``image/keras_application``
(encoders/keras_application.py: a ``keras.applications`` constructor plus a
local ``*_notop.h5``) and ``image/keras_model`` (encoders/keras_model.py: a
user's own Keras model file cut at a named layer). Both put the backbone's
input preprocessing in the graph, so the serving signature preprocesses as
training did, and both can return the spatial feature map as a sequence of
regions (for token-level cross-attention fusion).

Freezing follows the standard Keras transfer-learning recipe (Chollet,
"Transfer learning & fine-tuning", keras.io): a frozen backbone, and a
pretrained one even once unfrozen, runs its BatchNorm layers in inference
mode, so a few small batches do not wreck statistics learnt on ImageNet.
"""

from __future__ import annotations

import os

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import MissingFileError


def check_weights_file(path: str, key: str = "weights") -> None:
    """Raises MissingFileError when ``path`` is set but is not an existing file."""
    if path and not os.path.isfile(path):
        raise MissingFileError(
            key, f"no such file {path!r} (a local Keras weights file; nothing is downloaded)"
        )


def pool_or_sequence(feature_map: tf.Tensor, pooling: str, sequence_output: bool):
    """[B, h, w, C] -> pooled [B, C], or ([B, h*w, C] regions, all-True [B, h*w] mask)."""
    if sequence_output:
        shape = tf.shape(feature_map)
        regions = tf.reshape(feature_map, [shape[0], shape[1] * shape[2], feature_map.shape[-1]])
        return regions, tf.ones(tf.shape(regions)[:2], tf.bool)
    reduce = tf.reduce_mean if pooling == "avg" else tf.reduce_max
    return reduce(feature_map, axis=[1, 2])


class BackboneEncoder(keras.layers.Layer):
    """What both backbone families share: resize, preprocess, backbone, pool, project.

    Subclasses set ``self.backbone`` (a functional model on [B, S, S, C]) and
    ``self.scale`` (pixels in [0, 1] -> the backbone's input) in ``__init__``.
    The recipe's two-phase fine-tuning calls :meth:`set_backbone_trainable`.
    """

    supports_sequence_output = True

    def _init_head(self, output_dim, dropout_rate, sequence_output, pooling) -> None:
        self.output_dim = output_dim
        self.dropout_rate = dropout_rate
        self.sequence_output = sequence_output
        self.pooling = pooling
        self.projection = keras.layers.Dense(output_dim, name="projection") if output_dim else None
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freezes the backbone, or makes its top ``trainable_layers`` weighted layers trainable.

        In BatchNorm inference mode the BatchNorm layers stay frozen too, as
        in the Keras fine-tuning guide (their gamma/beta were fit to the
        statistics they are frozen with).
        """
        self.backbone.trainable = trainable  # recursive: every sublayer
        if not trainable:
            return
        weighted = [layer for layer in self.backbone.layers if layer.weights]
        for layer in weighted[: -self.trainable_layers] if self.trainable_layers else []:
            layer.trainable = False
        if self.batch_norm_inference:
            for layer in self.backbone.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False

    def build(self, input_shape) -> None:
        expected = self.backbone.input_shape[-1]
        if input_shape[-1] != expected:
            raise ValueError(
                f"{self.name}: the backbone takes {expected}-channel images; set data.image.channels="
                f"{expected} (got {input_shape[-1]})"
            )
        super().build(input_shape)

    def call(self, images: tf.Tensor, training=None):
        size = self.backbone.input_shape[1:3]
        x = images
        if tuple(x.shape[1:3]) != tuple(size):
            x = tf.image.resize(x, size)
        x = self.scale(tf.cast(x, self.compute_dtype))
        # training=False keeps BatchNorm (and any dropout inside) in inference mode.
        x = self.backbone(x, training=False if self.batch_norm_inference else training)
        if len(x.shape) == 2:  # an already pooled model output: one region
            x = x[:, None, None, :]
        elif len(x.shape) == 3:  # a sequence output [B, T, C]: T regions of one row
            x = x[:, None, :, :]
        out = pool_or_sequence(x, self.pooling, self.sequence_output)
        if self.sequence_output:
            regions, mask = out
            if self.projection is not None:
                regions = self.projection(regions)
            return self.dropout(regions, training=training), mask
        if self.projection is not None:
            out = self.projection(out)
        return self.dropout(out, training=training)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "output_dim": self.output_dim,
                "dropout_rate": self.dropout_rate,
                "sequence_output": self.sequence_output,
                "pooling": self.pooling,
                "freeze": self.freeze,
                "trainable_layers": self.trainable_layers,
                "input_size": self.input_size,
            }
        )
        return config


def load_backbone_weights(backbone: keras.Model, path: str, expected: str) -> None:
    """Loads a .h5 weights file into ``backbone``; a file of another architecture names both."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} not found (expected a local {expected} file)")
    try:
        backbone.load_weights(path)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(
            f"weights file {path!r} does not fit {expected}: {str(error).splitlines()[0][:300]}"
        ) from None
