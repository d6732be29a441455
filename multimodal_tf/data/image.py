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


def _header_bytes(encoded: tf.Tensor, count: int) -> tf.Tensor:
    """The first ``count`` bytes as int64 [count] (zeros past the end)."""
    head = tf.io.decode_raw(tf.strings.substr(encoded, 0, count), tf.uint8, fixed_length=count)
    return tf.cast(head, tf.int64)


def _number(head: tf.Tensor, start: int, size: int, big_endian: bool) -> tf.Tensor:
    """Unsigned integer of ``size`` bytes at ``head[start:]``."""
    order = range(size) if big_endian else reversed(range(size))
    value = tf.constant(0, tf.int64)
    for i in order:
        value = value * 256 + head[start + i]
    return value


def image_size(encoded: tf.Tensor) -> tf.Tensor:
    """[height, width] (int64) of one encoded image, read from its header only.

    PNG: the IHDR chunk; JPEG: the SOF marker (``tf.io.extract_jpeg_shape``);
    GIF: the logical screen descriptor; BMP: the DIB header (a negative
    height means top-down rows). Nothing is decoded, so a small file that
    declares a huge canvas costs nothing to measure.
    """
    head = _header_bytes(encoded, 26)

    def png():
        return tf.stack([_number(head, 20, 4, True), _number(head, 16, 4, True)])

    def jpeg():
        return tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64)

    def gif():
        return tf.stack([_number(head, 8, 2, False), _number(head, 6, 2, False)])

    def bmp():
        height = _number(head, 22, 4, False)
        height = tf.where(height >= 2**31, 2**32 - height, height)  # int32, negative = top-down
        return tf.stack([height, _number(head, 18, 4, False)])

    prefix = tf.strings.substr(encoded, 0, 4)
    return tf.case(
        [
            (tf.equal(prefix, _SIGNATURES[0]), png),
            (tf.equal(tf.strings.substr(prefix, 0, 3), _SIGNATURES[1]), jpeg),
            (tf.equal(prefix, _SIGNATURES[2]), gif),
        ],
        default=bmp,
    )


def _check_size(encoded: tf.Tensor, max_pixels: int) -> tf.Operation:
    """Asserts the header's width x height is at most ``max_pixels`` (0 = no limit)."""
    if max_pixels <= 0:
        return tf.no_op()
    size = image_size(encoded)
    message = tf.strings.format(
        "image: {} x {} pixels (height x width) is over data.image.max_pixels = {}",
        (size[0], size[1], max_pixels),
    )
    return tf.debugging.Assert(size[0] * size[1] <= max_pixels, [message])


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
            # After the format check, so the size is read only from a known header.
            check_size = _check_size(encoded, config.max_pixels)
        with tf.control_dependencies([check_size]):
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
