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
    "model.text_encoder.depth=1",  # each LSTM layer costs seconds of graph tracing
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


def fit_one_step(
    model,
    config: ExperimentConfig,
    num_classes: int,
    batch_size: int = 4,
    vocab_size: int = 50,
    run_eagerly: bool = False,
) -> float:
    """Compiles ``model`` with the loss of its head and fits one batch of random features.

    Returns the training loss, so a test can check that it is finite.
    ``run_eagerly`` skips tracing the train step (seconds per model).
    """
    from multimodal_tf import models  # noqa: PLC0415  (keeps this module light)

    inputs = random_features(config, batch_size=batch_size, vocab_size=vocab_size)
    labels = np.arange(batch_size) % num_classes
    targets = models.labels_for_head(labels, config, num_classes)
    model.compile(optimizer="adam", loss=models.loss_for(config), run_eagerly=run_eagerly)
    history = model.fit(inputs, targets, batch_size=batch_size, epochs=1, verbose=0)
    return float(history.history["loss"][-1])


def assert_config_round_trip(layer) -> None:
    """``type(layer).from_config(layer.get_config())`` has the same config."""
    config = layer.get_config()
    restored = type(layer).from_config(config)
    if restored.get_config() != config:
        raise AssertionError(
            f"{layer.name}: config changed in a round trip:\n{config}\n{restored.get_config()}"
        )
