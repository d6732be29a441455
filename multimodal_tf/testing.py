"""Shared helpers for tests: tiny configs, random inputs of the right specs, the layer test."""

from __future__ import annotations

import dataclasses

import numpy as np

from multimodal_tf import config as config_lib
from multimodal_tf.config import ExperimentConfig
from multimodal_tf.data import features

# Widths 8-16, 16 px images, 8 tokens, 0.25 s audio: runs the real code fast.
# Valid ``--set`` overrides of the default config (whose fusion, concat, has
# no fields); tiny_config adds TINY_FUSION for the fusion family it ends with.
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
    "model.head.hidden_units=[16]",
    "train.epochs=1",
    "train.verbose=0",
)


TINY_FUSION = {"hidden_dim": 16, "num_heads": 2, "ff_dim": 32}


def tiny_config(*overrides: str, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """A small experiment config; extra ``key=value`` overrides win.

    The tiny sizes are one layer and ``overrides`` the next, so an override
    that switches an encoder's family keeps the tiny sizes the new family
    also takes (e.g. ``output_dim``); TINY_FUSION is applied to whichever
    fusion family the overrides choose, where that family has the field.
    """
    tiny = config_lib.load((), TINY_OVERRIDES, base=base)
    fusion = config_lib.load((), overrides, base=tiny).model.fusion
    fields = {f.name for f in dataclasses.fields(fusion)}
    sizes = [f"model.fusion.{key}={value}" for key, value in TINY_FUSION.items() if key in fields]
    if sizes:
        tiny = config_lib.load((), [f"model.fusion.name={fusion.name}", *sizes], base=tiny)
    return config_lib.load((), overrides, base=tiny)


def random_features(config: ExperimentConfig, batch_size: int = 4, seed: int = 0, vocab_size: int = 50):
    """Random model features matching ``features.model_feature_specs``."""
    rng = np.random.default_rng(seed)
    specs = features.model_feature_specs(config.data, config.model)
    out = {}
    for name, spec in specs.items():
        shape = (batch_size,) + tuple(spec.shape[1:])
        if name.endswith("_present"):
            out[name] = np.ones(shape, np.float32)
        elif spec.dtype.name == "string":  # raw text (the text_strings input kind)
            words = ["red", "blue", "circle", "square", "big", "small"]
            out[name] = np.array([" ".join(rng.choice(words, 3)) for _ in range(batch_size)], object)
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


def fit_with_the_recipe(config: ExperimentConfig, epochs: int | None = None):
    """Fits ``mmtf train``'s model, datasets and recipe callbacks, without a run directory.

    The same :mod:`~multimodal_tf.recipe` calls as ``training.train`` and every
    tuning trial, minus checkpoints, logs and final evaluation (seconds per
    test). Returns ``(model, history dict)``.
    """
    from multimodal_tf import recipe  # noqa: PLC0415  (keeps this module light)
    from multimodal_tf.data.cache import prepare_data  # noqa: PLC0415

    metadata = prepare_data(config.data, progress=False)
    recipe.set_seed(config.train.seed, deterministic=not config.train.jit_compile)
    model = recipe.compile_model(config, metadata)
    train, val, _ = recipe.datasets_for(config, metadata)
    history = model.fit(
        train,
        validation_data=val,
        epochs=epochs or config.train.epochs,
        callbacks=recipe.callbacks_for(config),
        verbose=0,
    )
    return model, history.history


def assert_config_round_trip(layer) -> None:
    """``type(layer).from_config(layer.get_config())`` has the same config."""
    config = layer.get_config()
    restored = type(layer).from_config(config)
    if restored.get_config() != config:
        raise AssertionError(
            f"{layer.name}: config changed in a round trip:\n{config}\n{restored.get_config()}"
        )


def _as_plain(value):
    """Tuples as lists (as ``get_config`` stores them), recursively."""
    if isinstance(value, tuple | list):
        return [_as_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    return value


# Over 60 lines through its docstring and argument list; the checks are one sequence.
def run_layer_test(
    layer_class: type,
    init_kwargs: dict,
    inputs: tuple,
    expected_output_shape: tuple,
    *,
    training_check: bool = True,
):
    """The standard checks of one of our layers (keras-hub's ``run_layer_test``).

    Checks that:

    - ``layer_class(**init_kwargs)`` called on ``inputs`` (training and not)
      returns finite floats of ``expected_output_shape``;
    - ``get_config`` records every init argument with its value and
      ``from_config`` reproduces the config, so no argument is accepted and
      then dropped;
    - ``keras.layers.serialize``/``deserialize`` (by the registered name, as
      a SavedModel stores it) rebuilds a layer that computes the same
      outputs from the same weights;
    - with ``training_check``: every trainable weight gets a gradient, and
      one ``fit`` step of a functional model around the layer has a finite
      loss.

    Args:
        layer_class: the layer class (registered as Keras serializable).
        init_kwargs: constructor arguments.
        inputs: the positional call arguments: tensors or dicts of tensors
            (a fusion layer takes ``(embeddings, presence)``).
        expected_output_shape: the output shape, batch dimension included.
        training_check: False for layers without weights.

    Returns:
        The built layer, for further checks.
    """
    from multimodal_tf.compat import keras, tf  # noqa: PLC0415  (keeps this module light)

    layer = layer_class(**init_kwargs)
    for training in (False, True):
        output = layer(*inputs, training=training)
        if tuple(output.shape) != tuple(expected_output_shape) or not np.isfinite(output.numpy()).all():
            raise AssertionError(
                f"{layer.name}: output {output.shape} (finite: {np.isfinite(output.numpy()).all()}),"
                f" expected {expected_output_shape}"
            )
    config = layer.get_config()
    dropped = {k: v for k, v in init_kwargs.items() if _as_plain(config.get(k)) != _as_plain(v)}
    if dropped:
        raise AssertionError(f"{layer.name}: get_config lacks or changed init arguments {dropped}: {config}")
    assert_config_round_trip(layer)

    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    if type(restored) is not layer_class:
        raise AssertionError(f"deserialized a {type(restored).__name__}, not a {layer_class.__name__}")
    restored(*inputs)
    restored.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        restored(*inputs, training=False).numpy(), layer(*inputs, training=False).numpy(), atol=1e-6
    )
    if training_check:
        _check_training(layer, inputs, keras, tf)
    return layer


def _check_training(layer, inputs: tuple, keras, tf) -> None:
    """Every trainable weight gets a gradient; one fit step has a finite loss."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(tf.cast(layer(*inputs, training=True), tf.float32)))
    gradients = tape.gradient(loss, layer.trainable_weights)
    missing = [w.name for w, g in zip(layer.trainable_weights, gradients, strict=True) if g is None]
    if not layer.trainable_weights or missing:
        raise AssertionError(f"{layer.name}: no gradient for {missing or 'any weight (none trainable)'}")
    symbolic = tf.nest.map_structure(lambda x: keras.Input(x.shape[1:], dtype=x.dtype), inputs)
    model = keras.Model(tf.nest.flatten(symbolic), layer(*symbolic))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", run_eagerly=True)
    data = [np.asarray(x) for x in tf.nest.flatten(inputs)]
    target = np.zeros(model.output_shape[1:], np.float32)[None].repeat(len(data[0]), axis=0)
    history = model.fit(data, target, batch_size=len(data[0]), epochs=1, verbose=0)
    if not np.isfinite(history.history["loss"][-1]):
        raise AssertionError(f"{layer.name}: fit step loss {history.history['loss'][-1]}")


# data.targets of the manifests ``with_target_columns`` writes (tests, docs).
TARGET_OVERRIDE = (
    "data.targets=[{name: category, column: label, type: multiclass},"
    " {name: tags, column: tags, type: multilabel, separator: '|'},"
    " {name: score, column: rating, type: regression, loss_weight: 0.5}]"
)


def with_target_columns(manifest, out, every_missing: int = 4):
    """A copy of a synthetic manifest with ``tags`` and ``rating`` columns derived from its label.

    Class k gets tags ``mod3_<k % 3>`` and, for even k, ``even`` (so tags are
    learnable), and the rating ``k / 2``. Every ``every_missing``-th row
    leaves tags empty and every (``every_missing`` + 1)-th leaves the rating
    empty: missing labels, not classes.
    """
    import csv  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    manifest, out = Path(manifest), Path(out)
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    for i, row in enumerate(rows):
        k = int(row["label"])
        tags = [f"mod3_{k % 3}"] + (["even"] if k % 2 == 0 else [])
        row["tags"] = "" if i % every_missing == 0 else "|".join(tags)
        row["rating"] = "" if i % (every_missing + 1) == 0 else f"{k / 2:.1f}"
        for column in ("image", "audio", "text"):  # paths relative to the original folder
            if row.get(column) and (manifest.parent / row[column]).exists():
                row[column] = str((manifest.parent / row[column]).resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out
