"""Where TF Serving's behaviour is easy to get subtly wrong: each test pins one of its answers.

The expected codes and formats are TF Serving's (predict_util.cc,
get_model_status_impl.cc, multi_inference.cc, http_rest_api_handler.cc,
json_tensor.cc); serving/README.md lists what still differs and why.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket

import grpc
import numpy as np
import pytest
import serving_helpers as helpers
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from multimodal_tf.compat import tf
from multimodal_tf.serving import ModelServer, ModelSpec
from multimodal_tf.serving.local import LocalModel


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("parity_models")
    helpers.make_test_savedmodel(base, "m", 1)
    with ModelServer(
        [ModelSpec("m", str(base / "m"))], port=0, rest_api_port=0, file_system_poll_wait_seconds=0
    ) as running:
        running.local = LocalModel(base / "m" / "1")
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _http(server, method: str, path: str, body: bytes | None = None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=20)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response, data


def _raw_http(server, request: bytes) -> tuple[int, str, dict]:
    with socket.create_connection(("127.0.0.1", server.rest_api_port), timeout=20) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.getheader("Content-Type"), json.loads(response.read())


def _predict_request(**spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    for key, value in spec.items():
        setattr(request.model_spec, key, value)
    for name, values in helpers.make_inputs(2, seed=2).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.string))
    return request


# === gRPC ===


def test_numeric_outputs_use_typed_fields(stub, server):
    response = stub.Predict(_predict_request(), timeout=30)
    probabilities = response.outputs["probabilities"]
    assert probabilities.tensor_content == b"" and len(probabilities.float_val) == 6
    assert response.outputs["class_id"].dtype == tf.int64.as_datatype_enum
    assert len(response.outputs["class_id"].int64_val) == 2
    assert len(response.outputs["class_name"].string_val) == 2
    inputs = helpers.make_inputs(2, seed=2)
    expected = server.local.predict(images=inputs["image"], texts=inputs["text"], audios=inputs["audio"])
    np.testing.assert_allclose(
        np.reshape(probabilities.float_val, (2, 3)), expected["probabilities"], atol=1e-5
    )


def test_duplicate_output_filter_is_rejected(stub):
    request = _predict_request()
    request.output_filter.extend(["probabilities", "probabilities"])
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "duplicate output tensor alias" in error.value.details()


def test_get_model_status_with_empty_name_is_not_found(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_multi_inference_runs_classify_tasks(stub):
    examples = helpers.serialized_examples(helpers.make_inputs(3, seed=6))
    request = inference_pb2.MultiInferenceRequest()
    request.input.example_list.examples.extend(tf.train.Example.FromString(e) for e in examples)
    task = request.tasks.add(method_name="tensorflow/serving/classify")
    task.model_spec.name, task.model_spec.signature_name = "m", "classify"
    response = stub.MultiInference(request, timeout=30)
    classify = classification_pb2.ClassificationRequest(input=request.input)
    classify.model_spec.name, classify.model_spec.signature_name = "m", "classify"
    expected = stub.Classify(classify, timeout=30)
    assert len(response.results) == 1
    assert response.results[0].classification_result == expected.result
    assert response.results[0].model_spec.version.value == 1
    request.tasks.add().CopyFrom(request.tasks[0])
    with pytest.raises(grpc.RpcError) as error:
        stub.MultiInference(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Duplicate evaluation of signature: classify" in error.value.details()


# === REST ===


def test_routes_match_like_tf_serving(server):
    response, data = _http(server, "GET", "/V1/MODELS/m/VERSIONS/1")  # (?i): case-insensitive
    assert response.status == 200 and json.loads(data)["model_version_status"][0]["version"] == "1"
    for method, path, message in [
        ("GET", "/v1/models/m/", "Malformed request"),  # RE2::FullMatch: no trailing slash
        ("POST", "/v1/models/m:PREDICT", "Malformed request"),  # the verb itself is lower case
        ("GET", "/v1/models/m/versions/x", "Malformed request"),
        ("GET", "/v1/models", "Missing model name"),
    ]:
        response, data = _http(server, method, path, b"{}" if method == "POST" else None)
        assert response.status == 400, (path, data)
        assert message in json.loads(data)["error"]


def test_http_level_errors_have_json_bodies(server):
    long_line = b"GET /v1/models/" + b"m" * 70_000 + b" HTTP/1.1\r\n\r\n"
    too_many_headers = b"GET /v1/models/m HTTP/1.1\r\n" + b"X-A: b\r\n" * 120 + b"\r\n"
    unsupported = b"PUT /v1/models/m HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    for raw, code in [(long_line, 414), (too_many_headers, 431), (unsupported, 501)]:
        status, content_type, payload = _raw_http(server, raw)
        assert (status, content_type) == (code, "application/json")
        assert payload["error"]


def test_cors_preflight(server):
    headers = {"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}
    response, _ = _http(server, "OPTIONS", "/v1/models/m:predict", headers=headers)
    assert response.status == 200
    assert response.getheader("Access-Control-Allow-Origin") == "*"
    assert "POST" in response.getheader("Access-Control-Allow-Methods")


def _predict_image(server, b64: str) -> tuple[int, dict]:
    body = {"instances": [{"image": {"b64": b64}, "text": "a red cat", "audio": ""}]}
    response, data = _http(server, "POST", "/v1/models/m:predict", json.dumps(body).encode())
    return response.status, json.loads(data)


def test_base64_as_absl_accepts_it(server):
    png = next(p for p in (helpers.png_bytes(seed=1, size=n) for n in range(16, 40)) if len(p) % 3)
    encoded = base64.b64encode(png).decode()
    assert encoded.endswith("=")
    status, padded = _predict_image(server, encoded)
    assert status == 200
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    for variant in (encoded.rstrip("="), wrapped):
        assert _predict_image(server, variant) == (200, padded)
    assert _predict_image(server, "not base64!")[0] == 400


def test_columnar_inputs_ignore_extra_keys(server):
    body = {"inputs": {"image": [""], "text": ["a red cat"], "audio": [""], "unused": [1, 2]}}
    response, data = _http(server, "POST", "/v1/models/m:predict", json.dumps(body).encode())
    assert response.status == 200, data
    expected = server.local.predict(texts=["a red cat"])["probabilities"]
    np.testing.assert_allclose(json.loads(data)["outputs"]["probabilities"], expected, atol=1e-5)


def test_metadata_json_keeps_default_valued_fields(server):
    response, data = _http(server, "GET", "/v1/models/m/metadata")
    signatures = json.loads(data)["metadata"]["signature_def"]["signature_def"]
    image = signatures["serving_default"]["inputs"]["image"]
    assert image["tensor_shape"]["unknown_rank"] is False  # a default value, printed as TF Serving does
    assert "method_name" in signatures["serving_default"]
