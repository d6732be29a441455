"""Shared helpers for tests: tiny configs and random inputs of the right specs."""

from __future__ import annotations

import numpy as np

from multimodal_tf import config as config_lib
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data import features

# Widths 8-16, 16 px images, 8 tokens, 0.25 s audio: runs the real code fast.
TINY_OVERRIDES = (
    "data.image.height=16",
    "data.image.width=16",
    "data.text.max_tokens=8",
    "data.audio.duration_seconds=0.25",
    "data.audio.num_mel_bins=16",
    "data.batch_size=8",
    "model.image_encoder.width=8",
    "model.image_encoder.output_dim=16",
    "model.text_encoder.width=8",
    "model.text_encoder.embedding_dim=8",
    "model.text_encoder.output_dim=16",
    "model.audio_encoder.width=8",
    "model.audio_encoder.output_dim=16",
    "model.fusion.hidden_dim=16",
    "model.fusion.num_heads=2",
    "model.head.hidden_units=[16]",
    "train.epochs=1",
    "train.verbose=0",
)


def tiny_config(*overrides: str, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """A small experiment config; extra ``key=value`` overrides win."""
    return config_lib.load((), TINY_OVERRIDES + tuple(overrides), base=base)


def random_features(config: ExperimentConfig, batch_size: int = 4, seed: int = 0, vocab_size: int = 50):
    """Random model features matching ``features.model_feature_specs``."""
    rng = np.random.default_rng(seed)
    specs = features.model_feature_specs(config.data, config.model.modalities)
    out = {}
    for name, spec in specs.items():
        shape = (batch_size,) + tuple(spec.shape[1:])
        if name.endswith("_present"):
            out[name] = np.ones(shape, np.float32)
        elif spec.dtype.is_integer:
            out[name] = rng.integers(1, vocab_size, shape).astype(np.int64)
        else:
            out[name] = rng.normal(size=shape).astype(np.float32)
    return out
