"""Load test: concurrent gRPC clients with mixed batch sizes against `mmtf serve --enable-batching`.

Starts the real server as a child process (so a crash is an exit status, not
a dead benchmark) on an export whose graph holds image and audio convolution
stacks (the combination that aborted TF 2.17 with oneDNN on), with
``TF_ENABLE_ONEDNN_OPTS=1`` in its environment, as on a CPU where TF turns
oneDNN on by itself. ``--clients`` threads send Predict requests of 1 to
``--max-rows`` rows for ``--seconds``; the script prints requests/s, p50/p99
latency, errors, the server's RSS before and after, and whether it is alive.

``--cost`` also measures what turning oneDNN off costs: one thread (which
never crashed) calling the export in-process, oneDNN on against off, side by
side in child processes, over the same mixed batch sizes.

    python benchmarks/serving_load.py [--clients 32] [--max-rows 16] [--seconds 60] [--cost]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import serving_helpers as helpers  # noqa: E402


def build_export(directory: Path) -> Path:
    """The regression test's image+audio model, freshly initialised, exported as ``m/1``."""
    helpers.export_untrained_model(directory / "m" / "1", *helpers.IMAGE_AUDIO)
    return directory / "m"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _load(target: str, clients: int, max_rows: int, seconds: float) -> dict:
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from multimodal_tf.compat import tf

    pool = helpers.make_inputs(32, seed=5)
    latencies, errors, lock = [], [], threading.Lock()
    stop = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while time.monotonic() < stop:
                rows = [rng.randrange(32) for _ in range(rng.randint(1, max_rows))]
                request = predict_pb2.PredictRequest()
                request.model_spec.name = "m"
                for modality in ("image", "audio"):
                    values = [pool[modality][r] for r in rows]
                    request.inputs[modality].CopyFrom(tf.make_tensor_proto(values, tf.string))
                started = time.monotonic()
                try:
                    stub.Predict(request, timeout=30)
                    with lock:
                        latencies.append(time.monotonic() - started)
                except grpc.RpcError as e:
                    with lock:
                        errors.append(f"{e.code().name}: {e.details()[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    latencies.sort()
    pick = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)  # noqa: E731
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": pick(0.50) if latencies else None,
        "p99_ms": pick(0.99) if latencies else None,
    }


def load_test(base: Path, args) -> dict:
    port = helpers.free_port()
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "multimodal_tf.cli", "serve", "--model-base-path", str(base)]
    command += ["--model-name", "m", "--port", str(port), "--rest-api-port", "-1", "--enable-batching"]
    log = open(base.parent / "serve.log", "w+")  # noqa: SIM115 - read after the server ends
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=180)
        time.sleep(2)  # the model loads after the port opens
        before = rss_mib(server.pid)
        results = _load(f"127.0.0.1:{port}", args.clients, args.max_rows, args.seconds)
        alive = server.poll() is None
        results.update(
            rss_before_mib=round(before), rss_after_mib=round(rss_mib(server.pid)) if alive else None
        )
        results["server"] = "alive" if alive else f"died (exit {server.returncode})"
    finally:
        server.terminate()
        server.wait(60)
        log.seek(0)
        tail = log.read()[-1500:]
        log.close()
    if results["server"] != "alive":
        results["server_log_tail"] = tail
    return results


COST = textwrap.dedent(
    """
    import random, sys, time
    import tensorflow as tf, tensorflow_text  # noqa: F401  (no multimodal_tf.serving: oneDNN as asked)
    from tensorflow.python.util import _pywrap_util_port
    sys.path.insert(0, sys.argv[3])
    from tests.serving_helpers import make_inputs
    f = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    pool, rng = make_inputs(32, seed=5), random.Random(0)
    batches = [[rng.randrange(32) for _ in range(rng.randint(1, 16))] for _ in range(50)]
    run = lambda rows: f(**{m: tf.constant([pool[m][r] for r in rows]) for m in ("image", "audio")})
    for rows in batches[:10]:
        run(rows)
    started, calls, rows_done = time.monotonic(), 0, 0
    while time.monotonic() - started < float(sys.argv[2]):
        rows = batches[calls % len(batches)]
        run(rows)
        calls, rows_done = calls + 1, rows_done + len(rows)
    elapsed = time.monotonic() - started
    print(_pywrap_util_port.IsMklEnabled(), round(calls / elapsed, 1), round(rows_done / elapsed, 1))
    """
)


def cost(base: Path, seconds: float) -> dict:
    out = {}
    for flag in ("1", "0"):
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=flag, TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, "-c", COST, str(base / "1"), str(seconds), str(REPO)]
        line = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout.split()
        out[f"onednn_{flag}"] = {
            "onednn_enabled": line[0],
            "calls_per_s": float(line[1]),
            "rows_per_s": float(line[2]),
        }
    out["off_over_on_rows_per_s"] = round(out["onednn_0"]["rows_per_s"] / out["onednn_1"]["rows_per_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-rows", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--cost", action="store_true", help="also measure oneDNN on vs off, one thread")
    parser.add_argument("--cost-seconds", type=float, default=20)
    args = parser.parse_args()
    base = build_export(Path(tempfile.mkdtemp(prefix="load_bench_")))
    results = {"load": load_test(base, args)}
    if args.cost:
        results["cost"] = cost(base, args.cost_seconds)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
