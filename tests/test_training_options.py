"""Training options run for real: mixed precision, XLA, early stopping, class weights."""

import csv
import json

import numpy as np
import pytest

from multimodal_tf import recipe
from multimodal_tf.compat import keras, tf
from multimodal_tf.data.cache import prepare_data
from multimodal_tf.export import export_run
from multimodal_tf.run_dir import load_trained_model
from multimodal_tf.serving.local import LocalModel
from multimodal_tf.testing import fit_with_the_recipe, tiny_config
from multimodal_tf.training import train


def options_config(manifest, out, *overrides):
    """Image-only, constant learning rate, no early stopping: the loss should fall every run."""
    return tiny_config(
        f"data.manifest={manifest}",
        f"train.output_dir={out}",
        "model.modalities=[image]",
        "data.batch_size=16",
        "train.epochs=3",
        "train.lr_schedule=constant",
        "train.learning_rate=0.01",
        "train.early_stopping_patience=0",
        *overrides,
    )


def raw_test_inputs(manifest, count=6):
    folder = manifest.parent
    rows = [r for r in csv.DictReader(open(manifest, encoding="utf-8")) if r["image"]][:count]
    return [(folder / r["image"]).read_bytes() for r in rows]


# Three trainings and exports, ~15 s each on 2 cores: with the slow tests (CI runs them).
@pytest.mark.slow
@pytest.mark.parametrize(
    "option, compute_dtype",
    [
        ("train.mixed_precision=mixed_float16", "float16"),
        ("train.mixed_precision=mixed_bfloat16", "bfloat16"),
        ("train.jit_compile=true", "float32"),
    ],
    ids=["mixed_float16", "mixed_bfloat16", "xla"],
)
def test_precision_and_xla_train_keep_float32_variables_and_export_equal_outputs(
    synth_manifest, tmp_path, option, compute_dtype
):
    config = options_config(synth_manifest, tmp_path / "run", option)
    metadata = prepare_data(config.data, progress=False)
    model = recipe.compile_model(config, metadata)
    # The option reached the compiled model, and only that model (no leaked global policy).
    assert model.get_layer("image_encoder").compute_dtype == compute_dtype
    assert model.output.dtype == tf.float32
    assert all(w.dtype == tf.float32 for w in model.weights)
    assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer) == (
        compute_dtype == "float16"
    )
    assert model.jit_compile == config.train.jit_compile
    assert keras.mixed_precision.global_policy().name == "float32"

    run = train(config, progress=False)
    loss = json.loads((run / "history.json").read_text())["loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0], loss
    assert keras.mixed_precision.global_policy().name == "float32"

    # The export holds the trained float32 variables; it computes in float32
    # (serving CPUs gain nothing from float16), so it equals the float32 model
    # of those weights and is within rounding of the mixed-precision one.
    _, _, trained = load_trained_model(run)
    assert all(w.dtype == tf.float32 for w in trained.weights)
    path = export_run(run, tmp_path / "models", "m")
    images = raw_test_inputs(synth_manifest)
    exported = LocalModel(path).predict(images=images)["probabilities"]
    from multimodal_tf.data.preprocessing import Preprocessor

    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model.modalities)
    model_features = preprocessor({"image": tf.constant(images)})
    np.testing.assert_allclose(exported, trained(model_features, training=False).numpy(), atol=1e-5)
    if config.train.mixed_precision:
        model.set_weights(trained.get_weights())  # the training policy, the trained weights
        np.testing.assert_allclose(exported, model(model_features, training=False).numpy(), atol=0.05)


def test_early_stopping_ends_a_run_whose_monitor_stops_improving(synth_manifest):
    # Learning rate 0 and no BatchNorm (bag-of-words text only): val_loss is the
    # same every epoch, so patience 1 stops after the second of six epochs.
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        "model.modalities=[text]",
        "model.text_encoder.name=text/bow",
        "data.batch_size=32",
        "train.epochs=6",
        "train.learning_rate=0.0",
        "train.monitor=val_loss",
        "train.early_stopping_patience=1",
    )
    _, history = fit_with_the_recipe(config)
    assert len(history["loss"]) == 2, history


def test_balanced_class_weights_weigh_the_loss_by_inverse_class_frequency(two_class_manifest, tmp_path):
    configs = {
        mode: tiny_config(
            f"data.manifest={two_class_manifest}",
            "model.modalities=[text]",
            "model.text_encoder.name=text/bow",
            f"train.class_weights={mode}",
        )
        for mode in ("none", "balanced")
    }
    metadata = prepare_data(configs["none"].data, progress=False)
    counts = [metadata.counts["train"]["labels"][name] for name in metadata.label_names]
    assert counts[0] >= 3 * counts[1], counts  # the set is imbalanced
    keras.utils.set_random_seed(0)
    model = recipe.compile_model(configs["none"], metadata)

    def per_example(config):
        """(labels, sample weights or None, mean loss) over the train split, as fit sees it."""
        train_ds, _, _ = recipe.datasets_for(config, metadata)
        labels, weights, losses = [], [], []
        for batch in train_ds:
            x, y = batch[0], batch[1]
            labels.append(y.numpy())
            weights.append(batch[2].numpy() if len(batch) == 3 else np.ones(len(y), np.float32))
            losses.append(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False)).numpy())
        labels, weights, losses = map(np.concatenate, (labels, weights, losses))
        return labels, weights, model.evaluate(train_ds, verbose=0, return_dict=True)["loss"], losses

    labels, plain_weights, plain_loss, losses = per_example(configs["none"])
    _, weights, weighted_loss, _ = per_example(configs["balanced"])
    assert (plain_weights == 1).all()
    expected = {c: sum(counts) / (len(counts) * n) for c, n in enumerate(counts)}
    np.testing.assert_allclose(weights, [expected[c] for c in labels], rtol=1e-6)
    assert plain_loss == pytest.approx(losses.mean(), rel=1e-4)
    assert weighted_loss == pytest.approx((weights * losses).mean(), rel=1e-4)
    assert abs(weighted_loss - plain_loss) > 1e-3
