"""``audio/saved_model``: a test-built YAMNet-like SavedModel, checked against NumPy."""

import io
import json
import os
import subprocess
import sys
import textwrap
import wave

import numpy as np
import pytest

from multimodal_tf import export, models
from multimodal_tf.compat import keras, tf
from multimodal_tf.config import ConfigError
from multimodal_tf.data import audio_io, features
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.encoders import AudioSavedModelConfig, AudioSavedModelEncoder, build_encoder
from multimodal_tf.testing import random_features, run_layer_test, tiny_config

# Frames of 0.05 s every 0.025 s, 6 floats each: YAMNet's interface (0.96 s
# every 0.48 s, 1024 floats) at a size a test builds in a second.
FRAME_LENGTH, FRAME_STEP, DIM = 800, 400, 6
SAMPLE_RATE = 16000
SAMPLES = 4000  # tiny_config's 0.25 s clips
NUM_FRAMES = 1 + (SAMPLES - FRAME_LENGTH) // FRAME_STEP
NUM_CLASSES = 3


class YAMNetLike(tf.Module):
    """[samples] -> {"predictions", "embeddings" [frames, DIM], ...}: frame, project, ReLU."""

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.kernel = tf.Variable(
            rng.normal(0, 0.05, (FRAME_LENGTH, DIM)).astype(np.float32), name="frame_kernel"
        )
        self.bias = tf.Variable(rng.normal(0, 0.1, DIM).astype(np.float32), name="frame_bias")

    def embed(self, waveform):
        frames = tf.signal.frame(waveform, FRAME_LENGTH, FRAME_STEP)  # [..., frames, FRAME_LENGTH]
        return tf.nn.relu(frames @ self.kernel + self.bias)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def __call__(self, waveform):
        embeddings = self.embed(waveform)
        return {
            "predictions": tf.sigmoid(embeddings[:, :2]),
            "embeddings": embeddings,
            "frame_count": tf.shape(embeddings)[0],  # not float: for the error test
            "loudness": tf.reduce_mean(tf.abs(waveform)),  # a scalar: for the error test
        }


class TRILLLike(YAMNetLike):
    """Batched: ``(samples=[B, samples], sample_rate=scalar) -> {"embedding": [B, frames, DIM]}``."""

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.int32)])
    def __call__(self, samples, sample_rate):
        check = tf.debugging.assert_equal(sample_rate, SAMPLE_RATE)
        with tf.control_dependencies([check]):
            return {"embedding": self.embed(samples)}


class ResamplingYAMNet(YAMNetLike):
    """Resamples with tensorflow-io first: an op TF Serving does not have."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def __call__(self, waveform):
        import tensorflow_io as tfio

        waveform = tfio.audio.resample(waveform[:, None], rate_in=SAMPLE_RATE, rate_out=SAMPLE_RATE)[:, 0]
        return {"embeddings": self.embed(waveform)}


class BinarizingYAMNet(YAMNetLike):
    """Runs a tf-text op that TF Serving 2.17's bundled tensorflow-text 2.12.1 lacks."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def __call__(self, waveform):
        import tensorflow_text as tf_text

        bits = tf_text.utf8_binarize(tf.constant(["a"]))  # TFText>Utf8Binarize: tf-text >= 2.13
        return {"embeddings": self.embed(waveform) + 0.0 * tf.reduce_sum(bits)}


def save(module: tf.Module, path) -> str:
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": module.__call__.get_concrete_function()}
    )
    return str(path)


@pytest.fixture(scope="module")
def yamnet(tmp_path_factory):
    module = YAMNetLike(seed=0)
    return save(module, tmp_path_factory.mktemp("yamnet")), module


@pytest.fixture(scope="module")
def trill(tmp_path_factory):
    module = TRILLLike(seed=1)
    return save(module, tmp_path_factory.mktemp("trill")), module


def reference_frames(waveform: np.ndarray, module: YAMNetLike) -> np.ndarray:
    """NumPy: cut frames, project, ReLU -> [frames, DIM]."""
    count = 1 + (len(waveform) - FRAME_LENGTH) // FRAME_STEP
    frames = np.stack([waveform[i * FRAME_STEP : i * FRAME_STEP + FRAME_LENGTH] for i in range(count)])
    return np.maximum(frames.astype(np.float64) @ module.kernel.numpy() + module.bias.numpy(), 0.0)


