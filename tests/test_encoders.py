"""Encoders: the shared layer test, absent inputs, what each computes, one fit step each."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from multimodal_tf import config as config_lib
from multimodal_tf import encoders, models, testing
from multimodal_tf.compat import keras, tf
from multimodal_tf.registry import ENCODERS

BATCH = 4
# Text and audio LSTMs at depth 1: tracing each LSTM layer costs seconds.
CONFIGS = {
    "image/cnn": encoders.ImageCNNConfig(width=8, depth=2, output_dim=16),
    "image/cnn colour": encoders.ImageCNNConfig(width=8, depth=2, output_dim=16, colour_bins=4),
    "text/lstm": encoders.TextLSTMConfig(width=8, depth=1, output_dim=16, embedding_dim=8),
    "text/bow": encoders.TextBagOfEmbeddingsConfig(output_dim=16, embedding_dim=8),
    "text/bow linear": encoders.TextBagOfEmbeddingsConfig(embedding_dim=16, output_dim=16, linear=True),
    "audio/cnn": encoders.AudioCNNConfig(width=8, depth=2, output_dim=16),
    "audio/lstm": encoders.AudioLSTMConfig(width=8, depth=1, output_dim=16),
    "audio/stats": encoders.AudioStatsConfig(width=8, depth=2, output_dim=16),
}
# What the layer test turns on beyond CONFIGS, so every argument is exercised.
LAYER_TEST_CHANGES = {
    "image/cnn colour": {"augment": True},
    "text/lstm": {"bidirectional": True},
    "audio/lstm": {"bidirectional": True},
}
INPUT_SHAPES = {"image": (16, 16, 3), "text": (8,), "audio": (23, 16)}
# Families that wrap local files cannot be built from their default config;
# their own test files check them with files the tests write.
# Families whose layer needs a local file: tests/test_audio_saved_model.py, tests/test_backbones.py,
# tests/test_bert.py.
NEEDS_LOCAL_FILES = {"audio/saved_model", "image/keras_model", "text/bert"}
VOCAB_SIZE = 50


def _extra(name: str) -> dict:
    # text/tfidf reads raw strings and learns its own vocabulary (tests/test_tfidf.py).
    return {"vocab_size": VOCAB_SIZE} if name.startswith("text/") and name != "text/tfidf" else {}


def make_encoder(name: str, **changes):
    config = dataclasses.replace(CONFIGS[name], **changes)
    return encoders.build_encoder(config, name="encoder", **_extra(name))


def make_input(name: str, seed: int = 0) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    shape = (BATCH,) + INPUT_SHAPES[name.split("/")[0]]
    if name.startswith("text/"):
        tokens = rng.integers(1, VOCAB_SIZE, shape)
        tokens[:, 5:] = 0  # right padding
        return tf.constant(tokens, tf.int64)
    values = rng.normal(size=shape) - (4.0 if name.startswith("audio/") else 0.0)  # log-mel-like offset
    return tf.constant(values, tf.float32)


def test_registry_keys():
    assert set(ENCODERS.keys()) >= {
        "image/cnn",
        "text/lstm",
        "text/bow",
        "text/tfidf",
        "audio/cnn",
        "audio/lstm",
        "audio/stats",
    }


def test_unknown_encoder_lists_known_ones():
    with pytest.raises(KeyError, match="image/cnn"):
        ENCODERS.get("image/resnet9000")
    with pytest.raises(config_lib.ConfigError, match="model.image_encoder.name: unknown encoder.*image/cnn"):
        config_lib.load([], ["model.image_encoder.name=image/resnet9000"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer(name):
    """Shapes, config round trip, serialization, gradients and a fit step (testing.run_layer_test)."""
    config = dataclasses.replace(CONFIGS[name], **LAYER_TEST_CHANGES.get(name, {}))
    testing.run_layer_test(
        ENCODERS.get(config.name),
        {**config.layer_arguments(), **_extra(name), "name": "encoder"},
        (make_input(name),),
        (BATCH, 16),
    )


def test_every_family_config_is_its_layers_arguments():
    """A family's config fields are exactly the arguments its layer records: none unused, none missing."""
    for key in set(ENCODERS.keys()) - NEEDS_LOCAL_FILES:
        config = ENCODERS.config(key)()
        layer = encoders.build_encoder(config, **_extra(key))
        # vocab_size and sequence_output come from build_model, not the config.
        recorded = (
            set(layer.get_config())
            - set(keras.layers.Layer().get_config())
            - {"vocab_size", "sequence_output"}
        )
        assert recorded == set(config.layer_arguments()), key
        assert all(layer.get_config()[k] == v for k, v in config.layer_arguments().items()), key


