"""text/tfidf: TF-IDF equal to scikit-learn's, absent text, config errors, export with raw text."""

import csv
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from multimodal_tf import config as config_lib
from multimodal_tf import export
from multimodal_tf.compat import tf
from multimodal_tf.config import ConfigError
from multimodal_tf.data import features
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.encoders.tfidf import CHAR_PREFIX, WORD_PREFIX, TextTFIDFEncoder, term_fingerprints
from multimodal_tf.run_dir import load_trained_model
from multimodal_tf.testing import tiny_config
from multimodal_tf.training import train

EMOJI3 = Path("/work/shared/data/emoji3/manifest.csv")
SENTENCES = [
    "Hello, world! Hello again.",
    "Café Müller serves naïve façade crêpes",
    "Привет мир, привет",
    "日本語のテキスト",
    "a b c",
    "grinning face with big eyes",
    "x",
    "face_with_tears of joy 2024",
]
UNSEEN = ["hello café", "big grinning world", "zzz qqq", "Мир"]


def sklearn_reference(word_range, char_range, **kwargs) -> TfidfVectorizer:
    """scikit-learn's TF-IDF over its own word and char_wb analyzers, kept apart by prefix.

    Words are Python's ``\\w+`` runs; char_wb n-grams are taken on those
    words (so punctuation inside a whitespace token does not reach them).
    """
    word = TfidfVectorizer(analyzer="word", token_pattern=r"(?u)\w+", ngram_range=word_range).build_analyzer()
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=char_range).build_analyzer()

    def analyzer(doc):
        words = " ".join(re.findall(r"\w+", doc.lower()))
        return [WORD_PREFIX + t for t in word(doc)] + [CHAR_PREFIX + g for g in char(words)]

    return TfidfVectorizer(analyzer=analyzer, sublinear_tf=True, smooth_idf=True, norm="l2", **kwargs)


def assert_matches_sklearn(train_texts, other_texts, word_range=(1, 2), char_range=(2, 4), min_df=1):
    encoder = TextTFIDFEncoder(word_range, char_range, max_features=50000, min_df=min_df)
    kept = encoder.adapt(train_texts)
    reference = sklearn_reference(word_range, char_range, min_df=min_df)
    expected_train = reference.fit_transform(train_texts).toarray()
    assert kept == len(reference.vocabulary_)
    # The same vocabulary: each sklearn term at its fingerprint's slot.
    terms = list(reference.get_feature_names_out())
    fingerprints = term_fingerprints(tf.constant(terms)).numpy()
    keys = encoder.vocabulary.numpy()
    slots = np.searchsorted(keys, fingerprints)
    np.testing.assert_array_equal(keys[slots], fingerprints)
    for texts, expected in ((train_texts, expected_train), (other_texts, reference.transform(other_texts))):
        ours = encoder.tfidf(tf.constant(texts)).numpy()
        np.testing.assert_allclose(
            ours[:, slots],
            np.asarray(expected.todense() if hasattr(expected, "todense") else expected),
            atol=1e-5,
        )
        assert np.abs(np.delete(ours, slots, axis=1)).max(initial=0) == 0


def test_tfidf_equals_sklearn_on_fixed_sentences():
    assert_matches_sklearn(SENTENCES, UNSEEN)
    assert_matches_sklearn(SENTENCES, UNSEEN, word_range=(1, 1), char_range=(3, 5))
    assert_matches_sklearn(SENTENCES + SENTENCES[:3], UNSEEN, min_df=2)


def test_tfidf_equals_sklearn_on_emoji3_names():
    if not EMOJI3.exists():
        pytest.skip(f"{EMOJI3} not present: the emoji3 data set is not on this machine")
    rows = list(csv.DictReader(open(EMOJI3, encoding="utf-8")))
    train_texts = [r["text"] for r in rows if r["split"] == "train" and r["text"]][:400]
    test_texts = [r["text"] for r in rows if r["split"] == "test" and r["text"]][:100]
    assert_matches_sklearn(train_texts, test_texts)


def test_max_features_keeps_the_most_frequent_terms():
    encoder = TextTFIDFEncoder((1, 1), (0, 0), max_features=2)
    assert encoder.adapt(["red red blue", "red green", "blue"]) == 2
    expected = np.sort(term_fingerprints(tf.constant([WORD_PREFIX + "red", WORD_PREFIX + "blue"])).numpy())
    np.testing.assert_array_equal(encoder.vocabulary.numpy(), expected)
    # idf = ln((1 + 3) / (1 + df)) + 1 for blue (df 2) and red (df 2)
    np.testing.assert_allclose(encoder.idf.numpy(), [np.log(4 / 3) + 1] * 2, rtol=1e-6)


