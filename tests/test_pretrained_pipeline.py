"""pipelines/pretrained.yaml (BERT + Keras Applications + YAMNet, cross-attention) on tiny real-format files."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from serving_helpers import export_untrained_model, png_bytes, wav_bytes

from multimodal_tf import cli, models
from multimodal_tf import config as config_lib
from multimodal_tf.compat import tf
from multimodal_tf.config import MissingFileError
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.run_dir import load_trained_model
from multimodal_tf.serving import Client, ModelServer, ModelSpec
from multimodal_tf.testing_pretrained import TinyYAMNet, tiny_pretrained_overrides

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "pretrained.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tool's own output: ``tools/make_tiny_pretrained.py OUT`` run in this process."""
    spec = importlib.util.spec_from_file_location(
        "make_tiny_pretrained", ROOT / "tools" / "make_tiny_pretrained.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path_factory.mktemp("tiny_pretrained")
    assert tool.main([str(out)]) == 0
    return out


def test_the_pipeline_names_its_missing_files_and_builds_on_the_tiny_overlay(tiny):
    with pytest.raises(
        MissingFileError, match=r"model\.image_encoder\.weights: no such file 'pretrained/resnet50v2"
    ):
        config_lib.load([PIPELINE])
    config = config_lib.load([PIPELINE, tiny / "tiny.yaml"])
    assert config.model.fusion.name == "cross_attention"
    assert (config.model.text_encoder.name, config.model.audio_encoder.output_key) == ("text/bert", "1")
    model = models.build_model(config, num_classes=3, vocab_size=1)

    # The .h5 file's values are what the backbone holds.
    backbone = model.get_layer("image_encoder").backbone
    with h5py.File(tiny / "mobilenetv3small_tiny_notop.h5", "r") as weights_file:
        layer = next(layer for layer in backbone.layers if layer.weights)
        group = weights_file[layer.name]
        stored = [np.asarray(group[name]) for name in group.attrs["weight_names"]]
    for variable, value in zip(layer.weights, stored, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)

    # The YAMNet stand-in answers as the published yamnet/1: a tuple, frames in output 1.
    loaded = tf.saved_model.load(str(tiny / "yamnet"))
    waveform = np.random.default_rng(0).uniform(-1, 1, 4000).astype(np.float32)
    scores, embeddings, log_mel = loaded(tf.constant(waveform))
    np.testing.assert_allclose(
        embeddings.numpy(), TinyYAMNet(seed=0)(tf.constant(waveform))[1].numpy(), atol=1e-6
    )
    assert scores.shape == (9, 4) and embeddings.shape == (9, 8) and log_mel.shape == (9, 1)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # registers the tf-text ops the BERT tokenizer uses
    model = tf.saved_model.load(sys.argv[1])
    raw = {k: tf.constant(v) for k, v in np.load(sys.argv[2]).items()}
    print(json.dumps(model.signatures["serving_default"](**raw)["probabilities"].numpy().tolist()))
    """
)


# A training epoch and an export of three pretrained encoders and a Transformer: minutes here.
@pytest.mark.slow
def test_the_pipeline_trains_on_tiny_files_and_its_export_serves_the_same_in_a_fresh_process(
    tiny, synth_manifest, tmp_path
):
    run = tmp_path / "run"
    command = ["train", "--config", str(PIPELINE), "--config", str(tiny / "tiny.yaml")]
    command += ["--manifest", str(synth_manifest), "--output-dir", str(run), "--set", "train.verbose=0"]
    assert cli.main(command) == 0
    assert np.isfinite(json.loads((run / "history.json").read_text())["loss"]).all()
    assert cli.main(["export", str(run), "--base-path", str(tmp_path / "models"), "--model-name", "p"]) == 0

    raw = {
        "image": np.array([png_bytes(0, size=32), b"", png_bytes(2, size=40)], dtype=bytes),
        "text": np.array([b"a red cat", b"the dog is happy", b""], dtype=bytes),
        "audio": np.array([wav_bytes(0, seconds=0.25), wav_bytes(1, seconds=0.1), b""], dtype=bytes),
    }
    np.savez(tmp_path / "raw.npz", **raw)
    config, metadata, model = load_trained_model(run)
    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model)
    expected = model(preprocessor({k: tf.constant(v) for k, v in raw.items()}), training=False).numpy()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(tmp_path / "models" / "p" / "1"),
            str(tmp_path / "raw.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        check=True,
    )
    served = np.array(json.loads(result.stdout.strip().splitlines()[-1]))
    assert served.shape == expected.shape == (3, 8)
    np.testing.assert_allclose(served, expected, atol=1e-5)


# An export of BERT + cross-attention (four signatures traced) and a server: about a minute here.
@pytest.mark.slow
def test_embedded_server_predicts_raw_inputs_as_the_in_process_bert_cross_attention_model(tiny, tmp_path):
    """gRPC Predict over a real socket on raw PNG/text/WAV bytes, tokenized by the export's own
    vocab.txt asset, equals the Keras model on the same inputs, absent modalities included."""
    paths = {
        "bert": tiny / "bert",
        "image_weights": tiny / "mobilenetv3small_tiny_notop.h5",
        "yamnet": tiny / "yamnet",
    }
    module = export_untrained_model(
        tmp_path / "b" / "1",
        "model.modalities=[image,text]",
        "model.image_encoder.name=image/cnn",  # the pretrained text family is what is under test
        *[o for o in tiny_pretrained_overrides(paths) if o.startswith(("model.text", "model.fusion"))],
    )
    assert module.model.get_layer("fusion").__class__.__name__ == "CrossAttentionFusion"
    texts = [b"the red cat is happy", b"", b"a blue car!", b"unaffable dogs"]
    images = [png_bytes(0), png_bytes(1), b"", png_bytes(3)]
    raw = {"image": tf.constant(images), "text": tf.constant(texts)}
    expected = module.model(module.preprocessor(raw), training=False).numpy()
    with ModelServer([ModelSpec("b", str(tmp_path / "b"))], port=0, rest_api_port=None) as server:
        with Client(server.grpc_target, "b", timeout_seconds=60) as client:
            served = client.predict(images=images, texts=texts)
    np.testing.assert_array_equal(served["text_present"], [1, 0, 1, 1])
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)
