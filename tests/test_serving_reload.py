"""Version policies, hot reload under load, broken versions, config reload, graceful stop."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request

import grpc
import pytest
import serving_helpers as helpers
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from multimodal_tf.compat import tf
from multimodal_tf.serving import Client, ModelServer, ModelSpec
from multimodal_tf.serving.config import BatchingOptions

POLL_SECONDS = 0.5


def _wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _states(client: Client) -> dict[int, str]:
    return {s["version"]: s["state"] for s in client.status()}


def _is_gone(client: Client) -> bool:
    try:
        client.status()
    except grpc.RpcError as e:
        return e.code() == grpc.StatusCode.NOT_FOUND
    return False


def _predict_request(model: str = "m") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for name, values in helpers.make_inputs(1, seed=1).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.string))
    return request


class _Load:
    """Client threads sending Predict (gRPC) and REST requests until stopped (at most 120 s).

    Each thread pauses ``PAUSE_SECONDS`` between requests, so that on a small
    machine loading the next version is not starved of CPU.
    """

    PAUSE_SECONDS = 0.01

    def __init__(self, server: ModelServer, threads: int = 2):
        self.versions: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._server = server
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._grpc_loop, daemon=True) for _ in range(threads)]
        self._threads.append(threading.Thread(target=self._rest_loop, daemon=True))

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _running(self, started: float) -> bool:
        return not self._stop.is_set() and time.monotonic() - started < 120

    def _grpc_loop(self):
        request, started = _predict_request(), time.monotonic()
        with grpc.insecure_channel(self._server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while self._running(started):
                time.sleep(self.PAUSE_SECONDS)
                try:
                    response = stub.Predict(request, timeout=30)
                    with self._lock:
                        self.versions.append(response.model_spec.version.value)
                except grpc.RpcError as e:
                    with self._lock:
                        self.errors.append(f"{e.code().name}: {e.details()}")

    def _rest_loop(self):
        started = time.monotonic()
        body = b'{"instances": [{"image": "", "text": "a red cat", "audio": ""}]}'
        url = f"{self._server.rest_url}/v1/models/m:predict"
        while self._running(started):
            time.sleep(self.PAUSE_SECONDS)
            try:
                urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30).read()
            except Exception as e:  # noqa: BLE001 - any failure is what the test counts
                with self._lock:
                    self.errors.append(f"REST {e}")

    def count(self) -> int:
        with self._lock:
            return len(self.versions)

    def saw(self, version: int) -> bool:
        with self._lock:
            return version in self.versions[-20:]


def test_aspired_versions_follow_the_policy():
    on_disk = [1, 2, 5, 7]
    assert ModelSpec("m", "/x").aspired_versions(on_disk) == [7]
    assert ModelSpec("m", "/x", num_versions=2).aspired_versions(on_disk) == [7, 5]
    assert ModelSpec("m", "/x", policy="all").aspired_versions(on_disk) == [7, 5, 2, 1]
    assert ModelSpec("m", "/x", policy="specific", versions=(2, 3, 7)).aspired_versions(on_disk) == [7, 2]


def test_hot_reload_under_load_drops_no_request(tmp_path):
    helpers.make_test_savedmodel(tmp_path, "m", 1, seed=0)
    server = ModelServer(
        [ModelSpec("m", str(tmp_path / "m"))],
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=POLL_SECONDS,
    )
    with server, Client(server.grpc_target, "m") as client, _Load(server) as load:
        _wait_for(lambda: load.count() >= 10, what="traffic")
        helpers.make_test_savedmodel(tmp_path, "m", 2, seed=1)  # temp folder + rename
        _wait_for(lambda: _states(client) == {2: "AVAILABLE", 1: "END"}, what="version 2 replacing 1")
        _wait_for(lambda: load.saw(2), what="requests served by version 2")
        helpers.make_test_savedmodel(tmp_path, "m", 3, seed=2)
        shutil.rmtree(tmp_path / "m" / "2")
        _wait_for(
            lambda: _states(client).get(3) == "AVAILABLE" and _states(client)[2] == "END", what="version 3"
        )
        _wait_for(lambda: load.saw(3), what="requests served by version 3")
    assert load.errors == []
    assert {1, 2, 3} <= set(load.versions)
    assert load.count() >= 30


def test_broken_version_reports_error_while_others_serve(tmp_path):
    helpers.make_test_savedmodel(tmp_path, "all", 1)
    helpers.make_broken_version(tmp_path, "all", 2)
    helpers.make_test_savedmodel(tmp_path, "latest", 1)
    specs = [
        ModelSpec("all", str(tmp_path / "all"), policy="all"),
        ModelSpec("latest", str(tmp_path / "latest")),
    ]
    server = ModelServer(
        specs,
        port=0,
        rest_api_port=None,
        file_system_poll_wait_seconds=POLL_SECONDS,
        max_num_load_retries=0,  # retried when the folder changes, not on a timer
    )
    with server, Client(server.grpc_target, "all") as client, Client(server.grpc_target, "latest") as latest:
        statuses = {s["version"]: s for s in client.status()}
        assert statuses[1]["state"] == "AVAILABLE"
        assert statuses[2]["state"] == "END" and statuses[2]["error_code"] != "OK"
        assert statuses[2]["error_message"]
        assert client.predict(texts=["a red cat"])["probabilities"].shape == (1, 3)
        # latest{1}: a broken newer version does not unload the serving one.
        helpers.make_broken_version(tmp_path, "latest", 2)
        _wait_for(lambda: _states(latest).get(2) == "END", what="broken version 2 of 'latest'")
        assert _states(latest)[1] == "AVAILABLE"
        assert latest.predict(texts=["a red cat"])["probabilities"].shape == (1, 3)
        # Rewriting the broken folder retries the load.
        shutil.rmtree(tmp_path / "all" / "2")
        helpers.make_test_savedmodel(tmp_path, "all", 2, seed=1)
        _wait_for(lambda: _states(client).get(2) == "AVAILABLE", what="fixed version 2")
        assert client.status(version=2)[0]["error_code"] == "OK"


def _config_text(models: dict[str, str]) -> str:
    entries = "".join(
        f'config {{ name: "{n}" base_path: "{p}" model_platform: "tensorflow" }}\n' for n, p in models.items()
    )
    return f"model_config_list {{\n{entries}}}\n"


def test_model_config_reload_by_rpc_and_by_file(tmp_path):
    helpers.make_test_savedmodel(tmp_path, "a", 1)
    helpers.make_test_savedmodel(tmp_path, "b", 1, seed=1)
    config_file = tmp_path / "models.config"
    config_file.write_text(_config_text({"a": str(tmp_path / "a")}))
    server = ModelServer(
        model_config_file=config_file,
        port=0,
        rest_api_port=None,
        file_system_poll_wait_seconds=0,
        model_config_file_poll_wait_seconds=0.3,
    )
    with server, grpc.insecure_channel(server.grpc_target) as channel, Client(server.grpc_target, "b") as b:
        assert pytest.raises(grpc.RpcError, b.status).value.code() == grpc.StatusCode.NOT_FOUND
        config = model_server_config_pb2.ModelServerConfig()
        for name in ("a", "b"):
            config.model_config_list.config.add(name=name, base_path=str(tmp_path / name))
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=60)
        assert _states(b) == {1: "AVAILABLE"}
        config_file.write_text(_config_text({"b": str(tmp_path / "b")}))
        with Client(server.grpc_target, "a") as a:
            _wait_for(lambda: _is_gone(a), what="model a removed")
        assert b.predict(texts=["x"])["probabilities"].shape == (1, 3)


def test_stop_finishes_in_flight_requests(tmp_path):
    helpers.make_test_savedmodel(tmp_path, "m", 1)
    # A long batch timeout holds the request in the queue while stop() runs.
    batching = BatchingOptions(max_batch_size=64, batch_timeout_micros=1_500_000, num_batch_threads=1)
    server = ModelServer(
        [ModelSpec("m", str(tmp_path / "m"))],
        port=0,
        rest_api_port=None,
        batching=batching,
        file_system_poll_wait_seconds=0,
    ).start()
    channel = grpc.insecure_channel(server.grpc_target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        future = stub.Predict.future(_predict_request(), timeout=30)
        servable = server.manager.status("m")[0].servable
        _wait_for(lambda: servable.in_flight > 0, what="the request to reach the batch queue")
        started = time.monotonic()
        server.stop(grace_seconds=10)
        assert time.monotonic() - started < 10
        assert future.result().outputs["probabilities"].tensor_shape.dim[0].size == 1
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(_predict_request(), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        server.stop()
