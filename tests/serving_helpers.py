"""Test SavedModels with the export contract's signatures, and test inputs.

``make_test_savedmodel`` builds a real SavedModel: a tiny tf_keras model
(seconds to trace, unlike ``build_model``'s) inside the exporter's own
``ServingModule``, so its signatures, preprocessing and classify method_name
are exactly what ``mmtf export`` writes; plus a warmup file. The server is
tested on what it will serve in production.
A build is cached per process and copied for further versions.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from multimodal_tf.compat import keras, tf
from multimodal_tf.config import MODALITIES, AudioConfig, DataConfig, ImageConfig, TextConfig
from multimodal_tf.data import features
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.export import ServingModule

CLASS_NAMES = ("cat", "dog", "bird")
VOCABULARY = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cat", "dog", "bird", "sky")
SAMPLE_RATE = 16000
TINY_DATA = DataConfig(
    image=ImageConfig(height=16, width=16),
    text=TextConfig(max_tokens=8),
    audio=AudioConfig(duration_seconds=0.25, num_mel_bins=16),
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# === Inputs ===


def png_bytes(seed: int = 0, size: int = 20) -> bytes:
    """A random RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return tf.io.encode_png(pixels).numpy()


def wav_bytes(seed: int = 0, seconds: float = 0.3, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit PCM mono WAV of a noisy tone."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.5 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + rng.normal(0, 0.05, t.shape)
    samples = np.clip(wave, -1, 1).astype(np.float32)[:, None]
    return tf.audio.encode_wav(samples, sample_rate).numpy()


def text_of(seed: int = 0) -> str:
    words = VOCABULARY[5:]
    return " ".join(words[(seed + i) % len(words)] for i in range(3))


def make_inputs(batch_size: int, seed: int = 0, absent: Sequence[str] = ()) -> dict[str, list[bytes]]:
    """Raw inputs for ``serving_default``: lists of bytes, ``b""`` for ``absent`` modalities."""
    makers = {
        features.IMAGE: png_bytes,
        features.TEXT: lambda s: text_of(s).encode(),
        features.AUDIO: wav_bytes,
    }
    return {
        modality: [b"" if modality in absent else make(seed + i) for i in range(batch_size)]
        for modality, make in makers.items()
    }


def serialized_examples(inputs: dict[str, list[bytes]]) -> list[bytes]:
    """``tf.Example`` bytes with one bytes feature per modality."""
    batch_size = len(next(iter(inputs.values())))
    examples = []
    for i in range(batch_size):
        feature = {
            name: tf.train.Feature(bytes_list=tf.train.BytesList(value=[values[i]]))
            for name, values in inputs.items()
        }
        examples.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return examples


# === Model ===


def _tiny_model(data: DataConfig, modalities: Sequence[str], seed: int) -> keras.Model:
    """Flatten + Dense per modality, masked by presence -> softmax over 3 classes."""
    specs = features.model_feature_specs(data, modalities)
    inputs = {name: keras.Input(spec.shape[1:], dtype=spec.dtype, name=name) for name, spec in specs.items()}
    branches = []
    for index, modality in enumerate(modalities):
        value = inputs[modality]
        if modality == features.TEXT:
            value = keras.layers.Embedding(len(VOCABULARY), 4, name="text_embedding")(value)
        value = keras.layers.Flatten(name=f"{modality}_flatten")(value)
        initializer = keras.initializers.GlorotUniform(seed=seed * 10 + index)
        value = keras.layers.Dense(
            4, activation="tanh", kernel_initializer=initializer, name=f"{modality}_dense"
        )(value)
        presence = keras.layers.Reshape((1,), name=f"{modality}_presence")(
            inputs[features.presence_name(modality)]
        )
        branches.append(keras.layers.Multiply(name=f"{modality}_masked")([value, presence]))
    fused = branches[0] if len(branches) == 1 else keras.layers.Concatenate(name="fusion")(branches)
    head_init = keras.initializers.GlorotUniform(seed=seed * 10 + 9)
    outputs = keras.layers.Dense(
        len(CLASS_NAMES),
        activation="softmax",
        kernel_initializer=head_init,
        bias_initializer="ones",
        name="head",
    )(fused)
    return keras.Model(inputs, outputs, name="tiny")


def write_warmup(export_dir: str | Path, model_name: str, modalities: Sequence[str]) -> None:
    """assets.extra/tf_serving_warmup_requests: one Predict request of batch 2."""
    inputs = make_inputs(2, seed=7)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = "serving_default"
    for modality in modalities:
        request.inputs[modality].CopyFrom(tf.make_tensor_proto(inputs[modality], tf.string))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    extra = Path(export_dir) / "assets.extra"
    extra.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / "tf_serving_warmup_requests")) as writer:
        writer.write(log.SerializeToString())


@functools.cache
def _module(modalities: tuple[str, ...]) -> ServingModule:
    """The module; tracing its signatures is the slow part, so it is built once per process."""
    preprocessor = Preprocessor(TINY_DATA, VOCABULARY, modalities)
    specs = features.model_feature_specs(TINY_DATA, preprocessor.modalities)
    model = _tiny_model(TINY_DATA, preprocessor.modalities, seed=0)
    return ServingModule(model, preprocessor, CLASS_NAMES, "multiclass", specs)


