"""data.targets: multi-label and regression heads, masked losses and metrics, reports, exports, Regress."""

from __future__ import annotations

import csv
import json

import grpc
import numpy as np
import pytest
from sklearn import metrics as skm
from tensorflow_serving.apis import classification_pb2, input_pb2, prediction_service_pb2_grpc, regression_pb2

from multimodal_tf import config as config_lib
from multimodal_tf import distribute, recipe, target_report
from multimodal_tf import targets as targets_lib
from multimodal_tf.compat import keras, tf
from multimodal_tf.data import convert as convert_lib
from multimodal_tf.data.cache import default_tfrecord_dir, prepare_data
from multimodal_tf.data.pipeline import make_dataset
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.evaluation import evaluate
from multimodal_tf.export import export_run
from multimodal_tf.run_dir import load_trained_model
from multimodal_tf.serving import ModelServer, ModelSpec
from multimodal_tf.testing import TARGET_OVERRIDE, fit_with_the_recipe, tiny_config, with_target_columns
from multimodal_tf.training import train


@pytest.fixture(scope="module")
def target_manifest(synth_manifest, tmp_path_factory):
    return with_target_columns(synth_manifest, tmp_path_factory.mktemp("targets") / "manifest.csv")


def _bce(y, p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


# --- Config and validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, message",
    [
        (
            "[{name: tags, column: tags, type: multilabel}]",
            "targets[0]: the primary target must be multiclass",
        ),
        (
            "[{name: category, column: label}, {name: x, column: y, type: foo}]",
            "targets[1].type: expected one of",
        ),
        ("[{name: category, column: label}, {name: Bad, column: y, type: regression}]", "targets[1].name"),
        ("[{name: category, column: label}, {name: category, column: y, type: regression}]", "distinct"),
        (
            "[{name: category, column: label}, {name: x, column: label, type: regression}]",
            "targets[1].column",
        ),
        ("[{name: category, column: label}, {name: x, column: y, type: multiclass}]", "targets[1].type"),
        (
            "[{name: category, column: label}, {name: x, column: y, type: regression, loss_weight: -1}]",
            ">= 0",
        ),
    ],
)
def test_bad_target_lists_name_the_field(targets, message):
    with pytest.raises(config_lib.ConfigError, match=r"data\.targets") as info:
        config_lib.load((), [f"data.targets={targets}"])
    assert message in str(info.value)


def test_malformed_cells_are_named_by_row_and_column(target_manifest, tmp_path):
    rows = list(csv.DictReader(open(target_manifest, encoding="utf-8")))[:12]
    rows[2]["tags"] = "mod3_1||even"
    rows[5]["rating"] = "four"
    rows[7]["rating"] = "nan"
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = tiny_config(f"data.manifest={bad}", TARGET_OVERRIDE).data
    with pytest.raises(convert_lib.ConversionError) as info:
        convert_lib.convert(bad, tmp_path / "out", config, progress=False)
    message = str(info.value)
    assert "3 problems" in message, message
    assert f"row 3 id={rows[2]['id']} tags: malformed multilabel cell 'mod3_1||even'" in message
    assert f"row 6 id={rows[5]['id']} rating: regression value 'four' is not a number" in message
    assert f"row 8 id={rows[7]['id']} rating: regression value 'nan' is not finite" in message


def test_a_missing_target_column_is_a_manifest_error(synth_manifest, tmp_path):
    from multimodal_tf.data.manifest import ManifestError, read_manifest

    config = tiny_config(TARGET_OVERRIDE).data
    with pytest.raises(ManifestError, match=r"missing columns \['tags', 'rating'\]"):
        read_manifest(synth_manifest, config)


