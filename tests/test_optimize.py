"""mmtf optimize: pruned sparsity reached, TFLite/ONNX outputs vs the SavedModel, evaluate --artifact.

One tiny image+audio run (no LSTM: TFLite int8 refuses those, see
test_int8_refuses_an_LSTM_model) is optimized once by the CLI; the slow
tests read what it wrote. The default test converts an untrained model.
"""

import json

import numpy as np
import pytest

from multimodal_tf import cli
from multimodal_tf.compat import keras, tf
from multimodal_tf.data.pipeline import make_dataset
from multimodal_tf.encoders.image import colour_histogram
from multimodal_tf.encoders.text import TextBagOfEmbeddingsEncoder, masked_max
from multimodal_tf.models import build_model
from multimodal_tf.optimize import artifacts, onnx, pruning, qat, quantization, selective
from multimodal_tf.optimize.evaluation import evaluate_artifact
from multimodal_tf.optimize.run import OptimizeOptions, optimize_run
from multimodal_tf.run_dir import load_run, load_trained_model
from multimodal_tf.testing import random_features, tiny_config
from multimodal_tf.training import train

TARGET_SPARSITY = 0.5


@pytest.fixture(scope="module")
def optimized(synth_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("optimize_run")
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={out / 'run'}",
        "train.epochs=2",
        "model.modalities=[image,audio]",
    )
    run = train(config, progress=False)
    argv = ["optimize", str(run), "--prune", str(TARGET_SPARSITY), "--prune-epochs", "1"]
    assert cli.main([*argv, "--quantize", "dynamic", "int8", "--onnx", "--qat", "1"]) == 0
    return run, run / artifacts.OPTIMIZED_DIR


def _test_features(run, count=48):
    config, metadata = load_run(run)
    dataset = make_dataset(config, "test", training=False, metadata=metadata, batch_size=count)
    x, _ = next(iter(dataset))
    return {name: value.numpy() for name, value in x.items()}


@pytest.mark.slow  # the module's run: train, prune fine-tune, export, 3 conversions (~70 s CPU)
def test_optimize_writes_each_artifact_with_its_json(optimized):
    run, out = optimized
    names = [
        "pruned_model_dynamic.tflite",
        "pruned_model_int8.tflite",
        "pruned_model_qat_int8.tflite",
        "pruned_model.onnx",
    ]
    for name in names:
        description = json.loads(artifacts.description_path(out / name).read_text())
        assert description["artifact"] == name
        assert description["source_run"] == str(run.resolve())
        assert description["flags"]["prune"] == TARGET_SPARSITY
        assert description["bytes"] == (out / name).stat().st_size > 0
        assert description["tools"]["tensorflow"] == tf.__version__
    pruned = json.loads((out / "pruned.json").read_text())
    assert pruned["artifact"] == "pruned/1" and (out / "pruned" / "1" / "saved_model.pb").exists()
    int8 = json.loads((out / "pruned_model_int8.tflite.json").read_text())
    assert int8["int8_only"] is True  # every op of this model has an int8 kernel
    assert int8["kept_float"] == [] and int8["debugger_rounds"] == 1  # and int8 breaks none of them
    qat = json.loads((out / "pruned_model_qat_int8.tflite.json").read_text())
    # concat fusion: the head's Dense layers are top-level, tfmot supports them; the encoders are ours.
    assert qat["annotated_layers"] == ["head_dense_0", "probabilities"]
    assert qat["float_layers"] == ["audio_encoder", "image_encoder"] and qat["qat_epochs"] == 1


@pytest.mark.slow  # the module's run: train, prune fine-tune, export, 3 conversions (~70 s CPU)
def test_pruned_savedmodel_reaches_the_target_sparsity(optimized):
    _, out = optimized
    loaded = tf.saved_model.load(str(out / "pruned" / "1"))
    kernels = [v.numpy() for v in loaded.model.trainable_variables if len(v.shape) >= 2]
    zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    # tfmot rounds the zero count per tensor: within 1% of the target.
    assert abs(zeros - TARGET_SPARSITY) < 0.01
    assert json.loads((out / "pruned.json").read_text())["sparsity"] == pytest.approx(zeros)


