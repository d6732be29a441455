"""Server-side batching: merging, splitting, padding, queue limits, and equality with unbatched runs."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import serving_helpers as helpers
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from multimodal_tf.compat import tf
from multimodal_tf.serving import ModelServer, ModelSpec
from multimodal_tf.serving.batching import BatchScheduler
from multimodal_tf.serving.config import BatchingOptions
from multimodal_tf.serving.errors import Code, ServingError
from multimodal_tf.serving.local import LocalModel


class _Recorder:
    """A fake signature: doubles ``x`` and records the batch sizes it ran."""

    def __init__(self, release: threading.Event | None = None):
        self.sizes: list[int] = []
        self.release = release

    def __call__(self, inputs):
        if self.release is not None:
            self.release.wait(10)
        x = inputs["x"]
        self.sizes.append(len(x))
        if (x < 0).any():
            raise ServingError(Code.INVALID_ARGUMENT, "negative input")
        return {"y": x * 2}


def _scheduler(**options) -> BatchScheduler:
    return BatchScheduler(BatchingOptions(**{"num_batch_threads": 1, **options}))


def test_concurrent_requests_merge_and_split_back():
    scheduler, run = _scheduler(max_batch_size=8, batch_timeout_micros=200_000), _Recorder()
    try:
        tasks = [scheduler.submit("q", "k", run, {"x": np.array([i, 10 + i])}, 2) for i in range(3)]
        results = [t.result(10)["y"].tolist() for t in tasks]
    finally:
        scheduler.stop()
    assert results == [[0, 20], [2, 22], [4, 24]]
    assert run.sizes == [6]


def test_full_batches_close_and_keys_do_not_mix():
    scheduler, run = _scheduler(max_batch_size=4, batch_timeout_micros=100_000), _Recorder()
    try:
        first = scheduler.submit("q", "k", run, {"x": np.arange(3)}, 3)
        second = scheduler.submit("q", "k", run, {"x": np.arange(2)}, 2)  # 3 + 2 > 4: a new batch
        other = scheduler.submit("q", "other", run, {"x": np.arange(1)}, 1)
        assert [f.result(10)["y"].tolist() for f in (first, second, other)] == [[0, 2, 4], [0, 2], [0]]
    finally:
        scheduler.stop()
    assert sorted(run.sizes) == [1, 2, 3]


def test_allowed_batch_sizes_pad_and_trim():
    scheduler, run = (
        _scheduler(max_batch_size=8, batch_timeout_micros=100_000, allowed_batch_sizes=(2, 4, 8)),
        _Recorder(),
    )
    try:
        a = scheduler.submit("q", "k", run, {"x": np.array([1])}, 1)
        b = scheduler.submit("q", "k", run, {"x": np.array([2, 3])}, 2)
        assert a.result(10)["y"].tolist() == [2] and b.result(10)["y"].tolist() == [4, 6]
    finally:
        scheduler.stop()
    assert run.sizes == [4]


def test_full_queue_is_unavailable():
    release = threading.Event()
    scheduler, run = _scheduler(max_batch_size=2, max_enqueued_batches=1), _Recorder(release)
    try:
        running = scheduler.submit("q", "a", run, {"x": np.array([1])}, 1)
        while not running.running():  # the only batch thread is now busy
            threading.Event().wait(0.01)
        queued = scheduler.submit("q", "b", run, {"x": np.array([2])}, 1)
        with pytest.raises(ServingError) as error:
            scheduler.submit("q", "c", run, {"x": np.array([3])}, 1)
        assert error.value.code == Code.UNAVAILABLE
        release.set()
        assert queued.result(10)["y"].tolist() == [4]
    finally:
        release.set()
        scheduler.stop()


def test_a_bad_request_fails_alone():
    scheduler, run = _scheduler(max_batch_size=8, batch_timeout_micros=200_000), _Recorder()
    try:
        good, bad, other = (scheduler.submit("q", "k", run, {"x": np.array([v])}, 1) for v in (1, -1, 2))
        assert good.result(10)["y"].tolist() == [2] and other.result(10)["y"].tolist() == [4]
        with pytest.raises(ServingError, match="negative"):
            bad.result(10)
    finally:
        scheduler.stop()


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("batching_models")
    helpers.make_test_savedmodel(base, "m", 1)
    batching = BatchingOptions(
        max_batch_size=8, batch_timeout_micros=100_000, num_batch_threads=1, max_enqueued_batches=100
    )
    specs = [ModelSpec("m", str(base / "m"))]
    with ModelServer(
        specs,
        port=0,
        rest_api_port=None,
        batching=batching,
        file_system_poll_wait_seconds=0,
        metrics_path="/metrics",
    ) as server:
        server.local = LocalModel(base / "m" / "1")
        yield server


def _request(inputs: dict[str, list[bytes]]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    for name, values in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values, tf.string))
    return request


def test_server_batches_concurrent_requests_with_unbatched_results(batching_server):
    count = 16
    inputs = [helpers.make_inputs(1, seed=i, absent=("audio",) if i % 2 else ()) for i in range(count)]
    results: list = [None] * count
    barrier = threading.Barrier(count)
    runs_before = batching_server.metrics.counter("model_runs")

    def send(index: int):
        with grpc.insecure_channel(batching_server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            barrier.wait(10)
            response = stub.Predict(_request(inputs[index]), timeout=30)
            results[index] = tf.make_ndarray(response.outputs["probabilities"])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    runs = batching_server.metrics.counter("model_runs") - runs_before
    assert all(r is not None for r in results)
    assert runs < count  # merged: fewer signature runs than requests
    for index in range(count):
        expected = batching_server.local.predict(
            images=inputs[index]["image"], texts=inputs[index]["text"], audios=inputs[index]["audio"]
        )["probabilities"]
        np.testing.assert_allclose(results[index], expected, atol=1e-5)


def test_request_larger_than_max_batch_is_refused(batching_server):
    # As TF Serving without large batch splitting (test_serving_limits covers splitting).
    inputs = helpers.make_inputs(12, seed=3)
    with grpc.insecure_channel(batching_server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(_request(inputs), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 12 rows; the limit per request is 8" in error.value.details()
