"""fusion/cross_attention: a NumPy reference, masking, the model around it, strategies, export, float16."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from serving_helpers import export_untrained_model, make_inputs

from multimodal_tf import config as config_lib
from multimodal_tf import distribute, fusion, models, testing
from multimodal_tf.compat import keras, tf
from multimodal_tf.export import check_ops
from multimodal_tf.fusion.cross_attention import CrossAttentionFusion

MODALITIES = ("image", "text", "audio")
LENGTHS = {"image": 4, "text": 6, "audio": 3}
DIMS = {"image": 5, "text": 4, "audio": 3}  # different widths on purpose
BATCH = 4
# Rows: all present; image absent; only audio; none present.
PRESENCE = {"image": [1, 0, 0, 0], "text": [1, 1, 0, 0], "audio": [1, 1, 1, 0]}
TEXT_LENGTHS = [6, 2, 3, 0]  # real tokens per row (right padding), an empty row last
NUM_CLASSES = 3
VOCAB_SIZE = 50


def make_sequences(seed: int = 0, scale: float = 1.0) -> tuple[dict, dict]:
    """({modality: (sequence, mask)}, {modality: presence}) with padded text."""
    rng = np.random.default_rng(seed)
    embeddings = {}
    for m in MODALITIES:
        sequence = scale * rng.normal(size=(BATCH, LENGTHS[m], DIMS[m]))
        mask = np.ones((BATCH, LENGTHS[m]), bool)
        if m == "text":
            mask = np.arange(LENGTHS[m])[None, :] < np.array(TEXT_LENGTHS)[:, None]
        embeddings[m] = (tf.constant(sequence, tf.float32), tf.constant(mask))
    presence = {m: tf.constant(PRESENCE[m], tf.float32) for m in MODALITIES}
    return embeddings, presence


def make_layer(**changes) -> CrossAttentionFusion:
    arguments = {"hidden_dim": 8, "num_heads": 2, "num_layers": 2, "ff_dim": 16, "dropout_rate": 0.0}
    return CrossAttentionFusion(MODALITIES, **{**arguments, **changes}, name="fusion")


def test_layer_on_sequences():
    """Shapes, config round trip, serialization, gradients and a fit step, on (sequence, mask) inputs.

    test_fusion.py runs the same checks on pooled inputs with the "cls" readout.
    """
    testing.run_layer_test(
        CrossAttentionFusion,
        {
            "modalities": MODALITIES,
            "hidden_dim": 8,
            "num_heads": 2,
            "num_layers": 1,
            "ff_dim": 16,
            "dropout_rate": 0.1,
            "readout": "mean",
            "name": "fusion",
        },
        make_sequences(),
        (BATCH, 8),
    )


@pytest.mark.parametrize("readout", ["cls", "mean"])
def test_padding_and_absent_modalities_do_not_change_the_output(readout):
    layer = make_layer(readout=readout)
    embeddings, presence = make_sequences(seed=0)
    noise, _ = make_sequences(seed=1, scale=100.0)
    expected = layer(embeddings, presence, training=False).numpy()
    changed = {}
    for m in MODALITIES:
        sequence, mask = embeddings[m]
        keep = tf.logical_and(mask, presence[m][:, None] > 0)[..., None]
        # Padded positions and absent modalities take other values (NaN too).
        other = tf.where(tf.range(BATCH)[:, None, None] == 3, np.nan, noise[m][0])
        changed[m] = (tf.where(keep, sequence, other), mask)
    output = layer(changed, presence, training=False).numpy()
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-6)
    # ...whereas a real token of a present modality does change the output.
    sequence, mask = embeddings["text"]
    moved = {**embeddings, "text": (sequence + tf.one_hot(0, LENGTHS["text"])[None, :, None], mask)}
    assert not np.allclose(layer(moved, presence, training=False).numpy()[:2], expected[:2])


def test_pooled_embedding_is_one_token():
    """An encoder without sequence output ([B, D]) is the same as a length-1 sequence."""
    layer = make_layer()
    embeddings, presence = make_sequences()
    pooled = dict(embeddings, audio=embeddings["audio"][0][:, 0])
    one_token = dict(embeddings, audio=(embeddings["audio"][0][:, :1], tf.ones([BATCH, 1], tf.bool)))
    np.testing.assert_allclose(
        layer(pooled, presence).numpy(), layer(one_token, presence).numpy(), rtol=0, atol=1e-6
    )


# ~20 s of SavedModel tracing: with the slow tests. Exports (tf.saved_model of
# the serving module) do not revive Keras layers; training checkpoints are
# HDF5 weights (test_models.py::test_weight_names_are_unique).
@pytest.mark.slow
def test_keras_saved_model_round_trip(tmp_path):
    """A revived Keras SavedModel on (sequence, mask) inputs restores every weight (MHA's included)."""
    embeddings, presence = make_sequences()
    inputs = {}
    for m in MODALITIES:
        inputs[m] = keras.Input((LENGTHS[m], DIMS[m]), name=m)
        inputs[f"{m}_mask"] = keras.Input((LENGTHS[m],), dtype=tf.bool, name=f"{m}_mask")
        inputs[f"{m}_present"] = keras.Input((), name=f"{m}_present")
    layer = make_layer(num_layers=1)
    outputs = layer(
        {m: (inputs[m], inputs[f"{m}_mask"]) for m in MODALITIES},
        {m: inputs[f"{m}_present"] for m in MODALITIES},
    )
    model = keras.Model(inputs, outputs)
    values = {}
    for m in MODALITIES:
        values[m], values[f"{m}_mask"] = embeddings[m]
        values[f"{m}_present"] = presence[m]
    expected = model(values, training=False).numpy()
    model.save(tmp_path / "model")
    reloaded = keras.models.load_model(tmp_path / "model")
    np.testing.assert_allclose(reloaded(values, training=False).numpy(), expected, atol=1e-6)


# === The NumPy reference ===


def _layer_norm(x, layer):
    gamma, beta = (w.numpy().astype(np.float64) for w in layer.weights)
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + layer.epsilon) * gamma + beta


