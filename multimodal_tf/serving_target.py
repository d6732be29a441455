"""Which TF Serving a SavedModel can run on: the op check of ``mmtf export --target-serving``.

A serving graph may use only core TF ops plus those of the tensorflow-text
that the target TF Serving image embeds (FACTS.md); ``check_ops`` names every
other op before a model ships.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from multimodal_tf.compat import tf
from multimodal_tf.signatures import APPROXIMATE_INFO_FILE, ASSETS_EXTRA

# The tensorflow-text each TF Serving release line embeds (FACTS.md, "TF
# Serving images and their tf-text"): 2.17-2.19 ship 2.12.1, whose op set is
# listed in serving_ops/ (tools/text_ops_from_wheel.py); 2.20 and later ship
# the tf-text of their own TF.
SERVING_TEXT_VERSIONS = {
    "2.17": "2.12.1",
    "2.18": "2.12.1",
    "2.19": "2.12.1",
    "2.20": "2.20",
    "2.21": "2.21",
}
_OPS_DIR = Path(__file__).resolve().parent / "serving_ops"
# The TF Serving image that matches each lock file's TensorFlow
# (requirements/lock.txt: 2.21, requirements/lock-tf2.17.txt: 2.17);
# serving/docker-compose.yml and serving/kubernetes.yaml name the default
# lock's, and tests/test_serving_config.py keeps them in step.
SERVING_IMAGES = {"2.17": "tensorflow/serving:2.17.1", "2.21": "tensorflow/serving:2.21.0"}


# Why a version written by ``mmtf index --approximate`` is the embedded server's only.
APPROXIMATE_SERVING_NOTE = (
    "its `search` is a faiss index (assets.extra/approximate_index.*), and faiss has no TensorFlow op: "
    "TF Serving would load the version but answer `search` with 'signature not found'; "
    "serve it with the embedded server (`mmtf serve`)"
)


class ExportError(ValueError):
    """The export would not run under TF Serving; the message says why."""


def default_target_serving() -> str:
    """The TF Serving line matching the installed TensorFlow (``"2.17"``, ``"2.21"``)."""
    return ".".join(tf.__version__.split(".")[:2])


def installed_text_ops() -> set[str]:
    """The op names the installed tensorflow-text registers (read from its kernels)."""
    import tensorflow_text
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session

    names = set()
    root = os.path.dirname(tensorflow_text.__file__)
    for library in glob.glob(os.path.join(root, "python", "**", "_*.so"), recursive=True):
        op_list = op_def_pb2.OpList()
        op_list.ParseFromString(pywrap_tf_session.TF_GetOpList(pywrap_tf_session.TF_LoadLibrary(library)))
        names |= {op.name for op in op_list.op}
    return names


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


def target_text_ops(target: str) -> tuple[str, set[str]]:
    """(tensorflow-text version, op names) of the TF Serving line ``target``.

    Where the target's tf-text is at least the installed one, every installed
    op is there; where it is older, only the installed ops listed for it in
    ``serving_ops/tensorflow_text-<version>.txt``.

    Raises:
        ExportError: an unknown target, or an older tf-text with no op list.
    """
    if target not in SERVING_TEXT_VERSIONS:
        raise ExportError(f"unknown --target-serving {target!r}; known: {', '.join(SERVING_TEXT_VERSIONS)}")
    import tensorflow_text

    version = SERVING_TEXT_VERSIONS[target]
    installed = installed_text_ops()
    if _version(version) >= _version(tensorflow_text.__version__):
        return version, installed
    listing = _OPS_DIR / f"tensorflow_text-{version}.txt"
    if not listing.is_file():
        raise ExportError(f"no op list for tensorflow-text {version} (TF Serving {target}) at {listing}")
    lines = listing.read_text(encoding="utf-8").splitlines()
    return version, installed & {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def allowed_ops(target: str | None = None) -> set[str]:
    """Core TF ops plus the tf-text ops the target TF Serving line links in.

    Args:
        target: a key of SERVING_TEXT_VERSIONS; None: the installed TF's line.
    """
    return set(dir(tf.raw_ops)) | target_text_ops(target or default_target_serving())[1]


def graph_ops(saved_model_dir: str | Path) -> set[str]:
    """Every op type in a SavedModel's graph and function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops |= {node.op for node in meta_graph.graph_def.node}
        for function in meta_graph.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    return ops


def check_ops(saved_model_dir: str | Path, target: str | None = None) -> None:
    """Raises ExportError naming every op the target TF Serving would not have.

    A version holding an approximate index (``mmtf index --approximate``)
    fails outright: its ``search`` needs the embedded server.

    Args:
        saved_model_dir: the SavedModel to check.
        target: the TF Serving line (``"2.17"``, ``"2.21"``); None: the
            installed TF's.
    """
    target = target or default_target_serving()
    text_version, _ = target_text_ops(target)
    if (Path(saved_model_dir) / ASSETS_EXTRA / APPROXIMATE_INFO_FILE).is_file():
        raise ExportError(f"{saved_model_dir} cannot run on TF Serving {target}: {APPROXIMATE_SERVING_NOTE}")
    unknown = sorted(graph_ops(saved_model_dir) - allowed_ops(target))
    if unknown:
        raise ExportError(
            f"the graph uses ops that TF Serving {target} (core TF + tensorflow-text {text_version}) "
            f"does not have: {', '.join(unknown)} "
            "(tensorflow-io ops belong in conversion, never in the serving graph; a newer tf-text op "
            "needs a newer --target-serving)"
        )
