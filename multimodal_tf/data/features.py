"""Feature names and specs: the single source for pipeline, model and export.

Raw features are what a TFRecord holds and what the raw serving signature
takes; model features are what preprocessing produces and ``keras.Input``s
are built from.
"""

from __future__ import annotations

import tensorflow as tf

from multimodal_tf.config import MODALITIES, DataConfig

ID = "id"
LABEL = "label"
IMAGE, TEXT, AUDIO = MODALITIES


def presence_name(modality: str) -> str:
    """Name of the 0/1 presence flag of ``modality`` (``"image_present"``)."""
    return f"{modality}_present"


def raw_feature_spec() -> dict[str, tf.io.FixedLenFeature]:
    """``tf.Example`` parsing spec of the TFRecords (and of Classify requests).

    Media are the raw encoded bytes (an empty string means absent); presence
    flags and label default so that a serving request may omit them.
    """
    spec = {ID: tf.io.FixedLenFeature([], tf.string, default_value="")}
    for modality in MODALITIES:
        spec[modality] = tf.io.FixedLenFeature([], tf.string, default_value="")
        spec[presence_name(modality)] = tf.io.FixedLenFeature([], tf.int64, default_value=0)
    spec[LABEL] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    return spec


def audio_num_frames(config: DataConfig) -> int:
    """Number of STFT frames produced for one clip."""
    audio = config.audio
    samples = int(round(audio.sample_rate * audio.duration_seconds))
    return 1 + (samples - audio.frame_length) // audio.frame_step


def model_feature_specs(config: DataConfig, modalities=MODALITIES) -> dict[str, tf.TensorSpec]:
    """Specs of the preprocessed features a model consumes (batch dim first)."""
    specs: dict[str, tf.TensorSpec] = {}
    if IMAGE in modalities:
        shape = (None, config.image.height, config.image.width, config.image.channels)
        specs[IMAGE] = tf.TensorSpec(shape, tf.float32, name=IMAGE)
    if TEXT in modalities:
        specs[TEXT] = tf.TensorSpec((None, config.text.max_tokens), tf.int64, name=TEXT)
    if AUDIO in modalities:
        shape = (None, audio_num_frames(config), config.audio.num_mel_bins)
        specs[AUDIO] = tf.TensorSpec(shape, tf.float32, name=AUDIO)
    for modality in modalities:
        name = presence_name(modality)
        specs[name] = tf.TensorSpec((None,), tf.float32, name=name)
    return specs