@functools.cache
def _build(seed: int, modalities: tuple[str, ...], model_name: str) -> Path:
    module = _module(modalities)
    rng = np.random.default_rng(seed)
    for weight in module.model.weights:  # same graph, weights drawn from this seed
        weight.assign(rng.uniform(-0.8, 0.8, weight.shape).astype(weight.dtype.as_numpy_dtype))
    root = tempfile.mkdtemp(prefix="mmtf_test_savedmodel_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    export_dir = Path(root) / "model"
    module.save(export_dir)
    write_warmup(export_dir, model_name, module.modalities)
    return export_dir


def make_test_savedmodel(
    base_path: str | Path,
    name: str,
    version: int,
    seed: int = 0,
    modalities: Sequence[str] = MODALITIES,
    atomic: bool = True,
) -> Path:
    """Writes BASE/NAME/VERSION with the export contract's signatures; returns it.

    Args:
        base_path: the model base folder's parent (TF Serving's ``/models``).
        name: model name (folder under ``base_path``).
        version: version folder name.
        seed: weight seed; different seeds give different outputs.
        modalities: the inputs of ``serving_default``.
        atomic: write into a temporary folder and rename it into place, as an
            exporter must when a server polls the folder.
    """
    source = _build(seed, tuple(m for m in MODALITIES if m in modalities), name)
    model_dir = Path(base_path) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version)
    if not atomic:
        shutil.copytree(source, target)
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    shutil.copytree(source, staging, dirs_exist_ok=True)
    os.rename(staging, target)
    return target


# Image and audio convolution stacks in one graph: the combination that
# aborted TF 2.17 with oneDNN on (tests/test_serving_concurrency.py).
IMAGE_AUDIO = ("model.modalities=[image,audio]", "model.fusion.name=concat")

# An image + text model with an 8-dim aligned space: what the retrieval tests
# embed, index and search.
ALIGNED_IMAGE_TEXT = (
    "model.modalities=[image,text]",
    "model.text_encoder.name=text/bow",
    "model.alignment.weight=1",
    "model.alignment.pairs=[[image,text]]",
    "model.alignment.dim=8",
)


def export_untrained_model(
    directory: str | Path, *overrides: str, embed: Sequence[str] = ()
) -> ServingModule:
    """A freshly initialised ``build_model`` model of the tiny test config (plus
    ``overrides``) inside the exporter's ServingModule, saved to ``directory``.

    Real encoders and fusion, unlike ``make_test_savedmodel``'s tiny model:
    for checks that depend on the graph the families build. ``embed`` names
    the modalities that get ``embed_<modality>`` signatures (an aligned config).
    """
    from multimodal_tf import models  # noqa: PLC0415  (tests that never need it stay light)
    from multimodal_tf.data import text  # noqa: PLC0415
    from multimodal_tf.testing import tiny_config  # noqa: PLC0415

    config = tiny_config(*overrides)
    keras.utils.set_random_seed(0)
    vocab_size = text.vocabulary_size(config.data.text, VOCABULARY)
    model = models.build_model(config, num_classes=len(CLASS_NAMES), vocab_size=vocab_size)
    # The model config, not its modality names: its encoders decide each
    # input kind (text/bert reads its checkpoint's vocabulary, audio/saved_model
    # takes waveforms).
    preprocessor = Preprocessor(config.data, VOCABULARY, config.model)
    specs = features.model_feature_specs(config.data, config.model)
    module = ServingModule(model, preprocessor, CLASS_NAMES, config.model.head.type, specs)
    if embed:
        from multimodal_tf.retrieval import EmbeddingModule  # noqa: PLC0415

        module.embedding = EmbeddingModule(model, preprocessor, tuple(embed))
    module.save(directory)
    return module


def stop_and_read_log(process, log) -> str:
    """Kills a server child still running, then returns (and closes) its log file."""
    if process.poll() is None:
        process.kill()
        process.wait(10)
    log.seek(0)
    output = log.read()
    log.close()
    return output


def make_broken_version(base_path: str | Path, name: str, version: int) -> Path:
    """A version folder whose saved_model.pb is not a SavedModel."""
    target = Path(base_path) / name / str(version)
    target.mkdir(parents=True)
    (target / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    return target


# === TLS ===


def make_certificates(directory: str | Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate, by it.

    Uses the ``openssl`` command line (the ``cryptography`` package is not
    part of this project's environment); returns the PEM files by name:
    ``ca``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``
    and ``other_ca`` (an unrelated CA, for a client that trusts the wrong one).
    Skips the calling test when ``openssl`` is not installed.
    """
    import subprocess  # noqa: PLC0415

    import pytest  # noqa: PLC0415

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("TLS tests generate certificates with the openssl command, which is not installed")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=out, timeout=60)

    key_args = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other_ca"):
        run("req", "-x509", *key_args, "-keyout", f"{ca}_key.pem", "-out", f"{ca}.pem",
            "-days", "2", "-subj", f"/CN=mmtf test {ca}")  # fmt: skip
    (out / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")
    (out / "client.ext").write_text("extendedKeyUsage=clientAuth\n", encoding="utf-8")
    for name in ("server", "client"):
        run("req", *key_args, "-keyout", f"{name}_key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca_key.pem",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}_cert.pem")  # fmt: skip
    names = ("ca", "other_ca", "server_cert", "server_key", "client_cert", "client_key")
    return {name: out / f"{name}.pem" for name in names}
