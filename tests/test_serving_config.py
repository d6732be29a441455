"""Config parsing in TF Serving's formats, and the deployment files in serving/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from multimodal_tf.serving import config as config_lib
from multimodal_tf.serving.config import BatchingOptions, ModelSpec, ServingConfigError

DEPLOYMENT = Path(__file__).resolve().parents[1] / "serving"


def test_model_config_policies_and_labels():
    specs = config_lib.parse_model_config(
        """
        model_config_list {
          config { name: "a" base_path: "/m/a" model_platform: "tensorflow" }
          config { name: "b" base_path: "/m/b" model_version_policy { latest { num_versions: 3 } } }
          config { name: "c" base_path: "/m/c" model_version_policy { all {} } }
          config {
            name: "d" base_path: "/m/d"
            model_version_policy { specific { versions: 4 versions: 2 } }
            version_labels { key: "stable" value: 2 }
            version_labels { key: "canary" value: 4 }
          }
        }
        """
    )
    assert specs == [
        ModelSpec("a", "/m/a"),
        ModelSpec("b", "/m/b", num_versions=3),
        ModelSpec("c", "/m/c", policy="all"),
        ModelSpec(
            "d", "/m/d", policy="specific", versions=(2, 4), version_labels=(("canary", 4), ("stable", 2))
        ),
    ]
    assert specs[3].labels == {"stable": 2, "canary": 4}
    assert config_lib.single_model("m", "/x") == [ModelSpec("m", "/x")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('model_config_list { config { name: "a" base_path: "/a" typo: 1 } }', 'no field named "typo"'),
        ('model_config_list { config { base_path: "/a" } }', "has no name"),
        ('model_config_list { config { name: "a" } }', "has no base_path"),
        (
            'model_config_list { config { name: "a" base_path: "/a" model_platform: "pytorch" } }',
            "not supported",
        ),
        (
            'model_config_list { config { name: "a" base_path: "/a" } config { name: "a" base_path: "/b" } }',
            "more than once",
        ),
        (
            'model_config_list { config { name: "a" base_path: "/a" model_version_policy { specific {} } } }',
            "lists no versions",
        ),
    ],
)
def test_model_config_errors(text, message):
    with pytest.raises(ServingConfigError, match=message):
        config_lib.parse_model_config(text)


def test_batching_parameters():
    options = config_lib.parse_batching_parameters(
        "max_batch_size { value: 16 } batch_timeout_micros { value: 500 } num_batch_threads { value: 3 }\n"
        "allowed_batch_sizes: 4 allowed_batch_sizes: 16 thread_pool_name { value: 'x' }"
    )
    assert options == BatchingOptions(16, 500, 3, 10, (4, 16))
    assert config_lib.parse_batching_parameters("").max_batch_size == BatchingOptions().max_batch_size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_sise { value: 4 }", 'no field named "max_batch_sise"'),
        ("max_batch_size: 4", "max_batch_size"),
        ("max_batch_size { value: 0 }", "must be >= 1"),
        ("batch_timeout_micros { value: -1 }", "must be >= 0"),
        (
            "max_batch_size { value: 8 } allowed_batch_sizes: 2 allowed_batch_sizes: 4",
            "must be increasing and end with",
        ),
        ("pad_variable_length_inputs: true", "not supported"),
    ],
)
def test_batching_parameter_errors(text, message):
    with pytest.raises(ServingConfigError, match=message):
        config_lib.parse_batching_parameters(text)


def test_monitoring_config():
    assert (
        config_lib.parse_monitoring_config("prometheus_config { enable: true }")
        == config_lib.DEFAULT_METRICS_PATH
    )
    assert config_lib.parse_monitoring_config('prometheus_config { enable: true path: "/m" }') == "/m"
    assert config_lib.parse_monitoring_config("prometheus_config { enable: false }") is None
    with pytest.raises(ServingConfigError):
        config_lib.parse_monitoring_config("prometheus { enable: true }")


def test_deployment_files_parse():
    path = DEPLOYMENT / "models.config"
    specs = config_lib.parse_model_config(path.read_text(encoding="utf-8"), str(path))
    assert [(s.name, s.base_path, s.policy, s.num_versions) for s in specs] == [
        ("mmtf", "/models/mmtf", "latest", 2)
    ]
    batching = config_lib.load_batching_parameters(DEPLOYMENT / "batching_parameters.txt")
    assert batching.max_batch_size >= 1 and batching.num_batch_threads >= 1
    assert (
        config_lib.load_monitoring_config(DEPLOYMENT / "monitoring.config")
        == "/monitoring/prometheus/metrics"
    )


def _default_lock_image() -> str:
    """The TF Serving image matching the TensorFlow of the default lock file."""
    from multimodal_tf.export import SERVING_IMAGES

    lock = (DEPLOYMENT.parent / "requirements" / "lock.txt").read_text().splitlines()
    version = next(line.split("==")[1] for line in lock if line.startswith("tensorflow=="))
    return SERVING_IMAGES[".".join(version.split(".")[:2])]


def test_kubernetes_manifest_runs_the_default_locks_image():
    deployment, _service = yaml.safe_load_all((DEPLOYMENT / "kubernetes.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == _default_lock_image()


def test_compose_file_runs_the_official_image_on_these_files():
    compose = yaml.safe_load((DEPLOYMENT / "docker-compose.yml").read_text())
    service = compose["services"]["tfserving"]
    # The image follows the lock in use: TF_SERVING_IMAGE overrides the default lock's.
    assert service["image"] == "${TF_SERVING_IMAGE:-" + _default_lock_image() + "}"
    assert {"127.0.0.1:8500:8500", "127.0.0.1:8501:8501"} == set(service["ports"])
    flags = dict(arg.split("=", 1) for arg in service["command"])
    mounts = {target: source for source, target, _mode in (v.rsplit(":", 2) for v in service["volumes"])}
    assert mounts["/models"].endswith("../models}")
    for flag in ("--model_config_file", "--batching_parameters_file", "--monitoring_config_file"):
        source = mounts[flags[flag]]
        assert (DEPLOYMENT / source).is_file(), f"{flag} points at {source}, which is not in serving/"
    assert flags["--port"] == "8500" and flags["--rest_api_port"] == "8501"