def _dense(x, layer):
    return x @ layer.kernel.numpy().astype(np.float64) + layer.bias.numpy()


def _attention(x, key_mask, attention):
    """Multi-head scaled dot-product self-attention, written out: [B, S, H] -> [B, S, H]."""
    w = {
        name: (
            getattr(attention, f"_{name}_dense").kernel.numpy(),
            getattr(attention, f"_{name}_dense").bias.numpy(),
        )
        for name in ("query", "key", "value", "output")
    }
    heads, key_dim = w["query"][0].shape[1:]
    q, k, v = (
        np.einsum("bsh,hnd->bnsd", x, w[n][0]) + w[n][1][None, :, None, :] for n in ("query", "key", "value")
    )
    scores = np.einsum("bnsd,bntd->bnst", q, k) / math.sqrt(key_dim)
    scores = np.where(key_mask[:, None, None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = np.einsum("bnst,bntd->bsnd", weights, v)
    return np.einsum("bsnd,ndh->bsh", context, w["output"][0]) + w["output"][1]


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def reference_forward(layer: CrossAttentionFusion, embeddings: dict, presence: dict) -> np.ndarray:
    """The layer's forward pass in float64 NumPy, from its weights alone."""
    tokens = [np.repeat(layer.cls_token.numpy().astype(np.float64), BATCH, axis=0)]
    keys = [np.ones((BATCH, 1), bool)]
    for i, m in enumerate(MODALITIES):
        sequence, mask = (np.asarray(t) for t in embeddings[m])
        mask = mask & (presence[m].numpy()[:, None] > 0)
        sequence = np.where(mask[..., None], sequence, 0.0)
        tokens.append(_dense(sequence, layer.projections[m]) + layer.modality_embedding.numpy()[i])
        keys.append(mask)
    x, key_mask = np.concatenate(tokens, 1), np.concatenate(keys, 1)
    for block in layer.blocks:
        x = x + _attention(_layer_norm(x, block.attention_norm), key_mask, block.attention)
        inner = _gelu(_dense(_layer_norm(x, block.feedforward_norm), block.feedforward_inner))
        x = x + _dense(inner, block.feedforward_outer)
    x = _layer_norm(x, layer.final_norm)
    if layer.readout == "cls":
        return x[:, 0]
    return (x * key_mask[..., None]).sum(1) / key_mask.sum(1, keepdims=True)


@pytest.mark.parametrize("num_layers,num_heads,readout", [(1, 1, "cls"), (2, 2, "cls"), (1, 2, "mean")])
def test_equals_a_numpy_transformer(num_layers, num_heads, readout):
    layer = make_layer(num_layers=num_layers, num_heads=num_heads, readout=readout)
    embeddings, presence = make_sequences()
    layer(embeddings, presence)
    # Random values for every weight (LayerNorm scales and offsets, biases,
    # CLS and type embeddings too), so none is checked only at its initial value.
    rng = np.random.default_rng(7)
    layer.set_weights([rng.normal(scale=0.5, size=w.shape) for w in layer.get_weights()])
    output = layer(embeddings, presence, training=False).numpy()
    np.testing.assert_allclose(output, reference_forward(layer, embeddings, presence), rtol=0, atol=1e-5)


# === Config ===


def test_config_and_registry():
    config = config_lib.load([], ["model.fusion={name: cross_attention, hidden_dim: 16, num_layers: 3}"])
    assert isinstance(config.model.fusion, fusion.CrossAttentionFusionConfig)
    layer = fusion.build_fusion(config.model.fusion, MODALITIES)
    assert (layer.num_layers, layer.hidden_dim, layer.consumes_sequences) == (3, 16, True)
    for override, message in [
        ("model.fusion={name: cross_attention, hidden_dim: 10, num_heads: 4}", "num_heads: must divide"),
        ("model.fusion={name: cross_attention, readout: max}", "readout: expected one of"),
        ("model.fusion={name: cross_attention, rank: 3}", "'cross_attention' takes only"),
    ]:
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.load([], [override])
    with pytest.raises(ValueError, match="readout"):
        CrossAttentionFusion(MODALITIES, readout="max")


# === In the model ===

# text/bow rather than the LSTM: tracing an LSTM costs seconds, and the LSTM's
# sequence output is checked in test_encoders.py and exported below.
MODEL = (
    "model.fusion.name=cross_attention",
    "model.text_encoder.name=text/bow",
    "model.modality_dropout.text=0.3",
    "model.modality_dropout.image=0.3",
    "model.fusion.dropout_rate=0.0",
    "model.head.dropout_rate=0.0",
    "train.seed=1",
)


@pytest.fixture(scope="module")
def model_config():
    return testing.tiny_config(*MODEL)


def test_model_feeds_sequences_and_ignores_absent_modalities(model_config):
    model = models.build_model(model_config, NUM_CLASSES, VOCAB_SIZE)
    for modality in MODALITIES:
        output = model.get_layer(f"{modality}_encoder").output
        assert isinstance(output, tuple) and output[1].dtype == tf.bool, modality
    inputs = testing.random_features(model_config, batch_size=4, seed=0, vocab_size=VOCAB_SIZE)
    other = testing.random_features(model_config, batch_size=4, seed=1, vocab_size=VOCAB_SIZE)
    # Row 0: nothing present; row 1: only the (same) image; rows 2-3: all present.
    for batch in (inputs, other):
        for modality in MODALITIES:
            batch[f"{modality}_present"][:2] = 0.0
        batch["image_present"][1] = 1.0
    other["image"][1] = inputs["image"][1]
    expected = model(inputs, training=False).numpy()
    changed = model(other, training=False).numpy()
    np.testing.assert_allclose(changed[:2], expected[:2], rtol=0, atol=1e-6)
    assert not np.allclose(changed[2:], expected[2:])


# Tracing the train step of three encoders and the fusion takes 10-40 s here;
# the default run fits one eager step of the fusion in test_fusion.py instead.
@pytest.mark.slow
def test_model_with_modality_dropout_trains(model_config):
    """The loss of a small fixed set falls well below its start, with modality dropout on."""
    keras.utils.set_random_seed(0)
    model = models.build_model(model_config, NUM_CLASSES, VOCAB_SIZE)
    inputs = testing.random_features(model_config, batch_size=16, seed=2, vocab_size=VOCAB_SIZE)
    labels = np.arange(16) % NUM_CLASSES
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=models.loss_for(model_config))
    losses = model.fit(inputs, labels, batch_size=16, epochs=30, verbose=0, shuffle=False).history["loss"]
    # Measured: 1.63 -> 0.70 (mean of the last three epochs); a broken
    # fusion (gradients not reaching the encoders, say) stays near ln 3 = 1.1.
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < 0.6 * losses[0], losses


def test_mirrored_step_equals_the_default_step():
    """One SGD step over two replicas gives the single-device loss and weights.

    Text only (no BatchNorm, which normalises each replica's half batch on its
    own) and no dropout, so the two runs compute the same function.
    """
    config = testing.tiny_config(
        "model.modalities=[text]",
        "model.text_encoder.name=text/bow",
        "model.fusion.name=cross_attention",
        "model.fusion.dropout_rate=0.0",
        "model.text_encoder.dropout_rate=0.0",
        "model.head.dropout_rate=0.0",
    )
    inputs = testing.random_features(config, batch_size=8, vocab_size=VOCAB_SIZE)
    inputs["text"][:, 5:] = 0  # padding, so masks take part
    labels = np.arange(8) % NUM_CLASSES
    results, initial = {}, None
    for name in ("default", "mirrored"):
        strategy = distribute.make_strategy(dataclasses.replace(config.train, strategy=name))
        with strategy.scope():
            model = models.build_model(config, NUM_CLASSES, VOCAB_SIZE)
            # Eager steps skip tracing twice; the replicas still all-reduce.
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=models.loss_for(config), run_eagerly=True)
        initial = model.get_weights() if initial is None else initial
        model.set_weights(initial)
        history = model.fit(inputs, labels, batch_size=8, epochs=1, verbose=0, shuffle=False)
        results[name] = (history.history["loss"][0], model.get_weights())
    assert strategy.num_replicas_in_sync == 2
    np.testing.assert_allclose(results["mirrored"][0], results["default"][0], rtol=1e-5)
    for mirrored, default in zip(results["mirrored"][1], results["default"][1], strict=True):
        np.testing.assert_allclose(mirrored, default, atol=1e-5)
    assert not np.allclose(results["default"][1][0], initial[0])  # the step did move the weights


