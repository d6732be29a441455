"""Raw bytes -> model features: the one preprocessing used everywhere.

The training pipeline, the exported serving signatures and the in-process
predictor all call :class:`Preprocessor`, so training and serving cannot skew.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from multimodal_tf.config import MODALITIES, DataConfig, ModelConfig
from multimodal_tf.data import features
from multimodal_tf.data.audio import preprocess_audio, preprocess_waveforms
from multimodal_tf.data.image import preprocess_images
from multimodal_tf.data.text import RESERVED_TOKENS, TextTokenizer, clean_texts


class Preprocessor(tf.Module):
    """Batched raw inputs -> model features, in TF ops only.

    Args:
        config: data preprocessing settings.
        vocabulary: WordPiece vocabulary (from the conversion metadata).
        modalities: the model config (its encoders decide what each modality
            is turned into, see ``features.input_kinds``), or the modality
            names the model uses (default inputs); others are not computed.

    Call with a dict of [B] string tensors keyed ``image``/``text``/``audio``
    (encoded image, UTF-8 text, WAV bytes; empty string = absent). Returns
    the model features of :func:`features.model_feature_specs`, including a
    float 0/1 presence flag per modality.
    """

    def __init__(
        self,
        config: DataConfig,
        vocabulary: Sequence[str] = RESERVED_TOKENS,
        modalities: Sequence[str] | ModelConfig = MODALITIES,
        name: str = "preprocessor",
    ):
        super().__init__(name=name)
        names = modalities.modalities if isinstance(modalities, ModelConfig) else modalities
        unknown = set(names) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {MODALITIES}")
        self.config = config
        self.kinds = features.input_kinds(modalities)
        self.modalities = tuple(self.kinds)
        self.tokenizer = None
        if self.kinds.get(features.TEXT) == features.TOKEN_IDS:
            self.tokenizer = TextTokenizer(vocabulary, config.text)
        elif self.kinds.get(features.TEXT) == features.CHECKPOINT_TOKEN_IDS:
            # The encoder's own vocabulary (e.g. a BERT checkpoint's vocab.txt).
            self.tokenizer = modalities.text_encoder.tokenizer(config.text)

    def __call__(self, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        outputs: dict[str, tf.Tensor] = {}
        for modality in self.modalities:
            encoded = tf.convert_to_tensor(raw[modality], tf.string)
            present = tf.cast(tf.strings.length(encoded) > 0, tf.float32)
            with tf.name_scope(modality):
                if modality == features.IMAGE:
                    value = preprocess_images(encoded, self.config.image)
                elif self.kinds[modality] == features.TEXT_STRINGS:
                    value = clean_texts(encoded, self.config.text)
                elif modality == features.TEXT:
                    value = self.tokenizer(encoded)
                elif self.kinds[modality] == features.WAVEFORM:
                    value = preprocess_waveforms(encoded, self.config.audio)
                else:
                    value = preprocess_audio(encoded, self.config.audio)
            outputs[modality] = value
            outputs[features.presence_name(modality)] = present
        return outputs

    def parse_examples(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        """[B] serialized ``tf.Example`` -> raw feature dict (plus id and label)."""
        return tf.io.parse_example(serialized, features.raw_feature_spec())
