"""build_model: inputs and outputs, heads, presence masking, modality dropout, weights."""

from __future__ import annotations

import numpy as np
import pytest

from multimodal_tf import models, testing
from multimodal_tf.compat import keras, tf
from multimodal_tf.data import features

VOCAB_SIZE = 50
NUM_CLASSES = 3
# One LSTM layer: each traced LSTM layer costs seconds of test time.
FULL = ("model.text_encoder.depth=1", "model.fusion.name=attention", "model.modality_dropout.text=0.3")


@pytest.fixture(scope="module")
def full_config():
    return testing.tiny_config(*FULL)


@pytest.fixture(scope="module")
def full_model(full_config):
    return models.build_model(full_config, NUM_CLASSES, VOCAB_SIZE)


def test_inputs_and_output_follow_the_feature_specs(full_config, full_model):
    specs = features.model_feature_specs(full_config.data, full_config.model.modalities)
    assert set(full_model.input) == set(specs)
    for name, spec in specs.items():
        assert full_model.input[name].dtype == spec.dtype
        assert tuple(full_model.input[name].shape) == tuple(spec.shape)
    assert full_model.output_names == [models.OUTPUT_NAME]
    output = full_model(testing.random_features(full_config), training=False)
    assert output.shape == (4, NUM_CLASSES) and output.dtype == tf.float32
    np.testing.assert_allclose(output.numpy().sum(-1), 1.0, atol=1e-5)


def test_every_layer_has_an_explicit_name(full_model):
    for layer in full_model.layers:
        assert not any(layer.name.startswith(default) for default in ("dense", "input_", "tf.", "dropout"))


def test_absent_modality_does_not_change_model_output(full_config, full_model):
    inputs = testing.random_features(full_config, batch_size=4, seed=0, vocab_size=VOCAB_SIZE)
    other = testing.random_features(full_config, batch_size=4, seed=1, vocab_size=VOCAB_SIZE)
    # Row 0: no modality present; row 1: only the (same) image; rows 2-3: all present.
    for batch in (inputs, other):
        for modality in full_config.model.modalities:
            batch[features.presence_name(modality)][:2] = 0.0
        batch["image_present"][1] = 1.0
    other["image"][1] = inputs["image"][1]
    expected = full_model(inputs, training=False).numpy()
    changed = full_model(other, training=False).numpy()
    np.testing.assert_allclose(changed[:2], expected[:2], atol=1e-6)
    assert not np.allclose(changed[2:], expected[2:])


def test_fit_step_full_model(full_config, full_model):
    assert np.isfinite(testing.fit_one_step(full_model, full_config, NUM_CLASSES, vocab_size=VOCAB_SIZE))


def test_weights_save_and_reload(full_config, full_model, tmp_path):
    inputs = testing.random_features(full_config, vocab_size=VOCAB_SIZE)
    expected = full_model(inputs, training=False).numpy()
    full_model.save_weights(tmp_path / "weights.h5")
    reloaded = models.build_model(full_config, NUM_CLASSES, VOCAB_SIZE)
    reloaded.load_weights(tmp_path / "weights.h5")
    np.testing.assert_allclose(reloaded(inputs, training=False).numpy(), expected, atol=1e-6)


def test_image_and_audio_only():
    config = testing.tiny_config("model.modalities=[image,audio]", "model.fusion.name=gated")
    model = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
    assert set(model.input) == {"image", "audio", "image_present", "audio_present"}
    assert model(testing.random_features(config), training=False).shape == (4, NUM_CLASSES)


@pytest.mark.parametrize(
    ("head", "num_classes", "fusion", "units"),
    [("binary", 2, "concat", 1), ("multilabel", 4, "concat", 4), ("binary", 2, "late", 1)],
)
def test_head_types(head, num_classes, fusion, units):
    config = testing.tiny_config(
        "model.modalities=[image]", f"model.head.type={head}", f"model.fusion.name={fusion}"
    )
    model = models.build_model(config, num_classes, VOCAB_SIZE)
    output = model(testing.random_features(config), training=False).numpy()
    assert output.shape == (4, units)
    assert ((output > 0) & (output < 1)).all()
    assert isinstance(models.loss_for(config), keras.losses.BinaryCrossentropy)
    if fusion == "concat":
        assert np.isfinite(testing.fit_one_step(model, config, num_classes, run_eagerly=True))


