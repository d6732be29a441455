"""REST API routes, JSON formats and HTTP error codes, plus the Prometheus endpoint."""

from __future__ import annotations

import base64
import http.client
import json

import numpy as np
import pytest
import serving_helpers as helpers

from multimodal_tf.serving import Client, ModelServer, ModelSpec

METRICS = "/monitoring/prometheus/metrics"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("rest_models")
    helpers.make_test_savedmodel(base, "m", 1, seed=0)
    helpers.make_test_savedmodel(base, "m", 2, seed=1)
    specs = [ModelSpec("m", str(base / "m"), policy="all", version_labels=(("stable", 1),))]
    with ModelServer(
        specs, port=0, rest_api_port=0, metrics_path=METRICS, file_system_poll_wait_seconds=0
    ) as s:
        yield s


def _request(server, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict | str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=20)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(text)
    return response.status, text


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def _instances(inputs: dict[str, list[bytes]]) -> list[dict]:
    count = len(inputs["image"])
    return [
        {
            "image": _b64(inputs["image"][i]),
            "text": inputs["text"][i].decode(),
            "audio": _b64(inputs["audio"][i]),
        }
        for i in range(count)
    ]


def test_status_routes(server):
    status, body = _request(server, "GET", "/v1/models/m")
    assert status == 200
    assert body["model_version_status"][0] == {
        "version": "2",
        "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }
    assert _request(server, "GET", "/v1/models/m/versions/1")[1]["model_version_status"][0]["version"] == "1"
    # TF Serving's GetModelStatus ignores the label: every version is listed.
    labelled = _request(server, "GET", "/v1/models/m/labels/stable")[1]["model_version_status"]
    assert [s["version"] for s in labelled] == ["2", "1"]


def test_metadata_route(server):
    status, body = _request(server, "GET", "/v1/models/m/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "m", "signature_name": "", "version": "1"}
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert signatures["classify"]["method_name"] == "tensorflow/serving/classify"
    assert signatures["serving_default"]["inputs"]["image"]["dtype"] == "DT_STRING"


def test_predict_row_and_columnar_match_grpc(server):
    inputs = helpers.make_inputs(3, seed=2, absent=("audio",))
    with Client(server.grpc_target, "m") as client:
        expected = client.predict(images=inputs["image"], texts=inputs["text"])
    status, body = _request(server, "POST", "/v1/models/m:predict", {"instances": _instances(inputs)})
    assert status == 200
    rows = body["predictions"]
    assert len(rows) == 3 and rows[0]["audio_present"] == 0.0
    np.testing.assert_allclose([r["probabilities"] for r in rows], expected["probabilities"], atol=1e-6)
    assert [r["class_name"] for r in rows] == [n.decode() for n in expected["class_name"]]
    columnar = {
        "inputs": {
            "image": [_b64(x) for x in inputs["image"]],
            "text": [t.decode() for t in inputs["text"]],
            "audio": ["", "", ""],
        }
    }
    status, body = _request(server, "POST", "/v1/models/m:predict", columnar)
    assert status == 200
    np.testing.assert_allclose(body["outputs"]["probabilities"], expected["probabilities"], atol=1e-6)


def test_predict_versions_labels_and_signature(server):
    body = {"instances": [{"image": "", "text": "a red cat", "audio": ""}]}
    v1 = _request(server, "POST", "/v1/models/m/versions/1:predict", body)[1]["predictions"]
    stable = _request(server, "POST", "/v1/models/m/labels/stable:predict", body)[1]["predictions"]
    latest = _request(server, "POST", "/v1/models/m:predict", body)[1]["predictions"]
    assert v1 == stable and v1 != latest
    examples = helpers.serialized_examples({"text": [b"a red cat"]})
    single_input = {"signature_name": "predict_examples", "instances": [_b64(examples[0])]}
    status, result = _request(server, "POST", "/v1/models/m:predict", single_input)
    assert status == 200
    np.testing.assert_allclose(
        result["predictions"][0]["probabilities"], latest[0]["probabilities"], atol=1e-6
    )


def test_classify_route(server):
    inputs = helpers.make_inputs(2, seed=4)
    examples = [{"image": _b64(inputs["image"][i]), "text": inputs["text"][i].decode()} for i in range(2)]
    status, body = _request(
        server, "POST", "/v1/models/m:classify", {"signature_name": "classify", "examples": examples}
    )
    assert status == 200
    assert [label for label, _ in body["results"][0]] == list(helpers.CLASS_NAMES)
    row = _request(server, "POST", "/v1/models/m:predict", {"instances": _instances(inputs)[:1]})[1]
    # The classify examples had no audio: compare with a predict without audio.
    no_audio = {"instances": [{**_instances(inputs)[0], "audio": ""}]}
    expected = _request(server, "POST", "/v1/models/m:predict", no_audio)[1]["predictions"][0][
        "probabilities"
    ]
    np.testing.assert_allclose([score for _, score in body["results"][0]], expected, atol=1e-5)
    assert row["predictions"][0]["audio_present"] == 1.0
    context = {"signature_name": "classify", "context": {"text": "a red cat"}, "examples": [{"image": ""}]}
    assert _request(server, "POST", "/v1/models/m:classify", context)[0] == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "code", "message"),
    [
        ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
        ("GET", "/v1/models/m/versions/9", None, 404, "Could not find version 9"),
        ("GET", "/v1/models/m/labels/x/metadata", None, 400, "Unrecognized servable version label"),
        ("GET", "/v2/models/m", None, 404, "Malformed request"),
        ("GET", "/v1/models/m:predict", None, 400, "Malformed request"),
        ("POST", "/v1/models/m/versions/9:predict", {"instances": [{"text": ""}]}, 404, "Specific(m, 9)"),
        ("POST", "/v1/models/m:predict", {"signature_name": "x", "instances": [1]}, 400, 'signature key "x"'),
        (
            "POST",
            "/v1/models/m:predict",
            {"instances": [{"text": "", "image": "", "audio": ""}], "inputs": {}},
            400,
            "Only one",
        ),
        ("POST", "/v1/models/m:predict", {"nothing": 1}, 400, "Missing 'inputs' or 'instances'"),
        (
            "POST",
            "/v1/models/m:predict",
            {"instances": [{"text": "", "image": ""}]},
            400,
            "Missing but required: {audio}",
        ),
        (
            "POST",
            "/v1/models/m:predict",
            {"instances": [{"text": 3, "image": "", "audio": ""}]},
            400,
            "expected a string",
        ),
        (
            "POST",
            "/v1/models/m:predict",
            {"instances": [{"text": "", "image": {"b64": "%%"}, "audio": ""}]},
            400,
            "base64",
        ),
        (
            "POST",
            "/v1/models/m:predict",
            {"instances": [{"text": "", "image": "xx", "audio": ""}]},
            400,
            "not a PNG",
        ),
        (
            "POST",
            "/v1/models/m:predict",
            {"inputs": {"text": [[""], ["", ""]], "image": [""], "audio": [""]}},
            400,
            "rectangular",
        ),
        ("POST", "/v1/models/m:predict", {"inputs": {"text": [""]}}, 400, "Missing named input: audio"),
        ("POST", "/v1/models/m:classify", {"examples": []}, 400, "'examples'"),
        (
            "POST",
            "/v1/models/m:classify",
            {"signature_name": "serving_default", "examples": [{}]},
            400,
            "classify",
        ),
        ("POST", "/v1/models/m:regress", {"signature_name": "classify", "examples": [{}]}, 400, "regress"),
    ],
)
def test_errors(server, method, path, body, code, message):
    status, payload = _request(server, method, path, body)
    assert status == code
    assert message in payload["error"]


