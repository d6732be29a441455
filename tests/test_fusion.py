"""Fusion layers: the shared layer test, presence masking, what each computes, one fit step each."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from multimodal_tf import config as config_lib
from multimodal_tf import fusion, models, testing
from multimodal_tf.compat import keras, tf
from multimodal_tf.registry import FUSIONS

NAMES = ("concat", "weighted_sum", "gated", "attention", "cross_attention", "late", "tensor")
MODALITIES = ("image", "text", "audio")
DIMS = {"image": 6, "text": 4, "audio": 5}  # different sizes on purpose
BATCH = 5
HIDDEN_DIM = 8
NUM_CLASSES = 3
OUTPUT_DIMS = {
    "concat": sum(DIMS.values()) + len(MODALITIES),
    "weighted_sum": HIDDEN_DIM,
    "gated": HIDDEN_DIM,
    "attention": HIDDEN_DIM,
    "cross_attention": HIDDEN_DIM,
    "late": NUM_CLASSES,
    "tensor": HIDDEN_DIM,
}
# Rows: all present, image absent, text and audio absent, only audio absent, none present.
PRESENCE = {
    "image": [1, 0, 1, 1, 0],
    "text": [1, 1, 0, 1, 0],
    "audio": [1, 1, 0, 0, 0],
}


# Each family's tiny settings: its config takes only its own fields.
SETTINGS = {"hidden_dim": HIDDEN_DIM, "num_heads": 2, "rank": 3, "dropout_rate": 0.1, "ff_dim": 16}


def family_config(name: str, **changes):
    """``name``'s config with the SETTINGS it takes, then ``changes``."""
    config_class = FUSIONS.config(name)
    fields = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in SETTINGS.items() if k in fields}, **changes)


def make_fusion(name: str, modalities=MODALITIES, **changes):
    return fusion.build_fusion(
        family_config(name, **changes),
        modalities,
        num_outputs=NUM_CLASSES,
        output_activation="softmax",
        name="fusion",
    )


def make_inputs(seed: int = 0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    embeddings = {m: tf.constant(scale * rng.normal(size=(BATCH, DIMS[m])), tf.float32) for m in MODALITIES}
    presence = {m: tf.constant(PRESENCE[m], tf.float32) for m in MODALITIES}
    return embeddings, presence


def test_registry_keys():
    assert set(FUSIONS.keys()) >= set(NAMES)


@pytest.mark.parametrize("name,changes", [(n, {}) for n in NAMES] + [("late", {"combine": "product"})])
def test_layer(name, changes):
    """Shapes, config round trip, serialization, gradients and a fit step (testing.run_layer_test)."""
    fusion_class = FUSIONS.get(name)
    extra = (
        {"num_outputs": NUM_CLASSES, "output_activation": "softmax"}
        if fusion_class.produces_probabilities
        else {}
    )
    testing.run_layer_test(
        fusion_class,
        {
            "modalities": MODALITIES,
            **family_config(name, **changes).layer_arguments(),
            **extra,
            "name": "fusion",
        },
        make_inputs(),
        (BATCH, OUTPUT_DIMS[name]),
        training_check=name != "concat",  # no weights
    )


def test_every_family_config_is_its_layers_arguments():
    """A family's config fields are exactly the arguments its layer records: none unused, none missing."""
    # What build_fusion passes from outside the family config: the modalities,
    # the primary output and (late fusion) the extra targets' outputs.
    build_time = {"modalities", "num_outputs", "output_activation", "extra_outputs"}
    standard = set(keras.layers.Layer().get_config()) | build_time
    for name in FUSIONS.keys():
        config = FUSIONS.config(name)()
        layer = fusion.build_fusion(config, MODALITIES, num_outputs=2, output_activation="sigmoid")
        assert set(layer.get_config()) - standard == set(config.layer_arguments()), name
        assert all(layer.get_config()[k] == v for k, v in config.layer_arguments().items()), name


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.fusion.rank=3", "'model.fusion.rank': 'concat' takes only name"),
        (
            "model.fusion={name: late, rank: 3}",
            "'model.fusion.rank': 'late' takes only combine, dropout_rate",
        ),
        ("model.fusion={name: late, combine: median}", "model.fusion.combine: expected one of"),
        (
            "model.fusion={name: attention, hidden_dim: 10, num_heads: 4}",
            "model.fusion.num_heads: must divide",
        ),
        ("model.fusion={name: tensor, rank: 0}", "model.fusion.rank: must be >= 1"),
        ("model.fusion={name: cross_attention, num_layers: 0}", "model.fusion.num_layers: must be >= 1"),
        ("model.fusion={name: cross_attention, readout: max}", "model.fusion.readout: expected one of"),
    ],
)
def test_fusion_config_rejects_what_the_family_does_not_take(override, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("{", r"\{")):
        config_lib.load([], [override])


