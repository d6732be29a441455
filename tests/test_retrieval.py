"""Retrieval: embed signatures, ``mmtf index`` + ``search`` (in process and served), metrics."""

from __future__ import annotations

import base64
import http.client
import itertools
import json

import grpc
import numpy as np
import pytest
import serving_helpers as helpers
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from multimodal_tf import cli
from multimodal_tf.alignment import embedding_model
from multimodal_tf.compat import tf
from multimodal_tf.data.preprocessing import Preprocessor
from multimodal_tf.evaluation import evaluate
from multimodal_tf.retrieval import SearchModule, read_corpus, retrieval_metrics
from multimodal_tf.run_dir import load_trained_model
from multimodal_tf.serving import ModelServer, ModelSpec
from multimodal_tf.testing import tiny_config
from multimodal_tf.training import train

TOP_K = 5
QUERIES = ["red circle", "a blue square", "green"]


@pytest.fixture(scope="module")
def indexed(synth_manifest, tmp_path_factory):
    """A tiny aligned run, its export (version 1) and an image index of the manifest (version 2)."""
    out = tmp_path_factory.mktemp("retrieval")
    config = tiny_config(
        f"data.manifest={synth_manifest}",
        f"train.output_dir={out / 'run'}",
        "model.alignment.weight=1",
        "model.alignment.pairs=[[image,text],[audio,text]]",
        "model.alignment.dim=8",
        # Encoders without recurrent layers: tracing LSTMs dominated this fixture.
        "model.text_encoder.name=text/bow",
        "model.audio_encoder.name=audio/stats",
    )
    run = train(config, progress=False)
    assert cli.main(["export", str(run), "--base-path", str(out / "models"), "--model-name", "m"]) == 0
    export = out / "models" / "m" / "1"
    argv = ["index", str(export), "--manifest", str(synth_manifest), "--modality", "image"]
    assert cli.main([*argv, "--top-k", str(TOP_K)]) == 0
    return run, export, out / "models" / "m" / "2", synth_manifest


# slow: a SavedModel save + reload (~13 s); keeps the default run under 15 min
@pytest.mark.slow
def test_untrained_export_embeds_and_searches_like_numpy(tmp_path):
    """The default-run check (no training): embed signatures and search vs the in-memory model and NumPy."""

    module = helpers.export_untrained_model(
        tmp_path / "1", *helpers.ALIGNED_IMAGE_TEXT, embed=("image", "text")
    )
    model, preprocessor = module.model, module.preprocessor
    loaded = tf.saved_model.load(str(tmp_path / "1"))
    inputs = helpers.make_inputs(12, seed=4)
    corpus = {}
    for modality in ("image", "text"):
        raw = tf.constant(inputs[modality])
        served = loaded.signatures[f"embed_{modality}"](**{modality: raw})["embedding"].numpy()
        alone = {m: raw if m == modality else tf.fill([12], "") for m in ("image", "text")}
        local = embedding_model(model, modality)(preprocessor(alone)[modality]).numpy()
        np.testing.assert_allclose(served, local, atol=1e-5)
        corpus[modality] = served
    ids = [f"item{i}" for i in range(12)]
    searcher = SearchModule(loaded, corpus["image"], ids, TOP_K, ("text",))
    tf.saved_model.save(searcher, str(tmp_path / "2"), signatures=searcher.signatures())
    got = tf.saved_model.load(str(tmp_path / "2")).signatures["search"](text=tf.constant(inputs["text"][:4]))
    expected_ids, expected_scores = _numpy_top_k(corpus["text"][:4], corpus["image"], ids, TOP_K)
    np.testing.assert_array_equal(got["ids"].numpy().astype(str), expected_ids)
    np.testing.assert_allclose(got["scores"].numpy(), expected_scores, atol=1e-5)


def _numpy_top_k(queries, corpus, ids, k):
    scores = queries @ corpus.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.asarray(ids)[order], np.take_along_axis(scores, order, axis=1)


# slow: shares the module's train + export + index fixture (~90 s CPU).
@pytest.mark.slow
def test_exported_embeddings_equal_the_in_memory_model(indexed, synth_manifest):
    run, export, _, _ = indexed
    config, metadata, model = load_trained_model(run)
    loaded = tf.saved_model.load(str(export))
    preprocessor = Preprocessor(config.data, metadata.vocabulary, config.model)
    for modality in ("image", "text", "audio"):
        _, raw = read_corpus(synth_manifest, modality, config.data)
        raw = tf.constant(raw[:6])
        served = loaded.signatures[f"embed_{modality}"](**{modality: raw})["embedding"].numpy()
        inputs = {m: raw if m == modality else tf.fill([6], "") for m in ("image", "text", "audio")}
        local = embedding_model(model, modality)(preprocessor(inputs)[modality]).numpy()
        np.testing.assert_allclose(served, local, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-5)


