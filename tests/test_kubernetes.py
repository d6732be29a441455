"""deploy/k8s, checked offline: the files parse, TF_CONFIG per pod index, images and flags equal serving/."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from multimodal_tf import kubernetes
from multimodal_tf.export import SERVING_IMAGES

ROOT = Path(__file__).resolve().parents[1]
K8S, SERVING = ROOT / "deploy" / "k8s", ROOT / "serving"


def _documents(path: Path) -> dict:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def _training_pod_env(index: int) -> dict:
    job = _documents(K8S / "training-job.yaml")["Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"]} | {"JOB_COMPLETION_INDEX": str(index)}


def test_indexed_job_pods_get_one_cluster_and_their_own_task():
    documents = _documents(K8S / "training-job.yaml")
    job, service = documents["Job"], documents["Service"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert service["spec"]["clusterIP"] == "None"
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "multimodal_tf.kubernetes"]
    assert "--strategy=multi_worker" in container["args"]
    configs = [kubernetes.tf_config_for_pod(_training_pod_env(i)) for i in range(2)]
    hosts = ["mmtf-train-0.mmtf-workers:2222", "mmtf-train-1.mmtf-workers:2222"]
    assert configs == [
        {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}} for i in range(2)
    ]
    assert str(container["ports"][0]["containerPort"]) == hosts[0].rsplit(":", 1)[1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"JOB_COMPLETION_INDEX": "2"}, "JOB_COMPLETION_INDEX 2 is not below MMTF_NUM_WORKERS 2"),
        ({"JOB_COMPLETION_INDEX": ""}, "JOB_COMPLETION_INDEX is not set"),
        ({"MMTF_NUM_WORKERS": "two"}, "MMTF_NUM_WORKERS must be a non-negative integer, got 'two'"),
    ],
)
def test_entrypoint_names_a_wrong_setting(change, message):
    with pytest.raises(kubernetes.PodEnvironmentError, match=message):
        kubernetes.tf_config_for_pod(_training_pod_env(0) | change)


def test_entrypoint_runs_the_command_with_tf_config(tmp_path):
    env = os.environ | _training_pod_env(1)
    env["PYTHONPATH"] = str(ROOT)
    show = "import os; print(os.environ['TF_CONFIG'])"
    result = subprocess.run(
        [sys.executable, "-m", "multimodal_tf.kubernetes", "--", sys.executable, "-c", show],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["task"] == {"type": "worker", "index": 1}
    env["JOB_COMPLETION_INDEX"] = "7"
    result = subprocess.run(
        [sys.executable, "-m", "multimodal_tf.kubernetes", "true"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and "JOB_COMPLETION_INDEX 7" in result.stderr


def _serving_container() -> dict:
    deployment = _documents(SERVING / "kubernetes.yaml")["Deployment"]
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_kserve_pins_our_serving_image_with_the_deployments_flags():
    predictor = _documents(K8S / "kserve.yaml")["InferenceService"]["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "tensorflow"
    # The runtime's image is tensorflow/serving; runtimeVersion is its tag.
    assert f"tensorflow/serving:{model['runtimeVersion']}" == _serving_container()["image"]
    assert _serving_container()["image"] in SERVING_IMAGES.values()
    deployment_flags = dict(arg.split("=", 1) for arg in _serving_container()["args"])
    for arg in model["args"]:
        flag, value = arg.split("=", 1)
        assert deployment_flags[flag] == value, flag
    assert {"--enable_batching", "--batching_parameters_file", "--monitoring_config_file"} <= {
        a.split("=")[0] for a in model["args"]
    }
    assert model["env"] == _serving_container()["env"]
    mounts = {m["name"]: m["mountPath"] for m in model["volumeMounts"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "mmtf-serving-config" and mounts["config"] == "/config"