@pytest.mark.parametrize("name,changes", [(n, {}) for n in NAMES] + [("late", {"combine": "product"})])
def test_absent_modality_does_not_change_output(name, changes):
    layer = make_fusion(name, **changes)
    embeddings, presence = make_inputs(seed=0)
    changed, _ = make_inputs(seed=1, scale=100.0)
    # Absent rows take values from `changed`; present rows stay as they were.
    mixed = {m: tf.where(presence[m][:, None] > 0, embeddings[m], changed[m]) for m in MODALITIES}
    expected = layer(embeddings, presence, training=False).numpy()
    np.testing.assert_allclose(layer(mixed, presence, training=False).numpy(), expected, rtol=0, atol=1e-6)
    # ...whereas changing a present modality does change the output.
    mixed["text"] = tf.where(presence["text"][:, None] > 0, changed["text"], embeddings["text"])
    assert not np.allclose(layer(mixed, presence, training=False).numpy()[0], expected[0])


@pytest.mark.parametrize("name", ["weighted_sum", "gated", "late"])
def test_one_present_modality_takes_all_the_weight(name):
    """With only image present, the output is the image branch's own output."""
    layer = make_fusion(name)
    embeddings, _ = make_inputs()
    image_only = {m: tf.constant([1.0 if m == "image" else 0.0] * BATCH) for m in MODALITIES}
    output = layer(embeddings, image_only, training=False).numpy()
    if name == "late":
        expected = tf.nn.softmax(
            layer.classifiers["image"](layer.hidden["image"](embeddings["image"]))
        ).numpy()
    elif name == "weighted_sum":
        expected = layer.projections["image"](embeddings["image"]).numpy()
    else:
        expected = layer.candidates["image"](embeddings["image"]).numpy()
    np.testing.assert_allclose(output, expected, atol=1e-5)


def test_late_fusion_with_linear_heads():
    """hidden_dim=0: each modality's head is its classifier on the embedding itself."""
    config = fusion.LateFusionConfig(hidden_dim=0)
    layer = fusion.build_fusion(config, MODALITIES, num_outputs=NUM_CLASSES, output_activation="softmax")
    embeddings, presence = make_inputs()
    output = layer(embeddings, presence, training=False).numpy()
    assert output.shape == (BATCH, NUM_CLASSES) and not layer.hidden
    image_only = {m: tf.constant([1.0 if m == "image" else 0.0] * BATCH) for m in MODALITIES}
    np.testing.assert_allclose(
        layer(embeddings, image_only, training=False).numpy(),
        tf.nn.softmax(layer.classifiers["image"](embeddings["image"])).numpy(),
        atol=1e-6,
    )
    testing.assert_config_round_trip(layer)
    assert type(layer).from_config(layer.get_config())(embeddings, presence).shape == output.shape
    with pytest.raises(ValueError, match="hidden_dim"):
        fusion.LateFusion(MODALITIES, num_outputs=3, hidden_dim=-1)
    with pytest.raises(config_lib.ConfigError, match="model.fusion.hidden_dim: must be >= 0"):
        config_lib.load([], ["model.fusion.name=late", "model.fusion.hidden_dim=-1"])


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_late_fusion_combinations(activation):
    """mean: weighted mean of the heads' probabilities; product: activation of the weighted logit sum."""
    config = fusion.LateFusionConfig(hidden_dim=HIDDEN_DIM, combine="product")
    product = fusion.build_fusion(config, MODALITIES, num_outputs=NUM_CLASSES, output_activation=activation)
    embeddings, presence = make_inputs()
    product(embeddings, presence)
    product.modality_logits.assign([0.5, -0.3, 0.1])  # unequal weights, so a mix-up of them shows
    mean = type(product).from_config({**product.get_config(), "combine": "mean"})
    mean(embeddings, presence)
    mean.set_weights(product.get_weights())
    assert product.get_config()["combine"] == "product" and mean.combine == "mean"

    act = tf.nn.softmax if activation == "softmax" else tf.sigmoid
    logits = np.stack(
        [product.classifiers[m](product.hidden[m](embeddings[m])).numpy() for m in MODALITIES], 1
    )
    flags = np.stack([presence[m].numpy() for m in MODALITIES], 1)
    weights = fusion.masked_softmax(product.modality_logits, flags).numpy()[:, :, None]  # [B, M, 1]
    prior = 1.0 / NUM_CLASSES if activation == "softmax" else 0.5
    np.testing.assert_allclose(
        product(embeddings, presence, training=False).numpy(),
        act((weights * logits).sum(1)).numpy(),
        atol=1e-5,
    )
    expected_mean = (weights * act(logits).numpy()).sum(1)
    expected_mean[-1] = prior  # the row with no modality present
    np.testing.assert_allclose(mean(embeddings, presence, training=False).numpy(), expected_mean, atol=1e-5)
    # The two differ whenever more than one modality is present (row 0: all three).
    assert not np.allclose(product(embeddings, presence).numpy()[0], mean(embeddings, presence).numpy()[0])
    # With one modality present, product gives that head's own prediction.
    image_only = {m: tf.constant([1.0 if m == "image" else 0.0] * BATCH) for m in MODALITIES}
    np.testing.assert_allclose(product(embeddings, image_only).numpy(), act(logits[:, 0]).numpy(), atol=1e-5)
    np.testing.assert_allclose(product(embeddings, presence).numpy()[-1], prior, atol=1e-6)
    with pytest.raises(ValueError, match="combine"):
        fusion.LateFusion(MODALITIES, num_outputs=3, output_activation=activation, combine="median")


