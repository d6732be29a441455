"""Export: signatures on raw inputs, fresh-process reload equality, op check, layout."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from multimodal_tf import cli, export
from multimodal_tf.compat import tf
from multimodal_tf.data import audio_io, features
from multimodal_tf.data.cache import default_tfrecord_dir
from multimodal_tf.run_dir import load_trained_model
from multimodal_tf.signatures import CLASSIFY_METHOD, WARMUP_FILE_NAME
from multimodal_tf.testing import tiny_config
from multimodal_tf.training import train


@pytest.fixture(scope="module")
def exported(synth_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={out / 'run'}",
        "train.epochs=1",
        "model.fusion.name=attention",
    )
    run = train(config, progress=False)
    assert cli.main(["export", str(run), "--base-path", str(out / "models"), "--model-name", "m"]) == 0
    return run, out / "models" / "m" / "1"


def _test_examples(run, count=6):
    config, metadata, _ = load_trained_model(run)
    directory = default_tfrecord_dir(config.data)
    files = [str(directory / f) for f in metadata.shards["test"]]
    return [r.numpy() for r in tf.data.TFRecordDataset(files).take(count)]


def test_layout_and_assets(exported):
    _, path = exported
    assert (path / "saved_model.pb").exists() and (path / "variables").is_dir()
    extra = path / "assets.extra"
    assert (extra / "config.yaml").exists() and (extra / "label_names.txt").read_text().split() == [
        f"class_{i}" for i in range(8)
    ]
    from tensorflow_serving.apis import prediction_log_pb2

    logs = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(str(extra / WARMUP_FILE_NAME))
    ]
    assert 0 < len(logs) < 1000
    assert set(logs[0].predict_log.request.inputs) == {"image", "text", "audio"}


def test_classify_method_name_and_op_set(exported):
    _, path = exported
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    signatures = proto.meta_graphs[0].signature_def
    assert signatures["classify"].method_name == CLASSIFY_METHOD
    assert signatures["serving_default"].method_name == "tensorflow/serving/predict"
    assert set(signatures) >= {"serving_default", "classify", "predict_examples", "predict_features"}
    ops = export.graph_ops(path)
    assert "FastWordpieceTokenizeWithOffsets" in ops and "DecodeWav" in ops
    assert not [op for op in ops if op.startswith("IO>")]


@pytest.mark.skipif(
    not audio_io.tfio_available(),
    reason="tensorflow-io ops do not load here (the compatibility lock has them)",
)
def test_check_ops_rejects_tensorflow_io_ops(tmp_path):
    import tensorflow_io as tfio

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def f(self, x):
            return {"y": tfio.audio.decode_wav(x[0], dtype=tf.int16)}

    tf.saved_model.save(Module(), str(tmp_path), signatures={"serving_default": Module().f})
    with pytest.raises(export.ExportError, match="IO>"):
        export.check_ops(tmp_path)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # registers the tf-text ops the graph uses
    model = tf.saved_model.load(sys.argv[1])
    examples = tf.constant([r.numpy() for r in tf.data.TFRecordDataset(sys.argv[2])])
    raw = tf.io.parse_example(examples, {
        m: tf.io.FixedLenFeature([], tf.string, default_value="") for m in ("image", "text", "audio")})
    out = {
        "serving_default": model.signatures["serving_default"](**raw)["probabilities"].numpy().tolist(),
        "predict_examples": model.signatures["predict_examples"](examples=examples)["probabilities"].numpy().tolist(),
        "classify": model.signatures["classify"](inputs=examples)["scores"].numpy().tolist(),
        "predict_features": model.signatures["predict_features"](
            **{name: tf.constant(value) for name, value in np.load(sys.argv[3]).items()}
        )["probabilities"].numpy().tolist(),
    }
    print(json.dumps(out))
    """
)


