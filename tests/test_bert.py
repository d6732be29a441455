"""text/bert: a Google-layout checkpoint loads and computes BERT exactly; tokenization; errors; model use."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from multimodal_tf import export, models, testing
from multimodal_tf import testing_bert as tiny_bert
from multimodal_tf.compat import import_bert, keras, tf
from multimodal_tf.config import ConfigError
from multimodal_tf.data import features
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.encoders.bert import BertTextTokenizer, TextBertConfig, TextBertEncoder

VOCAB = {token: i for i, token in enumerate(tiny_bert.TINY_VOCABULARY)}
SENTENCES = ["The red things!", "Héllo world", "", "unaffable cat dog zebra very big car 1 2"]
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return str(tiny_bert.write_tiny_bert_checkpoint(tmp_path_factory.mktemp("bert") / "uncased_L-2_H-16_A-2"))


@pytest.fixture(scope="module")
def encoder(checkpoint_dir):
    """A fine-tunable encoder without dropout of its own (BERT's inside stays), built once."""
    return TextBertEncoder(checkpoint_dir, dropout_rate=0.0, name="text_encoder")


def _ids(*tokens: str) -> list[int]:
    return [VOCAB[token] for token in tokens]


def _gelu_erf(x):
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


# === bert-for-tf2 under tf_keras ===


def test_import_bert_gives_layers_that_fit_inside_a_tf_keras_model():
    """compat.import_bert: BertModelLayer builds, and fits one step, in a tf_keras model."""
    bert = import_bert()
    import tensorflow.python as tensorflow_python

    assert tensorflow_python.keras is not keras  # the alias is restored after the import
    params = bert.BertModelLayer.Params(
        num_layers=1,
        num_heads=2,
        hidden_size=8,
        intermediate_size=16,
        vocab_size=20,
        max_position_embeddings=8,
    )
    ids = keras.Input((6,), dtype="int32")
    sequence = bert.BertModelLayer.from_params(params, name="bert")([ids, tf.zeros_like(ids)])
    model = keras.Model(ids, keras.layers.Dense(2, name="out")(sequence[:, 0]))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(np.ones((4, 6), np.int32), np.array([0, 1, 0, 1]), verbose=0)
    assert np.isfinite(history.history["loss"][0])


# === The key test: the loaded encoder is BERT on this checkpoint ===


def test_encoder_equals_a_numpy_bert_on_the_same_checkpoint(checkpoint_dir, encoder):
    """Pooled [CLS] and token vectors equal an independent float64 NumPy BERT within 1e-4.

    The reference uses GELU's tanh approximation, as Google's modeling.py and
    bert-for-tf2 do; with the exact (erf) GELU the difference is above the
    tolerance, so the test tells the two apart.
    """
    ids = BertTextTokenizer(checkpoint_dir, max_tokens=8)(tf.constant(SENTENCES)).numpy()
    weights = tiny_bert.tiny_bert_weights(tiny_bert.TINY_BERT_CONFIG)
    sequence, pooled = tiny_bert.bert_forward(weights, tiny_bert.TINY_BERT_CONFIG, ids)
    present = (ids != 0).any(axis=1)

    np.testing.assert_allclose(encoder(ids).numpy()[present], pooled[present], atol=1e-4)
    np.testing.assert_array_equal(encoder(ids).numpy()[~present], 0.0)  # absent text

    tokens, mask = TextBertEncoder(checkpoint_dir, dropout_rate=0.0, sequence_output=True)(ids)
    np.testing.assert_array_equal(mask.numpy(), ids != 0)
    np.testing.assert_allclose(tokens.numpy()[ids != 0], sequence[ids != 0], atol=1e-4)
    assert np.isfinite(tokens.numpy()).all()

    _, pooled_erf = tiny_bert.bert_forward(weights, tiny_bert.TINY_BERT_CONFIG, ids, gelu=_gelu_erf)
    assert np.abs(pooled_erf - pooled)[present].max() > 1e-4


def test_every_weight_comes_from_the_checkpoint_and_freeze_fixes_them(checkpoint_dir, encoder):
    weights = tiny_bert.tiny_bert_weights(tiny_bert.TINY_BERT_CONFIG)
    ids = tf.constant([_ids("[CLS]", "the", "cat", "[SEP]", "[PAD]", "[PAD]", "[PAD]", "[PAD]")])
    # Fine-tuned: every BERT and pooler weight trains, and BERT's own dropout acts in training.
    assert not np.allclose(encoder(ids, training=True).numpy(), encoder(ids, training=False).numpy())
    assert len(encoder.trainable_weights) == 39  # 37 BERT + 2 pooler variables

    frozen = TextBertEncoder(checkpoint_dir, freeze=True, output_dim=4, dropout_rate=0.0, name="frozen")
    frozen.build((None, 8))
    loaded = {w.name: w.numpy() for w in frozen.weights}
    assert len(loaded) == 39 + 2  # + the projection's kernel and bias
    np.testing.assert_array_equal(
        loaded["frozen/bert/encoder/layer_1/intermediate/kernel:0"],
        weights["bert/encoder/layer_1/intermediate/dense/kernel"],
    )
    np.testing.assert_array_equal(loaded["frozen/pooler/kernel:0"], weights["bert/pooler/dense/kernel"])
    # Frozen: only the projection trains, and BERT runs without its dropout.
    assert [w.name for w in frozen.trainable_weights] == [
        "frozen/projection/kernel:0",
        "frozen/projection/bias:0",
    ]
    np.testing.assert_array_equal(frozen(ids, training=True).numpy(), frozen(ids, training=False).numpy())


# Builds the layer four times (each a few seconds of tracing): with the slow tests.
@pytest.mark.slow
def test_layer_checks(checkpoint_dir):
    """Shapes, config round trip, serialization (reloading the checkpoint), gradients, a fit step."""
    ids = BertTextTokenizer(checkpoint_dir, max_tokens=8)(tf.constant(SENTENCES))
    arguments = {**TextBertConfig(checkpoint_dir=checkpoint_dir, output_dim=4).layer_arguments(), "name": "e"}
    testing.run_layer_test(TextBertEncoder, arguments, (ids,), (4, 4))
    assert set(TextBertEncoder(**arguments).get_config()) - set(keras.layers.Layer().get_config()) == {
        *TextBertConfig(checkpoint_dir=checkpoint_dir).layer_arguments(),
        "sequence_output",
    }


# === In-graph tokenization ===


def test_tokenizer_gives_cls_pieces_sep_truncated_and_padded(checkpoint_dir):
    ids = BertTextTokenizer(checkpoint_dir, max_tokens=8)(tf.constant(SENTENCES)).numpy()
    pad = VOCAB["[PAD]"]
    assert ids.dtype == np.int64 and ids.tolist() == [
        _ids("[CLS]", "the", "red", "thing", "##s", "!", "[SEP]") + [pad],  # lower-cased, WordPiece
        _ids("[CLS]", "hello", "world", "[SEP]") + [pad] * 4,  # accent stripped
        [pad] * 8,  # empty (absent) text
        # cut to max_tokens with [SEP] kept; unknown word -> [UNK]
        _ids("[CLS]", "un", "##aff", "##able", "cat", "dog", "[UNK]", "[SEP]"),
    ]
    cased = BertTextTokenizer(checkpoint_dir, max_tokens=4, lower_case=False)
    assert cased(tf.constant(["The cat"])).numpy().tolist() == [_ids("[CLS]", "[UNK]", "cat", "[SEP]")]
    traced = tf.function(BertTextTokenizer(checkpoint_dir, max_tokens=8).__call__)
    np.testing.assert_array_equal(traced(tf.constant(SENTENCES)).numpy(), ids)


def test_preprocessor_uses_the_checkpoint_tokenizer(checkpoint_dir):
    config = testing.tiny_config("model.modalities=[text]", *_bert_overrides(checkpoint_dir))
    assert features.input_kinds(config.model) == {"text": features.CHECKPOINT_TOKEN_IDS}
    out = Preprocessor(config.data, modalities=config.model)({"text": tf.constant(["a cat", ""])})
    assert out["text"].numpy().tolist() == [_ids("[CLS]", "a", "cat", "[SEP]") + [0] * 4, [0] * 8]
    assert out["text_present"].numpy().tolist() == [1.0, 0.0]


# === Errors at config/build time, naming the file ===


def _copy(checkpoint_dir, tmp_path, name="copy"):
    return shutil.copytree(checkpoint_dir, tmp_path / name)


def test_missing_files_are_named(checkpoint_dir, tmp_path):
    for index, file in enumerate(("bert_config.json", "vocab.txt", "bert_model.ckpt.index")):
        broken = _copy(checkpoint_dir, tmp_path, f"broken_{index}")
        os.remove(broken / file)
        with pytest.raises(ValueError, match=f"lacks {file}.*bert_config.json, bert_model.ckpt"):
            TextBertEncoder(str(broken))
        with pytest.raises(ValueError, match=f"{broken}' lacks {file}"):
            BertTextTokenizer(str(broken), 8)
    with pytest.raises(ValueError, match="is not a folder"):
        TextBertEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="model.text_encoder.checkpoint_dir: required"):
        testing.tiny_config("model.text_encoder.name=text/bert")


