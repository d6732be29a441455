"""gRPC round trips through the Client against the embedded server (real sockets, real SavedModels)."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
import serving_helpers as helpers
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    inference_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from multimodal_tf.compat import tf
from multimodal_tf.serving import Client, ModelServer, ModelSpec
from multimodal_tf.serving.local import LocalModel


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("grpc_models")
    helpers.make_test_savedmodel(base, "m", 1, seed=0)
    helpers.make_test_savedmodel(base, "m", 2, seed=1)
    helpers.make_test_savedmodel(base, "imgtext", 1, seed=0, modalities=("image", "text"))
    specs = [
        ModelSpec("m", str(base / "m"), policy="all", version_labels=(("stable", 1), ("canary", 2))),
        ModelSpec("imgtext", str(base / "imgtext")),
    ]
    with ModelServer(specs, port=0, rest_api_port=None, file_system_poll_wait_seconds=0) as running:
        running.base = base
        yield running


@pytest.fixture(scope="module")
def client(server):
    with Client(server.grpc_target, "m", timeout_seconds=20) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _code(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def test_predict_matches_in_process_model(server, client):
    inputs = helpers.make_inputs(5, seed=3)
    served = client.predict(images=inputs["image"], texts=inputs["text"], audios=inputs["audio"])
    local = LocalModel(server.base / "m" / "2").predict(
        images=inputs["image"], texts=inputs["text"], audios=inputs["audio"]
    )
    np.testing.assert_allclose(served["probabilities"], local["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(served["class_name"], local["class_name"])
    assert served["probabilities"].shape == (5, 3)
    np.testing.assert_allclose(served["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert served["class_id"].dtype == np.int64


def test_missing_modalities_are_absent(client, tmp_path):
    inputs = helpers.make_inputs(3, seed=1)
    image_path = tmp_path / "x.png"
    image_path.write_bytes(inputs["image"][0])
    outputs = client.predict(images=[str(image_path), None, ""], texts=["a red cat", "", None])
    np.testing.assert_array_equal(outputs["image_present"], [1, 0, 0])
    np.testing.assert_array_equal(outputs["text_present"], [1, 0, 0])
    np.testing.assert_array_equal(outputs["audio_present"], [0, 0, 0])
    audio_only = client.predict(audios=inputs["audio"])
    np.testing.assert_array_equal(audio_only["audio_present"], [1, 1, 1])
    np.testing.assert_array_equal(audio_only["image_present"], [0, 0, 0])


def test_versions_and_labels(client):
    inputs = helpers.make_inputs(2, seed=5)
    kwargs = {"images": inputs["image"], "texts": inputs["text"]}
    latest = client.predict(**kwargs)["probabilities"]
    v1 = client.predict(version=1, **kwargs)["probabilities"]
    v2 = client.predict(version=2, **kwargs)["probabilities"]
    np.testing.assert_allclose(latest, v2)
    assert not np.allclose(v1, v2)
    np.testing.assert_allclose(client.predict(version_label="stable", **kwargs)["probabilities"], v1)
    np.testing.assert_allclose(client.predict(version_label="canary", **kwargs)["probabilities"], v2)


def test_model_spec_in_response_and_output_filter(stub):
    request = predict_pb2.PredictRequest(output_filter=["class_name"])
    request.model_spec.name = "m"
    request.model_spec.version_label = "stable"
    for name, values in helpers.make_inputs(2).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.string))
    response = stub.Predict(request, timeout=20)
    assert list(response.outputs) == ["class_name"]
    assert (response.model_spec.name, response.model_spec.version.value) == ("m", 1)
    assert response.model_spec.signature_name == "serving_default"


def test_subset_model_takes_only_its_modalities(server, caplog):
    inputs = helpers.make_inputs(2)
    with Client(server.grpc_target, "imgtext") as c, caplog.at_level(logging.WARNING):
        outputs = c.predict(images=inputs["image"], texts=inputs["text"], audios=inputs["audio"])
    assert "audio_present" not in outputs
    assert outputs["probabilities"].shape == (2, 3)
    assert "ignoring" in caplog.text


def test_client_splits_large_batches(server):
    inputs = helpers.make_inputs(11, seed=2)
    with (
        Client(server.grpc_target, "m", max_batch=4) as small,
        Client(server.grpc_target, "m", max_batch=64) as big,
    ):
        split = small.predict(images=inputs["image"], texts=inputs["text"], audios=inputs["audio"])
        whole = big.predict(images=inputs["image"], texts=inputs["text"], audios=inputs["audio"])
    assert set(split) == set(whole)
    np.testing.assert_allclose(split["probabilities"], whole["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(split["class_name"], whole["class_name"])


def test_classify_matches_predict(client):
    inputs = helpers.make_inputs(4, seed=9, absent=("audio",))
    examples = helpers.serialized_examples(inputs)
    result = client.classify(examples)
    assert result["classes"].tolist() == [list(helpers.CLASS_NAMES)] * 4
    predicted = client.predict(images=inputs["image"], texts=inputs["text"])["probabilities"]
    np.testing.assert_allclose(result["scores"], predicted, atol=1e-5)
    # A context supplies features shared by every example; the example's own win.
    context = tf.train.Example.FromString(helpers.serialized_examples({"text": [inputs["text"][0]]})[0])
    images_only = helpers.serialized_examples({"image": inputs["image"]})
    with_context = client.classify(images_only, context=context)
    expected = client.predict(images=inputs["image"], texts=[inputs["text"][0]] * 4)["probabilities"]
    np.testing.assert_allclose(with_context["scores"], expected, atol=1e-5)


def test_metadata_has_signatures_and_classify_method(client):
    signatures = client.metadata()
    assert {"serving_default", "classify", "predict_examples", "predict_features"} <= set(signatures)
    assert signatures["classify"].method_name == "tensorflow/serving/classify"
    assert set(signatures["serving_default"].inputs) == {"image", "text", "audio"}
    assert signatures["serving_default"].outputs["probabilities"].dtype == tf.float32.as_datatype_enum
    assert set(client.metadata(version_label="stable")) == set(signatures)


def test_status(client):
    assert [(s["version"], s["state"], s["error_code"]) for s in client.status()] == [
        (2, "AVAILABLE", "OK"),
        (1, "AVAILABLE", "OK"),
    ]
    # TF Serving's GetModelStatus ignores version_label: every version is listed.
    assert [s["version"] for s in client.status(version_label="stable")] == [2, 1]
    assert [s["version"] for s in client.status(version_label="no-such-label")] == [2, 1]
    assert client.status(version=2)[0]["state"] == "AVAILABLE"


def test_other_signatures(client):
    inputs = helpers.make_inputs(3, seed=4)
    raw = client.predict(images=inputs["image"], texts=inputs["text"], audios=inputs["audio"])
    examples = np.array(helpers.serialized_examples(inputs), dtype=object)
    from_examples = client.predict_tensors({"examples": examples}, signature_name="predict_examples")
    np.testing.assert_allclose(from_examples["probabilities"], raw["probabilities"], atol=1e-5)
    specs = client.metadata()["predict_features"].inputs
    rng = np.random.default_rng(0)
    feeds = {}
    for name, info in specs.items():
        shape = [3] + [d.size for d in info.tensor_shape.dim[1:]]
        dtype = tf.dtypes.as_dtype(info.dtype).as_numpy_dtype
        feeds[name] = rng.integers(0, 5, shape).astype(dtype)
    outputs = client.predict_tensors(feeds, signature_name="predict_features")
    assert outputs["probabilities"].shape == (3, 3)


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        ({"version": 7}, grpc.StatusCode.NOT_FOUND, "Specific(m, 7)"),
        # TF Serving's codes: ServerCore (label), predict_util.cc (signature).
        (
            {"version_label": "nope"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Unrecognized servable version label: nope",
        ),
        (
            {"signature_name": "nope"},
            grpc.StatusCode.FAILED_PRECONDITION,
            'Serving signature key "nope" not found',
        ),
    ],
)
def test_unknown_version_or_signature(client, kwargs, code, message):
    error = _code(client.predict_tensors, {"image": np.array([b""], dtype=object)}, **kwargs)
    assert error.code() == code
    assert message in error.details()


def test_classify_unknown_signature_is_invalid_argument(client):
    examples = helpers.serialized_examples(helpers.make_inputs(1))
    error = _code(client.classify, examples, signature_name="nope")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'signature key "nope" not found' in error.details()


def test_unknown_model_not_found(server):
    with Client(server.grpc_target, "nope") as c:
        assert (
            _code(c.predict_tensors, {"image": np.array([b""], dtype=object)}).code()
            == grpc.StatusCode.NOT_FOUND
        )
        assert _code(c.status).code() == grpc.StatusCode.NOT_FOUND
        assert _code(c.metadata).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"image": [b""], "text": [b""]}, "Missing but required: {audio}"),
        ({"image": [b""], "text": [b""], "audio": [b""], "video": [b""]}, "not found in signature: video"),
        (
            {"image": np.zeros(1, np.float32), "text": [b""], "audio": [b""]},
            "input 'image': expected dtype string, got float",
        ),
        ({"image": [[b""]], "text": [[b""]], "audio": [[b""]]}, "expected shape [-1]"),
        (
            {"image": [b"not an image"], "text": [b""], "audio": [b""]},
            "image: not a PNG, JPEG, GIF or BMP file",
        ),
        ({"image": [b""], "text": [b"\xff\xfe"], "audio": [b""]}, "text: not valid UTF-8"),
        (
            {"image": [b""], "text": [b""], "audio": [helpers.wav_bytes(sample_rate=8000)]},
            "audio: sample rate",
        ),
    ],
)
def test_invalid_argument(client, feeds, message):
    arrays = {k: np.array(v, dtype=object) if not isinstance(v, np.ndarray) else v for k, v in feeds.items()}
    error = _code(client.predict_tensors, arrays)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_wrong_rpc_for_signature(client, stub):
    error = _code(
        client.classify, helpers.serialized_examples(helpers.make_inputs(1)), signature_name="serving_default"
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensorflow/serving/classify" in error.details()
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "m"
    assert _code(stub.GetModelMetadata, request, timeout=5).code() == grpc.StatusCode.INVALID_ARGUMENT
    request.metadata_field.append("bogus")
    assert _code(stub.GetModelMetadata, request, timeout=5).code() == grpc.StatusCode.INVALID_ARGUMENT
    multi = inference_pb2.MultiInferenceRequest()
    error = _code(stub.MultiInference, multi, timeout=5)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Expected at least one task")


def test_expired_deadline_is_deadline_exceeded(client, stub):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    for name, values in helpers.make_inputs(64).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.string))
    error = _code(stub.Predict, request, timeout=0.001)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.predict(texts=["still fine"])["probabilities"].shape == (1, 3)


def test_busy_port_is_an_error(server, tmp_path):
    second = ModelServer([ModelSpec("x", str(tmp_path))], port=server.port, rest_api_port=None)
    with pytest.raises(OSError, match="cannot bind"):
        second.start()
