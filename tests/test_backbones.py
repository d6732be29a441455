"""Backbone image encoders (Keras Applications, a cut local model) and the fine-tuning recipe.

References are independent of the encoder code: the source tf_keras model
(the application built by tf_keras itself, or the user's model file) run on
the same images through its own ``preprocess_input``.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from serving_helpers import png_bytes

from multimodal_tf import cli
from multimodal_tf import config as config_lib
from multimodal_tf.compat import keras, tf
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.encoders import KerasApplicationEncoder, KerasModelEncoder
from multimodal_tf.run_dir import LAST_WEIGHTS, load_trained_model
from multimodal_tf.testing import assert_config_round_trip, random_features, run_layer_test, tiny_config
from multimodal_tf.training import train

# Small, fast variants (tens of thousands to a few hundred thousand weights at 32 px).
SMALL = {
    "MobileNetV3Small": {"alpha": 0.75, "minimalistic": True},
    "MobileNetV2": {"alpha": 0.35},
}


def randomised(model: keras.Model, seed: int) -> keras.Model:
    """``model`` with every weight drawn at random, BatchNorm statistics included.

    Fresh BatchNorm statistics (mean 0, variance 1) would hide a backbone run
    in the wrong BatchNorm mode or with the wrong weights assignment.
    """
    rng = np.random.default_rng(seed)
    values = []
    for weight in model.weights:
        shape = weight.shape
        if "moving_variance" in weight.name:
            values.append(rng.uniform(0.5, 2.0, shape))
        elif "moving_mean" in weight.name:
            values.append(rng.normal(0.0, 0.3, shape))
        else:
            values.append(weight.numpy() + rng.normal(0.0, 0.05, shape))
    model.set_weights([v.astype(np.float32) for v in values])
    return model


def application(architecture: str, size: int = 32, seed: int = 0) -> keras.Model:
    constructor = getattr(keras.applications, architecture)
    model = constructor(include_top=False, weights=None, input_shape=(size, size, 3), **SMALL[architecture])
    return randomised(model, seed)


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """Architecture -> (source model, its .h5 weights file written here)."""
    out = tmp_path_factory.mktemp("backbones")
    files = {}
    for index, architecture in enumerate(SMALL):
        model = application(architecture, seed=index)
        path = out / f"{architecture}_notop.h5"
        model.save_weights(str(path))
        files[architecture] = (model, str(path))
    return files


def images(batch: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (batch, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("architecture", list(SMALL))
def test_application_encoder_equals_the_source_model_on_its_own_preprocessing(architecture, weights_files):
    source, path = weights_files[architecture]
    encoder = KerasApplicationEncoder(
        architecture, weights=path, architecture_arguments=SMALL[architecture], input_size=32
    )
    module = {
        "MobileNetV3Small": keras.applications.mobilenet_v3,
        "MobileNetV2": keras.applications.mobilenet_v2,
    }
    pixels = images()
    feature_map = source(module[architecture].preprocess_input(pixels * 255.0), training=False).numpy()
    np.testing.assert_allclose(encoder(pixels).numpy(), feature_map.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    # Larger images are resized to input_size (bilinear) before the backbone.
    large = images(size=48, seed=1)
    resized = tf.image.resize(large, (32, 32)).numpy()
    expected = source(module[architecture].preprocess_input(resized * 255.0), training=False).numpy()
    np.testing.assert_allclose(encoder(large).numpy(), expected.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    # Regions: the feature map row by row, every region real.
    regions, mask = KerasApplicationEncoder(
        architecture,
        weights=path,
        architecture_arguments=SMALL[architecture],
        input_size=32,
        pooling="max",
        sequence_output=True,
    )(pixels)
    batch, height, width, channels = feature_map.shape
    np.testing.assert_allclose(
        regions.numpy(), feature_map.reshape(batch, height * width, channels), rtol=1e-5, atol=1e-6
    )
    assert mask.dtype == tf.bool and mask.numpy().all() and mask.shape == (batch, height * width)


def test_weights_of_another_architecture_or_size_and_missing_files_are_named(weights_files, tmp_path):
    _, mobilenet_v2 = weights_files["MobileNetV2"]
    with pytest.raises(ValueError, match=r"MobileNetV2_notop\.h5.*does not fit MobileNetV3Small"):
        KerasApplicationEncoder(
            "MobileNetV3Small", weights=mobilenet_v2, architecture_arguments=SMALL["MobileNetV3Small"]
        )
    with pytest.raises(config_lib.ConfigError, match=r"weights: no such file '.*absent\.h5'"):
        tiny_config(
            "model.image_encoder.name=image/keras_application",
            f"model.image_encoder.weights={tmp_path / 'absent.h5'}",
        )
    with pytest.raises(config_lib.ConfigError, match="InceptionV3 takes inputs of at least 75x75, got 64"):
        tiny_config(
            "model.image_encoder.name=image/keras_application",
            "model.image_encoder.architecture=InceptionV3",
            "model.image_encoder.input_size=64",
        )
    with pytest.raises(
        config_lib.ConfigError, match=r"architecture_arguments: ResNet50V2 does not take \['alpha'\]"
    ):
        tiny_config(
            "model.image_encoder.name=image/keras_application",
            "model.image_encoder.architecture_arguments={alpha: 1}",
        )
    with pytest.raises(ValueError, match="data.image.channels=3"):
        KerasApplicationEncoder(
            "MobileNetV3Small", architecture_arguments=SMALL["MobileNetV3Small"], input_size=32
        )(np.zeros((1, 32, 32, 1), np.float32))


def test_a_frozen_backbone_keeps_its_batch_norm_statistics_and_trains_only_the_projection(weights_files):
    _, path = weights_files["MobileNetV3Small"]
    encoder = KerasApplicationEncoder(
        "MobileNetV3Small",
        weights=path,
        architecture_arguments=SMALL["MobileNetV3Small"],
        input_size=32,
        output_dim=8,
    )
    pixels = images(batch=4)
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, encoder(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    backbone_before = [w.numpy() for w in encoder.backbone.weights]
    projection_before = [w.numpy() for w in encoder.projection.weights]
    assert encoder.backbone.trainable_weights == [] and len(encoder.trainable_weights) == 2
    np.testing.assert_allclose(
        encoder(pixels, training=True).numpy(), encoder(pixels, training=False).numpy(), atol=1e-6
    )
    model.fit(pixels, np.ones((4, 8), np.float32), epochs=1, verbose=0)
    for before, after in zip(backbone_before, encoder.backbone.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy(), err_msg=after.name)  # moving stats included
    assert any(
        not np.allclose(b, a.numpy())
        for b, a in zip(projection_before, encoder.projection.weights, strict=False)
    )


def test_trainable_layers_unfreezes_only_the_top_layers_and_keeps_batch_norm_frozen(weights_files):
    _, path = weights_files["MobileNetV3Small"]
    encoder = KerasApplicationEncoder(
        "MobileNetV3Small",
        weights=path,
        architecture_arguments=SMALL["MobileNetV3Small"],
        input_size=32,
        freeze=False,
        trainable_layers=3,
    )
    weighted = [layer for layer in encoder.backbone.layers if layer.weights]
    trainable = [layer.name for layer in weighted if layer.trainable]
    top = [layer.name for layer in weighted[-3:] if not isinstance(layer, keras.layers.BatchNormalization)]
    assert trainable == top and encoder.batch_norm_inference  # pretrained: BatchNorm in inference mode
    assert_config_round_trip(encoder)


def small_cnn_file(path, channels: int = 1) -> keras.Model:
    """A user's own CNN (fer-like: grey 24 px faces) saved as a full .h5 model."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((24, 24, channels))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv_1")(inputs)
    x = keras.layers.BatchNormalization(name="norm_1")(x)
    x = keras.layers.MaxPool2D(name="pool_1")(keras.layers.ReLU(name="relu_1")(x))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(7, activation="softmax", name="emotions")(x)
    model = randomised(keras.Model(inputs, outputs), seed=4)
    model.save(str(path))
    return model