def test_build_encoder_needs_the_family_config():
    with pytest.raises(TypeError, match="AudioLSTMConfig"):
        encoders.build_encoder(dataclasses.replace(encoders.AudioCNNConfig(), name="audio/lstm"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_absent_input_gives_finite_output(name):
    """What preprocessing emits for an absent modality (zeros) encodes without NaN."""
    encoder = make_encoder(name)
    absent = tf.zeros_like(make_input(name))
    for training in (False, True):
        assert np.isfinite(encoder(absent, training=training).numpy()).all()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_text_all_padding_row_is_zero(bidirectional):
    encoder = make_encoder("text/lstm", bidirectional=bidirectional, depth=2)
    tokens = make_input("text/lstm").numpy()
    tokens[1] = 0
    output = encoder(tf.constant(tokens), training=False).numpy()
    assert np.isfinite(output).all()
    np.testing.assert_array_equal(output[1], 0.0)


def test_text_padding_is_masked():
    """Trailing padding does not change the encoding."""
    encoder = make_encoder("text/lstm")
    unpadded = encoder(tf.constant([[5, 6, 7]], tf.int64), training=False).numpy()
    padded = encoder(tf.constant([[5, 6, 7, 0, 0, 0, 0, 0]], tf.int64), training=False).numpy()
    np.testing.assert_allclose(padded, unpadded, atol=1e-6)


def test_linear_bow_is_the_masked_mean_embedding():
    """fastText's representation: the mean of the present tokens' embeddings, nothing else."""
    encoder = make_encoder("text/bow linear")
    tokens = make_input("text/bow linear").numpy()
    tokens[2] = 0  # absent text
    output = encoder(tf.constant(tokens), training=False).numpy()
    table = encoder.embedding.get_weights()[0]
    for row, ids in zip(output, tokens, strict=True):
        present = ids[ids != 0]
        expected = table[present].mean(axis=0) if len(present) else np.zeros(16)
        np.testing.assert_allclose(row, expected, atol=1e-6)
    assert encoder.projection is None and encoder.output_dim == 16
    restored = type(encoder).from_config(encoder.get_config())
    assert restored.linear and restored.projection is None


def test_audio_encoders_ignore_recording_level():
    """Per-clip normalisation: a constant offset of the log-mel map changes nothing."""
    for name in ("audio/cnn", "audio/lstm"):
        encoder = make_encoder(name)
        spectrograms = make_input(name)
        np.testing.assert_allclose(
            encoder(spectrograms, training=False).numpy(),
            encoder(spectrograms + 3.0, training=False).numpy(),
            atol=1e-4,
        )


def test_audio_stats_encoder_sees_band_statistics_not_frame_order():
    encoder = make_encoder("audio/stats")
    spectrograms = make_input("audio/stats").numpy()
    expected = encoder(spectrograms, training=False).numpy()
    shuffled = spectrograms[:, np.random.default_rng(1).permutation(spectrograms.shape[1])]
    np.testing.assert_allclose(encoder(shuffled, training=False).numpy(), expected, atol=1e-5)
    # The statistics it pools are numpy's.
    stats = np.concatenate([spectrograms.mean(1), spectrograms.std(1), spectrograms.max(1)], axis=-1)
    np.testing.assert_allclose(
        encoders.audio.band_statistics(tf.constant(spectrograms)).numpy(), stats, atol=1e-3
    )
    # A louder clip is a different clip: no per-clip normalisation here.
    assert not np.allclose(encoder(spectrograms + 3.0, training=False).numpy(), expected)
    # Unlike the encoders above, one frame's change moves the max, and so the output.
    spectrograms[0, 3, 2] += 10.0
    assert not np.allclose(encoder(spectrograms, training=False).numpy()[0], expected[0])


def test_image_augmentation_acts_only_while_training():
    plain, augmented = make_encoder("image/cnn"), make_encoder("image/cnn", augment=True)
    images = make_input("image/cnn")
    plain(images)
    augmented(images)
    augmented.set_weights(plain.get_weights())
    assert augmented.get_config()["augment"] is True
    assert type(augmented).from_config(augmented.get_config()).augment is True
    # Inference: augmentation is the identity, so the two encoders agree exactly.
    np.testing.assert_allclose(
        augmented(images, training=False).numpy(), plain(images, training=False).numpy(), atol=1e-6
    )
    # Training: the augmented encoder sees transformed images.
    shifted = [layer(images, training=True) for layer in augmented.augmentation]
    assert all(not np.allclose(x.numpy(), images.numpy()) for x in shifted[1:])


def test_colour_histogram_counts_joint_colour_bins():
    rng = np.random.default_rng(0)
    images = rng.random((2, 5, 7, 3)).astype(np.float32)
    images[0, 0, 0] = 1.0  # the top edge falls in the last level, not past it
    levels = np.minimum((images * 4).astype(int), 3)
    cells = levels[..., 0] + 4 * levels[..., 1] + 16 * levels[..., 2]
    expected = np.sqrt([np.bincount(c.ravel(), minlength=64) / 35 for c in cells])
    np.testing.assert_allclose(encoders.image.colour_histogram(images, 4).numpy(), expected, atol=1e-6)
    grey = encoders.image.colour_histogram(images[..., :1], 5).numpy()
    assert grey.shape == (2, 5)
    np.testing.assert_allclose((grey**2).sum(-1), 1.0, atol=1e-6)


def test_colour_bins_see_the_palette_not_the_layout():
    """The histogram path reacts to a recolouring that keeps every pixel's place."""
    encoder = make_encoder("image/cnn colour")
    images = np.random.default_rng(2).random((BATCH, 16, 16, 3)).astype(np.float32)
    encoder(images)
    # Silence the convolutional path: what is left is the colour histogram.
    encoder.projection.kernel.assign(
        tf.concat([tf.zeros([16 * 4 * 4, 16]), tf.random.stateless_normal([4**3, 16], seed=[0, 1])], axis=0)
    )
    encoder.projection.bias.assign(tf.ones([16]))
    expected = encoder(images, training=False).numpy()
    flipped = images[:, ::-1, ::-1]  # same pixels, other places
    np.testing.assert_allclose(encoder(flipped, training=False).numpy(), expected, atol=1e-5)
    recoloured = images[..., ::-1]  # same places, other colours
    assert not np.allclose(encoder(recoloured, training=False).numpy(), expected)
    assert type(encoder).from_config(encoder.get_config()).colour_bins == 4
    with pytest.raises(ValueError, match="colour_bins"):
        encoders.ImageCNNEncoder(colour_bins=1)
    with pytest.raises(config_lib.ConfigError, match="model.image_encoder.colour_bins: must be 0"):
        config_lib.load([], ["model.image_encoder.colour_bins=1"])


def test_encoder_checkpoint_round_trip(tmp_path):
    encoder = make_encoder("image/cnn")
    images = make_input("image/cnn")
    expected = encoder(images, training=False).numpy()
    prefix = encoders.save_encoder_checkpoint(encoder, str(tmp_path / "image_encoder"))
    other = make_encoder("image/cnn")
    other(images)
    encoders.load_encoder_checkpoint(other, prefix)
    np.testing.assert_allclose(other(images, training=False).numpy(), expected, atol=1e-6)
    wider = make_encoder("image/cnn", width=4)
    wider(images)
    with pytest.raises(ValueError, match="does not fit"):
        encoders.load_encoder_checkpoint(wider, prefix)
    with pytest.raises(ValueError, match="no checkpoint"):
        encoders.load_encoder_checkpoint(other, str(tmp_path / "missing"))


FIT_OVERRIDES = {
    "image/cnn": ("model.modalities=[image]",),
    "image/cnn colour": ("model.modalities=[image]", "model.image_encoder.colour_bins=3"),
    "text/lstm": ("model.modalities=[text]", "model.text_encoder.depth=1"),
    "text/bow": ("model.modalities=[text]", "model.text_encoder.name=text/bow"),
    "text/bow linear": (
        "model.modalities=[text]",
        "model.text_encoder.name=text/bow",
        "model.text_encoder.linear=true",
    ),
    "audio/cnn": ("model.modalities=[audio]", "model.audio_encoder.name=audio/cnn"),
    "audio/lstm": (
        "model.modalities=[audio]",
        "model.audio_encoder.name=audio/lstm",
        "model.audio_encoder.depth=1",
    ),
    "audio/stats": ("model.modalities=[audio]", "model.audio_encoder.name=audio/stats"),
}


@pytest.mark.parametrize("name", sorted(FIT_OVERRIDES))
def test_fit_step_in_full_model(name):
    config = testing.tiny_config(*FIT_OVERRIDES[name])
    model = models.build_model(config, num_classes=3, vocab_size=VOCAB_SIZE)
    assert np.isfinite(testing.fit_one_step(model, config, num_classes=3, vocab_size=VOCAB_SIZE))


# === Sequence outputs (the protocol of docs/models.md, for cross_attention) ===

SEQUENCE_ENCODERS = ("image/cnn", "image/cnn colour", "text/lstm", "text/bow", "audio/cnn", "audio/lstm")


def make_sequence_encoder(name: str):
    return encoders.build_encoder(CONFIGS[name], name="encoder", sequence_output=True, **_extra(name))


def _lstm_like(recurrent_layer, source) -> keras.layers.LSTM:
    """A fresh unidirectional LSTM returning only its last output, with ``source``'s weights."""
    lstm = keras.layers.LSTM(recurrent_layer.units)
    lstm.build((None, None, source.shape[-1]))
    lstm.set_weights(recurrent_layer.get_weights())
    return lstm


@pytest.mark.parametrize("name", SEQUENCE_ENCODERS)
def test_sequence_output(name):
    """(sequence, mask) shapes, dtypes and values; the config records it and round-trips."""
    encoder = make_sequence_encoder(name)
    assert type(encoder).supports_sequence_output and encoder.get_config()["sequence_output"] is True
    testing.assert_config_round_trip(encoder)
    inputs = make_input(name)
    if name.startswith("text/"):
        inputs = inputs.numpy()
        inputs[2] = 0  # an empty row
        inputs = tf.constant(inputs)
    sequence, mask = encoder(inputs, training=False)
    sequence, mask = sequence.numpy(), mask.numpy()
    assert mask.dtype == bool and sequence.shape[:2] == mask.shape and np.isfinite(sequence).all()
    if name.startswith("text/"):
        np.testing.assert_array_equal(mask, inputs.numpy() != 0)
        np.testing.assert_array_equal(sequence[~mask], 0.0)  # padding carries nothing
    else:
        assert mask.all()
    if name.startswith("image/"):
        x = inputs
        for layer in encoder.blocks:
            x = layer(x, training=False)
        regions = x.numpy().reshape(BATCH, -1, x.shape[-1])  # row-major: region (i, j) is i * w + j
        assert sequence.shape == (BATCH, 16, 16 + (64 if "colour" in name else 0))  # 16 px / 2**2 = 4 x 4
        np.testing.assert_allclose(sequence[..., : x.shape[-1]], regions, atol=1e-6)
    elif name == "text/bow":
        table = encoder.embedding.embeddings.numpy()
        np.testing.assert_allclose(sequence, np.where(mask[..., None], table[inputs.numpy()], 0.0), atol=1e-6)
    elif name == "text/lstm":
        # Token t's output is the LSTM run over tokens 0..t alone.
        embedded = encoder.embedding(inputs)
        lstm = _lstm_like(encoder.recurrent[-1], embedded)
        for t in (0, 3, 4):
            np.testing.assert_allclose(sequence[0, t], lstm(embedded[:1, : t + 1]).numpy()[0], atol=1e-5)
    elif name == "audio/cnn":
        x = encoder.input_norm(inputs)[..., None]
        for layer in encoder.blocks:
            x = layer(x, training=False)
        assert sequence.shape == (BATCH, 6, 4 * 16)  # ceil(23 / 4) frames, 16 / 4 bands x 16 channels
        np.testing.assert_allclose(sequence, x.numpy().reshape(BATCH, 6, -1), atol=1e-6)
    else:  # audio/lstm
        normed = encoder.input_norm(inputs)
        lstm = _lstm_like(encoder.recurrent[-1], normed)
        assert sequence.shape == (BATCH, 23, 8)
        np.testing.assert_allclose(sequence[:, 10], lstm(normed[:, :11]).numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["text/lstm", "audio/lstm"])
def test_sequence_output_uses_the_pooled_encoders_weights(name):
    """The last LSTM's final step is the state the pooled encoder projects (same weights, same input)."""
    pooled = make_encoder(name)
    inputs = make_input(name)
    pooled(inputs)
    sequential = make_sequence_encoder(name)
    sequential(inputs)
    assert len(sequential.weights) == len(pooled.weights) - 2  # no projection kernel and bias
    sequential.set_weights([w.numpy() for w in pooled.weights if "projection" not in w.name])
    sequence, mask = sequential(inputs, training=False)
    last = tf.gather(sequence, tf.reduce_sum(tf.cast(mask, tf.int32), axis=1) - 1, batch_dims=1)
    expected = pooled.dropout(pooled.projection(last), training=False)
    np.testing.assert_allclose(pooled(inputs, training=False).numpy(), expected.numpy(), atol=1e-5)


def test_audio_stats_has_no_sequence_output():
    assert not encoders.AudioStatsEncoder.supports_sequence_output
    with pytest.raises(ValueError, match="no sequence output"):
        make_sequence_encoder("audio/stats")
