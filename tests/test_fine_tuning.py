"""Per-encoder learning rates and two-phase fine-tuning through the training recipe."""

import numpy as np
import pytest

from multimodal_tf import fine_tuning, recipe
from multimodal_tf.compat import keras
from multimodal_tf.data.metadata import DatasetMetadata
from multimodal_tf.models import build_model, labels_for_head
from multimodal_tf.testing import random_features, tiny_config

NUM_CLASSES = 3


def fake_metadata(examples: int = 8) -> DatasetMetadata:
    """What compile_model reads of a converted dataset: class names, vocabulary, train size."""
    return DatasetMetadata(
        label_names=[f"class_{i}" for i in range(NUM_CLASSES)],
        vocabulary=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"],
        counts={"train": {"examples": examples}},
        shards={},
        sample_rate=16000,
        source={},
    )


def batch(config, size: int = 8):
    x = random_features(config, batch_size=size, seed=5)
    y = labels_for_head(np.arange(size) % NUM_CLASSES, config, NUM_CLASSES)
    return x, y


def image_config(*overrides):
    return tiny_config(
        "model.modalities=[image]",
        "train.lr_schedule=constant",
        "train.learning_rate=0.01",
        "model.image_encoder.dropout_rate=0",
        "model.head.dropout_rate=0",
        *overrides,
    )


def step_deltas(optimizer: str, multiplier: float, initial=None):
    """Weight changes of the encoder and the rest after one training step, from the same start."""
    config = image_config(
        f"train.optimizer={optimizer}", f"model.image_encoder.learning_rate_multiplier={multiplier}"
    )
    model = recipe.compile_model(config, fake_metadata())
    model.run_eagerly = True  # the optimizer's code is the same; tracing would cost seconds per model
    if initial is not None:
        model.set_weights(initial)
    initial = model.get_weights()
    encoder = model.get_layer("image_encoder")
    encoder_ids = {id(v) for v in encoder.trainable_weights}
    before = [v.numpy() for v in model.trainable_weights]
    model.train_on_batch(*batch(config))
    deltas = [v.numpy() - b for v, b in zip(model.trainable_weights, before, strict=True)]
    in_encoder = [id(v) in encoder_ids for v in model.trainable_weights]
    return (
        initial,
        [d for d, e in zip(deltas, in_encoder, strict=False) if e],
        [d for d, e in zip(deltas, in_encoder, strict=False) if not e],
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_learning_rate_multiplier_scales_the_encoder_update_and_nothing_else(optimizer):
    """SGD (momentum): the step is linear in the rate. Adam's first step is lr * m1/sqrt(v1)
    (nearly lr * sign(g)) whatever the gradient's scale: scaling gradients would leave it as it
    is, so m * (the m = 1 step) proves a real per-variable learning rate."""
    initial, encoder_one, rest_one = step_deltas(optimizer, 1.0)
    for multiplier in (0.25, 0.0):
        _, encoder_m, rest_m = step_deltas(optimizer, multiplier, initial)
        assert any(np.abs(d).max() > 1e-4 for d in encoder_one)
        for one, scaled in zip(encoder_one, encoder_m, strict=True):
            np.testing.assert_allclose(scaled, multiplier * one, rtol=1e-4, atol=1e-7)
        for one, same in zip(rest_one, rest_m, strict=True):  # the head keeps train.learning_rate
            np.testing.assert_allclose(same, one, rtol=1e-4, atol=1e-7)


class EpochWeights(keras.callbacks.Callback):
    """The image encoder's weights at the end of every epoch (as checkpoints see them)."""

    def on_train_begin(self, logs=None):
        self.epochs = [[w.numpy() for w in self.model.get_layer("image_encoder").weights]]

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append([w.numpy() for w in self.model.get_layer("image_encoder").weights])


def changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_an_encoder_frozen_until_its_epoch_is_then_trained_and_checkpoints_load_into_a_fresh_model(tmp_path):
    config = image_config(
        "model.image_encoder.unfreeze_at_epoch=2", "train.epochs=4", "train.ema_momentum=0.5"
    )
    model = recipe.compile_model(config, fake_metadata())
    recorder = EpochWeights()
    callbacks = recipe.callbacks_for(config, between=[recorder])
    assert [type(c).__name__ for c in callbacks][:3] == [
        "SwapEMAWeights",
        "FineTuningSchedule",
        "EpochWeights",
    ]
    x, y = batch(config)
    model.fit(x, y, batch_size=4, epochs=4, callbacks=callbacks, verbose=0)
    weights = recorder.epochs
    assert not changed(weights[0], weights[1]) and not changed(weights[1], weights[2])  # epochs 0, 1: frozen
    assert changed(weights[2], weights[3]) and changed(weights[3], weights[4])  # epochs 2, 3: trained
    # Back to the flags it was built with, so its .h5 checkpoints load into a fresh model.
    assert all(layer.trainable for layer in model.get_layer("image_encoder")._flatten_layers())
    model.save_weights(str(tmp_path / "last.weights.h5"))
    fresh = build_model(config, NUM_CLASSES, 5)
    fresh.load_weights(str(tmp_path / "last.weights.h5"))
    for a, b in zip(fresh.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_variables_of_every_phase_are_collected_and_the_flags_restored():
    config = image_config("model.image_encoder.unfreeze_at_epoch=1")
    model = build_model(config, NUM_CLASSES, 5)
    encoder = model.get_layer("image_encoder")
    schedule = fine_tuning.unfreeze_schedule(config.model)
    assert schedule == {"image_encoder": 1}
    fine_tuning.apply_phase(model, schedule, 0)
    assert encoder.trainable_weights == []
    fine_tuning.apply_phase(model, schedule, 1)
    assert encoder.trainable_weights
    fine_tuning.apply_phase(model, schedule, 0)
    variables = fine_tuning.variables_ever_trained(model, schedule)
    assert encoder.trainable_weights == []  # the flags it found are back
    assert {id(v) for v in encoder.weights if "moving" not in v.name} <= {id(v) for v in variables}
    fine_tuning.apply_phase(model, schedule, 1)
    assert {id(v) for v in variables} == {id(v) for v in model.trainable_variables}