def test_head_validation():
    config = testing.tiny_config("model.modalities=[image]", "model.head.type=binary")
    with pytest.raises(ValueError, match="binary"):
        models.build_model(config, 3, VOCAB_SIZE)
    with pytest.raises(ValueError, match="head.type"):
        models.build_model(testing.tiny_config("model.head.type=ordinal"), 3, VOCAB_SIZE)
    with pytest.raises(ValueError, match="image_encoder"):
        models.build_model(testing.tiny_config("model.image_encoder.name=audio/cnn"), 3, VOCAB_SIZE)
    with pytest.raises(ValueError, match="modalities"):
        models.build_model(testing.tiny_config("model.modalities=[image,video]"), 3, VOCAB_SIZE)


def test_labels_for_head_and_loss():
    labels = tf.constant([0, 1, 1, 0], tf.int64)
    multiclass = testing.tiny_config()
    assert isinstance(models.loss_for(multiclass), keras.losses.SparseCategoricalCrossentropy)
    np.testing.assert_array_equal(models.labels_for_head(labels, multiclass, 3).numpy(), [0, 1, 1, 0])
    binary = models.labels_for_head(labels, testing.tiny_config("model.head.type=binary"), 2)
    assert binary.dtype == tf.float32 and binary.shape == (4, 1)
    multilabel = models.labels_for_head(labels, testing.tiny_config("model.head.type=multilabel"), 3)
    np.testing.assert_array_equal(multilabel.numpy(), np.eye(3, dtype=np.float32)[[0, 1, 1, 0]])


def test_modality_dropout_never_hides_every_present_modality():
    layer = models.ModalityDropout({"image": 0.9, "text": 0.9, "audio": 0.9}, seed=3)
    rng = np.random.default_rng(0)
    presence = {m: tf.constant(rng.integers(0, 2, 2000), tf.float32) for m in ("image", "text", "audio")}
    dropped = layer(presence, training=True)
    before = np.stack([presence[m].numpy() for m in sorted(presence)], 1)
    after = np.stack([dropped[m].numpy() for m in sorted(presence)], 1)
    assert (after <= before).all()  # never turns an absent modality on
    np.testing.assert_array_equal(after.max(1), before.max(1))  # at least one kept where one was present
    assert after.sum() < 0.6 * before.sum()  # and it does drop
    for training in (False, None):
        identity = layer(presence, training=training)
        for m in presence:
            np.testing.assert_array_equal(identity[m].numpy(), presence[m].numpy())


def test_modality_dropout_is_identity_at_inference():
    overrides = ("model.modalities=[image,audio]", "model.fusion.name=weighted_sum")
    config = testing.tiny_config(
        *overrides, "model.modality_dropout.image=0.9", "model.modality_dropout.audio=0.9"
    )
    model = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
    without_dropout = models.build_model(testing.tiny_config(*overrides), NUM_CLASSES, VOCAB_SIZE)
    without_dropout.set_weights(model.get_weights())
    inputs = testing.random_features(config, batch_size=16)
    expected = without_dropout(inputs, training=False).numpy()
    for _ in range(3):
        np.testing.assert_array_equal(model(inputs, training=False).numpy(), expected)
    assert not np.allclose(model(inputs, training=True).numpy(), expected)


