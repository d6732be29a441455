"""``python -m multimodal_tf.kubernetes CMD...``: run CMD with ``TF_CONFIG`` built from the pod.

The entrypoint of the training pods of ``deploy/k8s/training-job.yaml``, an
Indexed Job: Kubernetes gives pod ``i`` the environment variable
``JOB_COMPLETION_INDEX=i`` and, with ``subdomain`` set to a headless Service,
the stable DNS name ``<job>-<i>.<service>``. Every pod therefore knows the
whole cluster from three settings (``MMTF_JOB_NAME``, ``MMTF_SERVICE``,
``MMTF_NUM_WORKERS``; ``MMTF_PORT``, default 2222) and its own index, which
is all ``TF_CONFIG`` holds for MultiWorkerMirroredStrategy (worker 0 is the
chief). Kubeflow's TFJob did this before Trainer v2 dropped TensorFlow.
The module imports no TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

DEFAULT_PORT = 2222


class PodEnvironmentError(ValueError):
    """A setting the entrypoint needs is missing or wrong; the message names it."""


def _setting(environ: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = environ.get(name, default)
    if value is None or value == "":
        raise PodEnvironmentError(f"{name} is not set (deploy/k8s/training-job.yaml sets it)")
    return value


def _integer(environ: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = _setting(environ, name, default)
    if not value.isdigit():
        raise PodEnvironmentError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def tf_config_for_pod(environ: Mapping[str, str]) -> dict:
    """The ``TF_CONFIG`` of the pod whose environment is ``environ``."""
    job, service = _setting(environ, "MMTF_JOB_NAME"), _setting(environ, "MMTF_SERVICE")
    workers = _integer(environ, "MMTF_NUM_WORKERS")
    port = _integer(environ, "MMTF_PORT", str(DEFAULT_PORT))
    index = _integer(environ, "JOB_COMPLETION_INDEX")
    if not 0 <= index < workers:
        raise PodEnvironmentError(f"JOB_COMPLETION_INDEX {index} is not below MMTF_NUM_WORKERS {workers}")
    hosts = [f"{job}-{i}.{service}:{port}" for i in range(workers)]
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def main(argv: list[str] | None = None) -> int:
    """Sets ``TF_CONFIG`` and replaces this process with the command in ``argv``."""
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("usage: python -m multimodal_tf.kubernetes COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        tf_config = tf_config_for_pod(os.environ)
    except PodEnvironmentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.environ["TF_CONFIG"] = json.dumps(tf_config)
    os.execvp(command[0], command)
    return 0  # not reached: execvp replaces the process


if __name__ == "__main__":
    sys.exit(main())
