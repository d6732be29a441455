"""Exports run the way TF Serving runs them: LoadSavedModel + Session::Run.

TF Serving loads a SavedModel the TF1 way: it runs the init op, then
``Session::Run`` on the SignatureDef's tensor names; it never calls the
Python ``ConcreteFunction``s the other tests use. The closest check available
without the binary is ``tf.compat.v1.saved_model.loader.load`` + ``Session.run``
on those names, in a fresh process (so nothing of the exporting process, such
as already-registered functions, helps). Each encoder family and an ensemble
is exported, every signature is run, and every output is compared with the
in-memory Keras model on the same raw inputs.
"""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from serving_helpers import CLASS_NAMES, export_untrained_model, make_inputs, serialized_examples

from multimodal_tf.compat import tf
from multimodal_tf.data import features
from multimodal_tf.export import ServingModule
from multimodal_tf.signatures import CLASSIFY_METHOD

# Every encoder family appears in at least one export, and so do the sequence
# outputs of image/cnn, text/lstm and audio/lstm (cross_attention).
EXPORTS = {
    "cnn-colour_lstm_cnn-attention": (
        "model.image_encoder.colour_bins=4",
        "model.fusion.name=attention",
    ),
    "cnn_bow-ngrams_lstm-gated": (
        "data.text.tokenizer=ngrams",
        "data.text.hash_buckets=101",
        "model.text_encoder.name=text/bow",
        "model.audio_encoder.name=audio/lstm",
        "model.audio_encoder.depth=1",
        "model.fusion.name=gated",
    ),
    "cnn_lstm_lstm-cross_attention": (
        "model.audio_encoder.name=audio/lstm",
        "model.audio_encoder.depth=1",
        "model.fusion.name=cross_attention",
    ),
    "late-ensemble_stats": (
        "model.audio_encoder.name=audio/stats",
        "model.fusion.name=late",
        "model.ensemble_size=2",
    ),
}

SESSION_RUN = textwrap.dedent(
    """
    import pickle, sys
    import tensorflow as tf
    import tensorflow_text  # TF Serving links the tf-text kernels; Python registers them on import
    export_dir, requests_path, out_path = sys.argv[1:]
    with open(requests_path, "rb") as f:
        requests = pickle.load(f)
    results = {}
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir)
        for name, feeds in requests.items():
            signature = meta_graph.signature_def[name]
            feed_dict = {signature.inputs[key].name: value for key, value in feeds.items()}
            keys = sorted(signature.outputs)
            values = session.run([signature.outputs[k].name for k in keys], feed_dict=feed_dict)
            results[name] = {"method_name": signature.method_name, **dict(zip(keys, values))}
    with open(out_path, "wb") as f:
        pickle.dump(results, f)
    """
)


def _requests(module: ServingModule) -> tuple[dict, dict]:
    """Feeds for each signature, and the in-memory model's features for them."""
    raw = make_inputs(5, seed=3, absent=())
    raw["image"][1] = b""  # one example without an image, one without audio
    raw["audio"][2] = b""
    examples = np.array(serialized_examples(raw), dtype=object)
    raw = {m: np.array(v, dtype=object) for m, v in raw.items()}
    model_features = {
        k: v.numpy() for k, v in module.preprocessor({m: tf.constant(v) for m, v in raw.items()}).items()
    }
    requests = {
        "serving_default": raw,
        "predict_examples": {"examples": examples},
        "classify": {"inputs": examples},
        "predict_features": model_features,
    }
    return requests, model_features


# One export in the default run; the other two (a minute each) run with the slow tests in CI.
@pytest.mark.parametrize(
    "name",
    [
        "cnn-colour_lstm_cnn-attention",
        pytest.param("cnn_bow-ngrams_lstm-gated", marks=pytest.mark.slow),
        pytest.param("late-ensemble_stats", marks=pytest.mark.slow),
        pytest.param("cnn_lstm_lstm-cross_attention", marks=pytest.mark.slow),
    ],
)
def test_every_signature_under_a_tf1_session_equals_the_keras_model(name, tmp_path):
    module = export_untrained_model(tmp_path / name, *EXPORTS[name])
    requests, model_features = _requests(module)
    expected = module.model({k: tf.constant(v) for k, v in model_features.items()}, training=False).numpy()
    assert np.all(model_features["image_present"] == [1, 0, 1, 1, 1])  # absence reached the model

    with open(tmp_path / "requests.pkl", "wb") as f:
        pickle.dump(requests, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run(
        [
            sys.executable,
            "-c",
            SESSION_RUN,
            str(tmp_path / name),
            str(tmp_path / "requests.pkl"),
            str(tmp_path / "out.pkl"),
        ],
        check=True,
        timeout=600,
        env=env,
    )
    with open(tmp_path / "out.pkl", "rb") as f:
        results = pickle.load(f)

    class_ids = expected.argmax(-1)
    names = np.array([CLASS_NAMES[i].encode() for i in class_ids], dtype=object)
    for signature in ("serving_default", "predict_examples", "predict_features"):
        out = results[signature]
        assert out["method_name"] == "tensorflow/serving/predict"
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5, err_msg=signature)
        np.testing.assert_array_equal(out["class_id"], class_ids, err_msg=signature)
        np.testing.assert_array_equal(out["class_name"], names, err_msg=signature)
        for modality in module.modalities:
            key = features.presence_name(modality)
            np.testing.assert_array_equal(out[key], model_features[key], err_msg=f"{signature} {key}")
    classify = results["classify"]
    assert classify["method_name"] == CLASSIFY_METHOD
    np.testing.assert_allclose(classify["scores"], expected, atol=1e-5)
    assert classify["classes"].tolist() == [[c.encode() for c in CLASS_NAMES]] * len(expected)
    if "ensemble" in name:  # the export is the members' average, not one member
        members = [
            m({k: tf.constant(v) for k, v in model_features.items()}, training=False).numpy()
            for m in module.model.members
        ]
        np.testing.assert_allclose(
            results["serving_default"]["probabilities"], np.mean(members, axis=0), atol=1e-5
        )
        assert not np.allclose(members[0], members[1], atol=1e-3)
