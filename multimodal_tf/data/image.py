"""In-graph image preprocessing (core TF ops only, so TF Serving can run it)."""

from __future__ import annotations

import tensorflow as tf

from multimodal_tf.config import ImageConfig

# Leading bytes of the formats tf.io.decode_image reads.
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")


def _check_format(encoded: tf.Tensor) -> tf.Tensor:
    head = tf.strings.substr(encoded, 0, 4)
    known = tf.reduce_any([tf.strings.substr(head, 0, len(sig)) == sig for sig in _SIGNATURES])
    return tf.debugging.Assert(known, ["image: not a PNG, JPEG, GIF or BMP file (unrecognised header)"])


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Converts a decoded [H, W, C] image (C in 1..4) to ``channels``."""
    image = image[..., : tf.minimum(tf.shape(image)[-1], 3)]  # drop alpha
    rgb = tf.cond(
        tf.shape(image)[-1] == 1,
        lambda: tf.tile(image[..., :1], [1, 1, 3]),
        lambda: tf.pad(image, [[0, 0], [0, 0], [0, 3 - tf.shape(image)[-1]]]),
    )
    rgb.set_shape([None, None, 3])
    if channels == 1:
        return tf.image.rgb_to_grayscale(rgb)
    return rgb


def decode_image(encoded: tf.Tensor, config: ImageConfig) -> tf.Tensor:
    """Decodes one encoded image (scalar string) to float32 [H, W, C] in [0, 1].

    An empty string yields zeros (the modality is absent).
    """

    def decode():
        with tf.control_dependencies([_check_format(encoded)]):
            image = tf.io.decode_image(encoded, channels=0, expand_animations=False)
        image = tf.cast(_to_channels(image, config.channels), tf.float32)
        if config.resize == "stretch":
            image = tf.image.resize(image, [config.height, config.width])
        else:
            image = tf.image.resize_with_pad(image, config.height, config.width)
        return tf.clip_by_value(image / 255.0, 0.0, 1.0)

    def absent():
        return tf.zeros([config.height, config.width, config.channels], tf.float32)

    return tf.cond(tf.strings.length(encoded) > 0, decode, absent)


def preprocess_images(encoded: tf.Tensor, config: ImageConfig) -> tf.Tensor:
    """Batched version: [B] encoded strings -> [B, H, W, C] float32."""
    spec = tf.TensorSpec([config.height, config.width, config.channels], tf.float32)
    return tf.map_fn(lambda x: decode_image(x, config), encoded, fn_output_signature=spec)
