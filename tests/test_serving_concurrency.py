"""Regression: concurrent requests of mixed batch sizes must not abort the process.

TF 2.17's oneDNN kernels corrupted the heap (``free(): invalid next size``)
within seconds when a model with image and audio convolution stacks was
called from several threads with different batch sizes; TF enables those
kernels by default only on some CPUs (AVX512_VNNI and newer), so the child
process here forces ``TF_ENABLE_ONEDNN_OPTS=1`` as such a CPU would, then
runs the server's own inference path. Without ``runtime.protect_concurrent_inference``
this child aborted in 2 of 2 runs here (docs/serving-crash.md); a crash is a
failed test, not a dead test runner, because it happens in the child.
"""

import os
import subprocess
import sys
import textwrap

from serving_helpers import IMAGE_AUDIO, export_untrained_model

from multimodal_tf import runtime

HAMMER = textwrap.dedent(
    """
    import random, sys, threading, time
    import numpy as np
    import multimodal_tf.serving  # the serving package sets the process up before TensorFlow loads
    from multimodal_tf.serving.servable import Servable
    from tensorflow.python.util import _pywrap_util_port
    from tests.serving_helpers import make_inputs

    export_dir, seconds = sys.argv[1], float(sys.argv[2])
    servable = Servable("m", 1, export_dir)
    pool = make_inputs(16, seed=1)
    # At least `seconds` and at least 100 calls (a loaded CI host may need
    # longer for them), at most 8x `seconds`.
    start, calls, errors = time.time(), [0], []

    def going():
        elapsed = time.time() - start
        return elapsed < 8 * seconds and (elapsed < seconds or calls[0] <= 100)

    def work(seed):
        rng = random.Random(seed)
        while going():
            rows = [rng.randrange(16) for _ in range(rng.randint(1, 8))]
            try:
                servable.run("serving_default", {m: np.array([pool[m][r] for r in rows], dtype=object) for m in ("image", "audio")})
                calls[0] += 1
            except Exception as e:  # an error is a failure too, but must not hide a crash
                errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(f"onednn={_pywrap_util_port.IsMklEnabled()} calls={calls[0]} errors={errors[:3]}")
    """
)


def test_eight_threads_of_mixed_batch_sizes_do_not_abort_the_process(tmp_path):
    export_untrained_model(tmp_path / "1", *IMAGE_AUDIO)

    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", HAMMER, str(tmp_path / "1"), "15"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, f"the process died (rc {result.returncode}): {result.stderr[-2000:]}"
    summary = result.stdout.strip().splitlines()[-1]
    assert "errors=[]" in summary, summary
    assert int(summary.split("calls=")[1].split()[0]) > 100, summary
    # The protection is what kept it alive: oneDNN was asked for, and is off.
    assert summary.startswith(f"onednn={runtime.onednn_is_safe()}")


def test_onednn_is_left_alone_where_it_is_safe_and_overridden_where_it_is_not(monkeypatch):
    assert not runtime.onednn_is_safe((2, 17)) and not runtime.onednn_is_safe((2, 20))
    assert runtime.onednn_is_safe((2, 21)) and runtime.onednn_is_safe((3, 0))
    # In this (pytest) process TensorFlow is already imported: the call can
    # only report whether the environment already protects it.
    monkeypatch.setenv(runtime.ONEDNN_VARIABLE, "1")
    assert runtime.protect_concurrent_inference() == runtime.onednn_is_safe()
    monkeypatch.setenv(runtime.ONEDNN_VARIABLE, "0")
    assert runtime.protect_concurrent_inference()


def test_the_shipped_deployments_restart_a_crashed_server_and_disable_onednn():
    import re
    from pathlib import Path

    import yaml

    serving = Path(__file__).resolve().parents[1] / "serving"
    compose = yaml.safe_load((serving / "docker-compose.yml").read_text())["services"]["tfserving"]
    assert compose["restart"] in ("always", "unless-stopped")
    assert compose["environment"]["TF_ENABLE_ONEDNN_OPTS"] == "0"
    deployment, service = yaml.safe_load_all((serving / "kubernetes.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "TF_ENABLE_ONEDNN_OPTS", "value": "0"} in container["env"]
    model_name = re.search(r'name: "(\w+)"', (serving / "models.config").read_text()).group(1)
    rest_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "rest")
    assert f"--rest_api_port={rest_port}" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": f"/v1/models/{model_name}", "port": "rest"}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"grpc", "rest"}