def test_mixed_precision_output_is_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        for fusion in ("attention", "late", "tensor"):
            config = testing.tiny_config("model.modalities=[image,audio]", f"model.fusion.name={fusion}")
            model = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
            inputs = testing.random_features(config)
            inputs["audio_present"][0] = 0.0
            output = model(inputs, training=False)
            assert output.dtype == tf.float32
            assert np.isfinite(output.numpy()).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_text_bow_runs_under_mixed_precision():
    """Its padding mask once stayed float32 beside float16 embeddings (found by benchmarks/gpu_check.py)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        config = testing.tiny_config("model.modalities=[text]", "model.text_encoder.name=text/bow")
        model = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
        inputs = testing.random_features(config)
        inputs["text"][:, 3:] = 0  # padding, which the mask must hide
        output = model(inputs, training=False)
        assert output.dtype == tf.float32 and np.isfinite(output.numpy()).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_encoder_checkpoint_is_loaded(tmp_path):
    from multimodal_tf.encoders import save_encoder_checkpoint

    config = testing.tiny_config("model.modalities=[image]")
    source = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
    prefix = save_encoder_checkpoint(source.get_layer("image_encoder"), str(tmp_path / "image"))
    config = testing.tiny_config("model.modalities=[image]", f"model.image_encoder.checkpoint={prefix}")
    model = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
    for loaded, saved in zip(
        model.get_layer("image_encoder").weights, source.get_layer("image_encoder").weights, strict=True
    ):
        np.testing.assert_array_equal(loaded.numpy(), saved.numpy())


@pytest.mark.parametrize(
    "fusion", ["concat", "weighted_sum", "gated", "attention", "cross_attention", "late", "tensor"]
)
def test_weight_names_are_unique(fusion):
    """HDF5 weight files (the training checkpoints) need one name per weight."""
    config = testing.tiny_config("model.modalities=[image,audio]", f"model.fusion.name={fusion}")
    names = [weight.name for weight in models.build_model(config, NUM_CLASSES, VOCAB_SIZE).weights]
    assert len(names) == len(set(names)), sorted(names)


# === Deep ensemble (model.ensemble_size) ===

# No dropout of any kind, so that one training step is deterministic.
ENSEMBLE = (
    "model.modalities=[image,audio]",
    "model.fusion.name=late",
    "model.image_encoder.dropout_rate=0.0",
    "model.audio_encoder.dropout_rate=0.0",
    "model.fusion.dropout_rate=0.0",
    "train.seed=3",
)


def test_ensemble_output_is_the_average_of_independently_initialised_members(tmp_path):
    config = testing.tiny_config(*ENSEMBLE, "model.ensemble_size=3")
    model = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
    assert isinstance(model, models.EnsembleModel) and len(model.members) == 3
    assert model.output_names == [models.OUTPUT_NAME]
    assert set(model.input) == set(features.model_feature_specs(config.data, config.model.modalities))
    inputs = testing.random_features(config)
    members = [member(inputs, training=False).numpy() for member in model.members]
    assert not np.allclose(members[0], members[1])  # their own initial weights
    output = model(inputs, training=False).numpy()
    np.testing.assert_allclose(output, np.mean(members, axis=0), atol=1e-6)
    # Nested members keep apart in HDF5 checkpoints (training's weight files).
    model.save_weights(tmp_path / "weights.h5")
    reloaded = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
    reloaded.load_weights(tmp_path / "weights.h5")
    np.testing.assert_allclose(reloaded(inputs, training=False).numpy(), output, atol=1e-6)
    for member, other in zip(model.members, reloaded.members, strict=True):
        np.testing.assert_allclose(member(inputs).numpy(), other(inputs).numpy(), atol=1e-6)


def _sgd_step(model, config, learning_rate: float):
    inputs = testing.random_features(config, batch_size=8, seed=5)
    labels = np.arange(8) % NUM_CLASSES
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss=models.loss_for(config))
    model.fit(inputs, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)


def test_each_ensemble_member_trains_on_its_own_loss():
    """A member's step equals the step it would take alone (deep ensembles), not one on the average."""
    config = testing.tiny_config(*ENSEMBLE, "model.ensemble_size=2")
    ensemble = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
    alone = models.build_model(testing.tiny_config(*ENSEMBLE), NUM_CLASSES, VOCAB_SIZE)
    averaged = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
    alone.set_weights(ensemble.members[0].get_weights())
    averaged.set_weights(ensemble.get_weights())
    start = [w.copy() for w in alone.get_weights()]
    # The ensemble minimises the members' mean loss: twice the rate of one model alone.
    _sgd_step(ensemble, config, 0.2)
    _sgd_step(alone, config, 0.1)
    for got, want in zip(ensemble.members[0].get_weights(), alone.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert any(not np.allclose(w, s) for w, s in zip(alone.get_weights(), start, strict=True))
    # Fitting the averaged output (plain keras.Model.train_step) moves a member differently.
    averaged.train_step = lambda data: keras.Model.train_step(averaged, data)
    _sgd_step(averaged, config, 0.2)
    assert any(
        not np.allclose(got, want, atol=1e-5)
        for got, want in zip(averaged.members[0].get_weights(), alone.get_weights(), strict=True)
    )


def test_ensemble_size_must_be_positive():
    with pytest.raises(ValueError, match="ensemble_size"):
        models.build_model(testing.tiny_config("model.ensemble_size=0"), NUM_CLASSES, VOCAB_SIZE)
