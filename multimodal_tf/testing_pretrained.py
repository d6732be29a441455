"""Tiny stand-ins, in the real file formats, for the pretrained files of ``pipelines/pretrained.yaml``.

No pretrained weights can be downloaded here, so :func:`write_tiny_pretrained`
writes seeded random ones in the formats the real releases use: a BERT
checkpoint in Google's TF1 layout (``testing_bert``), a Keras Applications
``include_top=False`` ``.h5`` weights file (what tf_keras writes and reads
for its own ``*_notop.h5`` downloads) and a SavedModel with the published
YAMNet's interface (called as the object on a 1-D 16 kHz waveform, returning
the tuple ``(scores, embeddings, log_mel)``). It also writes an overlay YAML
that points the pipeline at them and shrinks the sizes, so the pipeline
trains in seconds on the synthetic demo set:

    mmtf train --config pipelines/pretrained.yaml --config OUT/tiny.yaml --manifest ...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from multimodal_tf.compat import keras, tf
from multimodal_tf.testing_bert import write_tiny_bert_checkpoint

# Frames of 0.05 s every 0.025 s at 16 kHz, 8 floats each: YAMNet's interface
# (0.96 s every 0.48 s, 1024 floats) at a size that builds in a second.
TINY_FRAME_LENGTH, TINY_FRAME_STEP, TINY_FRAME_DIM = 800, 400, 8
TINY_NUM_SCORES = 4  # YAMNet: 521 AudioSet classes
# The smallest Keras Applications backbone: MobileNetV3Small at 32 px.
TINY_ARCHITECTURE = "MobileNetV3Small"
TINY_ARCHITECTURE_ARGUMENTS = {"alpha": 0.75, "minimalistic": True}
TINY_INPUT_SIZE = 32


class TinyYAMNet(tf.Module):
    """``waveform [samples] -> (scores [frames, 4], embeddings [frames, 8], log_mel [frames, 1])``.

    Frames the waveform, projects each frame (ReLU) to its embedding; the
    scores are a sigmoid of the first embedding values. The published YAMNet
    (``yamnet/1``) has this call signature and output tuple.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        kernel = rng.normal(0, 0.05, (TINY_FRAME_LENGTH, TINY_FRAME_DIM)).astype(np.float32)
        self.kernel = tf.Variable(kernel, name="frame_kernel")
        self.bias = tf.Variable(rng.normal(0, 0.1, TINY_FRAME_DIM).astype(np.float32), name="frame_bias")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="waveform")])
    def __call__(self, waveform):
        frames = tf.signal.frame(waveform, TINY_FRAME_LENGTH, TINY_FRAME_STEP)  # [frames, FRAME_LENGTH]
        embeddings = tf.nn.relu(frames @ self.kernel + self.bias)
        log_energy = tf.math.log(tf.reduce_mean(tf.square(frames), axis=1, keepdims=True) + 1e-6)
        return tf.sigmoid(embeddings[:, :TINY_NUM_SCORES]), embeddings, log_energy


def write_tiny_yamnet(directory: str | Path, seed: int = 0) -> Path:
    """Saves a :class:`TinyYAMNet` SavedModel (``saved_model.pb``, ``variables/``) to ``directory``."""
    module = TinyYAMNet(seed)
    tf.saved_model.save(module, str(directory))
    return Path(directory)


def write_tiny_keras_application(path: str | Path, seed: int = 0) -> Path:
    """Writes seeded random ``include_top=False`` weights of the tiny backbone as a ``.h5`` file."""
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, TINY_ARCHITECTURE)(
        include_top=False,
        weights=None,
        input_shape=(TINY_INPUT_SIZE, TINY_INPUT_SIZE, 3),
        **TINY_ARCHITECTURE_ARGUMENTS,
    )
    model.save_weights(str(path))
    return Path(path)


def tiny_overlay(bert_dir: Path, weights: Path, yamnet_dir: Path) -> dict:
    """The overlay config: tiny files, and sizes that suit them and the synthetic demo set."""
    return {
        "data": {
            "image": {"height": 32, "width": 32},
            "text": {"max_tokens": 16},  # the tiny BERT has 32 positions
            "audio": {"duration_seconds": 0.25},  # 9 tiny frames
            "batch_size": 16,
        },
        "model": {
            "image_encoder": {
                "architecture": TINY_ARCHITECTURE,
                "architecture_arguments": dict(TINY_ARCHITECTURE_ARGUMENTS),
                "weights": str(weights),
                "input_size": TINY_INPUT_SIZE,
                "output_dim": 16,
            },
            "text_encoder": {"checkpoint_dir": str(bert_dir), "output_dim": 16},
            "audio_encoder": {"path": str(yamnet_dir), "output_dim": 16},
            "fusion": {"hidden_dim": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32},
            "head": {"hidden_units": [16]},
        },
        "train": {"epochs": 1, "early_stopping_patience": 0},
    }


def write_tiny_pretrained(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Writes the three tiny pretrained files and ``tiny.yaml`` into ``directory``.

    Args:
        directory: the output folder (created).
        seed: seeds every random weight.

    Returns:
        ``{"bert": folder, "image_weights": .h5 file, "yamnet": folder, "overlay": tiny.yaml}``.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "bert": write_tiny_bert_checkpoint(directory / "bert", seed=seed),
        "image_weights": write_tiny_keras_application(directory / "mobilenetv3small_tiny_notop.h5", seed),
        "yamnet": write_tiny_yamnet(directory / "yamnet", seed),
        "overlay": directory / "tiny.yaml",
    }
    overlay = tiny_overlay(paths["bert"], paths["image_weights"], paths["yamnet"])
    header = (
        "# Tiny stand-ins for pipelines/pretrained.yaml, written by tools/make_tiny_pretrained.py:\n"
        "# seeded random weights in the real formats, for trying the pipeline without downloads.\n"
    )
    paths["overlay"].write_text(header + yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")
    return paths


def tiny_pretrained_overrides(paths: dict[str, Path], fusion: str = "cross_attention") -> tuple[str, ...]:
    """``tiny_config`` overrides for the three pretrained families on :func:`write_tiny_pretrained` files.

    Image, text and audio take ``image/keras_application``, ``text/bert`` and
    ``audio/saved_model`` (with the published YAMNet's keys), fused by
    ``fusion``; drop a family by leaving its modality out of
    ``model.modalities``.
    """
    arguments = ", ".join(
        f"{key}: {str(value).lower()}" for key, value in TINY_ARCHITECTURE_ARGUMENTS.items()
    )
    return (
        "model.image_encoder.name=image/keras_application",
        f"model.image_encoder.architecture={TINY_ARCHITECTURE}",
        f"model.image_encoder.architecture_arguments={{{arguments}}}",
        f"model.image_encoder.weights={paths['image_weights']}",
        f"model.image_encoder.input_size={TINY_INPUT_SIZE}",
        "model.text_encoder.name=text/bert",
        f"model.text_encoder.checkpoint_dir={paths['bert']}",
        "model.audio_encoder.name=audio/saved_model",
        f"model.audio_encoder.path={paths['yamnet']}",
        "model.audio_encoder.signature=",
        "model.audio_encoder.input_key=",
        "model.audio_encoder.output_key='1'",  # quoted: a string key, not YAML's int
        f"model.fusion.name={fusion}",
    )