@pytest.mark.slow  # the module's run: train, prune fine-tune, export, 3 conversions (~70 s CPU)
def test_tflite_and_onnx_match_the_pruned_savedmodel(optimized):
    run, out = optimized
    x = _test_features(run)
    reference = artifacts.load_runner(out / "pruned" / "1")(x)
    # ONNX: the same float32 graph on other kernels (summation order only).
    assert np.abs(artifacts.load_runner(out / "pruned_model.onnx")(x) - reference).max() < 1e-5
    # Dynamic range: int8 weights dequantized to float; errors ~1e-3 in probability.
    dynamic = artifacts.load_runner(out / "pruned_model_dynamic.tflite")(x)
    assert np.abs(dynamic - reference).max() < 0.02
    # Full int8: activations on a 1/256-ish grid through every layer; what
    # matters is the decision, so: the top class agrees on >= 90% of examples
    # and no probability moves by more than 0.1.
    int8 = artifacts.load_runner(out / "pruned_model_int8.tflite")(x)
    assert (int8.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
    assert np.abs(int8 - reference).max() < 0.1


@pytest.mark.slow  # the module's run: train, prune fine-tune, export, 3 conversions (~70 s CPU)
def test_evaluate_artifact_on_onnx_equals_evaluate_on_the_float_model(optimized, tmp_path):
    run, _ = optimized
    config, metadata, model = load_trained_model(run)
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx.convert(model, config))
    assert cli.main(["evaluate", str(run), "--no-ablation"]) == 0
    expected = json.loads((run / "report.json").read_text())
    report = evaluate_artifact(run, path)
    written = json.loads((tmp_path / "eval_model_onnx_test" / "report.json").read_text())
    assert set(expected) - {"ablation"} <= set(written)
    assert report["metrics"]["accuracy"] == expected["metrics"]["accuracy"]
    assert report["metrics"]["log_loss"] == pytest.approx(expected["metrics"]["log_loss"], abs=1e-5)


def test_tflite_and_onnx_of_an_untrained_model_match_keras():
    config = tiny_config("model.modalities=[image,audio]")
    model = build_model(config, 4, 50)
    x = random_features(config, batch_size=6)
    reference = model(x, training=False).numpy()
    tflite = quantization.TFLiteRunner(quantization.convert(model, config, None, "float").flatbuffer)
    assert np.abs(tflite(x) - reference).max() < 1e-5  # float32 both, kernel order only
    assert np.abs(onnx.ONNXRunner(onnx.convert(model, config))(x) - reference).max() < 1e-5


def test_int8_refuses_an_LSTM_model_and_pruning_checks_its_target():
    config = tiny_config()  # text/lstm
    model = build_model(config, 3, 50)
    with pytest.raises(ValueError, match="LSTM"):
        quantization.convert(model, config, None, "int8")
    with pytest.raises(ValueError, match="sparsity in"):
        pruning.pruning_schedule(1.5, 100)
    assert pruning.sparsity_of([np.array([[0.0, 1.0], [0.0, 2.0]])]) == 0.5


@pytest.mark.slow  # reads the module's optimized run
def test_raw_signature_converts_with_select_ops_and_savedmodel_artifacts_evaluate(optimized):
    run, out = optimized
    # image + audio: PNG/WAV decoding converts through the Flex (select TF ops) path.
    flatbuffer, message = quantization.convert_raw_signature(out / "pruned" / "1")
    assert flatbuffer is not None, message
    report = evaluate_artifact(run, out / "pruned" / "1")
    assert (out / "eval_pruned_test" / "report.json").exists()
    onnx_report = evaluate_artifact(run, out / "pruned_model.onnx")
    assert onnx_report["metrics"]["accuracy"] == report["metrics"]["accuracy"]


def test_a_missing_optimize_extra_is_named_before_any_work(monkeypatch, tmp_path):
    # The TF 2.17 compatibility lock has no [optimize] extra: the command must say
    # what to install, not fail inside a conversion step.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tf2onnx", "onnxruntime") else real(name, *a),
    )
    with pytest.raises(SystemExit, match=r"tf2onnx, onnxruntime not installed.*\[optimize\]"):
        cli.main(["optimize", str(tmp_path / "no_run"), "--onnx"])
    # Without that flag nothing is missing: the run dir is the next thing checked.
    assert cli.main(["optimize", str(tmp_path / "no_run"), "--tflite"]) == 2


# --- int8 failure mechanisms found on emoji3 (docs/optimization.md#int8-on-emoji3) ---


