"""Names shared by the export (writer) and the serving side (reader) of a SavedModel.

Imports nothing heavy, so clients and the CLI can use it without TensorFlow.
"""

from __future__ import annotations

from pathlib import PurePosixPath

# Signature keys of an mmtf export.
DEFAULT_SIGNATURE = "serving_default"  # raw inputs: one string tensor per modality
PREDICT_EXAMPLES_SIGNATURE = "predict_examples"  # serialized tf.Example ("examples")
CLASSIFY_SIGNATURE = "classify"  # TF Serving's Classify API ("inputs" -> classes, scores)
PREDICT_FEATURES_SIGNATURE = "predict_features"  # preprocessed model features

# TF2 writes every signature as ".../predict"; the export rewrites classify's.
CLASSIFY_METHOD = "tensorflow/serving/classify"
CLASSIFY_INPUTS, CLASSES, SCORES = "inputs", "classes", "scores"
# With a regression target (data.targets): TF Serving's Regress API on the
# first one ("inputs" -> "outputs" [B]); the export rewrites its method too.
REGRESS_SIGNATURE = "regress"
REGRESS_METHOD = "tensorflow/serving/regress"
REGRESS_OUTPUTS = "outputs"
EXAMPLES_INPUT = "examples"

# Outputs of the predict signatures (plus one "<modality>_present" per modality).
PROBABILITIES, CLASS_ID, CLASS_NAME = "probabilities", "class_id", "class_name"
# Per target of data.targets, "<target>/<output>": PROBABILITIES, CLASS_ID and
# CLASS_NAME (multiclass), PROBABILITIES and LABELS (multilabel), VALUE
# (regression).
LABELS, VALUE = "labels", "value"


def target_output(target: str, output: str) -> str:
    """Predict-signature output key of one target's output (``"tags/probabilities"``)."""
    return f"{target}/{output}"


# TF Serving replays these requests before a version takes traffic.
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE_NAME = "tf_serving_warmup_requests"
WARMUP_PATH = PurePosixPath(ASSETS_EXTRA) / WARMUP_FILE_NAME

# model.alignment: "embed_<modality>" (raw <modality> -> unit "embedding"), and
# "search" (+ "search_<modality>") in a version written by ``mmtf index``.
EMBED_PREFIX, EMBEDDING = "embed_", "embedding"
SEARCH_SIGNATURE, SEARCH_IDS, SEARCH_SCORES, SEARCH_INDICES = "search", "ids", "scores", "indices"
INDEX_FILE = "index.json"  # in assets.extra of an indexed version: corpus size, modality, k

# ``mmtf index --approximate``: a faiss index beside the SavedModel, in
# assets.extra (which the SavedModel loader and TF Serving never read, apart
# from the warmup file), served by the embedded server only.
APPROXIMATE_INFO_FILE = "approximate_index.json"  # kind, params, count, dim, metric
APPROXIMATE_INDEX_FILE = "approximate_index.faiss"  # faiss.write_index
APPROXIMATE_IDS_FILE = "approximate_index_ids.json"  # the corpus ids, index order
SEARCH_K = "k"  # optional scalar int32 input of an approximate ``search``
