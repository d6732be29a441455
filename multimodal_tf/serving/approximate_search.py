"""``search`` on a version written by ``mmtf index --approximate``: TF embeds, faiss searches.

Such a version's SavedModel is the export's (``embed_<modality>`` and the
rest); its faiss index lies in ``assets.extra/``. The servable adds, for
each query modality, a SignatureDef and a Python function that the rest of
the server (Predict, REST, batching, metrics) treats like a graph signature:

- ``search`` (the first query modality) and ``search_<modality>``: inputs
  ``<modality>`` [B] raw strings, as in an exact ``search``, plus an
  optional scalar int32 ``k`` (default: ``mmtf index --top-k``); outputs
  ``ids`` [B, k] string, ``scores`` [B, k] float32 (inner product = cosine),
  ``indices`` [B, k] int32 -- the exact ``search``'s names, dtypes and ranks.

Everything a load can get wrong (a missing file, an index whose dim is not
the embedding's) fails the load with a message naming it, and the server
keeps serving its other versions; a bad ``k`` fails that request only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from multimodal_tf.approximate_index import (  # noqa: F401  (is_approximate: API)
    ApproximateIndex,
    is_approximate,
)
from multimodal_tf.serving import tensors
from multimodal_tf.serving.errors import invalid_argument
from multimodal_tf.signatures import (
    EMBED_PREFIX,
    EMBEDDING,
    SEARCH_IDS,
    SEARCH_INDICES,
    SEARCH_K,
    SEARCH_SCORES,
    SEARCH_SIGNATURE,
)

PREDICT_METHOD = "tensorflow/serving/predict"


def _tensor_info(name: str, dtype: int, shape: list[int]) -> meta_graph_pb2.TensorInfo:
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
    return meta_graph_pb2.TensorInfo(
        name=f"approximate_search/{name}:0",
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
    )


def signature_def(modality: str) -> meta_graph_pb2.SignatureDef:
    """The SignatureDef of an approximate ``search`` on ``modality`` queries."""
    signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
    signature.inputs[modality].CopyFrom(_tensor_info(modality, types_pb2.DT_STRING, [-1]))
    signature.inputs[SEARCH_K].CopyFrom(_tensor_info(SEARCH_K, types_pb2.DT_INT32, []))
    signature.outputs[SEARCH_IDS].CopyFrom(_tensor_info(SEARCH_IDS, types_pb2.DT_STRING, [-1, -1]))
    signature.outputs[SEARCH_SCORES].CopyFrom(_tensor_info(SEARCH_SCORES, types_pb2.DT_FLOAT, [-1, -1]))
    signature.outputs[SEARCH_INDICES].CopyFrom(_tensor_info(SEARCH_INDICES, types_pb2.DT_INT32, [-1, -1]))
    return signature


def _embedding_dim(signature_defs: Mapping[str, meta_graph_pb2.SignatureDef], name: str, where: Path) -> int:
    if name not in signature_defs or EMBEDDING not in signature_defs[name].outputs:
        raise ValueError(
            f"{where}: the approximate index needs the SavedModel's `{name}` signature, which it lacks"
        )
    return (tensors.shape_of(signature_defs[name].outputs[EMBEDDING]) or [-1, -1])[-1]


def _search_function(index: ApproximateIndex, embed, modality: str) -> Callable[..., dict[str, np.ndarray]]:
    default_k = int(index.info.get("top_k") or min(10, index.count))

    def search(**feeds) -> dict[str, np.ndarray]:
        k = int(feeds[SEARCH_K].numpy()) if SEARCH_K in feeds else default_k
        if not 1 <= k <= index.count:
            raise invalid_argument(
                f"input '{SEARCH_K}': must be in [1, {index.count}] (the corpus size), got {k}"
            )
        queries = embed(**{modality: feeds[modality]})[EMBEDDING].numpy()
        ids, scores, indices = index.search(queries, k)
        return {SEARCH_IDS: ids, SEARCH_SCORES: scores, SEARCH_INDICES: indices}

    return search


def load(
    export_dir: Path,
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
    functions: Mapping[str, Callable],
) -> dict[str, tuple[meta_graph_pb2.SignatureDef, Callable]]:
    """``{name: (SignatureDef, function)}`` of the approximate searches of a version.

    Raises:
        FileNotFoundError: an index file is missing.
        ValueError: the files disagree, a query modality has no ``embed_``
            signature, or the index's dim is not the embedding's.
    """
    index = ApproximateIndex(export_dir)
    searches = {}
    for position, modality in enumerate(index.info.get("queries") or []):
        embed_name = f"{EMBED_PREFIX}{modality}"
        dim = _embedding_dim(signature_defs, embed_name, export_dir)
        if dim != index.dim:
            raise ValueError(
                f"{export_dir}: the approximate index holds vectors of dim {index.dim}, "
                f"but `{embed_name}` returns dim {dim}: the index was not built with this model"
            )
        entry = (signature_def(modality), _search_function(index, functions[embed_name], modality))
        searches[f"{SEARCH_SIGNATURE}_{modality}"] = entry
        if position == 0:
            searches[SEARCH_SIGNATURE] = entry
    if not searches:
        raise ValueError(f"{export_dir}: the approximate index description names no query modality")
    return searches