def test_reload_in_a_fresh_process_equals_the_in_memory_model(exported, tmp_path):
    run, path = exported
    config, metadata, model = load_trained_model(run)
    examples = _test_examples(run)
    from multimodal_tf.data.preprocessing import Preprocessor

    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model.modalities)
    model_features = preprocessor(preprocessor.parse_examples(tf.constant(examples)))
    expected = model(model_features, training=False).numpy()
    # predict_features is fed the same preprocessed tensors the model was given.
    np.savez(tmp_path / "features.npz", **{name: value.numpy() for name, value in model_features.items()})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with tf.io.TFRecordWriter(str(tmp_path / "examples.tfrecord")) as writer:
        for example in examples:
            writer.write(example)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(path),
            str(tmp_path / "examples.tfrecord"),
            str(tmp_path / "features.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(outputs) == {"serving_default", "predict_examples", "classify", "predict_features"}
    for name, values in outputs.items():
        np.testing.assert_allclose(np.array(values), expected, atol=1e-5, err_msg=name)


def test_raw_signature_handles_missing_modalities_and_names_bad_fields(exported):
    _, path = exported
    loaded = tf.saved_model.load(str(path))
    serve = loaded.signatures["serving_default"]
    out = serve(image=tf.constant([b""]), text=tf.constant(["a red thing"]), audio=tf.constant([b""]))
    assert out["image_present"].numpy().tolist() == [0.0] and out["text_present"].numpy().tolist() == [1.0]
    assert out["class_name"].numpy()[0].decode().startswith("class_")
    np.testing.assert_allclose(out["probabilities"].numpy().sum(), 1.0, atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="image: not a PNG"):
        serve(image=tf.constant([b"garbage"]), text=tf.constant([""]), audio=tf.constant([b""]))
    features_out = loaded.signatures["predict_features"](
        **{
            name: tf.zeros([1] + spec.shape[1:].as_list(), spec.dtype)
            for name, spec in features.model_feature_specs(tiny_config().data).items()
        }
    )
    assert features_out["probabilities"].shape == (1, 8)


def test_versions_increment_and_existing_versions_are_refused(exported):
    run, first = exported
    base = first.parent.parent
    second = export.export_run(run, base, "m")
    assert (first.name, second.name) == ("1", "2")
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_run(run, base, "m", version=2)
    assert sorted(p.name for p in (base / "m").iterdir()) == ["1", "2"]  # no temp dirs left


# A training and an export (over a minute): with the slow tests, which CI runs too;
# test_tf1_session (slow too) runs the same families' exports under a TF1 Session.
@pytest.mark.slow
def test_ngram_tokenizer_augmentation_colours_and_ensemble_export_and_match_the_model(
    synth_manifest, tmp_path
):
    """The n-gram tokenizer and the colour histogram are core TF ops (they pass the op check);
    augmentation is off in serving; an ensemble exports as one model whose output is its
    members' average."""
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={tmp_path / 'run'}",
        "data.text.tokenizer=ngrams",
        "data.text.max_tokens=32",
        "data.text.hash_buckets=500",
        "model.modalities=[image,text]",
        "model.text_encoder.name=text/bow",
        "model.image_encoder.augment=true",
        "model.image_encoder.colour_bins=4",
        "model.ensemble_size=2",
    )
    run = train(config, progress=False)
    assert cli.main(["export", str(run), "--base-path", str(tmp_path / "models"), "--model-name", "n"]) == 0
    path = tmp_path / "models" / "n" / "1"
    ops = export.graph_ops(path)
    assert "StringToHashBucketFast" in ops and "FastWordpieceTokenizeWithOffsets" not in ops
    assert "OneHot" in ops  # the colour histogram
    config, metadata, model = load_trained_model(run)
    examples = tf.constant(_test_examples(run))
    from multimodal_tf.data.preprocessing import Preprocessor

    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model.modalities)
    expected = model(preprocessor(preprocessor.parse_examples(examples)), training=False).numpy()
    loaded = tf.saved_model.load(str(path))
    served = loaded.signatures["predict_examples"](examples=examples)["probabilities"].numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)
    features = preprocessor(preprocessor.parse_examples(examples))
    members = [member(features, training=False).numpy() for member in model.members]
    np.testing.assert_allclose(served, np.mean(members, axis=0), atol=1e-5)