def test_mixed_float16_matches_float32(model_config):
    """Finite float16 outputs within 5e-3 of float32 on the same weights; masking still exact.

    float16 keeps 11 significant bits (unit roundoff 4.9e-4). The encoders,
    two Transformer blocks and the head chain a few dozen roundings, mostly
    renormalised by LayerNorm and BatchNorm, and the float32 softmax output
    moves by about 2 roundings: measured 2e-4 to 1.1e-3 over three seeds.
    5e-3 leaves a margin of 4x; the probabilities of these examples differ
    from each other by 2e-2 to 2e-1, so a broken float16 path shows.
    """
    inputs = testing.random_features(model_config, batch_size=4, vocab_size=VOCAB_SIZE)
    inputs["text"][:, 3:] = 0
    inputs["audio_present"][0] = 0.0
    inputs["text_present"][1] = 0.0
    model = models.build_model(model_config, NUM_CLASSES, VOCAB_SIZE)
    expected = model(inputs, training=False).numpy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = models.build_model(model_config, NUM_CLASSES, VOCAB_SIZE)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    half.set_weights(model.get_weights())
    assert half.get_layer("fusion").compute_dtype == "float16"
    output = half(inputs, training=False)
    assert output.dtype == tf.float32 and np.isfinite(output.numpy()).all()
    np.testing.assert_allclose(output.numpy(), expected, rtol=0, atol=5e-3)
    # An absent modality still changes nothing (float16 masks: MHA's own, -65504).
    changed = dict(inputs, audio=inputs["audio"].copy())
    changed["audio"][0] = 1e4
    np.testing.assert_allclose(half(changed, training=False).numpy()[0], output.numpy()[0], rtol=0, atol=1e-6)