def test_malformed_and_oversized_bodies(server):
    status, payload = _request(server, "POST", "/v1/models/m:predict", raw=b"{not json")
    assert status == 400 and "JSON Parse error" in payload["error"]
    status, payload = _request(server, "POST", "/v1/models/m:predict", raw=b"[1, 2]")
    assert status == 400
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=10)
    connection.putrequest("POST", "/v1/models/m:predict")
    connection.putheader("Content-Length", str(server.grpc_max_message_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 429 and "exceeds the limit" in json.loads(response.read())["error"]
    connection.close()


def test_metrics_endpoint_counts_requests(server):
    body = {"instances": [{"image": "", "text": "a red cat", "audio": ""}]}
    for _ in range(3):
        _request(server, "POST", "/v1/models/m/versions/1:predict", body)
    _request(
        server,
        "POST",
        "/v1/models/m/versions/1:predict",
        {"instances": [{"image": "x", "text": "", "audio": ""}]},
    )
    status, text = _request(server, "GET", METRICS)
    assert status == 200
    ok = 'model_name="m",model_version="1",signature_name="serving_default",API="predict",status="OK"'
    error = 'model_name="m",model_version="1",signature_name="serving_default",API="predict",status="INVALID_ARGUMENT"'
    counts = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[0] != "#"
    }
    assert counts[":tensorflow:serving:request_count{" + ok + "}"] >= 3
    assert counts[":tensorflow:serving:request_count{" + error + "}"] >= 1
    assert any(k.startswith(":tensorflow:serving:request_latency_bucket{") for k in counts)
    assert "# TYPE :tensorflow:serving:request_latency histogram" in text
