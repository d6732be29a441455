"""Running a SavedModel in-process with the client's interface (``mmtf predict --saved-model``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from multimodal_tf.serving import inference
from multimodal_tf.serving.client import (
    DEFAULT_MAX_BATCH,
    Predictor,
    classification_arrays,
    classification_requests,
)
from multimodal_tf.serving.manager import list_versions
from multimodal_tf.serving.servable import Servable


def resolve_export_dir(path: str | Path) -> tuple[Path, int]:
    """A version folder, or a model folder of numeric versions (the highest is used)."""
    path = Path(path)
    if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
        return path, int(path.name) if path.name.isdigit() else 0
    versions = list_versions(str(path)) or {}
    if not versions:
        raise FileNotFoundError(f"{path} holds neither saved_model.pb nor numeric version folders")
    version = max(versions)
    return versions[version], version


class LocalModel(Predictor):
    """A SavedModel called in this process; same ``predict``/``classify`` as :class:`Client`.

    Args:
        path: a version folder (``.../NAME/3``) or a model folder (highest version).
        max_batch: inputs per signature call.
    """

    def __init__(self, path: str | Path, max_batch: int = DEFAULT_MAX_BATCH):
        export_dir, version = resolve_export_dir(path)
        self.model_name = export_dir.parent.name if export_dir.name.isdigit() else export_dir.name
        self.servable = Servable(self.model_name, version, export_dir)
        self.max_batch = max_batch

    def signature_inputs(self, signature_name, version, version_label) -> list[str] | None:
        signature = self.servable.signature_defs.get(signature_name or inference.DEFAULT_SIGNATURE)
        return None if signature is None else sorted(signature.inputs)

    def _run_chunks(self, chunks, version, version_label, signature_name, output_filter):
        return [
            inference.predict_arrays(
                self.servable, signature_name, chunk, output_filter, inference.direct_run
            )
            for chunk in chunks
        ]

    def classify(
        self, examples, *, context=None, version=None, version_label=None, signature_name: str = "classify"
    ) -> dict[str, np.ndarray]:
        """Same result as :meth:`Client.classify`, through the same Classify logic."""
        requests = classification_requests(
            examples, context, self.model_name, None, None, signature_name, self.max_batch
        )
        return classification_arrays(
            inference.classify(self.servable, r, inference.direct_run) for r in requests
        )

    def metadata(self, **_) -> dict:
        return dict(self.servable.signature_defs)