def test_absent_or_unknown_text_gives_zeros_and_config_round_trips():
    encoder = TextTFIDFEncoder(output_dim=8, hidden_units=4, max_features=64)
    encoder.adapt(SENTENCES)
    out = encoder(tf.constant(["", "hello world", "!!! ...", "qqqq"])).numpy()
    assert out.shape == (4, 8)
    np.testing.assert_array_equal(out[[0, 2]], 0.0)
    assert np.abs(out[1]).sum() > 0
    # "qqqq" shares no term with the training texts either.
    np.testing.assert_array_equal(out[3], 0.0)
    clone = TextTFIDFEncoder.from_config(encoder.get_config())
    assert clone.get_config() == encoder.get_config()
    assert len(encoder.losses) == 2  # the L2 penalty of both kernels


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.text_encoder.char_ngram_range=[4, 2]", "model.text_encoder.char_ngram_range"),
        ("model.text_encoder.word_ngram_range=[0, 3]", "model.text_encoder.word_ngram_range"),
        ("model.text_encoder.max_features=0", "model.text_encoder.max_features"),
        ("model.text_encoder.width=8", "model.text_encoder.width"),
    ],
)
def test_config_errors_name_the_field(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_lib.load((), ["model.text_encoder.name=text/tfidf", override])


@pytest.fixture(scope="module")
def tfidf_export(synth_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfidf_run")
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={out / 'run'}",
        "model.modalities=[text, image]",
        "model.fusion.name=concat",
        "model.text_encoder.name=text/tfidf",
        "model.text_encoder.max_features=512",
        "train.epochs=2",
        "train.calibration=temperature",
    )
    run = train(config, progress=False)
    path = export.export_run(run, out / "models", "m", target_serving="2.17")
    return run, path


@pytest.mark.slow  # ~80 s here: conversion, 2 epochs, calibration, export
def test_export_serves_the_trained_tfidf_model_with_its_temperature(tfidf_export):
    run, path = tfidf_export
    config, metadata, model = load_trained_model(run)
    export.check_ops(path, "2.17")  # TF Serving 2.17's core TF + tf-text 2.12.1
    texts = ["", "a red circle", "Straße ünïcode", "blue"]
    images = tf.zeros([len(texts)], tf.string)
    loaded = tf.saved_model.load(str(path))
    served = loaded.signatures["serving_default"](text=tf.constant(texts), image=images)
    model_features = Preprocessor(config.data, metadata.vocabulary, config.model)(
        {"text": tf.constant(texts), "image": images}
    )
    assert model_features[features.TEXT].dtype == tf.string
    in_memory = model(model_features, training=False).numpy()
    np.testing.assert_allclose(served["probabilities"].numpy(), in_memory, atol=1e-5)
    # Calibrated = softmax(log p / T) of the same model with T = 1.
    layer = model.get_layer("probabilities")
    temperature = float(layer.temperature.numpy())
    assert abs(temperature - 1.0) > 1e-3  # else the check below could not fail

    recorded = json.loads((run / "calibration.json").read_text())
    assert temperature == pytest.approx(recorded["temperature"], rel=1e-6)
    assert (
        json.loads((run / "metrics.json").read_text())["calibration"]["temperature"]
        == recorded["temperature"]
    )
    layer.temperature.assign(1.0)
    log_p = np.log(model(model_features, training=False).numpy().astype(np.float64))
    scaled = np.exp(log_p / temperature)
    np.testing.assert_allclose(
        served["probabilities"].numpy(), scaled / scaled.sum(-1, keepdims=True), atol=1e-5
    )


@pytest.mark.slow  # shares the fixture above
def test_report_has_ece_reliability_diagram_and_temperature(tfidf_export):
    from multimodal_tf.evaluation import evaluate

    run, _ = tfidf_export
    report = evaluate(run, ablation=False)
    assert 0.0 <= report["metrics"]["ece"] <= 1.0
    assert (run / report["plots"]["reliability_diagram"]).stat().st_size > 1000
    assert report["calibration"]["temperature"] > 0
    markdown = (run / "report.md").read_text()
    assert "ECE (15 bins, top label)" in markdown and "Temperature scaling: T =" in markdown


def test_tfidf_model_builds_and_fits_in_a_fused_model():
    """build_model gives text/tfidf the raw string input; one fit step; missing text adds nothing."""
    from multimodal_tf import models
    from multimodal_tf.testing import fit_one_step, random_features

    config = tiny_config(
        "model.modalities=[text, audio]",
        "model.text_encoder.name=text/tfidf",
        "model.text_encoder.max_features=64",
        "model.audio_encoder.name=audio/stats",
    )
    model = models.build_model(config, 3, vocab_size=50)
    encoder = model.get_layer("text_encoder")
    encoder.adapt(["red circle", "blue square", "big red square"])
    assert np.isfinite(fit_one_step(model, config, 3, run_eagerly=True))
    x = random_features(config, batch_size=4)
    x["text"][:] = ""
    x["text_present"][:] = 0.0
    without = model(x, training=False).numpy()
    np.testing.assert_array_equal(encoder(tf.constant(x["text"])).numpy(), 0.0)
    assert np.isfinite(without).all()


# TF Serving's way of running a SavedModel (FACTS.md): a TF1 session in a fresh process.
SESSION_RUN = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    export_dir, out_path, *texts = sys.argv[1:]
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        signature = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir).signature_def[
            "serving_default"
        ]
        feeds = {signature.inputs["text"].name: texts, signature.inputs["image"].name: [b""] * len(texts)}
        np.save(out_path, session.run(signature.outputs["probabilities"].name, feed_dict=feeds))
    """
)


@pytest.mark.slow  # shares the fixture above; a fresh Python process
def test_fresh_process_tf1_session_equals_the_trained_model(tfidf_export, tmp_path):
    run, path = tfidf_export
    config, metadata, model = load_trained_model(run)
    texts = ["a red circle", "ünïcode Straße", "", "blue blue blue"]
    out = tmp_path / "served.npy"
    subprocess.run([sys.executable, "-c", SESSION_RUN, str(path), str(out), *texts], check=True, timeout=300)
    raw = {"text": tf.constant(texts), "image": tf.constant([""] * len(texts))}
    expected = model(Preprocessor(config.data, metadata.vocabulary, config.model)(raw), training=False)
    np.testing.assert_allclose(np.load(out), expected.numpy(), atol=1e-5)
