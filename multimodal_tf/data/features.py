"""Feature names and specs: the single source for pipeline, model and export.

Raw features are what a TFRecord holds and what the raw serving signature
takes; model features are what preprocessing produces and ``keras.Input``s
are built from.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from multimodal_tf.config import MODALITIES, DataConfig, ModelConfig

ID = "id"
LABEL = "label"
IMAGE, TEXT, AUDIO = MODALITIES

# What preprocessing hands an encoder (``EncoderConfig.input_kind``), per
# modality; the first is the modality's default.
PIXELS = "pixels"  # float32 [B, H, W, C] in [0, 1]
TOKEN_IDS = "token_ids"  # int64 [B, max_tokens] ids of data.text.tokenizer (0 = padding)
# int64 [B, max_tokens]: [CLS] ... [SEP] ids of the encoder's own WordPiece
# vocabulary (a BERT checkpoint's vocab.txt); 0 = [PAD].
CHECKPOINT_TOKEN_IDS = "checkpoint_token_ids"
# string [B]: the UTF-8 text itself (cut to data.text's character limit and
# checked), for encoders that analyse raw text inside the model (text/tfidf).
TEXT_STRINGS = "text_strings"
LOG_MEL = "log_mel"  # float32 [B, frames, mel_bins]
WAVEFORM = "waveform"  # float32 [B, samples] mono at data.audio.sample_rate, in [-1, 1]
INPUT_KINDS = {
    IMAGE: (PIXELS,),
    TEXT: (TOKEN_IDS, CHECKPOINT_TOKEN_IDS, TEXT_STRINGS),
    AUDIO: (LOG_MEL, WAVEFORM),
}

Modalities = Sequence[str] | ModelConfig


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


def input_kinds(model: Modalities = MODALITIES) -> dict[str, str]:
    """Modality -> input kind (see INPUT_KINDS) of each modality a model uses.

    Args:
        model: the model config (each encoder family declares its
            ``input_kind``), or just modality names (default kinds).

    Raises:
        ValueError: an encoder declares a kind its modality does not have.
    """
    if not isinstance(model, ModelConfig):
        return {m: INPUT_KINDS[m][0] for m in MODALITIES if m in model}
    kinds = {}
    for modality in (m for m in MODALITIES if m in model.modalities):
        encoder = getattr(model, f"{modality}_encoder")
        kind = type(encoder).input_kind or INPUT_KINDS[modality][0]
        if kind not in INPUT_KINDS[modality]:
            raise ValueError(
                f"encoder {encoder.name!r} declares input kind {kind!r}; "
                f"{modality} has {list(INPUT_KINDS[modality])}"
            )
        kinds[modality] = kind
    return kinds


def model_feature_specs(config: DataConfig, model: Modalities = MODALITIES) -> dict[str, tf.TensorSpec]:
    """Specs of the preprocessed features a model consumes (batch dim first).

    Args:
        config: the data preprocessing settings.
        model: the model config (its encoders decide their input kinds) or
            the modality names (each modality's default input).
    """
    specs: dict[str, tf.TensorSpec] = {}
    kinds = input_kinds(model)
    if IMAGE in kinds:
        shape = (None, config.image.height, config.image.width, config.image.channels)
        specs[IMAGE] = tf.TensorSpec(shape, tf.float32, name=IMAGE)
    if kinds.get(TEXT) == TEXT_STRINGS:
        specs[TEXT] = tf.TensorSpec((None,), tf.string, name=TEXT)
    elif TEXT in kinds:  # both id kinds are padded id rows
        specs[TEXT] = tf.TensorSpec((None, config.text.max_tokens), tf.int64, name=TEXT)
    if kinds.get(AUDIO) == LOG_MEL:
        shape = (None, audio_num_frames(config), config.audio.num_mel_bins)
        specs[AUDIO] = tf.TensorSpec(shape, tf.float32, name=AUDIO)
    elif kinds.get(AUDIO) == WAVEFORM:
        samples = int(round(config.audio.sample_rate * config.audio.duration_seconds))
        specs[AUDIO] = tf.TensorSpec((None, samples), tf.float32, name=AUDIO)
    modalities = list(kinds)
    for modality in modalities:
        name = presence_name(modality)
        specs[name] = tf.TensorSpec((None,), tf.float32, name=name)
    return specs
