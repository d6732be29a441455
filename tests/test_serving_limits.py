"""Bounded resources per request: REST worker pool, backlog and deadline; row limit; batch splitting."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import serving_helpers as helpers
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from multimodal_tf.compat import tf
from multimodal_tf.serving import ModelServer, ModelSpec
from multimodal_tf.serving import config as config_lib
from multimodal_tf.serving.config import BatchingOptions
from multimodal_tf.serving.local import LocalModel
from multimodal_tf.serving.rest import RestServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("limit_models")
    helpers.make_test_savedmodel(base, "m", 1)
    specs = [ModelSpec("m", str(base / "m"))]
    with ModelServer(
        specs, port=0, rest_api_port=0, file_system_poll_wait_seconds=0, max_request_rows=16
    ) as running:
        running.local = LocalModel(base / "m" / "1")
        yield running


@pytest.fixture()
def small_rest(server):
    """A second REST listener on the same service: 2 workers, 2 queued, a 1 s request deadline."""
    rest = RestServer(
        server.service,
        "127.0.0.1",
        0,
        server.metrics,
        None,
        1 << 20,
        num_workers=2,
        max_queued=2,
        request_deadline_seconds=1.0,
    )
    rest.start()
    yield rest
    rest.stop(0)


def _predict_json(port: int, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    connection.request("POST", "/v1/models/m:predict", body=body, headers=headers or {})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


# === REST listener ===


def test_rest_listener_has_a_realistic_backlog(server):
    # `ss` shows a listening socket's backlog in Send-Q; http.server's default is 5.
    try:
        lines = subprocess.run(
            ["ss", "-ltnH", f"sport = :{server.rest_api_port}"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("ss is not available")
    backlog = int(lines[2])
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    assert backlog == min(1024, somaxconn) and backlog >= 128


def test_connections_are_served_by_a_bounded_pool(small_rest):
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", small_rest.port), timeout=5) for _ in range(12)]
    try:
        time.sleep(0.3)
        # 2 queued (+ up to 2 already taken by the workers) hold their connections;
        # the others are refused with a 503 at once.
        refused = 0
        for sock in idle:
            sock.settimeout(0.5)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if data.startswith(b"HTTP/1.1 503"):
                refused += 1
                assert b"server overloaded" in data
        assert 8 <= refused <= 10
        assert threading.active_count() <= before  # no thread per connection
    finally:
        for sock in idle:
            sock.close()


def test_slow_sender_is_cut_off_at_the_request_deadline(small_rest):
    sock = socket.create_connection(("127.0.0.1", small_rest.port), timeout=10)
    request = b"POST /v1/models/m:predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"{" * 100
    started, sent, closed = time.monotonic(), 0, False
    try:
        while time.monotonic() - started < 6 and sent < len(request):
            try:
                sock.sendall(request[sent : sent + 1])  # one byte every 0.2 s: every recv is "fast"
                sent += 1
                sock.settimeout(0.2)
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                closed = True
                break
    finally:
        sock.close()
    assert closed, "the server kept reading a request that missed its deadline"
    assert time.monotonic() - started < 4  # deadline 1 s, watchdog granularity, slow CI


def test_deeply_nested_json_is_400_with_one_log_line(server, caplog):
    nested = "[" * 900 + '""' + "]" * 900
    body = ('{"inputs": {"image": [""], "audio": [""], "text": ' + nested + "}}").encode()
    with caplog.at_level(logging.INFO, logger="multimodal_tf"):
        status, payload = _predict_json(server.rest_api_port, body)
    assert status == 400
    assert "nested more than" in payload["error"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_chunked_request_body_is_accepted(server):
    inputs = helpers.make_inputs(2, seed=3)
    body = json.dumps({"instances": [{"text": t.decode(), "image": "", "audio": ""} for t in inputs["text"]]})
    data = body.encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + 50]), data[i : i + 50]) for i in range(0, len(data), 50)
    )
    status, payload = _predict_json(
        server.rest_api_port, chunks + b"0\r\n\r\n", {"Transfer-Encoding": "chunked"}
    )
    assert status == 200, payload
    expected = server.local.predict(texts=[t.decode() for t in inputs["text"]])["probabilities"]
    np.testing.assert_allclose([p["probabilities"] for p in payload["predictions"]], expected, atol=1e-5)


# === Rows per request ===


def _one_value_tensor(rows: int) -> tensor_pb2.TensorProto:
    """One string declared with shape [rows]: TF would repeat it ``rows`` times."""
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=rows)]
        ),
        string_val=[b"a red cat"],
    )


def test_row_limit_rejects_before_expanding(server):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["text"].CopyFrom(_one_value_tensor(10_000_000))
    assert request.ByteSize() < 100  # the 73-byte attack of the issue, with 10 M rows
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'text' has 10000000 rows; the limit per request is 16" in error.value.details()


def test_row_limit_applies_to_rest_and_classify(server):
    instances = [{"text": "a", "image": "", "audio": ""}] * 17
    status, payload = _predict_json(server.rest_api_port, json.dumps({"instances": instances}).encode())
    assert status == 400 and "has 17 rows; the limit per request is 16" in payload["error"]
    examples = [{"text": "a"}] * 17
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=20)
    connection.request(
        "POST", "/v1/models/m:classify", body=json.dumps({"signature_name": "classify", "examples": examples})
    )
    response = connection.getresponse()
    assert response.status == 400 and "17 rows" in json.loads(response.read())["error"]
    connection.close()


def test_row_limit_defaults_to_max_batch_size(tmp_path):
    helpers.make_test_savedmodel(tmp_path, "m", 1)
    batching = BatchingOptions(max_batch_size=8, num_batch_threads=1)
    server = ModelServer([ModelSpec("m", str(tmp_path / "m"))], port=0, rest_api_port=None, batching=batching)
    assert server.service.max_rows == 8
    plain = ModelServer([ModelSpec("m", str(tmp_path / "m"))], port=0, rest_api_port=None)
    assert plain.service.max_rows == 1024


# === Large batch splitting ===


def test_batching_parameters_accept_large_batch_splitting():
    options = config_lib.parse_batching_parameters(
        "max_batch_size { value: 64 } enable_large_batch_splitting { value: true } "
        "max_execution_batch_size { value: 8 } allowed_batch_sizes: 4 allowed_batch_sizes: 8"
    )
    assert (options.enable_large_batch_splitting, options.execution_batch_size) == (True, 8)
    with pytest.raises(config_lib.ServingConfigError, match="max_execution_batch_size"):
        BatchingOptions(max_batch_size=8, enable_large_batch_splitting=True, max_execution_batch_size=9)


@pytest.mark.parametrize("splitting", [True, False])
def test_oversize_request_is_split_into_execution_batches(tmp_path, splitting):
    helpers.make_test_savedmodel(tmp_path, "m", 1)
    batching = BatchingOptions(
        max_batch_size=32 if splitting else 8,
        batch_timeout_micros=1000,
        num_batch_threads=1,
        enable_large_batch_splitting=splitting,
        max_execution_batch_size=8 if splitting else None,
    )
    inputs = helpers.make_inputs(20, seed=5)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    for name, values in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.string))
    with (
        ModelServer(
            [ModelSpec("m", str(tmp_path / "m"))],
            port=0,
            rest_api_port=None,
            batching=batching,
            max_request_rows=100,  # so the batcher's own limit is what answers
        ) as server,
        grpc.insecure_channel(server.grpc_target) as channel,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        if not splitting:  # TF Serving: a task over max_batch_size is refused
            with pytest.raises(grpc.RpcError) as error:
                stub.Predict(request, timeout=60)
            assert "Task size 20 is larger than maximum input batch size 8" in error.value.details()
            return
        response = stub.Predict(request, timeout=60)
        runs = server.metrics.counter("model_runs", model_name="m")
    expected = LocalModel(tmp_path / "m" / "1").predict(
        images=inputs["image"], texts=inputs["text"], audios=inputs["audio"]
    )["probabilities"]
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), expected, atol=1e-5)
    assert runs == 3  # 8 + 8 + 4 rows (warmup replays outside the metrics)


# === Memory after a large request ===


@pytest.mark.slow
def test_rss_returns_after_a_large_request():
    """benchmarks/serving_rss.py: before the fix RSS stayed ~1.3 GB above the start (1000 rows, 512 px)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serving_rss.py"
    command = [sys.executable, str(script), "--rows", "1000", "--image-size", "512", "--repeats", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert max(numbers["rss_after_mib"]) < numbers["rss_before_mib"] + 300, numbers
