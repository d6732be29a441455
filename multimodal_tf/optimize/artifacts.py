"""Optimized artifacts: their file names, the JSON beside each, and loading one to predict.

Layout under ``RUN/optimized/`` (names in one place, read by evaluate and
benchmarks)::

    pruned/1/            SavedModel (mmtf export layout, servable), pruned.json
    model_float.tflite   model_dynamic.tflite   model_int8.tflite   (+ .json each)
    model.onnx           (+ model.onnx.json)

With ``--prune`` the TFLite and ONNX files are made from the pruned model
and named ``pruned_model_*``.
"""

from __future__ import annotations

import datetime
import gzip
import json
from pathlib import Path

import numpy as np

from multimodal_tf.signatures import PREDICT_FEATURES_SIGNATURE, PROBABILITIES

OPTIMIZED_DIR = "optimized"
PRUNED_NAME = "pruned"  # the SavedModel's model name: optimized/pruned/<version>/
TFLITE_SUFFIX, ONNX_SUFFIX = ".tflite", ".onnx"


def artifact_name(kind: str, pruned: bool) -> str:
    """``model_int8.tflite``, ``pruned_model.onnx``, ... for ``kind`` float/dynamic/int8/onnx."""
    stem = "pruned_model" if pruned else "model"
    return f"{stem}{ONNX_SUFFIX}" if kind == "onnx" else f"{stem}_{kind}{TFLITE_SUFFIX}"


def description_path(artifact: Path) -> Path:
    """The JSON that describes ``artifact`` (``model_int8.tflite.json``, ``pruned.json``)."""
    artifact = Path(artifact)
    if artifact.is_dir() and artifact.name.isdigit():  # a SavedModel version folder
        return artifact.parent.with_suffix(".json")
    return artifact.with_name(artifact.name + ".json")


def size_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (a SavedModel)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gzip_bytes(path: Path) -> int:
    """Gzipped size (level 9): what pruning's zeros save on disk or on the wire."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return sum(len(gzip.compress(p.read_bytes(), compresslevel=9)) for p in files)


def tool_versions() -> dict:
    """Versions of the tools that make or run artifacts."""
    from importlib import metadata  # noqa: PLC0415

    versions = {}
    for name in ("tensorflow", "tf_keras", "tensorflow-model-optimization", "tf2onnx", "onnx", "onnxruntime"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _display_name(artifact: Path) -> str:
    return f"{artifact.parent.name}/{artifact.name}" if artifact.name.isdigit() else artifact.name


def write_description(artifact: Path, kind: str, run_dir: Path, flags: dict, **details) -> Path:
    """Writes the JSON beside ``artifact``: what it is, how it was made, sizes, versions, date."""
    description = {
        "artifact": _display_name(Path(artifact)),
        "kind": kind,
        "source_run": str(Path(run_dir).resolve()),
        "flags": flags,
        "bytes": size_bytes(artifact),
        "gzip_bytes": gzip_bytes(artifact),
        "tools": tool_versions(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **details,
    }
    path = description_path(artifact)
    path.write_text(json.dumps(description, indent=1) + "\n", encoding="utf-8")
    return path


class SavedModelRunner:
    """Runs an mmtf SavedModel's ``predict_features`` signature on feature dicts."""

    def __init__(self, path):
        from multimodal_tf.compat import tf  # noqa: PLC0415

        self.loaded = tf.saved_model.load(str(path))
        self.signature = self.loaded.signatures[PREDICT_FEATURES_SIGNATURE]
        self.specs = self.signature.structured_input_signature[1]

    def __call__(self, model_features: dict) -> np.ndarray:
        from multimodal_tf.compat import tf  # noqa: PLC0415

        inputs = {name: tf.cast(model_features[name], spec.dtype) for name, spec in self.specs.items()}
        return self.signature(**inputs)[PROBABILITIES].numpy()


def load_runner(path, num_threads: int | None = None):
    """A callable feature dict -> probabilities [B, K] for a ``.tflite``, ``.onnx`` or SavedModel."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact {path} not found")
    if path.suffix == TFLITE_SUFFIX:
        from multimodal_tf.optimize.quantization import TFLiteRunner  # noqa: PLC0415

        return TFLiteRunner(path, num_threads)
    if path.suffix == ONNX_SUFFIX:
        from multimodal_tf.optimize.onnx import ONNXRunner  # noqa: PLC0415

        return ONNXRunner(path, num_threads)
    if (path / "saved_model.pb").exists():
        return SavedModelRunner(path)
    raise ValueError(f"artifact {path}: expected a .tflite or .onnx file or a SavedModel folder")
