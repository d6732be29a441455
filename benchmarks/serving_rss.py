"""Server RSS before and after large requests, with and without returning freed heap to the OS.

One in-process ModelServer (the test export: the export contract's
signatures and in-graph preprocessing) gets requests of ``--rows`` rows made
of one ``--image-size`` PNG repeated (a tiny gRPC message: one value, shape
[rows]), ``--repeats`` times. RSS is read from /proc after each. With
``--no-trim`` the service's malloc_trim after large runs is disabled, which
is how the server behaved before.

    python benchmarks/serving_rss.py [--rows 1000] [--image-size 512] [--repeats 3] [--no-trim]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import serving_helpers as helpers  # noqa: E402

from multimodal_tf.compat import tf  # noqa: E402
from multimodal_tf.serving import ModelServer, ModelSpec, memory, service  # noqa: E402


def _request(rows: int, png: bytes) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=rows)])
    for name, value in (("image", png), ("text", b"a red cat"), ("audio", b"")):
        request.inputs[name].CopyFrom(
            tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=[value])
        )
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-trim", action="store_true")
    args = parser.parse_args()
    if args.no_trim:
        service.TRIM_AFTER_ROWS = sys.maxsize
    pixels = np.random.default_rng(0).integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
    png = tf.io.encode_png(pixels).numpy()
    base = Path(tempfile.mkdtemp(prefix="rss_bench_"))
    helpers.make_test_savedmodel(base, "m", 1)
    mib = 1 << 20
    with (
        ModelServer(
            [ModelSpec("m", str(base / "m"))],
            port=0,
            rest_api_port=None,
            file_system_poll_wait_seconds=0,
            max_request_rows=args.rows,
        ) as server,
        grpc.insecure_channel(server.grpc_target) as channel,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(_request(2, png), timeout=60)
        results = {"rows": args.rows, "image_size": args.image_size, "trim": not args.no_trim}
        results["rss_before_mib"] = round(memory.rss_bytes() / mib)
        after, seconds = [], []
        for _ in range(args.repeats):
            started = time.monotonic()
            stub.Predict(_request(args.rows, png), timeout=600)
            seconds.append(round(time.monotonic() - started, 2))
            time.sleep(0.5)
            after.append(round(memory.rss_bytes() / mib))
        started = time.monotonic()
        memory.trim_heap(force=True)  # what one trim costs once the heap is back to normal
        results.update(rss_after_mib=after, request_seconds=seconds)
        results["trim_ms"] = round(1000 * (time.monotonic() - started), 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