def test_attention_keras_saved_model_round_trip(tmp_path):
    """A revived SavedModel restores every weight, those of MultiHeadAttention included."""
    embedding_inputs = {m: keras.Input((DIMS[m],), name=m) for m in MODALITIES}
    presence_inputs = {m: keras.Input((), name=f"{m}_present") for m in MODALITIES}
    outputs = make_fusion("attention")(embedding_inputs, presence_inputs)
    model = keras.Model(
        {**embedding_inputs, **{f"{m}_present": presence_inputs[m] for m in MODALITIES}}, outputs
    )
    embeddings, presence = make_inputs()
    inputs = {**embeddings, **{f"{m}_present": presence[m] for m in MODALITIES}}
    expected = model(inputs, training=False).numpy()
    model.save(tmp_path / "model")
    reloaded = keras.models.load_model(tmp_path / "model")
    np.testing.assert_allclose(reloaded(inputs, training=False).numpy(), expected, atol=1e-6)


def test_late_fusion_outputs_probabilities():
    layer = make_fusion("late")
    output = layer(*make_inputs(), training=False).numpy()
    np.testing.assert_allclose(output.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(output[-1], 1.0 / NUM_CLASSES, atol=1e-6)  # no modality present
    with pytest.raises(ValueError, match="num_outputs"):
        fusion.build_fusion(fusion.LateFusionConfig(), MODALITIES)


def test_masked_softmax_ignores_absent_modalities():
    weights = fusion.masked_softmax(
        tf.constant([1.0, 2.0, 3.0]), tf.constant([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    )
    expected = np.exp([1.0, 3.0]) / np.exp([1.0, 3.0]).sum()
    np.testing.assert_allclose(weights.numpy(), [[expected[0], 0.0, expected[1]], [0.0, 0.0, 0.0]], atol=1e-6)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        fusion.AttentionFusion(MODALITIES, hidden_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="modalities"):
        fusion.ConcatFusion(("image", "video"))
    layer = make_fusion("concat")
    embeddings, presence = make_inputs()
    with pytest.raises(ValueError, match="presence"):
        layer(embeddings, {"image": presence["image"]})


@pytest.mark.parametrize("name", NAMES)
def test_fit_step_in_full_model(name):
    # Image + audio (as in AV-MNIST), run eagerly: tracing six train steps
    # would cost seconds each; the traced train step of a full model is
    # tested in test_models.py and test_encoders.py.
    config = testing.tiny_config(f"model.fusion.name={name}", "model.modalities=[image,audio]")
    model = models.build_model(config, num_classes=NUM_CLASSES, vocab_size=50)
    assert np.isfinite(testing.fit_one_step(model, config, num_classes=NUM_CLASSES, run_eagerly=True))