def test_conversion_stores_values_presence_and_vocabulary(target_manifest):
    config = tiny_config(f"data.manifest={target_manifest}", TARGET_OVERRIDE, "model.modalities=[image]")
    metadata = prepare_data(config.data, progress=False)
    tags = metadata.targets["tags"]
    assert tags["label_names"] == ["even", "mod3_0", "mod3_1", "mod3_2"]
    rows = {r["id"]: r for r in csv.DictReader(open(target_manifest, encoding="utf-8"))}
    directory = default_tfrecord_dir(config.data)
    spec = targets_lib.feature_spec(config.data, targets_lib.sizes(config.data, metadata))
    spec["id"] = tf.io.FixedLenFeature([], tf.string)
    for split in ("train", "test"):
        files = [str(directory / f) for f in metadata.shards[split]]
        for record in tf.data.TFRecordDataset(files).map(lambda s: tf.io.parse_single_example(s, spec)):
            row = rows[record["id"].numpy().decode()]
            assert record["target_tags_present"].numpy() == int(bool(row["tags"]))
            hot = record["target_tags"].numpy()
            expected = (
                [float(n in row["tags"].split("|")) for n in tags["label_names"]] if row["tags"] else [0] * 4
            )
            np.testing.assert_array_equal(hot, expected)
            assert record["target_score_present"].numpy() == int(bool(row["rating"]))
            assert record["target_score"].numpy()[0] == pytest.approx(float(row["rating"] or 0))
    train_rows = [r for r in rows.values() if r["split"] == "train"]
    # val is held out of train by id hash; present + missing cover every train-file row.
    counted = sum(tags["counts"][s]["present"] + tags["counts"][s]["missing"] for s in ("train", "val"))
    assert counted == len(train_rows)


# --- Losses and metrics against NumPy / scikit-learn --------------------------------------


def _packed(rng, n=12, labels=5, missing=(0, 3, 7)):
    values = (rng.random((n, labels)) < 0.4).astype(np.float32)
    present = np.ones(n, np.float32)
    present[list(missing)] = 0
    values[list(missing)] = 0
    return values, present, np.concatenate([values, present[:, None]], axis=1)


def test_masked_losses_equal_a_numpy_mean_over_present_examples():
    rng = np.random.default_rng(0)
    values, present, packed = _packed(rng)
    probabilities = rng.uniform(0.02, 0.98, values.shape).astype(np.float32)
    loss = targets_lib.MaskedLoss("multilabel")(tf.constant(packed), tf.constant(probabilities))
    keep = present > 0
    expected = _bce(values[keep], probabilities[keep]).mean(axis=1).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # The missing rows' values do not matter: garbage there changes nothing.
    garbage = packed.copy()
    garbage[~keep, :-1] = 1.0
    again = targets_lib.MaskedLoss("multilabel")(tf.constant(garbage), tf.constant(probabilities))
    assert float(again) == pytest.approx(float(loss), rel=1e-6)

    scores = rng.normal(size=(12, 1)).astype(np.float32)
    truth = rng.normal(size=(12, 1)).astype(np.float32)
    packed_r = np.concatenate([truth, present[:, None]], axis=1)
    loss_r = targets_lib.MaskedLoss("regression")(tf.constant(packed_r), tf.constant(scores))
    assert float(loss_r) == pytest.approx(float(np.mean((truth[keep] - scores[keep]) ** 2)), rel=1e-5)
    # No label in the batch: zero loss (and no NaN in the gradient).
    none = packed_r.copy()
    none[:, -1] = 0
    assert float(targets_lib.MaskedLoss("regression")(tf.constant(none), tf.constant(scores))) == 0.0


_KINDS = {"tags": "multilabel", "score": "regression"}


def _uneven_labels(rng):
    """8 examples whose halves (the 2 replicas' shares) hold different numbers of labels.

    tags: 1 label in rows 0-3, 4 in rows 4-7; score: 3 in rows 0-3, 1 in rows 4-7.
    """
    tags = (rng.random((8, 3)) < 0.5).astype(np.float32)
    tags_present = np.array([0, 1, 0, 0, 1, 1, 1, 1], np.float32)
    scores = rng.normal(size=(8, 1)).astype(np.float32)
    scores_present = np.array([1, 1, 0, 1, 0, 0, 1, 0], np.float32)
    return {
        "tags": np.concatenate([tags * tags_present[:, None], tags_present[:, None]], axis=1),
        "score": np.concatenate([scores * scores_present[:, None], scores_present[:, None]], axis=1),
    }


