"""The same client checks against the real ``tensorflow_model_server`` (skipped when it is absent).

The binary is in neither PyPI nor Debian; run these where it is installed
(e.g. inside the ``tensorflow/serving:2.17.1`` image, or with it on PATH).
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time

import grpc
import numpy as np
import pytest
import serving_helpers as helpers

from multimodal_tf.serving import Client
from multimodal_tf.serving.local import LocalModel

BINARY = shutil.which("tensorflow_model_server")
pytestmark = [
    pytest.mark.tfserving,
    pytest.mark.skipif(BINARY is None, reason="tensorflow_model_server is not on PATH"),
]


@pytest.fixture(scope="module")
def tf_serving(tmp_path_factory):
    base = tmp_path_factory.mktemp("tfs_models")
    helpers.make_test_savedmodel(base, "m", 1)
    port, rest_port = helpers.free_port(), helpers.free_port()
    log = open(base / "tfs.log", "w")  # noqa: SIM115 - closed in teardown
    process = subprocess.Popen(
        [
            BINARY,
            f"--port={port}",
            f"--rest_api_port={rest_port}",
            "--model_name=m",
            f"--model_base_path={base / 'm'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while "Running gRPC ModelServer" not in (base / "tfs.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (base / "tfs.log").read_text()[
                -3000:
            ]
            time.sleep(0.2)
        with Client(f"127.0.0.1:{port}", "m", timeout_seconds=30) as client:
            client.wait_until_available(timeout_seconds=60)
            yield client, rest_port, base
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_predict_classify_metadata_status(tf_serving):
    client, _, base = tf_serving
    inputs = helpers.make_inputs(3, seed=2, absent=("audio",))
    served = client.predict(images=inputs["image"], texts=inputs["text"])
    local = LocalModel(base / "m" / "1").predict(images=inputs["image"], texts=inputs["text"])
    np.testing.assert_allclose(served["probabilities"], local["probabilities"], atol=1e-5)
    scores = client.classify(helpers.serialized_examples({k: inputs[k] for k in ("image", "text")}))["scores"]
    np.testing.assert_allclose(scores, local["probabilities"], atol=1e-5)
    assert client.metadata()["classify"].method_name == "tensorflow/serving/classify"
    assert client.status()[0]["state"] == "AVAILABLE"
    with pytest.raises(grpc.RpcError) as error:
        client.predict(images=[b"not an image"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rest_predict(tf_serving):
    _, rest_port, _ = tf_serving
    connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=30)
    body = {"instances": [{"image": "", "text": "a red cat", "audio": ""}]}
    connection.request("POST", "/v1/models/m:predict", body=json.dumps(body))
    response = connection.getresponse()
    assert response.status == 200
    assert len(json.loads(response.read())["predictions"][0]["probabilities"]) == 3
