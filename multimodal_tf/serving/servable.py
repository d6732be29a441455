"""One loaded model version: its SignatureDefs and callable signatures.

SignatureDefs (names, dtypes, shapes, method names) come from
``saved_model.pb`` through ``saved_model_pb2``, as TF Serving reads them; the
functions come from ``tf.saved_model.load(...).signatures``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from multimodal_tf.approximate_index import is_approximate
from multimodal_tf.compat import tf
from multimodal_tf.serving import tensors
from multimodal_tf.serving.errors import Code, ServingError, from_tf_error, invalid_argument, not_found
from multimodal_tf.signatures import (  # noqa: F401  (REGRESS_METHOD: API)
    DEFAULT_SIGNATURE,
    REGRESS_METHOD,
    SEARCH_K,
)

try:  # The tf-text ops our exports use; TF Serving links them in the same way.
    import tensorflow_text  # noqa: F401
except ImportError:  # pragma: no cover - optional for generic SavedModels
    pass

SERVE_TAG = "serve"
PREDICT_METHOD = "tensorflow/serving/predict"
INIT_OP_SIGNATURE = "__saved_model_init_op"

logger = logging.getLogger(__name__)


def read_signature_defs(export_dir: str | Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """SignatureDefs of the ``serve`` MetaGraph in ``saved_model.pb`` (or ``.pbtxt``)."""
    export_dir = Path(export_dir)
    saved_model = saved_model_pb2.SavedModel()
    binary, text = export_dir / "saved_model.pb", export_dir / "saved_model.pbtxt"
    if binary.is_file():
        saved_model.ParseFromString(binary.read_bytes())
    elif text.is_file():
        text_format.Parse(text.read_text(encoding="utf-8"), saved_model)
    else:
        raise FileNotFoundError(f"no saved_model.pb or saved_model.pbtxt in {export_dir}")
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise ValueError(f"{export_dir}: no MetaGraph tagged {SERVE_TAG!r}")


class Servable:
    """A loaded SavedModel version; thread-safe to call.

    Args:
        name: model name.
        version: version number (its folder name).
        export_dir: the version folder.
    """

    def __init__(self, name: str, version: int, export_dir: str | Path):
        self.name = name
        self.version = version
        self.export_dir = Path(export_dir)
        self.signature_defs = read_signature_defs(self.export_dir)
        self._loaded = tf.saved_model.load(str(self.export_dir), tags=[SERVE_TAG])
        self._functions = dict(self._loaded.signatures)
        # Inputs a request may leave out, per signature (only an approximate search's "k").
        self.optional_inputs: dict[str, frozenset[str]] = {}
        if is_approximate(self.export_dir):
            self._add_approximate_search()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)

    def _add_approximate_search(self) -> None:
        """``search`` signatures run in Python: the version's faiss index (``mmtf index --approximate``)."""
        from multimodal_tf.serving import approximate_search  # noqa: PLC0415  (imports faiss)

        for name, (signature, function) in approximate_search.load(
            self.export_dir, self.signature_defs, self._functions
        ).items():
            self.signature_defs[name] = signature
            self._functions[name] = function
            self.optional_inputs[name] = frozenset({SEARCH_K})

    # === Reference counting (a version is unloaded only when idle) ===

    def acquire(self) -> None:
        with self._lock:
            self._in_flight += 1

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self) -> None:
        """Drops the TF objects; memory is freed once no request holds them."""
        self._functions = {}
        self._loaded = None

    # === Calling ===

    def signature(
        self, signature_name: str, code: grpc.StatusCode = Code.FAILED_PRECONDITION
    ) -> meta_graph_pb2.SignatureDef:
        """The SignatureDef; an unknown name fails with ``code``.

        TF Serving answers FAILED_PRECONDITION for Predict (predict_util.cc)
        and INVALID_ARGUMENT for Classify/Regress and REST; both are 400 over REST.
        """
        name = signature_name or DEFAULT_SIGNATURE
        if name not in self.signature_defs or name == INIT_OP_SIGNATURE:
            raise ServingError(
                code, f'Serving signature key "{name}" not found. Known: {sorted(self.callable_signatures)}'
            )
        return self.signature_defs[name]

    @property
    def callable_signatures(self) -> list[str]:
        return [name for name in self.signature_defs if name in self._functions]

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checks ``inputs`` against the signature and calls it; returns every output."""
        name = signature_name or DEFAULT_SIGNATURE
        signature = self.signature(name)
        tensors.check_inputs(signature, inputs, self.optional_inputs.get(name, ()))
        function = self._functions.get(name)
        if function is None:
            raise not_found(f'Serving signature key "{name}" has no callable function')
        try:
            feeds = {
                key: tensors.to_tensor(value, tf.dtypes.as_dtype(signature.inputs[key].dtype))
                for key, value in inputs.items()
            }
            outputs = function(**feeds)
        except tf.errors.OpError as e:
            raise from_tf_error(e) from None
        except (TypeError, ValueError) as e:
            # Signature binding rejected the feeds after our checks passed.
            raise invalid_argument(f"signature '{name}' rejected the inputs: {e}") from None
        # Graph signatures return tensors; an approximate search returns numpy already.
        return {key: value.numpy() if hasattr(value, "numpy") else value for key, value in outputs.items()}

    def __repr__(self) -> str:
        return f"Servable({self.name!r}, version={self.version}, {self.export_dir})"


def describe_error(error: BaseException) -> ServingError:
    """Any load failure -> a status for GetModelStatus."""
    if isinstance(error, ServingError):
        return error
    if isinstance(error, tf.errors.OpError):
        return from_tf_error(error)
    return ServingError(Code.FAILED_PRECONDITION, f"{type(error).__name__}: {error}")