# === Export ===

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # registers the tf-text ops the graph uses
    model = tf.saved_model.load(sys.argv[1])
    raw = {name: tf.constant(values) for name, values in np.load(sys.argv[2], allow_pickle=True).items()}
    print(json.dumps(model.signatures["serving_default"](**raw)["probabilities"].numpy().tolist()))
    """
)


# Over two minutes on two busy cores (four signatures traced, a fresh TF
# process): with the slow tests, which CI runs.
@pytest.mark.slow
def test_export_reloads_in_a_fresh_process_with_equal_outputs(tmp_path):
    """Raw-bytes signature with padding and missing modalities, fresh process, equal outputs.

    CNN, bag-of-embeddings and CNN encoders: exporting LSTMs costs minutes of
    tracing here; test_tf1_session.py exports the LSTM's sequences (slow set).
    """
    module = export_untrained_model(tmp_path / "1", *MODEL)
    check_ops(tmp_path / "1")
    raw = make_inputs(4, seed=5)
    raw["image"][1] = b""
    raw["audio"][2] = b""
    raw["text"][3] = b""
    raw = {m: np.array(v, dtype=object) for m, v in raw.items()}
    model_features = module.preprocessor({m: tf.constant(v) for m, v in raw.items()})
    expected = module.model(model_features, training=False).numpy()
    np.savez(tmp_path / "raw.npz", **raw)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "1"), str(tmp_path / "raw.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        check=True,
    )
    outputs = np.array(json.loads(result.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)