def waveforms(batch_size: int = 3, seed: int = 0) -> np.ndarray:
    """Noisy tones in [-1, 1], the last row silent (an absent clip)."""
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLES) / SAMPLE_RATE
    rows = [
        0.5 * np.sin(2 * np.pi * (200 + 150 * i) * t) + rng.normal(0, 0.1, SAMPLES) for i in range(batch_size)
    ]
    clips = np.clip(np.stack(rows), -1, 1).astype(np.float32)
    clips[-1] = 0.0
    return clips


def audio_config(path: str, *overrides: str):
    return tiny_config(
        "model.modalities=[image,audio]",
        "model.audio_encoder.name=audio/saved_model",
        f"model.audio_encoder.path={path}",
        *overrides,
    )


# === Numerics ===


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_pooled_output_equals_numpy(yamnet, pooling):
    path, module = yamnet
    clips = waveforms()
    encoder = AudioSavedModelEncoder(path, pooling=pooling)
    output = encoder(tf.constant(clips)).numpy()
    for row, clip in enumerate(clips[:-1]):
        frames = reference_frames(clip, module)
        expected = frames.mean(axis=0) if pooling == "mean" else frames.max(axis=0)
        np.testing.assert_allclose(output[row], expected, atol=1e-5)
    np.testing.assert_array_equal(output[-1], np.zeros(DIM))  # the silent (absent) row


def test_batched_model_called_as_an_object_with_its_sample_rate(trill):
    """TRILL-style: the loaded object itself, batched, with a ``sample_rate`` input; a projection."""
    path, module = trill
    clips = waveforms(4, seed=1)
    encoder = AudioSavedModelEncoder(
        path,
        signature="",
        input_key="samples",
        output_key="embedding",
        batched=True,
        sample_rate_key="sample_rate",
        output_dim=5,
    )
    output = encoder(tf.constant(clips)).numpy()
    kernel, bias = (w.numpy() for w in encoder.projection.weights)
    for row, clip in enumerate(clips[:-1]):
        expected = reference_frames(clip, module).mean(axis=0) @ kernel + bias
        np.testing.assert_allclose(output[row], expected, atol=1e-5)
    np.testing.assert_allclose(output[-1], bias, atol=1e-7)  # absent: 0 before the projection


def test_sequence_output_gives_the_frames_and_a_mask(yamnet):
    path, module = yamnet
    clips = waveforms()
    sequence, mask = AudioSavedModelEncoder(path, sequence_output=True)(tf.constant(clips))
    assert sequence.shape == (3, NUM_FRAMES, DIM) and mask.dtype == tf.bool
    np.testing.assert_array_equal(mask.numpy(), [[True] * NUM_FRAMES] * 2 + [[False] * NUM_FRAMES])
    for row, clip in enumerate(clips[:-1]):
        np.testing.assert_allclose(sequence[row].numpy(), reference_frames(clip, module), atol=1e-5)


def test_layer_standard_checks(yamnet):
    """Shapes, get_config round trip, deserialization, gradients to the unfrozen wrapped variables."""
    path, _ = yamnet
    layer = run_layer_test(
        AudioSavedModelEncoder,
        {"path": path, "freeze": False, "output_dim": 4, "dropout_rate": 0.1, "name": "audio_encoder"},
        (tf.constant(waveforms()),),
        (3, 4),
    )
    assert {w.name.split("/")[-1] for w in layer.trainable_weights} >= {"frame_kernel:0", "frame_bias:0"}