def _numpy_masked_losses(x, y, weights, rows):
    """(tags BCE, score squared error) averaged over the present examples among ``rows``.

    ``weights``: output name -> (kernel, bias).
    """
    (kernel_t, bias_t), (kernel_s, bias_s) = weights["tags"], weights["score"]
    tags = 1 / (1 + np.exp(-(x[rows] @ kernel_t + bias_t)))
    score = x[rows] @ kernel_s + bias_s
    present_t, present_s = y["tags"][rows, -1] > 0, y["score"][rows, -1] > 0
    bce = _bce(y["tags"][rows, :-1], tags).mean(axis=1)[present_t].mean()
    squared = ((y["score"][rows, :-1] - score) ** 2).mean(axis=1)[present_s].mean()
    return bce, squared


def test_two_replicas_give_the_one_device_masked_loss_and_gradients():
    # Replicas holding different numbers of labels must weigh each labelled
    # example as one device does: the per-replica mean (each replica's
    # labels averaged on their own, then the replicas averaged) gives more
    # weight to the replica with fewer labels and fails this test.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = _uneven_labels(rng)
    # Fixed weights, not the initializers': the test does not depend on the seed state.
    dense = {"tags": (rng.normal(size=(5, 3)), rng.normal(size=3)), "score": (rng.normal(size=(5, 1)), [0.5])}
    dense = {name: [np.asarray(w, np.float32) for w in pair] for name, pair in dense.items()}
    strategies = {
        "default": tf.distribute.get_strategy(),
        "mirrored": distribute.make_strategy(tiny_config("train.strategy=mirrored").train),
    }
    assert strategies["mirrored"].num_replicas_in_sync == 2
    results = {}
    for name, strategy in strategies.items():
        with strategy.scope():
            inputs = keras.Input((5,), name="x")
            outputs = {
                "tags": keras.layers.Dense(3, activation="sigmoid", name="tags")(inputs),
                "score": keras.layers.Dense(1, name="score")(inputs),
            }
            model = keras.Model(inputs, outputs)
            model.compile(
                optimizer=keras.optimizers.SGD(1.0),  # weights after one step = before - gradient
                loss={t: targets_lib.MaskedLoss(k, name=f"{t}_loss") for t, k in _KINDS.items()},
            )
        for layer in _KINDS:
            model.get_layer(layer).set_weights(dense[layer])
        logs = model.train_on_batch(x, y, return_dict=True)
        gradients = [
            before - after
            for layer in _KINDS
            for before, after in zip(dense[layer], model.get_layer(layer).get_weights(), strict=True)
        ]
        results[name] = (logs, gradients)

    bce, squared = _numpy_masked_losses(x, y, dense, slice(None))
    default_logs, mirrored_logs = results["default"][0], results["mirrored"][0]
    assert default_logs["tags_loss"] == pytest.approx(bce, rel=1e-5)
    assert default_logs["score_loss"] == pytest.approx(squared, rel=1e-5)
    # float32 sums of <= 8 terms in another order (two halves, then the
    # cross-replica sum) differ from one device by a few ulps: 1e-5 relative.
    for key in ("loss", "tags_loss", "score_loss"):
        assert mirrored_logs[key] == pytest.approx(default_logs[key], rel=1e-5), key
    # Gradients are read as weights before - after an SGD(1.0) step: weights
    # of size ~1 carry float32 rounding of ~1e-7, hence atol 1e-6.
    for got, expected in zip(results["mirrored"][1], results["default"][1], strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The data tells the two means apart: the per-replica one is off by > 10 %.
    halves = [_numpy_masked_losses(x, y, dense, rows) for rows in (slice(0, 4), slice(4, 8))]
    per_replica = np.mean(halves, axis=0)
    assert abs(per_replica[0] - bce) > 0.1 * bce and abs(per_replica[1] - squared) > 0.1 * squared


def test_masked_keras_metrics_equal_scikit_learn_on_present_examples():
    rng = np.random.default_rng(1)
    values, present, packed = _packed(rng, n=40, labels=3, missing=range(0, 40, 5))
    probabilities = np.clip(values * 0.3 + rng.uniform(0, 0.7, values.shape), 0, 1).astype(np.float32)
    keep = present > 0
    auc = targets_lib.MaskedAUC(num_thresholds=2000)
    auc.update_state(packed, probabilities)
    micro = skm.roc_auc_score(values[keep].ravel(), probabilities[keep].ravel())
    assert float(auc.result()) == pytest.approx(micro, abs=2e-3)

    truth, scores = rng.normal(size=(40, 1)), rng.normal(size=(40, 1))
    packed_r = np.concatenate([truth, present[:, None]], axis=1).astype(np.float32)
    mae, rmse = targets_lib.MaskedMeanAbsoluteError(), targets_lib.MaskedRootMeanSquaredError()
    mae.update_state(packed_r, scores.astype(np.float32))
    rmse.update_state(packed_r, scores.astype(np.float32))
    assert float(mae.result()) == pytest.approx(skm.mean_absolute_error(truth[keep], scores[keep]), rel=1e-5)
    expected_rmse = np.sqrt(skm.mean_squared_error(truth[keep], scores[keep]))
    assert float(rmse.result()) == pytest.approx(expected_rmse, rel=1e-5)


def test_multilabel_report_metrics_equal_scikit_learn():
    rng = np.random.default_rng(2)
    values = (rng.random((50, 4)) < 0.35).astype(np.float32)
    values[:, 3] = 0  # a label with no positive: no AP/AUC, left out of the averages
    probabilities = np.clip(values * 0.4 + rng.uniform(0, 0.6, values.shape), 0, 1)
    m = target_report.multilabel_metrics(probabilities, values, ["a", "b", "c", "d"])
    predicted = probabilities >= 0.5
    assert m["micro_f1"] == pytest.approx(skm.f1_score(values, predicted, average="micro", zero_division=0))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(values, predicted, average="macro", zero_division=0))
    aps = [skm.average_precision_score(values[:, j], probabilities[:, j]) for j in range(3)]
    assert m["map"] == pytest.approx(np.mean(aps))
    for j, name in enumerate("abc"):
        assert m["per_label"][name]["roc_auc"] == pytest.approx(
            skm.roc_auc_score(values[:, j], probabilities[:, j])
        )
    assert m["per_label"]["d"]["average_precision"] is None
    # The frequency baseline's AP of a label is that label's positive rate (its chance level).
    baseline = target_report.frequency_baseline(np.array([0.3, 0.2, 0.5, 0.0]), values, ["a", "b", "c", "d"])
    assert baseline["map"] == pytest.approx(values[:, :3].mean(axis=0).mean())


