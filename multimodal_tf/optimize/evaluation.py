"""``mmtf evaluate RUN --artifact FILE``: a TFLite, ONNX or SavedModel artifact scored like the run.

The artifact gets the features ``mmtf evaluate`` gives the Keras model (the
same tf.data preprocessing of the same split), and the report has the same
fields as evaluate's report.json (plus ``artifact``), so accuracies compare
on equal terms.
"""

from __future__ import annotations

import json
from pathlib import Path

from multimodal_tf.evaluation import _plots, classification_metrics, predict_split_with, to_markdown
from multimodal_tf.optimize.artifacts import load_runner
from multimodal_tf.run_dir import load_run


def predict_artifact_split(runner, config, metadata, split: str):
    """``evaluation.predict_split`` for an artifact runner, which takes NumPy feature dicts (TFLite, onnxruntime)."""
    return predict_split_with(
        lambda x: runner({name: value.numpy() for name, value in x.items()}), config, metadata, split
    )


def evaluate_artifact(run_dir: str | Path, artifact: str | Path, split: str = "test") -> dict:
    """Scores ``artifact`` on ``split``; writes report.json/.md and plots to ``eval_<artifact>_<split>/``.

    The folder sits next to the artifact, so the run's own report.json
    (the float model's) is not overwritten.
    """
    run_dir, artifact = Path(run_dir), Path(artifact)
    config, metadata = load_run(run_dir)
    if split not in metadata.shards:
        raise ValueError(f"split {split!r} not in the dataset; have {sorted(metadata.shards)}")
    runner = load_runner(artifact)
    probabilities, labels, _ = predict_artifact_split(runner, config, metadata, split)
    if artifact.name.isdigit():  # a SavedModel version: report beside its model folder, not inside
        name, folder = artifact.parent.name, artifact.parent.parent
    else:
        name, folder = artifact.name, artifact.parent
    out_dir = folder / f"eval_{name.replace('.', '_')}_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(probabilities, labels, metadata.label_names)
    report = {
        "run": str(run_dir),
        "artifact": str(artifact),
        "split": split,
        "modalities": list(config.model.modalities),
        "fusion": config.model.fusion.name,
        "metrics": metrics,
        "plots": {
            k: str(out_dir / v)
            for k, v in _plots(probabilities, labels, metadata.label_names, out_dir).items()
        },
        "comparison": [
            {
                "run": str(artifact),
                "modalities": list(config.model.modalities),
                "fusion": config.model.fusion.name,
                "accuracy": metrics["accuracy"],
                "macro_f1": metrics["macro_f1"],
            }
        ],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(to_markdown(report, metadata.label_names))
    report["report_dir"] = str(out_dir)
    return report
