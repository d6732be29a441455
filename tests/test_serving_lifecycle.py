"""Model lifecycle as TF Serving runs it: load retries, changed files, ReloadConfig checks, fast exit."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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
from multimodal_tf.serving import config as config_lib
from multimodal_tf.serving.manager import State

REPO = Path(__file__).resolve().parents[1]


def _half_copied_version(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """BASE/m/1 whose variables data file holds only its first half, as during a copy.

    Returns:
        (base path, the truncated file, the bytes still missing from it).
    """
    source = helpers.make_test_savedmodel(tmp_path / "source", "m", 1)
    target = tmp_path / "models" / "m" / "1"
    shutil.copytree(source, target)
    data = next((target / "variables").glob("variables.data-*"))
    content = data.read_bytes()
    data.write_bytes(content[: len(content) // 2])
    return tmp_path / "models" / "m", data, content[len(content) // 2 :]


class _OnLoadFailure(logging.Handler):
    """Runs ``action`` once, when the manager logs the first failed load."""

    def __init__(self, action):
        super().__init__()
        self.action, self.done = action, False

    def emit(self, record):
        if not self.done and "failed to load" in record.getMessage():
            self.done = True
            self.action()


def test_version_seen_while_copied_loads_on_retry(tmp_path):
    base, data, rest = _half_copied_version(tmp_path)

    def finish_copy():
        with open(data, "ab") as f:
            f.write(rest)

    handler = _OnLoadFailure(finish_copy)
    logging.getLogger("multimodal_tf.serving.manager").addHandler(handler)
    try:
        server = ModelServer(
            [ModelSpec("m", str(base))],
            port=0,
            rest_api_port=None,
            file_system_poll_wait_seconds=0,  # no later poll: only a retry can load it
            max_num_load_retries=2,
            load_retry_interval_seconds=0.2,
        )
        with server, Client(server.grpc_target, "m") as client:
            assert handler.done, "the half-copied version loaded at the first attempt"
            assert [(s["version"], s["state"]) for s in client.status()] == [(1, "AVAILABLE")]
            assert client.predict(texts=["a red cat"])["probabilities"].shape == (1, 3)
    finally:
        logging.getLogger("multimodal_tf.serving.manager").removeHandler(handler)


def test_failed_version_is_reloaded_when_a_file_grows_in_place(tmp_path):
    base, data, rest = _half_copied_version(tmp_path)
    server = ModelServer(
        [ModelSpec("m", str(base))],
        port=0,
        rest_api_port=None,
        file_system_poll_wait_seconds=0.3,
        max_num_load_retries=0,
    )
    with server, Client(server.grpc_target, "m") as client:
        assert client.status()[0]["state"] == "END"
        with open(data, "ab") as f:  # no folder changes: only the file's size and mtime
            f.write(rest)
        deadline = time.monotonic() + 60
        while client.status()[0]["state"] != "AVAILABLE":
            assert time.monotonic() < deadline, "the completed version was never reloaded"
            time.sleep(0.1)


def _available(server, name: str) -> list[int]:
    return [s.version for s in server.manager.status(name) if s.state == State.AVAILABLE]


def test_reload_config_checks_like_tf_serving(tmp_path):
    helpers.make_test_savedmodel(tmp_path, "a", 1)
    server = ModelServer([ModelSpec("a", str(tmp_path / "a"))], port=0, rest_api_port=None)
    with server, grpc.insecure_channel(server.grpc_target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:  # an empty request unloads nothing
            stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Only ModelConfigList is currently supported" in error.value.details()
        assert _available(server, "a") == [1]
        relative = model_server_config_pb2.ModelServerConfig()
        relative.model_config_list.config.add(name="a", base_path="models/a")
        with pytest.raises(grpc.RpcError) as error:
            stub.HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(config=relative), timeout=30
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Expected model a to have an absolute path or URI" in error.value.details()
        good = model_server_config_pb2.ModelServerConfig()
        good.model_config_list.config.add(name="a", base_path=str(tmp_path / "a"))
        response = stub.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=good), timeout=60
        )
        assert response.HasField("status") and response.status.error_code == 0
        assert _available(server, "a") == [1]


def test_relative_base_path_in_config_file_is_rejected():
    with pytest.raises(config_lib.ServingConfigError, match="absolute path"):
        config_lib.parse_model_config('model_config_list { config { name: "a" base_path: "a/b" } }')
    assert config_lib.parse_model_config('model_config_list { config { name: "a" base_path: "gs://b/a" } }')


def test_serve_exits_soon_after_grace_seconds_under_load(tmp_path):
    base = helpers.make_test_savedmodel(tmp_path, "m", 1).parent
    port = helpers.free_port()
    command = [sys.executable, "-m", "multimodal_tf.cli", "serve", "--model-base-path", str(base)]
    command += ["--model-name", "m", "--port", str(port), "--rest-api-port", "-1", "--grace-seconds", "2"]
    command += ["--enable-batching"]
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read after the process ends
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ})
    stop = threading.Event()

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    for name, values in helpers.make_inputs(256, seed=1).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.string))

    def load():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.Predict(request, timeout=30)
                except grpc.RpcError:
                    time.sleep(0.05)

    try:
        deadline = time.monotonic() + 120
        while f"gRPC 127.0.0.1:{port}" not in Path(log.name).read_text() and process.poll() is None:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        threads = [threading.Thread(target=load, daemon=True) for _ in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        # Before: "server stopped" at +2 s, then 4-8 s of interpreter teardown.
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"exited {elapsed:.1f} s after SIGTERM"
    finally:
        stop.set()
        output = helpers.stop_and_read_log(process, log)
    assert "server stopped" in output, output[-2000:]


def test_serve_flags_for_limits_and_retries():
    import argparse

    from multimodal_tf.cli import serving as cli

    parser = argparse.ArgumentParser()
    cli.add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model-base-path", "/m"])
    assert (args.max_request_rows, args.max_num_load_retries, args.load_retry_interval_micros) == (
        None,
        5,
        60_000_000,
    )
    args = parser.parse_args(
        ["serve", "--model-base-path", "/m", "--max-request-rows", "64", "--max-num-load-retries", "0"]
        + ["--load-retry-interval-micros", "500000", "--rest-api-num-threads", "8"]
    )
    assert (args.max_request_rows, args.max_num_load_retries, args.rest_api_num_threads) == (64, 0, 8)