def test_monitor_names_the_primary_output():
    config = tiny_config(TARGET_OVERRIDE)
    assert targets_lib.monitor(config) == "val_category_accuracy"
    assert targets_lib.monitor(tiny_config(TARGET_OVERRIDE, "train.monitor=val_score_mae")) == "val_score_mae"
    assert targets_lib.monitor(tiny_config(TARGET_OVERRIDE, "train.monitor=val_loss")) == "val_loss"
    assert targets_lib.monitor(tiny_config()) == "val_accuracy"


# --- Training options with targets --------------------------------------------------------


def test_early_stopping_with_targets_stops_on_the_primary_accuracy(target_manifest):
    # Learning rate 0: val_category_accuracy (the default monitor, renamed for
    # a multi-output model) never improves, so patience 1 stops after epoch 2 of 6.
    config = tiny_config(
        f"data.manifest={target_manifest}",
        TARGET_OVERRIDE,
        "model.modalities=[text]",
        "model.text_encoder.name=text/bow",
        "data.batch_size=32",
        "train.epochs=6",
        "train.learning_rate=0.0",
        "train.early_stopping_patience=1",
    )
    _, history = fit_with_the_recipe(config)
    assert len(history["loss"]) == 2, history
    assert {"val_category_accuracy", "val_tags_auc", "val_score_mae", "val_score_rmse"} <= set(history)


