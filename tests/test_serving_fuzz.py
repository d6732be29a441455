"""Fuzz: thousands of malformed requests, each answered with a proper client-error status.

No client mistake may come back UNKNOWN or INTERNAL (TF Serving answers them
INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED), and the server must serve
correctly afterwards.
"""

from __future__ import annotations

import http.client
import json
from concurrent import futures

import grpc
import numpy as np
import pytest
import serving_helpers as helpers
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
)

from multimodal_tf.compat import tf
from multimodal_tf.serving import Client, ModelServer, ModelSpec

C = grpc.StatusCode
MAX_MESSAGE_BYTES = 256 << 10
NUM_GRPC_CASES = 2400
NUM_REST_CASES = 400
MODALITIES = ("image", "text", "audio")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz_models")
    helpers.make_test_savedmodel(base, "m", 1)
    specs = [ModelSpec("m", str(base / "m"), version_labels=(("stable", 1),))]
    with ModelServer(
        specs,
        port=0,
        rest_api_port=0,
        grpc_max_message_bytes=MAX_MESSAGE_BYTES,
        file_system_poll_wait_seconds=0,
        metrics_path="/metrics",
    ) as s:
        yield s


class _Cases:
    """Builds one malformed (or merely unusual) request: (method name, request, allowed codes)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.valid = helpers.make_inputs(4, seed=seed)

    def _bytes(self, size: int) -> bytes:
        return self.rng.integers(0, 256, size, dtype=np.uint8).tobytes()

    def _mutate(self, data: bytes) -> bytes:
        data = bytearray(data)
        choice = self.rng.integers(4)
        if choice == 0:
            return bytes(data[: self.rng.integers(len(data))])  # truncated
        if choice == 1:
            for index in self.rng.integers(0, len(data), 1 + self.rng.integers(8)):
                data[index] ^= 1 << self.rng.integers(8)  # bit flips
            return bytes(data)
        if choice == 2:
            return bytes(data[:4]) + self._bytes(self.rng.integers(1, 200))  # right header, garbage body
        return self._bytes(self.rng.integers(0, 300))

    def _predict(self, inputs: dict, **spec) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = spec.get("name", "m")
        for key in ("signature_name", "version_label"):
            if key in spec:
                setattr(request.model_spec, key, spec[key])
        if "version" in spec:
            request.model_spec.version.value = spec["version"]
        for key, value in inputs.items():
            proto = value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
            request.inputs[key].CopyFrom(proto)
        return request

    def _strings(self, size: int = 2, absent=()) -> dict:
        return {
            m: np.array([b"" if m in absent else self.valid[m][i] for i in range(size)], dtype=object)
            for m in MODALITIES
        }

    def content(self):
        inputs = self._strings()
        field = MODALITIES[self.rng.integers(3)]
        inputs[field] = np.array([self._mutate(v) for v in inputs[field]], dtype=object)
        return "Predict", self._predict(inputs), {C.OK, C.INVALID_ARGUMENT}

    def dtype(self):
        inputs = self._strings()
        dtype = [np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_, np.float16][
            self.rng.integers(7)
        ]
        inputs[MODALITIES[self.rng.integers(3)]] = self.rng.integers(0, 2, 2).astype(dtype)
        return "Predict", self._predict(inputs), {C.INVALID_ARGUMENT}

    def shape(self):
        inputs = self._strings()
        field = MODALITIES[self.rng.integers(3)]
        shapes = [(), (2, 1), (1, 2, 1), (2, 2)]
        shape = shapes[self.rng.integers(len(shapes))]
        inputs[field] = np.full(shape, b"", dtype=object)
        return "Predict", self._predict(inputs), {C.INVALID_ARGUMENT}

    def batch_sizes(self):
        inputs = self._strings(3)
        inputs[MODALITIES[self.rng.integers(3)]] = self._strings(int(self.rng.integers(0, 3)))["image"]
        return "Predict", self._predict(inputs), {C.INVALID_ARGUMENT}

    def empty_batch(self):
        return "Predict", self._predict({m: np.array([], dtype=object) for m in MODALITIES}), {C.OK}

    def tensor_proto(self):
        inputs = self._strings()
        proto = tf.make_tensor_proto(inputs["text"])
        kind = self.rng.integers(5)
        if kind == 0:
            proto.dtype = int(
                self.rng.choice([0, 20, 21, 30, 99, 1000])
            )  # invalid, resource, variant, unknown
        elif kind == 1:
            proto.tensor_shape.dim[0].size = -int(self.rng.integers(1, 5))
        elif kind == 2:
            proto.tensor_shape.dim[0].size = int(2 ** self.rng.integers(33, 62))
        elif kind == 3:
            proto = tf.make_tensor_proto(np.zeros(3, np.float32))
            proto.tensor_content = self._bytes(int(self.rng.integers(1, 11)) + 12)
        else:
            proto.string_val.extend([b"x"] * int(self.rng.integers(1, 4)))
        inputs["text"] = proto
        return "Predict", self._predict(inputs), {C.INVALID_ARGUMENT}

    def names(self):
        word = "".join(chr(c) for c in self.rng.integers(97, 123, int(self.rng.integers(1, 10))))
        inputs = self._strings(1)
        cases = [
            ({"name": word + "x"}, C.NOT_FOUND),
            ({"version": int(self.rng.integers(2, 2**40))}, C.NOT_FOUND),
            ({"version_label": word}, C.INVALID_ARGUMENT),  # TF Serving's codes
            ({"signature_name": word}, C.FAILED_PRECONDITION),
            ({"name": ""}, C.INVALID_ARGUMENT),
        ]
        spec, code = cases[self.rng.integers(len(cases))]
        if self.rng.random() < 0.3:
            inputs[word] = inputs["text"]
            return "Predict", self._predict(inputs), {C.INVALID_ARGUMENT}
        return "Predict", self._predict(inputs, **spec), {code}

    def oversized(self):
        inputs = self._strings(1)
        inputs[MODALITIES[self.rng.integers(3)]] = np.array(
            [self._bytes(MAX_MESSAGE_BYTES + 1024)], dtype=object
        )
        return "Predict", self._predict(inputs), {C.RESOURCE_EXHAUSTED}

    def raw_bytes(self):
        method = ["Predict", "Classify", "GetModelMetadata", "GetModelStatus"][self.rng.integers(4)]
        return method, self._bytes(int(self.rng.integers(0, 200))), {C.INVALID_ARGUMENT, C.NOT_FOUND}

    def classify(self):
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name = "m"
        request.model_spec.signature_name = ["classify", "serving_default", ""][self.rng.integers(3)]
        kind = self.rng.integers(3)
        if kind == 1:
            features = {
                m: tf.train.Feature(bytes_list=tf.train.BytesList(value=[self._mutate(self.valid[m][0])]))
                for m in MODALITIES
            }
            request.input.example_list.examples.add().features.CopyFrom(tf.train.Features(feature=features))
        elif kind == 2:
            feature = tf.train.Feature(float_list=tf.train.FloatList(value=[1.0, 2.0]))  # wrong feature type
            request.input.example_list_with_context.context.features.feature["image"].CopyFrom(feature)
            request.input.example_list_with_context.examples.add()
        return "Classify", request, {C.OK, C.INVALID_ARGUMENT}

    def metadata(self):
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = "m"
        request.metadata_field.extend(
            ["signature_def", "x" * int(self.rng.integers(1, 5))][: self.rng.integers(3)]
        )
        if len(request.metadata_field) == 1:
            request.metadata_field[0] = "bogus"
        return "GetModelMetadata", request, {C.INVALID_ARGUMENT}

    def output_filter(self):
        request = self._predict(self._strings(1, absent=("image", "audio")))
        request.output_filter.extend(["probabilities", "nope"])
        return "Predict", request, {C.INVALID_ARGUMENT}

    def next(self):
        makers = [
            self.content,
            self.dtype,
            self.shape,
            self.batch_sizes,
            self.empty_batch,
            self.tensor_proto,
            self.names,
            self.oversized,
            self.raw_bytes,
            self.classify,
            self.metadata,
            self.output_filter,
        ]
        weights = np.array([6, 2, 2, 2, 1, 3, 3, 1, 2, 2, 1, 1], dtype=float)
        return makers[self.rng.choice(len(makers), p=weights / weights.sum())]()


def _send(channel: grpc.Channel, method: str, request) -> grpc.StatusCode:
    service = "ModelService" if method == "GetModelStatus" else "PredictionService"
    call = channel.unary_unary(
        f"/tensorflow.serving.{service}/{method}",
        request_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
        response_deserializer=None,
    )
    try:
        call(request, timeout=30)
        return C.OK
    except grpc.RpcError as e:
        return e.code()


def test_grpc_fuzz(server):
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with Client(server.grpc_target, "m") as client:
        reference = client.predict(texts=["a red cat"])["probabilities"]

    def run(seed: int) -> list[str]:
        cases, failures = _Cases(seed), []
        with grpc.insecure_channel(server.grpc_target, options=options) as channel:
            for index in range(NUM_GRPC_CASES // 4):
                method, request, allowed = cases.next()
                code = _send(channel, method, request)
                if code not in allowed:
                    failures.append(
                        f"seed {seed} case {index} {method}: got {code.name}, allowed {sorted(c.name for c in allowed)}"
                    )
        return failures

    with futures.ThreadPoolExecutor(4) as pool:
        failures = [f for result in pool.map(run, range(4)) for f in result]
    assert failures == [], "\n".join(failures[:20])

    with Client(server.grpc_target, "m") as client:  # still healthy, same answers
        assert client.status()[0]["state"] == "AVAILABLE"
        np.testing.assert_allclose(client.predict(texts=["a red cat"])["probabilities"], reference, atol=1e-6)
        stub = model_service_pb2_grpc.ModelServiceStub(client._channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "m"
        assert stub.GetModelStatus(request, timeout=5).model_version_status[0].version == 1
    assert server.metrics.counter("request_count", status="INVALID_ARGUMENT") > 500
    assert server.metrics.counter("request_count", status="INTERNAL") == 0
    assert server.metrics.counter("request_count", status="UNKNOWN") == 0


def _random_json(rng, depth: int = 0):
    kind = rng.integers(7 if depth < 3 else 4)
    if kind == 0:
        return int(rng.integers(-(2**40), 2**40))
    if kind == 1:
        return "".join(chr(c) for c in rng.integers(32, 0x2FF, int(rng.integers(0, 8))))
    if kind == 2:
        return [None, True, 1.5, {"b64": "!!"}][rng.integers(4)]
    if kind == 3:
        return {"b64": "aGVsbG8="}
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    return _random_object(rng, depth)


def _random_object(rng, depth: int = 0) -> dict:
    keys = ["image", "text", "audio", "instances", "inputs", "examples", "signature_name", "context", "x"]
    return {keys[rng.integers(len(keys))]: _random_json(rng, depth + 1) for _ in range(rng.integers(0, 4))}


def test_rest_fuzz(server):
    rng = np.random.default_rng(0)
    paths = [
        "/v1/models/m:predict",
        "/v1/models/m:classify",
        "/v1/models/m:regress",
        "/v1/models/m/versions/1:predict",
        "/v1/models/m/labels/stable:classify",
        "/v1/models/nope:predict",
        "/v1/models/m/versions/99999999999999999999:predict",
        "/v1/models/m",
        "/v1/models/m/metadata",
        "/v1/models//x",
        "/v1/models/m:explode",
        "/metrics?x=1",
    ]
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=30)
    failures = []
    for index in range(NUM_REST_CASES):
        path = paths[rng.integers(len(paths))]
        if rng.random() < 0.2:
            body = rng.integers(0, 256, int(rng.integers(0, 100)), dtype=np.uint8).tobytes()
        else:
            document = {"instances": [_random_json(rng) for _ in range(rng.integers(0, 3))]}
            document.update(_random_object(rng) if rng.random() < 0.5 else {})
            body = json.dumps(document).encode()
        method = "POST" if ":" in path or rng.random() < 0.1 else "GET"
        connection.request(method, path, body=body if method == "POST" else None)
        response = connection.getresponse()
        payload = response.read()
        if response.status >= 500 or (response.status != 200 and "error" not in json.loads(payload)):
            failures.append(
                f"case {index}: {method} {path} {body[:80]!r} -> {response.status} {payload[:200]!r}"
            )
    connection.close()
    assert failures == [], "\n".join(failures[:20])


def test_case_mix_covers_every_kind():
    cases = _Cases(0)
    seen = {}
    for _ in range(400):
        method, _, allowed = cases.next()
        seen[method] = seen.get(method, 0) + 1
    assert set(seen) == {"Predict", "Classify", "GetModelMetadata", "GetModelStatus"}