def test_a_vocabulary_of_another_checkpoint_is_refused(checkpoint_dir, tmp_path):
    broken = _copy(checkpoint_dir, tmp_path)
    with open(broken / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("extra\n")
    with pytest.raises(ValueError, match=r"vocab.txt: 41 tokens, but .*bert_config.json says vocab_size=40"):
        BertTextTokenizer(str(broken), 8)
    config = json.loads((broken / "bert_config.json").read_text())
    (broken / "bert_config.json").write_text(json.dumps({**config, "vocab_size": 41}))
    with pytest.raises(
        ValueError, match=r"vocab.txt: 41 tokens, but bert/embeddings/word_embeddings .* 40 rows"
    ):
        TextBertEncoder(str(broken))
    (broken / "vocab.txt").write_text("[UNK]\n" + "x\n" * 40)
    with pytest.raises(ValueError, match=r"vocab.txt: the first token must be \[PAD\]"):
        BertTextTokenizer(str(broken), 8)


def test_too_many_tokens_and_a_checkpoint_of_another_size_are_refused(checkpoint_dir, tmp_path):
    with pytest.raises(
        ValueError, match="max_tokens=33: .*bert_config.json allows 2 to max_position_embeddings=32"
    ):
        BertTextTokenizer(checkpoint_dir, 33)
    with pytest.raises(
        ValueError, match="33 tokens per text .*bert_config.json allows max_position_embeddings=32"
    ):
        TextBertEncoder(checkpoint_dir).build((None, 33))
    # A config saying 3 layers over a 2-layer checkpoint: every layer_2 variable is named.
    broken = _copy(checkpoint_dir, tmp_path)
    config = json.loads((broken / "bert_config.json").read_text())
    (broken / "bert_config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(
        ValueError, match=r"bert_model.ckpt: 16 variables .*layer_2/attention/self/query/kernel"
    ):
        TextBertEncoder(str(broken))
    # A wider model than the checkpoint: shapes are named.
    (broken / "bert_config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ValueError, match=r"intermediate/dense/kernel \[16, 32\], expected \[16, 64\]"):
        BertTextTokenizer(str(broken), 8)


# === In the model ===


def _bert_overrides(checkpoint_dir, *extra):
    return (
        "model.text_encoder.name=text/bert",
        f"model.text_encoder.checkpoint_dir={checkpoint_dir}",
        *extra,
    )


def test_model_trains_ignores_absent_text_and_takes_modality_dropout(checkpoint_dir):
    config = testing.tiny_config(
        "model.modalities=[image,text]", "model.modality_dropout.text=0.5", *_bert_overrides(checkpoint_dir)
    )
    model = models.build_model(config, NUM_CLASSES, vocab_size=50)  # the data vocabulary is not used
    assert model.get_layer("text_encoder").output_dim == 16  # tiny_config's output_dim carries over
    names = [weight.name for weight in model.weights]
    assert len(names) == len(set(names))  # HDF5 training checkpoints need one name per weight
    inputs = testing.random_features(config, vocab_size=len(VOCAB))
    other = testing.random_features(config, seed=1, vocab_size=len(VOCAB))
    other["image"] = inputs["image"]
    for batch in (inputs, other):
        batch["text_present"][:2] = 0.0
    expected, changed = model(inputs).numpy(), model(other).numpy()
    np.testing.assert_allclose(changed[:2], expected[:2], atol=1e-6)
    assert not np.allclose(changed[2:], expected[2:])
    loss = testing.fit_one_step(model, config, NUM_CLASSES, vocab_size=len(VOCAB), run_eagerly=True)
    assert np.isfinite(loss)


# A model build and trace: with the slow tests (test_models checks the other families' mixed precision).
@pytest.mark.slow
def test_mixed_precision_builds_and_runs(checkpoint_dir):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        config = testing.tiny_config("model.modalities=[text]", *_bert_overrides(checkpoint_dir))
        model = models.build_model(config, NUM_CLASSES, vocab_size=50)
        encoder = model.get_layer("text_encoder")
        assert encoder.compute_dtype == "float16" and encoder.bert.compute_dtype == "float32"
        inputs = testing.random_features(config, vocab_size=len(VOCAB))
        inputs["text"][0] = 0
        output = model(inputs, training=False)
        assert output.dtype == tf.float32 and np.isfinite(output.numpy()).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


# === Export ===

FRESH_PROCESS = textwrap.dedent(
    """
    import pickle, sys
    import tensorflow as tf
    import tensorflow_text  # registers the tf-text kernels, which TF Serving links in
    export_dir, raw_path, out_path = sys.argv[1:]
    with open(raw_path, "rb") as f:
        raw = pickle.load(f)
    loaded = tf.saved_model.load(export_dir)
    out = {"function": loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in raw.items()})}
    out["function"] = {k: v.numpy() for k, v in out["function"].items()}
    # As TF Serving runs it: the init op (the vocabulary table), then Session.run on tensor names.
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        signature = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir).signature_def[
            "serving_default"
        ]
        keys = sorted(signature.outputs)
        feeds = {signature.inputs[k].name: v for k, v in raw.items()}
        values = session.run([signature.outputs[k].name for k in keys], feed_dict=feeds)
        out["session"] = dict(zip(keys, values))
    with open(out_path, "wb") as f:
        pickle.dump(out, f)
    """
)


# Tracing and saving four signatures plus a fresh process: minutes on the shared CI cores.
@pytest.mark.slow
def test_export_tokenizes_with_its_own_vocabulary_asset_after_the_checkpoint_is_gone(
    checkpoint_dir, tmp_path
):
    """Raw text in, the in-memory model's probabilities out (1e-5), in a fresh process and a TF1
    session, after the checkpoint folder was moved away; only core TF and tf-text ops."""
    source = str(_copy(checkpoint_dir, tmp_path, "checkpoint"))
    config = testing.tiny_config("model.modalities=[image,text]", *_bert_overrides(source))
    model = models.build_model(config, NUM_CLASSES, vocab_size=50)
    preprocessor = Preprocessor(config.data, modalities=config.model)
    specs = features.model_feature_specs(config.data, config.model)
    module = export.ServingModule(model, preprocessor, ["a", "b", "c"], "multiclass", specs)
    path = tmp_path / "export"
    module.save(path)
    export.check_ops(path)
    assert {"WordpieceTokenizeWithOffsets", "InitializeTableFromTextFileV2"} <= export.graph_ops(path)
    assert (path / "assets" / "vocab.txt").read_text(encoding="utf-8").split() == list(
        tiny_bert.TINY_VOCABULARY
    )

    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    images = [tf.io.encode_png(p).numpy() for p in pixels]
    raw = {
        "image": np.array([images[0], b"", images[2], images[1]], dtype=object),
        "text": np.array([s.encode() for s in SENTENCES], dtype=object),
    }
    expected = model(preprocessor({k: tf.constant(v) for k, v in raw.items()}), training=False).numpy()
    shutil.move(source, tmp_path / "moved")
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(raw, f)
    subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(path),
            str(tmp_path / "raw.pkl"),
            str(tmp_path / "out.pkl"),
        ],
        check=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    with open(tmp_path / "out.pkl", "rb") as f:
        outputs = pickle.load(f)
    for name, out in outputs.items():
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(out["text_present"], [1, 1, 0, 1], err_msg=name)


# A training run over two mirrored replicas and `mmtf export`: minutes; with the slow tests.
@pytest.mark.slow
def test_mirrored_training_run_exports_and_serves_what_it_trained(checkpoint_dir, synth_manifest, tmp_path):
    from multimodal_tf import cli
    from multimodal_tf.data.cache import default_tfrecord_dir
    from multimodal_tf.run_dir import load_trained_model
    from multimodal_tf.training import train

    config = testing.tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.strategy=mirrored",
        "model.modalities=[image,text]",
        "model.modality_dropout.text=0.3",
        *_bert_overrides(checkpoint_dir),
    )
    run = train(config, progress=False)
    assert np.isfinite(json.loads((run / "history.json").read_text())["loss"]).all()
    assert cli.main(["export", str(run), "--base-path", str(tmp_path / "models"), "--model-name", "b"]) == 0
    run_config, metadata, model = load_trained_model(run)
    directory = default_tfrecord_dir(run_config.data)
    files = [str(directory / f) for f in metadata.shards["test"]]
    examples = tf.constant([r.numpy() for r in tf.data.TFRecordDataset(files).take(6)])
    preprocessor = Preprocessor(run_config.data, metadata.vocabulary, run_config.model)
    expected = model(preprocessor(preprocessor.parse_examples(examples)), training=False).numpy()
    loaded = tf.saved_model.load(str(tmp_path / "models" / "b" / "1"))
    served = loaded.signatures["predict_examples"](examples=examples)["probabilities"].numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)
