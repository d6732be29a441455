"""The seed pipelines train and export; binary and multilabel heads train."""

import json
from pathlib import Path

import numpy as np
import pytest

from multimodal_tf import cli
from multimodal_tf.compat import tf
from multimodal_tf.data.cache import default_tfrecord_dir
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.data.synthetic import synthesize
from multimodal_tf.run_dir import load_trained_model
from multimodal_tf.serving.local import LocalModel
from multimodal_tf.testing import fit_with_the_recipe, tiny_config

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.fixture(scope="module")
def binary_manifest(tmp_path_factory):
    """The synthetic set with ``--task binary`` labels (majority of three bits)."""
    return synthesize(tmp_path_factory.mktemp("synth_binary"), num_examples=120, seed=3, task="binary")


def train_and_export(pipeline: str, manifest, out, *overrides) -> tuple[Path, Path]:
    """``mmtf train --config pipelines/PIPELINE`` for one epoch, then ``mmtf export``; (run, version)."""
    run = out / "run"
    command = ["train", "--config", str(PIPELINES / pipeline), "--manifest", str(manifest)]
    command += ["--output-dir", str(run), "--set", "train.epochs=1", "--set", "train.verbose=0"]
    for override in overrides:
        command += ["--set", override]
    assert cli.main(command) == 0
    assert cli.main(["export", str(run), "--base-path", str(out / "models"), "--model-name", "m"]) == 0
    return run, out / "models" / "m" / "1"


def held_out_examples(run, count=8) -> list[bytes]:
    config, metadata, _ = load_trained_model(run)
    files = [str(default_tfrecord_dir(config.data) / f) for f in metadata.shards["test"]]
    return [r.numpy() for r in tf.data.TFRecordDataset(files).take(count)]


# One epoch and an export of each seed architecture at its own sizes (~1 min
# together on 2 cores): with the slow tests, which CI runs.
@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline, overrides",
    [
        # AV-MNIST has 10 classes; the synthetic stand-in has 8 (num_classes 0: from the data).
        ("seed_a_attention.yaml", ["model.num_classes=0"]),
        ("seed_c_image_text.yaml", []),
    ],
)
def test_seed_pipeline_trains_one_epoch_and_exports(pipeline, overrides, synth_manifest, tmp_path):
    run, version = train_and_export(pipeline, synth_manifest, tmp_path, *overrides)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and np.isfinite(metrics["test"]["loss"])
    result = LocalModel(version).classify(held_out_examples(run))
    assert result["scores"].shape == (8, 8)
    np.testing.assert_allclose(result["scores"].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_seed_b_binary_head_trains_and_its_export_classifies(binary_manifest, tmp_path):
    run, version = train_and_export("seed_b_binary.yaml", binary_manifest, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):  # the binary head's metrics: accuracy and ROC AUC
        assert 0.0 <= metrics[split]["accuracy"] <= 1.0 and 0.0 <= metrics[split]["auc"] <= 1.0
    history = json.loads((run / "history.json").read_text())
    assert {"loss", "accuracy", "auc", "val_accuracy", "val_auc"} <= set(history)

    examples = held_out_examples(run)
    result = LocalModel(version).classify(examples)
    assert result["classes"].tolist() == [["minority", "majority"]] * len(examples)
    # Classify's scores are [P(minority), P(majority)] of the model's one sigmoid unit.
    config, metadata, model = load_trained_model(run)
    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model.modalities)
    sigmoid = model(preprocessor(preprocessor.parse_examples(tf.constant(examples))), training=False).numpy()
    np.testing.assert_allclose(result["scores"], np.concatenate([1 - sigmoid, sigmoid], axis=1), atol=1e-5)


# The multilabel run joins the slow set (CI runs it) to keep the default run within budget.
@pytest.mark.parametrize("head", ["binary", pytest.param("multilabel", marks=pytest.mark.slow)])
def test_binary_and_multilabel_heads_train_with_their_metrics(head, two_class_manifest, synth_manifest):
    # Bag-of-words text only: the head is what is under test, and it traces fast.
    manifest = two_class_manifest if head == "binary" else synth_manifest
    config = tiny_config(
        f"data.manifest={manifest}",
        "model.modalities=[text]",
        "model.text_encoder.name=text/bow",
        f"model.head.type={head}",
        "data.batch_size=32",
        "train.epochs=3",
        "train.learning_rate=0.01",
        "train.lr_schedule=constant",
        "train.early_stopping_patience=0",
    )
    model, history = fit_with_the_recipe(config)
    assert history["loss"][-1] < history["loss"][0], history["loss"]
    assert {"accuracy", "auc", "val_accuracy", "val_auc"} <= set(history)
    assert model.output_shape == ((None, 1) if head == "binary" else (None, 8))
