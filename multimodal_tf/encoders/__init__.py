"""Modality encoders, registered in ``registry.ENCODERS`` as ``<modality>/<kind>``.

Importing this package registers ``image/cnn``, ``image/keras_application``,
``image/keras_model`` (keras_application.py, keras_model.py), ``text/lstm``, ``text/bow``, ``text/bert``,
``text/tfidf``, ``audio/cnn``, ``audio/lstm``, ``audio/stats`` and ``audio/saved_model``, each with its config class
(``ImageCNNConfig``, ...: the layer's constructor arguments, which are the
only fields ``model.<modality>_encoder`` accepts for that family). Each
encoder is a Keras layer mapping one preprocessed modality (see
``data.features.model_feature_specs``) to a [B, output_dim] embedding.
Those whose class sets ``supports_sequence_output`` also take
``sequence_output=True`` and then return (sequence [B, T, D], bool mask
[B, T]) for fusions that consume sequences (docs/models.md).
``audio/saved_model`` (encoders/audio_saved_model.py) wraps a local
waveform -> frame-embedding SavedModel such as YAMNet.
"""

from __future__ import annotations

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import EncoderConfig
from multimodal_tf.encoders.audio import (
    AudioCNNConfig,
    AudioCNNEncoder,
    AudioLSTMConfig,
    AudioLSTMEncoder,
    AudioStatsConfig,
    AudioStatsEncoder,
)
from multimodal_tf.encoders.audio_saved_model import AudioSavedModelConfig, AudioSavedModelEncoder
from multimodal_tf.encoders.bert import TextBertConfig, TextBertEncoder
from multimodal_tf.encoders.image import ImageCNNConfig, ImageCNNEncoder
from multimodal_tf.encoders.keras_application import KerasApplicationConfig, KerasApplicationEncoder
from multimodal_tf.encoders.keras_model import KerasModelConfig, KerasModelEncoder
from multimodal_tf.encoders.text import (
    TextBagOfEmbeddingsConfig,
    TextBagOfEmbeddingsEncoder,
    TextLSTMConfig,
    TextLSTMEncoder,
)
from multimodal_tf.encoders.tfidf import TextTFIDFConfig, TextTFIDFEncoder
from multimodal_tf.registry import ENCODERS

__all__ = [
    "AudioCNNConfig",
    "AudioCNNEncoder",
    "AudioLSTMConfig",
    "AudioSavedModelConfig",
    "AudioSavedModelEncoder",
    "AudioLSTMEncoder",
    "AudioStatsConfig",
    "AudioStatsEncoder",
    "ImageCNNConfig",
    "ImageCNNEncoder",
    "KerasApplicationConfig",
    "KerasApplicationEncoder",
    "KerasModelConfig",
    "KerasModelEncoder",
    "TextBagOfEmbeddingsConfig",
    "TextBertConfig",
    "TextBertEncoder",
    "TextBagOfEmbeddingsEncoder",
    "TextLSTMConfig",
    "TextLSTMEncoder",
    "TextTFIDFConfig",
    "TextTFIDFEncoder",
    "build_encoder",
    "load_encoder_checkpoint",
    "save_encoder_checkpoint",
]


def build_encoder(config: EncoderConfig, **kwargs) -> keras.layers.Layer:
    """The encoder of ``config``'s family, with the family's fields as arguments.

    Args:
        config: the family's config (e.g. :class:`ImageCNNConfig`).
        **kwargs: what the encoder needs beyond the config (``vocab_size``
            for text) and layer arguments such as ``name``.

    Raises:
        KeyError: ``config.name`` is not a registered encoder.
        TypeError: ``config`` is not the config class of its family.
    """
    encoder_class = ENCODERS.get(config.name)
    config_class = ENCODERS.config(config.name)
    if type(config) is not config_class:
        raise TypeError(
            f"encoder {config.name!r} takes a {config_class.__name__}, got {type(config).__name__}"
        )
    return encoder_class(**config.layer_arguments(), **kwargs)


def save_encoder_checkpoint(encoder: keras.layers.Layer, path: str) -> str:
    """Writes a built encoder's weights as a TF checkpoint; returns its prefix."""
    return tf.train.Checkpoint(encoder=encoder).write(path)


def load_encoder_checkpoint(encoder: keras.layers.Layer, path: str) -> None:
    """Restores a built encoder from :func:`save_encoder_checkpoint` output.

    Args:
        encoder: the encoder layer, already built (called once).
        path: checkpoint prefix, or a folder holding checkpoints (the latest
            is used).

    Raises:
        ValueError: ``path`` is not a readable checkpoint, or it does not
            hold every weight of the encoder (e.g. a different width).
    """
    if tf.io.gfile.isdir(path):
        path = tf.train.latest_checkpoint(path) or path
    if not tf.io.gfile.exists(f"{path}.index"):
        raise ValueError(f"encoder checkpoint {path!r}: no checkpoint found (expected {path}.index)")
    try:
        status = tf.train.Checkpoint(encoder=encoder).read(path)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        raise ValueError(
            f"encoder checkpoint {path!r} does not fit encoder {encoder.name!r}: {error}"
        ) from None
    status.expect_partial()