def test_balanced_class_weights_with_targets_weigh_only_the_primary_loss(target_manifest):
    config = tiny_config(
        f"data.manifest={target_manifest}",
        TARGET_OVERRIDE,
        "model.modalities=[text]",
        "model.text_encoder.name=text/bow",
        "train.class_weights=balanced",
    )
    metadata = prepare_data(config.data, progress=False)
    weights = recipe.class_weights(metadata, "balanced")
    keras.utils.set_random_seed(0)
    model = recipe.compile_model(config, metadata)
    train_ds, _, _ = recipe.datasets_for(config, metadata)
    weighted, count = 0.0, 0
    for x, y, sample_weight in train_ds:
        assert set(sample_weight) == {"category"}
        np.testing.assert_allclose(sample_weight["category"], weights[y["category"].numpy()])
        out = model(x, training=False)
        ce = keras.losses.sparse_categorical_crossentropy(y["category"], out["category"]).numpy()
        weighted += float((ce * sample_weight["category"].numpy()).sum())
        count += len(ce)
    result = model.evaluate(train_ds, verbose=0, return_dict=True)
    assert result["category_loss"] == pytest.approx(weighted / count, rel=1e-4)
    assert weights.max() > weights.min()  # the synthetic classes are not all equal in size


# --- Train, evaluate, export and serve ----------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(target_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("target_run")
    config = tiny_config(
        f"data.manifest={target_manifest}",
        f"train.output_dir={out / 'run'}",
        TARGET_OVERRIDE,
        "model.modalities=[image,text]",
        "model.text_encoder.name=text/bow",
        "train.strategy=mirrored",
        "train.epochs=2",
        "data.batch_size=16",
    )
    return train(config, progress=False)


# Trains under MirroredStrategy (2 epochs), evaluates, exports and serves: ~1 min idle, slow.
@pytest.mark.slow
def test_mirrored_training_reports_a_section_per_target(trained_run):
    history = json.loads((trained_run / "history.json").read_text())
    assert np.isfinite(history["loss"]).all()
    report = evaluate(trained_run, ablation=False)
    assert set(report["targets"]) == {"tags", "score"}
    tags = report["targets"]["tags"]
    assert tags["missing"] > 0 and tags["metrics"]["examples"] > 0
    assert {"map", "micro_f1", "macro_f1"} <= set(tags["metrics"]) and "map" in tags["baseline"]
    assert set(report["targets"]["score"]["metrics"]) == {"examples", "mae", "rmse"}
    markdown = (trained_run / "report.md").read_text()
    assert "## Target `tags` (multilabel, column `tags`)" in markdown
    assert "## Target `score` (regression, column `rating`)" in markdown
    assert "accuracy" in report["metrics"]  # the primary target's section is the classification report