def _int8_relative_error(model, name, calibration, test, converter_to_flatbuffer):
    """Max |int8 - float| over max |float| of ``model``'s output on ``test`` (batch 1 each)."""

    def representative():
        for i in range(len(calibration)):
            yield {name: tf.constant(calibration[i : i + 1])}

    def make_converter():
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
        return converter

    flatbuffer, details = converter_to_flatbuffer(make_converter, representative)
    runner = tf.lite.Interpreter(model_content=flatbuffer).get_signature_runner()
    int8 = np.concatenate([next(iter(runner(**{name: test[i : i + 1]}).values())) for i in range(len(test))])
    reference = model({name: test}).numpy()
    return float(np.abs(int8 - reference).max() / np.abs(reference).max()), details


def _single_input_model(layer, name, shape, dtype):
    x = keras.Input(shape, dtype=dtype, name=name)
    return keras.Model({name: x}, layer(x, training=False))


def test_masked_max_equals_numpy_and_survives_int8():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, (48, 12))
    tokens[np.arange(12)[None, :] >= rng.integers(0, 5, 48)[:, None]] = 0  # 1-4 tokens, some rows empty
    encoder = TextBagOfEmbeddingsEncoder(50, embedding_dim=8, output_dim=16, name="text_encoder")
    model = _single_input_model(encoder, "tokens", (12,), "int64")
    x = encoder.embedding(tokens).numpy()
    mask = (tokens != 0)[..., None]
    mean = (x * mask).sum(1) / np.maximum(mask.sum(1), 1)
    expected = np.where(mask.any(1), np.where(mask, x, -np.inf).max(1), 0.0)
    got = masked_max(tf.constant(x), tf.constant(mask, tf.float32), tf.constant(mean, tf.float32)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-7)
    # The -1e4 padding trick this replaced gave 0.71 here: int8 spread over
    # [-1e4, 1] rounds every embedding to 0. A scale-safe masked max leaves
    # rounding noise: 8-bit steps through 3 quantized ops, ~2% measured.
    error, _ = _int8_relative_error(
        model, "tokens", tokens[:32], tokens[32:], lambda make, _: (make().convert(), None)
    )
    assert error < 0.05


def test_int8_keeps_the_op_it_breaks_float():
    class ColourHistogram(keras.layers.Layer):
        def call(self, images, training=None):
            return colour_histogram(images, 2)

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(48, 8, 8, 3)).astype(np.float32)
    model = _single_input_model(ColourHistogram(name="hist"), "images", (8, 8, 3), "float32")
    error, result = _int8_relative_error(
        model,
        "images",
        images[:32],
        images[32:],
        lambda make, data: (lambda r: (r.flatbuffer, r))(selective.convert_selective(make, data)),
    )
    # int8 ONE_HOT is off by ~half its 0/1 range (~128 steps): the whole int8
    # histogram was 0.34 off. Kept float, the error is the output's rounding.
    assert [e.op for e in result.found] == ["ONE_HOT"] and result.found[0].rmse_per_scale > 10
    assert len(result.kept_float) == 1 and result.kept_float[0].endswith("/hist/one_hot")
    assert result.rounds == 2  # round 2 found nothing else above the limit
    assert error < 0.05
    assert "ONE_HOT" in quantization.float_ops(result.flatbuffer)


@pytest.mark.slow  # a QAT fine-tune and an int8 conversion of the module's run (~40 s CPU)
def test_qat_tflite_matches_the_qat_keras_model(optimized):
    run, _ = optimized
    config, metadata, model = load_trained_model(run)
    result = qat.train_qat(model, config, metadata, epochs=1)
    assert result.annotated == ("head_dense_0", "probabilities")
    conversion = quantization.convert_int8(
        result.model, config, lambda: quantization.representative_features(config, metadata)
    )
    x = _test_features(run)
    reference = result.model(x, training=False).numpy()
    tflite = quantization.TFLiteRunner(conversion.flatbuffer)(x)
    # The head runs the int8 math its fake-quant ops emulated (equal up to
    # rounding); the encoders, float in the QAT model, are int8 in TFLite:
    # post-training int8 error, so the same bounds as the int8 test above.
    assert (tflite.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
    assert np.abs(tflite - reference).max() < 0.1
    with pytest.raises(ValueError, match="--quantize int8"):
        optimize_run(run, OptimizeOptions(qat=1))
