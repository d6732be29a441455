"""``audio/saved_model``: a test-built YAMNet-like SavedModel, checked against NumPy."""

import numpy as np
import pytest

from multimodal_tf.compat import tf
from multimodal_tf.encoders import AudioSavedModelEncoder
from multimodal_tf.testing import tiny_config

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