@pytest.mark.slow
def test_export_outputs_equal_the_model_and_regress_serves_over_grpc(trained_run, tmp_path):
    config, metadata, model = load_trained_model(trained_run)
    export = export_run(trained_run, tmp_path / "models", "t")
    directory = default_tfrecord_dir(config.data)
    files = [str(directory / f) for f in metadata.shards["test"]]
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(files).take(6)]
    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model)
    expected = model(preprocessor(preprocessor.parse_examples(tf.constant(serialized))), training=False)
    loaded = tf.saved_model.load(str(export))
    served = loaded.signatures["predict_examples"](examples=tf.constant(serialized))
    np.testing.assert_allclose(served["tags/probabilities"], expected["tags"], atol=1e-5)
    np.testing.assert_allclose(served["score/value"], expected["score"][:, 0], atol=1e-5)
    np.testing.assert_allclose(served["category/probabilities"], expected["category"], atol=1e-5)
    np.testing.assert_allclose(served["probabilities"], expected["category"], atol=1e-5)
    names = np.array(metadata.label_names, object)[expected["category"].numpy().argmax(-1)]
    assert [n.decode() for n in served["category/class_name"].numpy()] == list(names)
    assert served["tags/labels"].numpy()[0].tolist() == [
        n.encode() for n in metadata.targets["tags"]["label_names"]
    ]

    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "t"
    request.model_spec.signature_name = "regress"
    for s in serialized:
        request.input.example_list.examples.add().ParseFromString(s)
    specs = [ModelSpec("t", str(tmp_path / "models" / "t"))]
    with ModelServer(specs, port=0, rest_api_port=None, file_system_poll_wait_seconds=0) as running:
        with grpc.insecure_channel(running.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Regress(request, timeout=30)
            values = [r.value for r in response.result.regressions]
            np.testing.assert_allclose(values, expected["score"][:, 0], atol=1e-5)
            # Classify still serves the primary target.
            c_request = classification_pb2.ClassificationRequest(
                input=input_pb2.Input(example_list=request.input.example_list)
            )
            c_request.model_spec.name = "t"
            c_request.model_spec.signature_name = "classify"
            answer = stub.Classify(c_request, timeout=30)
            scores = [[c.score for c in r.classes] for r in answer.result.classifications]
            np.testing.assert_allclose(scores, expected["category"], atol=1e-5)


# Two one-epoch trials: ~20 s idle, with the slow tests.
@pytest.mark.slow
def test_a_search_trains_targets_and_scores_the_primary_accuracy(target_manifest, tmp_path):
    import dataclasses

    from multimodal_tf import tuning

    config = tiny_config(
        f"data.manifest={target_manifest}",
        TARGET_OVERRIDE,
        "model.modalities=[text]",
        "model.text_encoder.name=text/bow",
        "train.epochs=1",
    )
    space = {"learning_rate": {"type": "choice", "values": [0.001, 0.01], "key": "train.learning_rate"}}
    result = tuning.tune(
        dataclasses.replace(config, search_space=space),
        "random",
        max_trials=2,
        directory=tmp_path,
        progress=False,
    )
    assert result.num_trials == 2
    with open(result.project_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["COMPLETED"] * 2
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)  # val_category_accuracy, not a missing metric


# One epoch of image+text with alignment: ~15 s idle, with the slow tests.
@pytest.mark.slow
def test_targets_train_jointly_with_the_alignment_loss(target_manifest):
    config = tiny_config(
        f"data.manifest={target_manifest}",
        TARGET_OVERRIDE,
        "model.modalities=[image,text]",
        "model.text_encoder.name=text/bow",
        "model.alignment.weight=0.5",
        "model.alignment.pairs=[[image,text]]",
        "model.alignment.classification_weight=0.5",
    )
    assert recipe.loss_weights_for(config) == {"category": 0.5, "tags": 0.5, "score": 0.25}
    model, history = fit_with_the_recipe(config)
    assert set(model.output) == {"category", "tags", "score"}
    assert np.isfinite(history["loss"]).all() and np.isfinite(history["val_tags_loss"]).all()
    assert any("align" in key for key in history), sorted(history)


# --- Late fusion, ensembles and temperature calibration with targets ----------------------


@pytest.mark.parametrize("combine", ["mean", "product"])
def test_late_fusion_combines_each_target_as_numpy(combine):
    from scipy import special

    from multimodal_tf.fusion.late import PRIMARY_OUTPUT, LateFusion

    modalities = ("image", "text")
    layer = LateFusion(
        modalities,
        num_outputs=3,
        hidden_dim=5,
        combine=combine,
        extra_outputs={"tags": [4, "sigmoid"], "score": [1, "linear"]},
    )
    rng = np.random.default_rng(0)
    embeddings = {m: rng.normal(size=(6, 7)).astype(np.float32) for m in modalities}
    # Both, image only, text only, none present, both, image only.
    flags = {"image": np.float32([1, 1, 0, 0, 1, 1]), "text": np.float32([1, 0, 1, 0, 1, 0])}
    layer(embeddings, flags)  # builds
    layer.modality_logits.assign([0.7, -0.4])
    out = {k: v.numpy().astype(np.float64) for k, v in layer(embeddings, flags, training=False).items()}

    present = np.stack([flags[m] for m in modalities], 1).astype(np.float64)  # [B, M]
    weights = np.exp([0.7, -0.4]) * present
    weights = np.divide(weights, weights.sum(1, keepdims=True), out=np.zeros_like(weights), where=present > 0)

    def per_modality(dense_of):  # [B, M, K] logits
        rows = []
        for m in modalities:
            hidden_w, hidden_b = (w.numpy() for w in layer.hidden[m].weights)
            w, b = (v.numpy() for v in dense_of(m).weights)
            h = np.maximum((embeddings[m] * flags[m][:, None]) @ hidden_w + hidden_b, 0.0)
            rows.append(h @ w + b)
        return np.stack(rows, 1).astype(np.float64)

    none = 1.0 - present.max(1, keepdims=True)
    for name, activation, prior in (
        (PRIMARY_OUTPUT, lambda z: special.softmax(z, -1), 1 / 3),
        ("tags", special.expit, 0.5),
        ("score", lambda z: z, 0.0),
    ):
        dense = (
            (lambda m: layer.classifiers[m])
            if name == PRIMARY_OUTPUT
            else (lambda m, n=name: layer.extra_heads[f"{m}_{n}"])
        )
        logits = per_modality(dense)
        if combine == "product" or name == "score":
            expected = activation((logits * weights[:, :, None]).sum(1))
        else:
            expected = (activation(logits) * weights[:, :, None]).sum(1) + none * prior
        np.testing.assert_allclose(out[name], expected, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(out["score"][3], 0.0)  # no modality: no evidence


def _independent_temperature(logits, targets, activation) -> float:
    """argmin_T NLL(activation(logits / T)), by scipy's bounded scalar minimiser over log T."""
    from scipy import optimize, special

    def nll(log_t):
        z = logits / np.exp(log_t)
        if activation == "softmax":
            return np.mean(special.logsumexp(z, axis=1) - z[np.arange(len(z)), targets])
        return np.mean(-targets * special.log_expit(z) - (1 - targets) * special.log_expit(-z))

    found = optimize.minimize_scalar(
        nll, bounds=(np.log(1e-2), np.log(1e2)), method="bounded", options={"xatol": 1e-9}
    )
    return float(np.exp(found.x))


def _ensemble_config(target_manifest, *more):
    return tiny_config(
        f"data.manifest={target_manifest}",
        TARGET_OVERRIDE,
        "model.modalities=[image,text]",
        "model.text_encoder.name=text/bow",
        "model.fusion.name=late",
        "model.ensemble_size=2",
        "train.calibration=temperature",
        *more,
    )


# Builds (no training) two two-member late-fusion ensembles and calls them: ~4 s idle.
def test_an_ensemble_of_late_fusion_models_averages_each_target(target_manifest, tmp_path):
    from multimodal_tf.models import EnsembleModel

    config = _ensemble_config(target_manifest)
    metadata = prepare_data(config.data, progress=False)
    keras.utils.set_random_seed(0)
    model = recipe.build_for(config, metadata)
    assert isinstance(model, EnsembleModel) and len(model.members) == 2
    model.get_layer("category").temperature.assign(2.0)  # as calibrate_model would
    model.get_layer("tags").temperature.assign(0.5)
    x, _ = next(iter(make_dataset(config, "val", training=False, metadata=metadata)))
    out = {k: v.numpy().astype(np.float64) for k, v in model(x, training=False).items()}
    members = [member(x, training=False) for member in model.members]
    average = {n: np.mean([m[n].numpy() for m in members], axis=0).astype(np.float64) for n in out}
    assert average["score"].shape == (len(average["score"]), 1)
    np.testing.assert_allclose(out["score"], average["score"], atol=1e-6)  # regression: not scaled
    expected = np.exp(np.log(average["category"]) / 2.0)
    np.testing.assert_allclose(out["category"], expected / expected.sum(1, keepdims=True), atol=1e-5)
    logit = np.log(average["tags"]) - np.log1p(-average["tags"])
    np.testing.assert_allclose(out["tags"], 1 / (1 + np.exp(-logit / 0.5)), atol=1e-5)
    # Every head's weights (and the temperatures) come back with load_weights.
    model.save_weights(str(tmp_path / "weights"))
    keras.utils.set_random_seed(1)
    again = recipe.build_for(config, metadata)
    again.load_weights(str(tmp_path / "weights"))
    for name, value in again(x, training=False).items():
        np.testing.assert_allclose(value.numpy(), out[name], atol=1e-6, err_msg=name)


# One epoch of one text model (bag of words) and a pass over val: ~4 s idle.
def test_temperature_per_target_equals_an_independent_fit_on_present_labels(target_manifest):
    from multimodal_tf import calibration

    config = tiny_config(
        f"data.manifest={target_manifest}",
        TARGET_OVERRIDE,
        "model.modalities=[text]",
        "model.text_encoder.name=text/bow",
        "train.calibration=temperature",
        "data.batch_size=32",
        "train.learning_rate=0.02",
    )
    model, _ = fit_with_the_recipe(config)
    metadata = prepare_data(config.data, progress=False)
    result = calibration.calibrate_model(model, config, metadata)
    assert set(result["targets"]) == {"category", "tags"}  # regression is not calibrated
    names = ("category", "tags")
    logits_model = keras.Model(
        model.inputs, {n: model.get_layer(targets_lib.uncalibrated_name(n)).output for n in names}
    )
    logits, labels = {n: [] for n in names}, {n: [] for n in names}
    for x, y in make_dataset(config, "val", training=False, metadata=metadata, with_targets=True):
        for name, value in logits_model(x, training=False).items():
            logits[name].append(value.numpy().astype(np.float64))
            labels[name].append(y[name].numpy())
    logits = {n: np.concatenate(v) for n, v in logits.items()}
    labels = {n: np.concatenate(v) for n, v in labels.items()}
    expected = _independent_temperature(logits["category"], labels["category"], "softmax")
    assert result["temperature"] == result["targets"]["category"]["temperature"]
    assert result["temperature"] == pytest.approx(expected, rel=1e-3)
    present = labels["tags"][:, -1] > 0
    assert 0 < present.sum() < len(present)  # missing tags exist and are left out
    expected = _independent_temperature(logits["tags"][present], labels["tags"][present, :-1], "sigmoid")
    assert result["targets"]["tags"]["examples"] == present.sum()
    assert result["targets"]["tags"]["temperature"] == pytest.approx(expected, rel=1e-3)
    assert result["targets"]["tags"]["after"]["nll"] <= result["targets"]["tags"]["before"]["nll"]
    assert model.get_layer("tags").temperature.numpy() == pytest.approx(expected, rel=1e-3)


# Trains, calibrates, evaluates and exports a calibrated late-fusion ensemble with targets:
# ~40 s idle, slow.
@pytest.mark.slow
def test_a_calibrated_late_fusion_ensemble_with_targets_trains_and_exports(target_manifest, tmp_path):
    config = _ensemble_config(target_manifest, f"train.output_dir={tmp_path / 'run'}", "data.batch_size=32")
    run = train(config, progress=False)
    calibrated = json.loads((run / "calibration.json").read_text())
    assert set(calibrated["targets"]) == {"category", "tags"}
    report = evaluate(run, ablation=False)
    assert set(report["targets"]) == {"tags", "score"} and "accuracy" in report["metrics"]
    assert "Target `tags`: T = " in (run / "report.md").read_text()
    config, metadata, model = load_trained_model(run)
    assert model.get_layer("tags").temperature.numpy() == pytest.approx(
        calibrated["targets"]["tags"]["temperature"]
    )
    export = export_run(run, tmp_path / "models", "t")
    files = [str(default_tfrecord_dir(config.data) / f) for f in metadata.shards["test"]]
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(files).take(6)]
    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model)
    expected = model(preprocessor(preprocessor.parse_examples(tf.constant(serialized))), training=False)
    served = tf.saved_model.load(str(export)).signatures["predict_examples"](examples=tf.constant(serialized))
    np.testing.assert_allclose(served["category/probabilities"], expected["category"], atol=1e-5)
    np.testing.assert_allclose(served["tags/probabilities"], expected["tags"], atol=1e-5)
    np.testing.assert_allclose(served["score/value"], expected["score"][:, 0], atol=1e-5)
