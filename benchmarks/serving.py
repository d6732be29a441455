"""Serving latency and throughput, side by side, in one run (~1-2 minutes).

    python benchmarks/serving.py                                   # the tests' tiny SavedModel
    python benchmarks/serving.py --model-base-path models/mmtf     # a real export
    python benchmarks/serving.py --model-base-path models/emoji3 \
        --manifest ../shared/data/emoji3/manifest.csv              # ...fed real files

Prints batch-1 latency (p50/p99) of an in-process signature call, the
embedded gRPC server and its REST API, then requests/s at concurrency 1/8/32
with server-side batching off and on, and the in-process speed-up from batching
alone (its ceiling). The servers run as separate processes
(``mmtf serve``), as in deployment; the load comes from this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # serving_helpers: the test SavedModel and inputs


@dataclasses.dataclass
class _Server:
    process: subprocess.Popen
    port: int
    rest_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while f"gRPC {self.target}" not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server failed to start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)


def _start_server(base_path: Path, name: str, batching: Path | None, log_path: Path) -> _Server:
    import serving_helpers as helpers

    port, rest_port = helpers.free_port(), helpers.free_port()
    command = [sys.executable, "-m", "multimodal_tf.cli", "serve", "--model-base-path", str(base_path),
               "--model-name", name, "--port", str(port), "--rest-api-port", str(rest_port),
               "--monitoring-config-file", str(REPO / "serving" / "monitoring.config"),
               "--file-system-poll-wait-seconds", "0"]  # fmt: skip
    if batching is not None:
        command += ["--batching-parameters-file", str(batching)]
    log = open(log_path, "w")  # noqa: SIM115 - the process owns it until it exits
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return _Server(process, port, rest_port, log_path)


def _manifest_inputs(manifest: str) -> dict[str, list[bytes]]:
    """One example's raw inputs (file bytes, UTF-8 text) from a manifest's first test row."""
    from multimodal_tf.config import DataConfig
    from multimodal_tf.data.manifest import read_manifest
    from multimodal_tf.serving.client import raw_inputs

    records = read_manifest(manifest, DataConfig()).records
    record = next((r for r in records if r.split == "test"), records[0])
    return raw_inputs(images=[record.image], texts=[record.text], audios=[record.audio])


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    values = np.array(seconds) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def _time_calls(call, count: int, idle: float = 0.0) -> list[float]:
    for _ in range(5):  # warm caches and connections
        call()
    times = []
    for _ in range(count):
        if idle:
            time.sleep(idle)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _rest_body(inputs: dict[str, np.ndarray]) -> bytes:
    import base64

    instance = {name: {"b64": base64.b64encode(values[0]).decode()} for name, values in inputs.items()}
    return json.dumps({"instances": [instance]}).encode()


def _throughput(target: str, request, concurrency: int, seconds: float) -> tuple[float, float]:
    """Requests/s and p50 latency (ms) with ``concurrency`` requests always in flight.

    The load generator must not be the bottleneck on a 2-core box: the
    request is serialized once and each completed call's callback sends the
    next one (no thread per client, no per-call (de)serialization), which is
    what a compiled load tool such as ghz does.
    """
    import grpc

    payload = request.SerializeToString()
    stop, lock, latencies, errors = threading.Event(), threading.Lock(), [], []
    drained = threading.Semaphore(0)
    channel = grpc.insecure_channel(target)
    predict = channel.unary_unary(
        "/tensorflow.serving.PredictionService/Predict",
        request_serializer=None,
        response_deserializer=None,
    )

    def send():
        started = time.perf_counter()
        future = predict.future(payload, timeout=30)
        future.add_done_callback(lambda f: finished(f, started))

    def finished(future, started):
        error = future.exception()
        with lock:
            if error is None:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(error.code().name)
        if stop.is_set():
            drained.release()
        else:
            send()

    for _ in range(concurrency):
        send()
    time.sleep(min(1.0, seconds / 4))  # ramp up
    with lock:
        latencies.clear()
    started = time.perf_counter()
    time.sleep(seconds)
    with lock:
        done, window = len(latencies), list(latencies)
    elapsed = time.perf_counter() - started
    stop.set()
    for _ in range(concurrency):
        drained.acquire(timeout=30)
    channel.close()
    if errors:
        print(f"  ({len(errors)} errors at concurrency {concurrency}: {sorted(set(errors))})")
    return done / elapsed, _percentiles(window)[0] if window else float("nan")


def _predict_counts(rest_port: int) -> tuple[float, float]:
    """(Predict requests, model runs) so far, from the server's Prometheus metrics."""
    url = f"http://127.0.0.1:{rest_port}/monitoring/prometheus/metrics"
    lines = urllib.request.urlopen(url, timeout=10).read().decode().splitlines()

    def total(name: str, must_contain: str = "") -> float:
        prefix = f":tensorflow:serving:{name}{{"
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith(prefix) and must_contain in line
        )

    return total("request_count", 'API="predict"'), total("model_runs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-base-path", help="a model folder of numeric versions (default: the test model)"
    )
    parser.add_argument("--model-name", default="mmtf")
    parser.add_argument(
        "--manifest", help="take the request's files from this manifest's first test row (default: synthetic)"
    )
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement window per throughput point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=32)
    # 5 ms: at 2 ms batches held ~2 requests on 2 cores (454 req/s); 5 ms gave ~620.
    parser.add_argument("--batch-timeout-micros", type=int, default=5000)
    parser.add_argument("--num-batch-threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)

    import serving_helpers as helpers

    work = Path(tempfile.mkdtemp(prefix="mmtf_bench_serving_"))
    if args.model_base_path:
        base_path, name = Path(args.model_base_path), args.model_name
    else:
        helpers.make_test_savedmodel(work / "models", "bench", 1)
        base_path, name = work / "models" / "bench", "bench"
    batching_file = work / "batching.txt"
    batching_file.write_text(
        f"max_batch_size {{ value: {args.max_batch_size} }}\n"
        f"batch_timeout_micros {{ value: {args.batch_timeout_micros} }}\n"
        f"num_batch_threads {{ value: {args.num_batch_threads} }}\nmax_enqueued_batches {{ value: 1000 }}\n"
    )
    # Start both servers before this process uses gRPC (a channel active across fork may not reconnect).
    plain = _start_server(base_path, name, None, work / "plain.log")
    batched = _start_server(base_path, name, batching_file, work / "batched.log")
    try:
        return _run(args, helpers, base_path, name, plain, batched)
    finally:
        for server in (plain, batched):
            server.process.terminate()
            server.process.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def _run(args, helpers, base_path: Path, name: str, plain: _Server, batched: _Server) -> int:
    from tensorflow_serving.apis import predict_pb2

    from multimodal_tf.compat import tf
    from multimodal_tf.serving.client import Client
    from multimodal_tf.serving.local import LocalModel

    local = LocalModel(base_path)
    wanted = local.signature_inputs("serving_default", None, None)
    raw = _manifest_inputs(args.manifest) if args.manifest else helpers.make_inputs(1, seed=0)
    inputs = {m: np.array(raw[m], dtype=object) for m in wanted}
    plain.wait_listening()
    batched.wait_listening()

    print(f"model: {base_path} (inputs {wanted}); {os.cpu_count()} CPUs")
    print(f"\nlatency at batch 1, {args.latency_requests} sequential requests (ms)")
    print(f"  {'path':<32}{'p50':>8}{'p99':>8}{'p50 vs in-process':>20}")
    rows = [("in-process signature call", lambda: local.predict_tensors(inputs))]
    client = Client(plain.target, name)
    rows.append(("embedded gRPC (Client)", lambda: client.predict_tensors(inputs)))
    connection = http.client.HTTPConnection("127.0.0.1", plain.rest_port, timeout=30)

    def rest_call():  # like the gRPC Client: encode the request, decode the response
        connection.request(
            "POST",
            f"/v1/models/{name}:predict",
            body=_rest_body(inputs),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 200 and "predictions" in json.loads(response.read())

    rows.append(("embedded REST (keep-alive)", rest_call))
    baseline = grpc_p50 = None
    for label, call in rows:
        p50, p99 = _percentiles(_time_calls(call, args.latency_requests))
        baseline = baseline or p50
        grpc_p50 = p50 if "gRPC" in label else grpc_p50
        print(f"  {label:<32}{p50:>8.2f}{p99:>8.2f}{p50 / baseline:>19.2f}x")
    # A server's model sits idle while each request travels; a tight loop keeps
    # TF's thread pools spinning and caches hot. The same call with that idle
    # time in between shows how much of the gRPC gap is the pause, not gRPC.
    idle = max(grpc_p50 - baseline, 0.0) / 1000
    p50, p99 = _percentiles(_time_calls(rows[0][1], args.latency_requests, idle=idle))
    label = f"in-process, {idle * 1000:.1f} ms idle between"
    print(f"  {label:<32}{p50:>8.2f}{p99:>8.2f}{p50 / baseline:>19.2f}x")
    client.close()
    connection.close()

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    print(f"\nthroughput, batch-1 requests over gRPC, {args.seconds:.0f} s per point")
    print(f"  {'concurrency':<12}{'off req/s':>11}{'p50 ms':>9}{'on req/s':>11}{'p50 ms':>9}{'on/off':>8}")
    before = _predict_counts(batched.rest_port)
    for concurrency in args.concurrency:
        off, off_p50 = _throughput(plain.target, request, concurrency, args.seconds)
        on, on_p50 = _throughput(batched.target, request, concurrency, args.seconds)
        print(f"  {concurrency:<12}{off:>11.0f}{off_p50:>9.2f}{on:>11.0f}{on_p50:>9.2f}{on / off:>7.2f}x")
    requests, runs = (a - b for a, b in zip(_predict_counts(batched.rest_port), before, strict=True))
    if runs:
        print(
            f"\nbatching on: {requests:.0f} requests in {runs:.0f} model runs ({requests / runs:.1f} requests per run)"
        )
    # The most batching can give on this model and machine, with no transport
    # at all: examples/s of in-process calls at batch max_batch_size vs batch 1.
    # Per-example work (decoding, STFT, convolutions) does not shrink with the
    # batch, so a compute-heavy model has a low ceiling on few cores.
    rates = {}
    for size in (1, args.max_batch_size):
        batch = {key: np.repeat(value, size) for key, value in inputs.items()}
        seconds = np.median(_time_calls(lambda b=batch: local.predict_tensors(b), max(5, 200 // size)))
        rates[size] = size / seconds
    print(
        f"in-process ceiling: batch 1 {rates[1]:.0f} ex/s, batch {args.max_batch_size} "
        f"{rates[args.max_batch_size]:.0f} ex/s ({rates[args.max_batch_size] / rates[1]:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