# slow: shares the module's train + export + index fixture (~90 s CPU).
@pytest.mark.slow
def test_search_equals_brute_force_numpy_search(indexed):
    _, export, indexed_version, manifest = indexed
    config_text = (indexed_version / "assets.extra" / "index.json").read_text()
    assert json.loads(config_text)["queries"][0] == "text"
    base = tf.saved_model.load(str(export))
    searcher = tf.saved_model.load(str(indexed_version))
    from multimodal_tf.config import load  # noqa: PLC0415

    data = load([export / "assets.extra" / "config.yaml"], strict=False).data
    ids, raw = read_corpus(manifest, "image", data)
    corpus = base.signatures["embed_image"](image=tf.constant(raw))["embedding"].numpy()
    queries = base.signatures["embed_text"](text=tf.constant(QUERIES))["embedding"].numpy()
    expected_ids, expected_scores = _numpy_top_k(queries, corpus, ids, TOP_K)
    got = searcher.signatures["search"](text=tf.constant(QUERIES))
    np.testing.assert_allclose(got["scores"].numpy(), expected_scores, atol=1e-5)
    np.testing.assert_array_equal(got["ids"].numpy().astype(str), expected_ids)
    # The indexed version keeps the export's signatures.
    assert {"serving_default", "classify", "embed_text", "search_audio"} <= set(searcher.signatures)


# slow: shares the module's train + export + index fixture (~90 s CPU).
@pytest.mark.slow
def test_search_is_served_over_grpc_and_rest(indexed):
    _, _, indexed_version, _ = indexed
    expected = tf.saved_model.load(str(indexed_version)).signatures["search"](text=tf.constant(QUERIES))
    spec = ModelSpec("m", str(indexed_version.parent))
    with ModelServer([spec], port=0, rest_api_port=0, file_system_poll_wait_seconds=0) as server:
        with grpc.insecure_channel(server.grpc_target) as channel:
            request = predict_pb2.PredictRequest()
            request.model_spec.name, request.model_spec.signature_name = "m", "search"
            request.inputs["text"].CopyFrom(tf.make_tensor_proto(QUERIES))
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        assert response.model_spec.version.value == 2
        ids = tf.make_ndarray(response.outputs["ids"]).astype(str)
        np.testing.assert_array_equal(ids, expected["ids"].numpy().astype(str))
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]), expected["scores"], atol=1e-6)

        connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=30)
        body = {"signature_name": "search", "instances": [{"text": q} for q in QUERIES]}
        connection.request("POST", "/v1/models/m:predict", body=json.dumps(body))
        response = connection.getresponse()
        assert response.status == 200
        predictions = json.loads(response.read())["predictions"]
        connection.close()
    rest_ids = [[_text(v) for v in p["ids"]] for p in predictions]
    np.testing.assert_array_equal(rest_ids, expected["ids"].numpy().astype(str))
    np.testing.assert_allclose([p["scores"] for p in predictions], expected["scores"], atol=1e-5)


def _text(value) -> str:
    return base64.b64decode(value["b64"]).decode() if isinstance(value, dict) else value


# slow: shares the module's train + export + index fixture (~90 s CPU).
@pytest.mark.slow
def test_index_rejects_a_modality_the_model_does_not_align(indexed, capsys):
    _, export, _, manifest = indexed
    assert (
        cli.main(
            [
                "index",
                str(export),
                "--manifest",
                str(manifest),
                "--modality",
                "image",
                "--query-modality",
                "smell",
            ]
        )
        == 2
    )
    assert "not aligned" in capsys.readouterr().err


def _numpy_ranks(queries, gallery):
    """Rank of the true item by sorting (an independent route to the same ranks)."""
    scores = queries @ gallery.T
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.array([1 + int(np.where(order[i] == i)[0][0]) for i in range(len(queries))])


def test_retrieval_metrics_equal_numpy_and_chance_is_exact():
    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    gallery[:10] = queries[:10] + 0.01 * rng.normal(size=(10, 4))  # some easy matches
    ranks = _numpy_ranks(queries, gallery)
    metrics = retrieval_metrics(queries, gallery)
    for k in (1, 5, 10):
        assert metrics[f"recall@{k}"] == pytest.approx(np.mean(ranks <= k))
    assert metrics["median_rank"] == pytest.approx(np.median(ranks))
    assert metrics["mAP"] == pytest.approx(np.mean(1.0 / ranks))
    # Chance: the average over every ranking of 5 items.
    n = 5
    positions = np.array([perm.index(0) + 1 for perm in itertools.permutations(range(n))])
    chance = retrieval_metrics(np.eye(n), np.eye(n))
    assert chance["chance_recall@1"] == pytest.approx(np.mean(positions <= 1))
    assert chance["chance_recall@10"] == 1.0
    assert chance["chance_mAP"] == pytest.approx(np.mean(1.0 / positions))
    assert chance["chance_median_rank"] == pytest.approx(np.mean(positions))


# slow: shares the module's train + export + index fixture (~90 s CPU).
@pytest.mark.slow
def test_evaluate_reports_retrieval_for_each_pair_and_direction(indexed):
    run = indexed[0]
    report = evaluate(run, ablation=False)
    directions = {(row["query"], row["gallery"]) for row in report["retrieval"]}
    assert directions == {("image", "text"), ("text", "image"), ("audio", "text"), ("text", "audio")}
    config, metadata, model = load_trained_model(run)
    from multimodal_tf.retrieval import split_embeddings  # noqa: PLC0415

    embeddings, presence = split_embeddings(model, config, metadata, "test")
    both = presence["image"] & presence["text"]
    ranks = _numpy_ranks(embeddings["text"][both], embeddings["image"][both])
    row = next(r for r in report["retrieval"] if (r["query"], r["gallery"]) == ("text", "image"))
    assert row["count"] == both.sum() and row["mAP"] == pytest.approx(np.mean(1.0 / ranks))
    assert row["recall@5"] == pytest.approx(np.mean(ranks <= 5))
    assert "## Retrieval" in (run / "report.md").read_text()