def test_the_config_is_the_layers_arguments(yamnet):
    """As tests/test_encoders.py checks for the families buildable from defaults."""
    config = AudioSavedModelConfig(path=yamnet[0], output_dim=4, freeze=False, pooling="max")
    layer = build_encoder(config, name="audio_encoder")
    recorded = set(layer.get_config()) - set(keras.layers.Layer().get_config()) - {"sequence_output"}
    assert recorded == set(config.layer_arguments())
    assert all(layer.get_config()[k] == v for k, v in config.layer_arguments().items())
    assert type(config).input_kind == features.WAVEFORM


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_keeps_the_wrapped_variables_fixed(yamnet, tmp_path, freeze):
    path, module = yamnet
    inputs = keras.Input((SAMPLES,))
    encoder = AudioSavedModelEncoder(path, freeze=freeze, output_dim=2)
    model = keras.Model(inputs, encoder(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", run_eagerly=True)  # skips tracing the step
    model.fit(waveforms(4), np.ones((4, 2), np.float32), epochs=1, verbose=0)
    changed = not np.allclose(encoder.wrapped.kernel.numpy(), module.kernel.numpy())
    assert changed is not freeze
    assert len(encoder.trainable_weights) == (2 if freeze else 4)  # the projection (+ kernel and bias)
    # HDF5 weights (the training checkpoints) round-trip the trained wrapped variables.
    model.save_weights(str(tmp_path / "w.weights.h5"))
    fresh_encoder = AudioSavedModelEncoder(path, freeze=freeze, output_dim=2)
    fresh = keras.Model(inputs, fresh_encoder(inputs))
    fresh.load_weights(str(tmp_path / "w.weights.h5"))
    np.testing.assert_array_equal(fresh(waveforms(4)).numpy(), model(waveforms(4)).numpy())


# === Preprocessing and the model ===


def wav_file_bytes(samples: np.ndarray) -> bytes:
    """16-bit PCM mono WAV written with Python's ``wave`` module."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(SAMPLE_RATE)
        writer.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def wav_file_samples(data: bytes) -> np.ndarray:
    """Python ``wave`` + NumPy decode, scaled to [-1, 1), cropped/zero-padded to SAMPLES."""
    with wave.open(io.BytesIO(data)) as reader:
        values = np.frombuffer(reader.readframes(reader.getnframes()), "<i2") / 32768.0
    return np.pad(values[:SAMPLES], (0, max(0, SAMPLES - len(values))))


def test_preprocessor_hands_this_encoder_the_decoded_waveform(yamnet):
    config = audio_config(yamnet[0])
    specs = features.model_feature_specs(config.data, config.model)
    assert specs["audio"].shape.as_list() == [None, SAMPLES] and specs["audio"].dtype == tf.float32
    rng = np.random.default_rng(3)
    clips = [wav_file_bytes(rng.integers(-20000, 20000, n)) for n in (SAMPLES + 700, SAMPLES - 1500)]
    raw = {"image": tf.constant([b"", b"", b""]), "audio": tf.constant([*clips, b""])}
    out = Preprocessor(config.data, modalities=config.model)(raw)
    for row, clip in enumerate(clips):  # one cropped, one zero-padded
        np.testing.assert_allclose(out["audio"][row].numpy(), wav_file_samples(clip), atol=1e-7)
    np.testing.assert_array_equal(out["audio"][2].numpy(), np.zeros(SAMPLES))
    np.testing.assert_array_equal(out["audio_present"].numpy(), [1.0, 1.0, 0.0])


def test_model_with_missing_audio_and_modality_dropout_trains_a_step(yamnet):
    config = audio_config(yamnet[0], "model.audio_encoder.freeze=false", "model.modality_dropout.audio=0.5")
    model = models.build_model(config, NUM_CLASSES, vocab_size=50)
    inputs = random_features(config, batch_size=4)
    inputs["audio"] = waveforms(4)
    inputs["audio_present"][-1] = 0.0  # the silent row is absent
    # An absent clip does not change the output, whatever its waveform holds.
    expected = model(inputs, training=False).numpy()
    inputs["audio"][-1] = waveforms(4, seed=9)[0]
    np.testing.assert_allclose(model(inputs, training=False).numpy(), expected, atol=1e-6)
    model.compile(optimizer="adam", loss=models.loss_for(config), run_eagerly=True)
    before = model.get_layer("audio_encoder").wrapped.kernel.numpy()
    history = model.fit(inputs, np.arange(4) % NUM_CLASSES, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert not np.allclose(model.get_layer("audio_encoder").wrapped.kernel.numpy(), before)


def test_mixed_float16_runs_the_wrapped_model_in_float32(yamnet):
    path, module = yamnet
    clips = waveforms()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        encoder = AudioSavedModelEncoder(path)
        output = encoder(tf.constant(clips))
        config = audio_config(path, "model.audio_encoder.output_dim=8")
        model = models.build_model(config, NUM_CLASSES, vocab_size=50)
        probabilities = model(random_features(config) | {"audio": waveforms(4)}, training=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert output.dtype == tf.float16 and probabilities.dtype == tf.float32
    assert np.isfinite(probabilities.numpy()).all()
    # Only the pooled output is rounded to float16 (relative error 2^-11).
    expected = reference_frames(clips[0], module).mean(axis=0)
    np.testing.assert_allclose(output[0].numpy().astype(np.float64), expected, rtol=1e-3, atol=1e-4)


# Over 20 s here (a mirrored fit traces the step per replica): with the slow set, which CI runs.
@pytest.mark.slow
def test_mirrored_strategy_trains_the_unfrozen_wrapped_model(yamnet):
    """Loaded inside the strategy's scope, the wrapped variables are mirrored and train on both replicas."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    config = audio_config(yamnet[0], "model.audio_encoder.freeze=false", "model.modalities=[audio]")
    with strategy.scope():
        model = models.build_model(config, NUM_CLASSES, vocab_size=50)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=models.loss_for(config))
    encoder = model.get_layer("audio_encoder")
    assert isinstance(encoder.wrapped.kernel, tf.distribute.DistributedValues)
    before = encoder.wrapped.kernel.numpy()
    inputs = {"audio": waveforms(4), "audio_present": np.ones(4, np.float32)}
    history = model.fit(inputs, np.arange(4) % NUM_CLASSES, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert not np.allclose(encoder.wrapped.kernel.numpy(), before)


# === Errors at config and build time ===


@pytest.mark.parametrize(
    "kwargs, samples, message",
    [
        ({"signature": "embed"}, SAMPLES, r"no signature 'embed'; it has \['serving_default'\]"),
        ({"input_key": "audio"}, SAMPLES, r"input 'audio' is not an input .* it takes \['waveform'\]"),
        (
            {"output_key": "embedding"},
            SAMPLES,
            r"output_key 'embedding' is not an output; it has \['embeddings', 'frame_count', 'loudness', 'predictions'\]",
        ),
        ({"output_key": "frame_count"}, SAMPLES, "must be a float tensor, got <dtype: 'int32'>"),
        ({"output_key": "loudness"}, SAMPLES, r"has shape \(\); expected rank 1 or 2"),
        (
            {"batched": True},
            SAMPLES,
            r"input 'waveform' has shape \(None,\) \(one clip\): set batched: false",
        ),
        (
            {},
            FRAME_LENGTH - 1,
            r"gives no frame for 799 samples \(0.050 s\): raise data.audio.duration_seconds",
        ),
    ],
    ids=["signature", "input_key", "output_key", "int_output", "scalar_output", "batched", "too_short"],
)
def test_a_model_that_does_not_fit_is_an_error_naming_the_path(yamnet, kwargs, samples, message):
    path, _ = yamnet
    with pytest.raises(ValueError, match=message) as error:
        AudioSavedModelEncoder(path, **kwargs)(keras.Input((samples,)))
    assert path in str(error.value)


def test_a_call_the_model_does_not_accept_is_an_error_naming_the_path(trill):
    """TRILL-style models also need their sample rate: without sample_rate_key the call fails."""
    path, _ = trill
    encoder = AudioSavedModelEncoder(
        path, signature="", input_key="samples", output_key="embedding", batched=True
    )
    with pytest.raises(ValueError, match=r"failed on a \[1, 4000\] float32 waveform") as error:
        encoder(keras.Input((SAMPLES,)))
    assert path in str(error.value)


def test_a_missing_or_non_saved_model_path_fails_when_the_model_is_built(tmp_path):
    with pytest.raises(ValueError, match="needs model.audio_encoder.path"):
        models.build_model(audio_config(""), NUM_CLASSES, vocab_size=50)
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(ValueError, match=f"'{path}' is not a SavedModel directory"):
            models.build_model(audio_config(str(path)), NUM_CLASSES, vocab_size=50)


def test_a_sample_rate_mismatch_fails_when_the_config_is_loaded(yamnet):
    with pytest.raises(
        ConfigError, match=r"model.audio_encoder.sample_rate: the SavedModel .* takes 16000 Hz"
    ):
        audio_config(yamnet[0], "data.audio.sample_rate=8000")
    # The model's own rate in the config makes it consistent again; unused encoders are not checked.
    assert audio_config(yamnet[0], "data.audio.sample_rate=8000", "model.audio_encoder.sample_rate=8000")
    assert tiny_config(
        "model.modalities=[image]",
        "model.audio_encoder.name=audio/saved_model",
        "data.audio.sample_rate=8000",
    )


# === Export ===


def export_model(config, directory) -> tuple[keras.Model, Preprocessor]:
    """The untrained model inside the exporter's ServingModule, saved and op-checked."""
    model = models.build_model(config, NUM_CLASSES, vocab_size=50)
    preprocessor = Preprocessor(config.data, modalities=config.model)
    specs = features.model_feature_specs(config.data, config.model)
    module = export.ServingModule(model, preprocessor, ["a", "b", "c"], "multiclass", specs)
    module.save(directory)
    export.check_ops(directory)
    return model, preprocessor


# TF2 loading, and TF Serving's way (LoadSavedModel + Session::Run on the signature's tensor names).
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    raw = np.load(sys.argv[2], allow_pickle=True)
    loaded = tf.saved_model.load(sys.argv[1])
    out = loaded.signatures["serving_default"](image=tf.constant(raw["image"]), audio=tf.constant(raw["audio"]))
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        signature = tf.compat.v1.saved_model.loader.load(session, ["serve"], sys.argv[1]).signature_def[
            "serving_default"
        ]
        feeds = {signature.inputs[m].name: raw[m] for m in ("image", "audio")}
        session_out = session.run(signature.outputs["probabilities"].name, feed_dict=feeds)
    print(json.dumps({"tf2": out["probabilities"].numpy().tolist(), "session": session_out.tolist()}))
    """
)


# A model build, an export and a second process: about a minute here, so with the slow set (CI runs it).
@pytest.mark.slow
def test_export_reloads_in_a_fresh_process_equal_through_raw_wav_bytes(yamnet, tmp_path):
    """The wrapped graph and its variables travel in the export; its ops pass the TF Serving check."""
    config = audio_config(yamnet[0], "model.audio_encoder.output_dim=8")
    model, preprocessor = export_model(config, tmp_path / "model")  # passes check_ops
    rng = np.random.default_rng(5)
    png = tf.io.encode_png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).numpy()
    clips = [wav_file_bytes(rng.integers(-20000, 20000, n)) for n in (SAMPLES, SAMPLES // 2)]
    raw = {"image": np.array([png, b"", png], object), "audio": np.array([*clips, b""], object)}
    expected = model(preprocessor({k: tf.constant(v) for k, v in raw.items()}), training=False).numpy()
    np.savez(tmp_path / "raw.npz", **raw)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "model"), str(tmp_path / "raw.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        check=True,
    )
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    for name, values in outputs.items():  # "tf2" and "session"
        np.testing.assert_allclose(np.array(values), expected, atol=1e-5, err_msg=name)


class EncoderModule(tf.Module):
    """Just the encoder behind a signature: the smallest export that re-saves the wrapped graph."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    @tf.function(input_signature=[tf.TensorSpec([None, SAMPLES], tf.float32)])
    def serve(self, waveforms):
        return {"embedding": self.encoder(waveforms)}


@pytest.mark.parametrize(
    "module_class",
    [
        YAMNetLike,
        BinarizingYAMNet,
        pytest.param(
            ResamplingYAMNet,
            marks=pytest.mark.skipif(
                not audio_io.tfio_available(),
                reason="tensorflow-io ops do not load here (the compatibility lock has them)",
            ),
        ),
    ],
)
def test_the_op_check_covers_the_wrapped_graph(tmp_path, module_class):
    """Re-saving copies the wrapped functions into the export's library, where check_ops reads them."""
    encoder = AudioSavedModelEncoder(save(module_class(), tmp_path / "wrapped"))
    module = EncoderModule(encoder)
    tf.saved_model.save(module, str(tmp_path / "export"), signatures={"serving_default": module.serve})
    assert "Relu" in export.graph_ops(tmp_path / "export")  # the wrapped model's own op
    if module_class is ResamplingYAMNet:
        with pytest.raises(export.ExportError, match="IO>AudioResample"):
            export.check_ops(tmp_path / "export")
    elif module_class is BinarizingYAMNet:
        export.check_ops(tmp_path / "export", target="2.21")
        with pytest.raises(export.ExportError, match="TFText>Utf8Binarize"):
            export.check_ops(tmp_path / "export", target="2.17")
    else:
        export.check_ops(tmp_path / "export")
