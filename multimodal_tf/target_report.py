"""The report sections of extra targets (``data.targets``) in ``mmtf evaluate``.

Multi-label: micro/macro F1, mAP and per-label ROC-AUC next to a per-label
frequency baseline; regression: MAE/RMSE next to predicting the train mean.
What targets are and how they are trained is targets.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from multimodal_tf.config import MULTILABEL
from multimodal_tf.targets import extras

# Multi-label predictions count as positive at this probability (F1).
THRESHOLD = 0.5


def multilabel_metrics(probabilities: np.ndarray, values: np.ndarray, label_names: Sequence[str]) -> dict:
    """Micro/macro F1 (at THRESHOLD), mAP (macro average precision) and per-label ROC-AUC.

    Arrays hold only examples with a label. A label with no positive (or no
    negative) example has no AP/AUC (None) and is left out of the averages.
    """
    from sklearn import metrics as skm  # noqa: PLC0415  (sklearn is heavy; report time only)

    truth = values.astype(int)
    predicted = (probabilities >= THRESHOLD).astype(int)
    per_label = {}
    precisions = []
    for j, name in enumerate(label_names):
        positives = int(truth[:, j].sum())
        defined = 0 < positives < len(truth)
        ap = float(skm.average_precision_score(truth[:, j], probabilities[:, j])) if defined else None
        auc = float(skm.roc_auc_score(truth[:, j], probabilities[:, j])) if defined else None
        if ap is not None:
            precisions.append(ap)
        per_label[name] = {"support": positives, "average_precision": ap, "roc_auc": auc}
    aucs = [v["roc_auc"] for v in per_label.values() if v["roc_auc"] is not None]
    return {
        "examples": int(len(truth)),
        "micro_f1": float(skm.f1_score(truth, predicted, average="micro", zero_division=0)),
        "macro_f1": float(skm.f1_score(truth, predicted, average="macro", zero_division=0)),
        "map": float(np.mean(precisions)) if precisions else None,
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "per_label": per_label,
    }


def frequency_baseline(train_frequency: np.ndarray, values: np.ndarray, label_names: Sequence[str]) -> dict:
    """The multilabel metrics of predicting each label's train frequency for every example.

    Every example gets the same scores, so each label's AP is its positive
    rate in ``values``: the chance level of mAP.
    """
    scores = np.broadcast_to(train_frequency[None, :], values.shape).astype(np.float64)
    return multilabel_metrics(scores, values, label_names)


def regression_metrics(predictions: np.ndarray, values: np.ndarray) -> dict:
    """MAE and RMSE (examples with a value only), and those of predicting the mean."""
    errors = predictions.reshape(-1) - values.reshape(-1)
    return {
        "examples": int(len(errors)),
        "mae": float(np.mean(np.abs(errors))) if len(errors) else None,
        "rmse": float(np.sqrt(np.mean(errors**2))) if len(errors) else None,
    }


def predict_targets(model, dataset) -> tuple[dict, dict]:
    """(outputs, packed labels) per extra target over a ``with_targets`` dataset, as NumPy."""
    outputs: dict[str, list] = {}
    labels: dict[str, list] = {}
    for x, y in dataset:
        predicted = model(x, training=False)
        for name, value in y.items():
            outputs.setdefault(name, []).append(predicted[name].numpy())
            labels.setdefault(name, []).append(value.numpy())
    return (
        {k: np.concatenate(v) for k, v in outputs.items()},
        {k: np.concatenate(v) for k, v in labels.items()},
    )


def report_sections(data, metadata, outputs: Mapping, labels: Mapping) -> dict:
    """Report section per extra target: its metrics on the examples that have a label."""
    sections = {}
    for target in extras(data):
        info = metadata.targets[target.name]
        packed = labels[target.name]
        present = packed[:, -1] > 0
        values, predicted = packed[present, :-1], outputs[target.name][present]
        section = {"type": target.type, "column": target.column, "missing": int((~present).sum())}
        if target.type == MULTILABEL:
            names = info["label_names"]
            section["metrics"] = multilabel_metrics(predicted, values, names)
            train = info["counts"].get("train", {})
            frequency = np.array([train.get("labels", {}).get(n, 0) for n in names], np.float64)
            frequency /= max(train.get("present", 0), 1)
            section["baseline"] = frequency_baseline(frequency, values, names)
        else:
            section["metrics"] = regression_metrics(predicted, values)
            section["baseline"] = regression_metrics(np.full(len(values), train_mean(info)), values)
        sections[target.name] = section
    return sections


def train_mean(info: Mapping) -> float:
    """The regression target's mean on the train split (0 when unknown)."""
    return float(info.get("train_mean", 0.0))


def to_markdown(sections: Mapping) -> list[str]:
    """Report lines: one section per extra target with its metrics next to the baseline's."""

    def number(value):
        return "n/a" if value is None else f"{value:.4f}"

    lines = []
    for name, section in sections.items():
        m, b = section["metrics"], section["baseline"]
        lines += [
            "",
            f"## Target `{name}` ({section['type']}, column `{section['column']}`)",
            "",
            f"{m['examples']} examples with a label, {section['missing']} without (left out).",
            "",
        ]
        if section["type"] == MULTILABEL:
            lines += ["| metric | model | label-frequency baseline |", "|---|---|---|"]
            for key, title in (
                ("map", "mAP"),
                ("micro_f1", "micro-F1"),
                ("macro_f1", "macro-F1"),
                ("macro_roc_auc", "ROC-AUC (macro)"),
            ):
                lines.append(f"| {title} | {number(m[key])} | {number(b[key])} |")
            lines += ["", "| label | support | AP | ROC-AUC |", "|---|---|---|---|"]
            for label, v in m["per_label"].items():
                ap, auc = number(v["average_precision"]), number(v["roc_auc"])
                lines.append(f"| {label} | {v['support']} | {ap} | {auc} |")
        else:
            lines += ["| metric | model | train-mean baseline |", "|---|---|---|"]
            lines += [f"| {k.upper()} | {number(m[k])} | {number(b[k])} |" for k in ("mae", "rmse")]
    return lines
