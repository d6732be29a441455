"""``mmtf predict --manifest M.csv --saved-model DIR --runner beam``: batch prediction on Beam.

Beam's RunInference with its TensorFlow model handler batches the manifest's
rows and shares one loaded model per worker process; the handler here only
swaps what it loads and calls: the export runs through the same in-process
path as ``mmtf predict --saved-model`` (``serving.local.LocalModel``, the
SavedModel's ``serving_default`` on raw bytes), so the predictions CSV is the
same, row for row (its rows come in the order the workers finish them).
A row whose input is bad gets its error in the ``error`` column, as in the
in-process path; the other rows of its batch are still predicted.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from pathlib import Path

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor
from apache_beam.options.pipeline_options import PipelineOptions

from multimodal_tf.cli import serving as serving_cli
from multimodal_tf.data.beam_convert import local_options
from multimodal_tf.serving.local import LocalModel


class SavedModelHandler(TFModelHandlerTensor):
    """Beam's TensorFlow handler for a multimodal export: manifest rows in, output dicts out.

    Args:
        saved_model: a version folder or a model folder (highest version).
        batch_size: most rows per signature call (RunInference's batches).
        signature_name: the export's signature to run.
    """

    def __init__(self, saved_model: str, batch_size: int = 32, signature_name: str = "serving_default"):
        super().__init__(
            saved_model,
            inference_fn=self._predict,
            min_batch_size=1,
            max_batch_size=batch_size,
        )
        self.batch_size, self.signature_name = batch_size, signature_name

    def load_model(self) -> LocalModel:
        # Beam's own loader is tf.keras.models.load_model, which cannot read a
        # tf.Module export with raw-bytes signatures.
        return LocalModel(self._model_uri, max_batch=self.batch_size)

    def _predict(self, model, batch, inference_args, model_id=None):
        options = argparse.Namespace(version=None, version_label=None, signature_name=self.signature_name)
        results = serving_cli._predict_rows(model, list(batch), options)
        return [PredictionResult(row, result, model_id) for row, result in zip(batch, results, strict=True)]

    def get_num_bytes(self, batch) -> int:
        return sum(len(row["id"]) + len(row["text"] or b"") for row in batch)


def _csv_line(result: PredictionResult, has_label: bool, width: int) -> str:
    buffer = io.StringIO()  # csv's own line ends, as the in-process path writes them
    csv.writer(buffer).writerow(
        serving_cli.prediction_line(result.example, result.inference, has_label, width)
    )
    return buffer.getvalue()


def predict_with_beam(
    saved_model: str | Path,
    manifest: str | Path,
    output: str | Path,
    config_args=None,
    batch_size: int = 32,
    beam_options: Sequence[str] = (),
) -> int:
    """Writes the predictions CSV of every manifest row; returns the number of failed rows.

    Args:
        config_args: parsed ``--config``/``--set`` (``data.columns`` for the manifest).
        beam_options: Beam pipeline options; without ``--runner``, local ones.
    """
    rows = serving_cli.read_prediction_manifest(manifest, config_args)
    # The header needs the class names and the output width: ask the model once here.
    model = LocalModel(saved_model, max_batch=batch_size)
    names = serving_cli.class_names(model)
    width = len(names) if names else len(model.predict(texts=["x"])["probabilities"][0])
    has_label = any(r["label"] not in (None, "") for r in rows)
    header = io.StringIO()
    csv.writer(header).writerow(serving_cli.prediction_header(has_label, names, width))
    options = list(beam_options)
    if not any(option.startswith("--runner") for option in options):
        options += local_options()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    failures = []
    with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
        results = (
            pipeline
            | "Rows" >> beam.Create(rows)
            | "Predict" >> RunInference(SavedModelHandler(str(saved_model), batch_size))
        )
        _ = (
            results
            | "ToCSV" >> beam.Map(_csv_line, has_label, width)
            | "Write"
            >> beam.io.WriteToText(
                str(output), shard_name_template="", header=header.getvalue(), append_trailing_newlines=False
            )
        )
    with open(output, newline="", encoding="utf-8") as f:
        failures = [row for row in csv.DictReader(f) if row["error"]]
    return len(failures)
