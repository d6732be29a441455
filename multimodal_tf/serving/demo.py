"""The serving step of ``mmtf demo``: embedded server up, same rows over gRPC and REST, down."""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path

import numpy as np

from multimodal_tf.serving.client import Client, raw_inputs
from multimodal_tf.serving.config import DEFAULT_METRICS_PATH, ModelSpec
from multimodal_tf.serving.server import ModelServer
from multimodal_tf.signatures import CLASS_NAME, DEFAULT_SIGNATURE, PROBABILITIES


def _rest_predict(server: ModelServer, model_name: str, inputs: dict[str, list[bytes]]) -> list[dict]:
    count = len(next(iter(inputs.values())))
    instances = [
        {name: {"b64": base64.b64encode(values[i]).decode()} for name, values in inputs.items()}
        for i in range(count)
    ]
    connection = http.client.HTTPConnection(server.host, server.rest_api_port, timeout=60)
    try:
        connection.request(
            "POST", f"/v1/models/{model_name}:predict", body=json.dumps({"instances": instances})
        )
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"REST predict failed ({response.status}): {body.get('error')}")
    return body["predictions"]


def _rows_as_inputs(records) -> tuple[list[dict], dict[str, list[bytes]]]:
    """Manifest records (``data.manifest.Record``) -> display rows and raw bytes per modality."""
    resolved = [{"id": r.id, "label_name": r.label_name or r.label} for r in records]
    raw = raw_inputs(
        images=[r.image or None for r in records],
        texts=[r.text or None for r in records],
        audios=[r.audio or None for r in records],
    )
    return resolved, raw


def serve_and_query(export_base: str | Path, model_name: str, records: list) -> int:
    """Serves ``export_base/model_name`` on free local ports and queries ``records`` both ways.

    Prints the version status, each row's class over gRPC and over REST, and
    the request counts from the Prometheus endpoint; returns 0 when the two
    APIs agree.
    """
    resolved, raw = _rows_as_inputs(records)
    spec = ModelSpec(model_name, str(Path(export_base) / model_name))
    server = ModelServer(
        [spec], port=0, rest_api_port=0, metrics_path=DEFAULT_METRICS_PATH, file_system_poll_wait_seconds=0
    )
    with server:
        print(f"serving {spec.base_path}: gRPC {server.grpc_target}, REST {server.rest_url}")
        with Client(server.grpc_target, model_name) as client:
            for status in client.status():
                print(f"  version {status['version']}: {status['state']}")
            wanted = client.signature_inputs(DEFAULT_SIGNATURE, None, None) or list(raw)
            by_grpc = client.predict(**{f"{m}s": raw[m] for m in raw if m in wanted})
        by_rest = _rest_predict(server, model_name, {m: raw[m] for m in raw if m in wanted})
        agree = True
        print(f"  {'id':<14}{'true':<12}{'gRPC':<12}{'REST':<12}{'p(max)':>7}")
        for index, row in enumerate(resolved):
            grpc_name = by_grpc[CLASS_NAME][index].decode()
            rest_row = by_rest[index]
            same = rest_row[CLASS_NAME] == grpc_name and np.allclose(
                rest_row[PROBABILITIES], by_grpc[PROBABILITIES][index], atol=1e-5
            )
            agree &= bool(same)
            probability = float(np.max(by_grpc[PROBABILITIES][index]))
            print(
                f"  {row['id']:<14}{row['label_name']:<12}{grpc_name:<12}{rest_row['class_name']:<12}{probability:>7.3f}"
            )
        served = server.metrics.counter("request_count", model_name=model_name, status="OK")
        print(f"  {served:.0f} requests answered OK (see {server.rest_url}{DEFAULT_METRICS_PATH})")
    print("gRPC and REST agree" if agree else "gRPC and REST DISAGREE")
    return 0 if agree else 1