def test_keras_model_encoder_cut_at_a_named_layer_equals_the_source_intermediate_output(tmp_path):
    source = small_cnn_file(tmp_path / "faces.h5")
    cut = keras.Model(source.input, source.get_layer("conv_2").output)
    pixels = images(batch=2, size=24)[..., :1]
    expected = cut(pixels * 255.0 / 127.5 - 1.0, training=False).numpy()  # "tf" scaling: [-1, 1]
    encoder = KerasModelEncoder(str(tmp_path / "faces.h5"), output_layer="conv_2", preprocessing="tf")
    np.testing.assert_allclose(encoder(pixels).numpy(), expected.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    whole = KerasModelEncoder(str(tmp_path / "faces.h5"), preprocessing="unit")  # the model's own output
    np.testing.assert_allclose(whole(pixels).numpy(), source(pixels).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"has no layer 'conv_9'; its last layers are: .*conv_2, gap, emotions"
    ):
        KerasModelEncoder(str(tmp_path / "faces.h5"), output_layer="conv_9")
    with pytest.raises(ValueError, match=r"takes 24x24 inputs; input_size 32"):
        KerasModelEncoder(str(tmp_path / "faces.h5"), input_size=32)
    with pytest.raises(config_lib.ConfigError, match="path: no such file or folder"):
        tiny_config(
            "model.image_encoder.name=image/keras_model", f"model.image_encoder.path={tmp_path / 'x.h5'}"
        )


def test_keras_model_encoder_layer_contract(tmp_path):
    small_cnn_file(tmp_path / "faces.h5", channels=3)
    run_layer_test(
        KerasModelEncoder,
        {
            "path": str(tmp_path / "faces.h5"),
            "output_layer": "conv_2",
            "freeze": False,
            "output_dim": 5,
            "dropout_rate": 0.1,
            "preprocessing": "caffe",
        },
        (images(batch=2, size=24),),
        (2, 5),
    )


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # registers the tf-text ops the graph uses
    model = tf.saved_model.load(sys.argv[1])
    raw = {k: tf.constant(v) for k, v in np.load(sys.argv[2]).items()}
    print(json.dumps(model.signatures["serving_default"](**raw)["probabilities"].numpy().tolist()))
    """
)


# A mirrored training with a MobileNet and an export reloaded in another process (about a minute).
@pytest.mark.slow
def test_mirrored_two_phase_training_of_a_backbone_with_ema_then_export_equals_it_in_a_fresh_process(
    synth_manifest, weights_files, tmp_path
):
    """Phase 1 (epoch 0) trains the head on a frozen backbone, phase 2 (epoch 1) its top two
    weighted layers at a tenth of the rate; under MirroredStrategy with weight averaging,
    BackupAndRestore and best-weights checkpoints (training.train). The run's checkpoint loads
    into a fresh model, the untouched layers still hold the .h5 file's values, an absent image
    changes nothing, and the export serves the same probabilities in a fresh process."""
    source, path = weights_files["MobileNetV3Small"]
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={tmp_path / 'run'}",
        "model.modalities=[image,text]",
        "model.image_encoder.name=image/keras_application",
        "model.image_encoder.architecture=MobileNetV3Small",
        "model.image_encoder.architecture_arguments={alpha: 0.75, minimalistic: true}",
        f"model.image_encoder.weights={path}",
        "model.image_encoder.input_size=32",  # data images are 16 px: resized in the graph
        "model.image_encoder.trainable_layers=2",
        "model.image_encoder.unfreeze_at_epoch=1",
        "model.image_encoder.learning_rate_multiplier=0.1",
        "train.epochs=2",
        "data.batch_size=32",  # fewer steps of the MobileNet
        "train.strategy=mirrored",
        "train.ema_momentum=0.5",
        "train.early_stopping_patience=0",
    )
    run = train(config, progress=False)
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == 2
    config, metadata, model = load_trained_model(run, weights=LAST_WEIGHTS)
    backbone = model.get_layer("image_encoder").backbone
    weighted = [layer for layer in backbone.layers if layer.weights]
    top = {layer.name for layer in weighted[-2:] if not isinstance(layer, keras.layers.BatchNormalization)}
    assert top
    for layer in weighted:
        trained = [
            not np.array_equal(w.numpy(), s.numpy())
            for w, s in zip(layer.weights, source.get_layer(layer.name).weights, strict=False)
        ]
        assert any(trained) == (layer.name in top), layer.name

    # An absent image (presence 0) contributes nothing, whatever its pixels.
    inputs = random_features(config, batch_size=3, vocab_size=len(metadata.vocabulary))
    inputs["image_present"][:] = 0.0
    other = dict(inputs, image=inputs["image"] + 1.0)
    np.testing.assert_allclose(model(inputs).numpy(), model(other).numpy(), atol=1e-6)

    assert cli.main(["export", str(run), "--base-path", str(tmp_path / "models"), "--model-name", "b"]) == 0
    exported = tmp_path / "models" / "b" / "1"
    raw = {
        "image": np.array([png_bytes(0), b"", png_bytes(2)], dtype=bytes),
        "text": np.array([b"a red cat", b"blue sky", b""], dtype=bytes),
    }
    np.savez(tmp_path / "raw.npz", **raw)
    config, metadata, best = load_trained_model(run)
    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model)
    expected = best(preprocessor({k: tf.constant(v) for k, v in raw.items()}), training=False).numpy()
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(exported), str(tmp_path / "raw.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        check=True,
    )
    served = np.array(json.loads(result.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_keras_model_encoder_runs_under_mixed_precision(tmp_path):
    small_cnn_file(tmp_path / "faces.h5", channels=3)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        encoder = KerasModelEncoder(str(tmp_path / "faces.h5"), output_layer="conv_2", preprocessing="caffe")
        regions, mask = KerasModelEncoder(
            str(tmp_path / "faces.h5"), output_layer="conv_2", sequence_output=True, output_dim=4
        )(images(batch=2, size=24))
        pooled = encoder(images(batch=2, size=24))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert pooled.dtype == tf.float16 and np.isfinite(pooled.numpy()).all()
    assert regions.shape == (2, 12 * 12, 4) and mask.shape == (2, 144)
